"""Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2, compared per output row; no weight update."""
from __future__ import annotations

from .base import PruneMethod
from .masks import select_prune_mask


class Wanda(PruneMethod):
    name = "wanda"

    def prune(self, weight, stats, target):
        w = weight.detach().float()
        score = w.abs() * stats.col_norms.to(w.device)[None, :]
        mask = select_prune_mask(score, target)
        return w.masked_fill(mask, 0.0), mask
