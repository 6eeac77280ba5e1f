"""Exact per-row least-squares reconstruction of a linear layer's kept weights under a fixed mask.

For one output row with dense weights w, kept set K and pruned set P, the layer-wise error
(w - v)^T H (w - v) with v_P = 0 is smallest at

    v_K = w_K + H_KK^-1 H_KP w_P

(set the gradient on K to zero). SparseGPT's OBS sweep reaches an approximation of this (it fixes each column's
weights once the sweep passes it); this solves it to a set tolerance. H is damped and its dead inputs handled
as in SparseGPT, so both solve the same problem.
"""
from __future__ import annotations

import torch

from ..numerics.hessian import damped_hessian, masked_conjugate_gradient


def layer_error(weight: torch.Tensor, new: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per-row layer-wise error (w - v)^T H (w - v)."""
    d = weight.float() - new.float()
    return ((d @ hessian) * d).sum(1)


@torch.no_grad()
def lstsq_with_mask(weight: torch.Tensor, hessian: torch.Tensor, prune_mask: torch.Tensor,
                    start: torch.Tensor | None = None, percdamp: float = 0.01, max_iters: int = 30,
                    tol: float = 1e-4, info: dict | None = None) -> torch.Tensor:
    """Kept weights of every row of `weight` ([rows, in], dense values) re-solved under `prune_mask` (True =
    pruned), minimising each row's layer-wise error on the damped Hessian.

    Solved for all rows at once by `masked_conjugate_gradient`, started from `start` (e.g. SparseGPT's weights;
    the result is never worse than the start); the count of iterations used goes to `info["iterations"]`.
    From SparseGPT's weights a few tens of iterations reach nearly all of the error reduction that hundreds
    do, hence the cap of 30."""
    W = weight.detach().float().clone()
    H, dead = damped_hessian(hessian.to(W.device), percdamp)
    W[:, dead] = 0.0
    keep = (~(prune_mask | dead[None, :])).float()
    V, iterations = masked_conjugate_gradient(H, W, W if start is None else start.detach().float(), keep,
                                              max_iters, tol)
    if info is not None:
        info["iterations"] = iterations
    return V


def lstsq_rows(dense_rows: torch.Tensor, stats, prune_mask: torch.Tensor, start: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Barber's re-solve of the rows whose mask it changed (the `solver` of `Barber.rebuild_layer`): the exact
    least-squares weights under the new mask, from `start` (the init's weights, revived ones at dense value)."""
    return lstsq_with_mask(dense_rows, stats.hessian, prune_mask, start=start)


def resolve_layer(linears: dict[str, torch.nn.Linear], dense: dict[str, torch.Tensor], stats: dict,
                  masks: dict[str, torch.Tensor], percdamp: float = 0.01) -> dict:
    """Re-solve the kept weights of every linear of a pruned layer under its final mask, started from its
    current weights; returns each linear's layer-wise error (summed over rows) before and after."""
    report = {}
    for name, lin in linears.items():
        current = lin.weight.detach().float()
        H, _ = damped_hessian(stats[name].hessian, percdamp)
        before = float(layer_error(dense[name], current, H).sum())
        info: dict = {}
        new = lstsq_with_mask(dense[name], stats[name].hessian, masks[name], start=current, percdamp=percdamp,
                              info=info)
        after = float(layer_error(dense[name], new, H).sum())
        if after <= before:
            lin.weight.data.copy_(new)
        report[name] = {"error_before": before, "error_after": min(before, after), **info}
    return report
