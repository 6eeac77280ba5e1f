"""Magnitude: a unit's importance is the squared L2 norm of every weight it owns (the producers' rows and the
consumer's columns). Needs no calibration data."""
from __future__ import annotations

import torch

from .base import StructuredMethod, unit_sum


class MagnitudeSP(StructuredMethod):
    name = "magnitude"
    needs_stats = False

    def importance(self, kind, layer, stats):
        consumer = layer.get_submodule(kind.consumer).weight.detach().float()
        score = unit_sum(consumer.square().sum(dim=0), kind)
        for name, rows in kind.producers:
            weight = layer.get_submodule(name).weight.detach().float()
            score = score + weight.square().sum(dim=1).reshape(kind.count, rows).sum(dim=1)
        return score
