"""Magnitude pruning: score |W|, compared per output row (or per N:M group)."""
from __future__ import annotations

from .base import PruneMethod
from .masks import select_prune_mask


class Magnitude(PruneMethod):
    name = "magnitude"
    needs_stats = False

    def prune(self, weight, stats, target):
        w = weight.detach().float()
        mask = select_prune_mask(w.abs(), target)
        return w.masked_fill(mask, 0.0), mask
