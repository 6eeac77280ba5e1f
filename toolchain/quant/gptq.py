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

    # the order of the neutralised diagonal (dead inputs count as 1, as neutralise_dead_inputs sets them)
    perm = (torch.argsort(diagonal.masked_fill(dead, 1.0).sum(0), descending=True) if act_order
            else torch.arange(cols, device=W.device))
    # The sweep runs on the transpose, [cols, rows] in sweep order: a column is then one contiguous row, and
    # each column's reads and writes (weights, codes, mask, error) are contiguous where [rows, cols] strides.
    Wt = W.T[perm].contiguous()
    mask_t = prune_mask.T[perm].contiguous() if prune_mask is not None else None
    scales_t, zeros_t = scales.T.contiguous(), zeros.T.contiguous()       # [groups, rows]
    del W

    def private_hessian(j: int) -> torch.Tensor:
        """Block j in sweep order, dead inputs neutralised: one copy, which the inverse overwrites."""
        Hj = symmetric_permutation(H[j], perm) if act_order else H[j].clone()
        neutralise_dead_inputs(Hj)
        return Hj

    factors = [inverse_hessian_cholesky(private_hessian(j), percdamp, name, restore=lambda j=j: private_hessian(j))
               for j in range(k)]
    damps = torch.stack([torch.as_tensor(damp, dtype=torch.float32) for _, damp in factors]).to(Wt.device)
    # [k, cols, cols], row-major as the sweep reads its rows
    U = factors[0][0].contiguous()[None] if k == 1 else torch.stack([upper for upper, _ in factors])
    del factors, H
    r = rows // k
    damped_energy = _damped_row_energy(Wt, U)      # before the sweep changes Wt
    codes_t = torch.empty(cols, rows, dtype=torch.int32, device=Wt.device)
    swept_error = torch.zeros(rows, device=Wt.device)    # per row, the sum of the sweep's e^2

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = Wt[i1:i2].reshape(i2 - i1, k, r).clone(), U[:, i1:i2, i1:i2]   # row block j uses U[j]
        err = torch.empty_like(W1)
        for c in range(i2 - i1):
            col = int(perm[i1 + c])
            gi = int(group_of[col])
            if not act_order and col == groups[gi][0]:
                # Dynamic group: fit on this group's current weights (this block's columns carry the
                # in-block updates; later blocks' columns carry the lazy updates made so far).
                a, b = groups[gi]
                current = torch.cat([W1[c:c + min(b, i2) - a].reshape(-1, rows), Wt[i2:i2 + max(0, b - i2)]])
                scales_t[gi], zeros_t[gi] = fit_params(current.T, spec)
            w = W1[c].reshape(rows)
            q = quantize_codes(w[:, None], scales_t[gi], zeros_t[gi], spec)[:, 0]
            if mask_t is not None:
                q = torch.where(mask_t[i1 + c], zeros_t[gi], q)
            codes_t[i1 + c] = q
            deq = scales_t[gi] * (q - zeros_t[gi]).float()
            e = (w - deq).reshape(k, r) / U1[:, c, c][:, None]
            W1[c:] -= U1[:, c, c:].T[:, :, None] * e[None]
            err[c] = e
        swept_error += err.square().sum(0).reshape(rows)
        if i2 < cols:   # the lazy update of the later columns, in place
            if k == 1:
                Wt[i2:].addmm_(U[0, i1:i2, i2:].T, err.reshape(i2 - i1, rows), alpha=-1)
            else:
                Wt[i2:] -= torch.bmm(U[:, i1:i2, i2:].transpose(1, 2), err.transpose(0, 1)).transpose(0, 1
                                                                                                    ).reshape(-1, rows)
    del Wt, U

    inverse = torch.argsort(perm)
    codes = codes_t.T[:, inverse].contiguous()    # [rows, cols] in natural column order (already contiguous on CPU)
    del codes_t
    qw = QuantizedWeight(codes, scales_t.T.contiguous(), zeros_t.T.contiguous(), spec, prune_mask)
    W0 = weight.to(torch.float32).reshape(k, r, cols).masked_fill(dead[:, None, :], 0.0)   # the swept weights
    qw.row_error = _undamped(swept_error, damps, qw.dequantize().reshape(k, r, cols).sub_(W0))
    qw.row_energy = _undamped(damped_energy, damps, W0)
    return qw


def _damped_row_energy(Wt: torch.Tensor, U: torch.Tensor, rows_per_step: int = 2048) -> torch.Tensor:
    """Each row's w (H + damp I) w^T, from the factor: U^T U = (H + damp I)^-1 makes it |U^-T w^T|^2, one
    triangular solve (half the flops of a product with H). Wt: [cols, rows] in sweep order, U: [k, cols, cols]."""
    cols, rows = Wt.shape
    k = U.shape[0]
    r = rows // k
    energy = torch.empty(rows, device=Wt.device)
    for j in range(k):
        for a in range(j * r, (j + 1) * r, rows_per_step):
            b = min(a + rows_per_step, (j + 1) * r)
            energy[a:b] = torch.linalg.solve_triangular(U[j].T, Wt[:, a:b], upper=False).square().sum(0)
    return energy


def _undamped(damped: torch.Tensor, damps: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """d H d^T per row under the caller's H, from d (H + damp I) d^T ([rows]): less the damping's share
    damp * |d|^2, with d ([k, rows / k, cols], zero on each block's dead inputs) and damp ([k]) per Hessian block.

    The sweep's own errors give the damped error: it ends with W - Q = E U (E its scaled errors, U upper with
    U^T U = (H + damp I)^-1), so (W - Q)(H + damp I)(W - Q)^T = E E^T, a row's sum of e^2. Dead inputs add
    nothing to either: the sweep zeroed their weights (and quantized them to exactly 0), and the caller's H is
    zero there."""
    k = delta.shape[0]
    # the norm reduces without a squared [rows, in] copy (at an 8B model's gate/up projection, 0.47 GB)
    return (damped.reshape(k, -1) - torch.linalg.vector_norm(delta, dim=2).square() * damps[:, None]).reshape(-1)


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
                                   joint.zeros[rows].contiguous(), spec, m, joint.row_error[rows].clone(),
                                   joint.row_energy[rows].clone()))
        start += w.shape[0]
    return out
