"""FLAP (An et al., 2024): fluctuation-based structured pruning with bias compensation, training-free.

A consumer input column j is scored by how much its removal would move the output around its mean:
fluctuation_j = Var_t(x_tj) * ||W_:,j||^2 (the paper's WIFV), summed over each unit's columns. What the removed
columns contributed on average, W_:,removed @ mean(x_removed), is added to the consumer's bias, so the output
keeps its mean. Global allocation standardises the scores per layer and sub-block (`budget.global_removal`).
"""
from __future__ import annotations

import torch

from .base import Removal, StructuredMethod, unit_sum


class Flap(StructuredMethod):
    name = "flap"
    compensates_bias = True

    def importance(self, kind, layer, stats):
        weight = layer.get_submodule(kind.consumer).weight.detach().float()
        return unit_sum(stats.variance * weight.square().sum(dim=0), kind)

    @torch.no_grad()
    def remove(self, kind, layer, stats, n) -> Removal:
        removal = super().remove(kind, layer, stats, n)
        consumer = layer.get_submodule(kind.consumer)
        cols = kind.rows(kind.consumer, removal.removed)
        weight = consumer.weight.detach().float()
        bias = consumer.bias.detach().float() if consumer.bias is not None else torch.zeros(weight.shape[0],
                                                                                            device=weight.device)
        removal.consumer_bias = bias + weight[:, cols] @ stats.mean[cols]
        return removal
