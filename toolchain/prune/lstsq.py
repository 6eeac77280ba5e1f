"""Exact per-row least-squares reconstruction of a linear layer's kept weights under a fixed mask.

For one output row with dense weights w, kept set K and pruned set P, the layer-wise error
(w - v)^T H (w - v) with v_P = 0 is smallest at

    v_K = w_K + H_KK^-1 H_KP w_P

(set the gradient on K to zero). SparseGPT's OBS sweep reaches an approximation of this (it fixes each column's
weights once the sweep passes it); this solves it exactly, one small Cholesky system per row, batched. H is
damped and its dead inputs handled as in SparseGPT, so both solve the same problem.
"""
from __future__ import annotations

import torch

CHUNK_FLOATS = 1 << 24   # rows per batched solve are capped so the gathered H_KK blocks stay near 64 MiB


def damped_hessian(hessian: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """H + percdamp * mean(diag H) * I with dead inputs (zero diagonal) set to 1; returns (H, dead)."""
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    return H, dead


def lstsq_with_mask(weight: torch.Tensor, hessian: torch.Tensor, prune_mask: torch.Tensor,
                    percdamp: float = 0.01) -> torch.Tensor:
    """Kept weights of every row of `weight` ([rows, in], dense values) re-solved under `prune_mask` (True =
    pruned): the exact minimiser of the layer-wise error for each row. Rows may keep different counts."""
    W = weight.detach().float().clone()
    H, dead = damped_hessian(hessian.to(W.device), percdamp)
    W[:, dead] = 0.0
    pruned = prune_mask | dead[None, :]
    rows, cols = W.shape
    kept_counts = (~pruned).sum(1)
    k = int(kept_counts.max()) if rows else 0
    out = torch.zeros_like(W)
    if k == 0:
        return out
    # H_KP w_P for every row at once: (w * pruned) @ H, read at the kept columns.
    rhs_full = W.masked_fill(~pruned, 0.0) @ H
    # Kept columns first, in column order (stable sort on the pruned flag); rows keeping fewer than k get
    # padded slots that solve an identity system with a zero right-hand side.
    order = torch.argsort(pruned.to(torch.int8), dim=1, stable=True)[:, :k]
    valid = torch.arange(k, device=W.device)[None, :] < kept_counts[:, None]
    step = max(1, CHUNK_FLOATS // (k * k))
    eye = torch.eye(k, dtype=W.dtype, device=W.device)
    for r0 in range(0, rows, step):
        idx, ok = order[r0:r0 + step], valid[r0:r0 + step]
        both = ok[:, :, None] & ok[:, None, :]
        H_kk = torch.where(both, H[idx[:, :, None], idx[:, None, :]], eye)
        rhs = torch.gather(rhs_full[r0:r0 + step], 1, idx).masked_fill(~ok, 0.0)
        L, info = torch.linalg.cholesky_ex(H_kk)
        if bool((info != 0).any()):   # damping keeps H_KK positive definite; fall back to a general solve
            delta = torch.linalg.solve(H_kk, rhs)
        else:
            delta = torch.cholesky_solve(rhs[..., None], L)[..., 0]
        kept_w = torch.gather(W[r0:r0 + step], 1, idx) + delta
        out[r0:r0 + step].scatter_(1, idx, kept_w.masked_fill(~ok, 0.0))
    return out.masked_fill_(pruned, 0.0)
