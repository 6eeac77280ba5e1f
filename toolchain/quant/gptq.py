"""GPTQ (Frantar et al., 2022) as in the reference `gptq.py`, respecting a pruning mask.

H = 2XX^T/n from the layer engine, dead inputs zeroed, damping `percdamp` * mean(diag H) (retried with
more when Cholesky fails), U = upper Cholesky factor of H^-1, 128-column blocks with lazy updates.
Group parameters are fitted at the first column of each group on the already-updated weights (dynamic
groups), or, with act-order, on the original weights before the loop (static groups), so that codes,
scales and groups stay in natural column order for export. Pruned weights are quantized to exactly
zero and their error is propagated like any other column's, which keeps every mask and N:M pattern.
"""
from __future__ import annotations

import torch

from ..prune.sparsegpt import inverse_hessian_cholesky
from .quantizer import QuantizedWeight, QuantSpec, fit_params, quantize_codes


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec,
                  prune_mask: torch.Tensor | None = None, blocksize: int = 128, percdamp: float = 0.01,
                  act_order: bool = False, name: str = "layer") -> QuantizedWeight:
    W = weight.detach().float().clone()
    rows, cols = W.shape
    H = hessian.to(W.device).float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    groups = spec.groups(cols)
    group_of = torch.empty(cols, dtype=torch.long)
    for gi, (a, b) in enumerate(groups):
        group_of[a:b] = gi
    scales = torch.empty(rows, len(groups), device=W.device)
    zeros = torch.empty(rows, len(groups), dtype=torch.int32, device=W.device)
    if act_order:  # static groups: parameters from the original weights, in natural column order
        for gi, (a, b) in enumerate(groups):
            scales[:, gi], zeros[:, gi] = fit_params(W[:, a:b], spec)
    mask = prune_mask if prune_mask is not None else torch.zeros_like(W, dtype=torch.bool)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    W, H, mask_p = W[:, perm], H[perm][:, perm], mask[:, perm]
    U = inverse_hessian_cholesky(H, percdamp, name)
    del H
    codes = torch.empty(rows, cols, dtype=torch.int32, device=W.device)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        err = torch.zeros_like(W1)
        for c in range(i2 - i1):
            col = int(perm[i1 + c])
            gi = int(group_of[col])
            if not act_order and col == groups[gi][0]:
                # Dynamic group: fit on this group's current weights (this block's columns carry the
                # in-block updates; later blocks' columns carry the lazy updates made so far).
                a, b = groups[gi]
                current = torch.cat([W1[:, c:c + min(b, i2) - a], W[:, i2:i2 + max(0, b - i2)]], dim=1)
                scales[:, gi], zeros[:, gi] = fit_params(current, spec)
            w = W1[:, c]
            q = quantize_codes(w[:, None], scales[:, gi], zeros[:, gi], spec)[:, 0]
            q = torch.where(mask_p[:, i1 + c], zeros[:, gi], q)
            codes[:, i1 + c] = q
            deq = scales[:, gi] * (q - zeros[:, gi]).float()
            e = (w - deq) / U1[c, c]
            W1[:, c:] -= e[:, None] * U1[c, c:][None, :]
            err[:, c] = e
        W[:, i2:] -= err @ U[i1:i2, i2:]

    inverse = torch.argsort(perm)
    return QuantizedWeight(codes[:, inverse].contiguous(), scales, zeros, spec, prune_mask)
