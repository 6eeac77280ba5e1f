"""GPTQ (Frantar et al., 2022) as in the reference `gptq.py`, respecting a pruning mask.

H = 2XX^T/n from the layer engine, dead inputs zeroed, damping `percdamp` * mean(diag H) (retried with
more when Cholesky fails), U = upper Cholesky factor of H^-1, 128-column blocks with lazy updates.
By default (act-order, as llm-compressor does) the columns are swept by decreasing diag(H) and each group's
parameters are fitted on the original weights before the loop (static groups), so that codes, scales and
groups stay in natural column order for export. With act_order=False the sweep runs in natural order and a
group's parameters are fitted at its first column on the already-updated weights (dynamic groups, the
reference's default). Activation order is the better default out of the calibration domain: the columns that
matter most are rounded first, before error from the others has piled onto them. Pruned weights are quantized to exactly
zero and their error is propagated like any other column's, which keeps every mask and N:M pattern.

The Hessian may also be a stack [k, in, in]: the rows then form k equal consecutive blocks, block j with
its own H_j (APTQ's per-head attention Hessians). All blocks run through the same column loop at once;
with act-order they share one column order, by the summed diagonal.
"""
from __future__ import annotations

import torch

from ..numerics.hessian import inverse_hessian_cholesky, neutralise_dead_inputs, symmetric_permutation
from .quantizer import QuantizedWeight, QuantSpec, fit_params, quantize_codes


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec,
                  prune_mask: torch.Tensor | None = None, blocksize: int = 128, percdamp: float = 0.01,
                  act_order: bool = True, name: str = "layer") -> QuantizedWeight:
    rows, cols = weight.shape
    H = hessian.to(weight.device).float()        # the caller's statistics: read, never modified
    H = H[None] if H.dim() == 2 else H
    k = H.shape[0]
    if rows % k:
        raise ValueError(f"{name}: {rows} rows do not split into {k} Hessian blocks")
    W = weight.detach().float().reshape(k, rows // k, cols).clone()
    diagonal = H.diagonal(dim1=1, dim2=2)
    dead = diagonal == 0                                                  # [k, cols]
    W.masked_fill_(dead[:, None, :], 0.0)
    groups = spec.groups(cols)
    group_of = torch.empty(cols, dtype=torch.long)
    for gi, (a, b) in enumerate(groups):
        group_of[a:b] = gi
    W = W.reshape(rows, cols)
    scales = torch.empty(rows, len(groups), device=W.device)
    zeros = torch.empty(rows, len(groups), dtype=torch.int32, device=W.device)
    if act_order:  # static groups: parameters from the original weights, in natural column order
        for gi, (a, b) in enumerate(groups):
            scales[:, gi], zeros[:, gi] = fit_params(W[:, a:b], spec)
    mask = prune_mask if prune_mask is not None else torch.zeros_like(W, dtype=torch.bool)

    # the order of the neutralised diagonal (dead inputs count as 1, as neutralise_dead_inputs sets them)
    perm = (torch.argsort(diagonal.masked_fill(dead, 1.0).sum(0), descending=True) if act_order
            else torch.arange(cols, device=W.device))
    W, mask_p = W[:, perm], mask[:, perm]

    def private_hessian(j: int) -> torch.Tensor:
        """Block j in sweep order, dead inputs neutralised: one copy, which the inverse overwrites."""
        Hj = symmetric_permutation(H[j], perm) if act_order else H[j].clone()
        neutralise_dead_inputs(Hj)
        return Hj

    factors = [inverse_hessian_cholesky(private_hessian(j), percdamp, name, restore=lambda j=j: private_hessian(j))
               for j in range(k)]
    # [k, cols, cols], row-major as the sweep reads its rows (the factors come column-major from LAPACK)
    U = factors[0].contiguous()[None] if k == 1 else torch.stack(factors)
    del factors, H
    r = rows // k
    codes = torch.empty(rows, cols, dtype=torch.int32, device=W.device)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = W[:, i1:i2].reshape(k, r, i2 - i1).clone(), U[:, i1:i2, i1:i2]   # row block j uses U[j]
        err = torch.zeros_like(W1)
        for c in range(i2 - i1):
            col = int(perm[i1 + c])
            gi = int(group_of[col])
            if not act_order and col == groups[gi][0]:
                # Dynamic group: fit on this group's current weights (this block's columns carry the
                # in-block updates; later blocks' columns carry the lazy updates made so far).
                a, b = groups[gi]
                current = torch.cat([W1[:, :, c:c + min(b, i2) - a].reshape(rows, -1),
                                     W[:, i2:i2 + max(0, b - i2)]], dim=1)
                scales[:, gi], zeros[:, gi] = fit_params(current, spec)
            w = W1[:, :, c].reshape(rows)
            q = quantize_codes(w[:, None], scales[:, gi], zeros[:, gi], spec)[:, 0]
            q = torch.where(mask_p[:, i1 + c], zeros[:, gi], q)
            codes[:, i1 + c] = q
            deq = scales[:, gi] * (q - zeros[:, gi]).float()
            e = (w - deq).reshape(k, r) / U1[:, c, c][:, None]
            W1[:, :, c:] -= e[:, :, None] * U1[:, c, c:][:, None, :]
            err[:, :, c] = e
        W[:, i2:] -= torch.bmm(err, U[:, i1:i2, i2:]).reshape(rows, -1)

    inverse = torch.argsort(perm)
    return QuantizedWeight(codes[:, inverse].contiguous(), scales, zeros, spec, prune_mask)


def gptq_quantize_many(weights: list[torch.Tensor], hessians: list[torch.Tensor], spec: QuantSpec,
                       prune_masks: list[torch.Tensor | None], **kwargs) -> list[QuantizedWeight]:
    """One GPTQ sweep for several linears of one width whose rows are independent given their Hessians:
    either all share one matrix (q/k/v or gate/up read the same input), or all are stacks whose blocks have
    the same number of rows (APTQ's per-head q/k/v). Same result as one call each, with one column loop."""
    shared = all(h is hessians[0] for h in hessians) and hessians[0].dim() == 2
    if not shared and not all(h.dim() == 3 for h in hessians):
        raise ValueError("gptq_quantize_many: Hessians must be one shared matrix or stacks")
    if not shared and len({w.shape[0] // h.shape[0] for w, h in zip(weights, hessians)}) != 1:
        raise ValueError("gptq_quantize_many: stacked Hessians need the same rows per block")
    hessian = hessians[0] if shared else torch.cat(list(hessians), dim=0)
    masks = [m if m is not None else torch.zeros_like(w, dtype=torch.bool) for w, m in zip(weights, prune_masks)]
    any_mask = any(m is not None for m in prune_masks)
    if len(weights) == 1:   # no concatenated copy (the down projection alone is 0.23 GB on an 8B model)
        return [gptq_quantize(weights[0], hessian, spec, prune_masks[0], **kwargs)]
    joint = gptq_quantize(torch.cat(list(weights), dim=0), hessian, spec,
                          torch.cat(masks, dim=0) if any_mask else None, **kwargs)
    out, start = [], 0
    for w, m in zip(weights, prune_masks):
        rows = slice(start, start + w.shape[0])
        out.append(QuantizedWeight(joint.codes[rows].contiguous(), joint.scales[rows].contiguous(),
                                   joint.zeros[rows].contiguous(), spec, m))
        start += w.shape[0]
    return out
