"""Ours: OBS-style structured removal, then an exact least-squares refit of the consumer.

Removing a set S of the consumer's input columns (a unit's columns) and letting the other columns absorb the
loss as well as they can raises the layer's squared output error, per calibration token, by

    saliency(S) = 1/2 * sum over output rows of  w_S [H^-1]_SS^-1 w_S^T,      H = 2 X^T X / n (+ damping)

(the group form of Optimal Brain Surgeon, as in ZipLM). The units are removed a few at a time: after each round
the removed columns' weights are carried onto the kept ones (W -= W_S [H^-1]_SS^-1 [H^-1]_S:) and H^-1 becomes
the inverse over the kept columns (its Schur complement), so every saliency is measured against the already
reduced layer. Once the set is final, the consumer is solved exactly on the kept columns K from the dense
weights:  W_K = W H_:K (H_KK)^-1  (damped H), the least-squares fit of the dense output on the calibration
inputs the already-pruned model gives this layer.
"""
from __future__ import annotations

import math

import torch

from ...numerics.hessian import damped_hessian
from .base import Removal, StructuredMethod


def _unit_cols(kind, units: torch.Tensor) -> torch.Tensor:
    """[len(units), consumer_cols] column indices of each unit."""
    return kind.rows(kind.consumer, units).reshape(len(units), kind.consumer_cols)


def obs_saliency(weight: torch.Tensor, h_inv: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Per unit (a row of `cols`), the output error that removing it adds after the optimal update of the rest."""
    block = h_inv[cols[:, :, None], cols[:, None, :]]                  # [units, b, b]
    w = weight[:, cols].permute(1, 0, 2)                               # [units, out, b]
    return 0.5 * (torch.linalg.solve(block, w.transpose(1, 2)).transpose(1, 2) * w).sum(dim=(1, 2))


def least_squares_refit(weight: torch.Tensor, hessian: torch.Tensor, keep_cols: torch.Tensor) -> torch.Tensor:
    """W_K = W H_:K (H_KK)^-1: the kept columns that best reproduce W x on the inputs H was gathered from."""
    h_kk = hessian[keep_cols][:, keep_cols]
    rhs = (weight @ hessian[:, keep_cols]).T                           # [K, out]
    return torch.cholesky_solve(rhs, torch.linalg.cholesky(h_kk)).T


class ObsRefit(StructuredMethod):
    name = "obs-refit"
    needs_hessian = True
    #: the refit is a least-squares fit to the calibration text's inputs; a tenth of the mean diagonal keeps it
    #: from fitting that text's directions alone (chosen on out-of-domain perplexity, docs/results.md)
    percdamp = 0.1
    #: removal rounds per sub-block at most; the saliencies are recomputed after each round
    rounds = 16

    def _prepare(self, kind, layer, stats):
        weight = layer.get_submodule(kind.consumer).weight.detach().double()
        hessian, dead = damped_hessian(stats.hessian, self.percdamp)
        hessian = hessian.double()
        weight[:, dead] = 0   # a dead input never reaches the output on the calibration data
        return weight, hessian, torch.cholesky_inverse(torch.linalg.cholesky(hessian))

    @torch.no_grad()
    def importance(self, kind, layer, stats):
        weight, _, h_inv = self._prepare(kind, layer, stats)
        units = torch.arange(kind.count, device=weight.device)
        return obs_saliency(weight, h_inv, _unit_cols(kind, units)).float()

    @torch.no_grad()
    def remove(self, kind, layer, stats, n) -> Removal:
        dense, hessian, h_inv = self._prepare(kind, layer, stats)
        weight = dense.clone()
        alive = torch.arange(kind.count, device=weight.device)
        saliency = torch.zeros(kind.count, dtype=torch.float64, device=weight.device)
        removed: list[torch.Tensor] = []
        # a grouped kind (query heads) loses one unit from every group per round, so the groups stay equal
        per_round = kind.groups if kind.groups > 1 else max(1, math.ceil(n / self.rounds))
        while sum(len(r) for r in removed) < n:
            scores = obs_saliency(weight, h_inv, _unit_cols(kind, alive))
            saliency[alive] = scores
            if kind.groups > 1:
                group = alive // kind.per_group
                pick = torch.stack([torch.where(group == g, scores, torch.inf).argmin() for g in range(kind.groups)])
            else:
                pick = torch.topk(scores, min(per_round, n - sum(len(r) for r in removed)), largest=False).indices
            units = alive[pick]
            cols = kind.rows(kind.consumer, units)
            inv_block = torch.linalg.inv(h_inv[cols][:, cols])
            weight -= (weight[:, cols] @ inv_block) @ h_inv[cols, :]
            h_inv -= h_inv[:, cols] @ inv_block @ h_inv[cols, :]
            removed.append(units)
            alive = alive[~torch.isin(alive, units)]
        keep = alive.sort().values
        refit = least_squares_refit(dense, hessian, kind.rows(kind.consumer, keep))
        dtype = layer.get_submodule(kind.consumer).weight.dtype
        return Removal(keep, torch.cat(removed), refit.to(dtype), None, saliency.float())
