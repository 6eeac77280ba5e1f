"""Wanda-sp (the structured Wanda baseline of An et al., FLAP): Wanda's score |W_ij| * ||X_j|| on the consumer,
summed over each unit's input columns."""
from __future__ import annotations

from .base import StructuredMethod, unit_sum


class WandaSP(StructuredMethod):
    name = "wanda-sp"

    def importance(self, kind, layer, stats):
        weight = layer.get_submodule(kind.consumer).weight.detach().float()
        return unit_sum((weight.abs() * stats.col_norms[None, :]).sum(dim=0), kind)
