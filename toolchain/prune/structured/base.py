"""The per-sub-block interface every structured pruning method implements.

The units of a sub-block (KV groups, blocks of MLP channels) are described by the family adapter's `UnitKind`.
Removing units removes input columns of the sub-block's consumer linear (o_proj, down_proj, fc2), so a method
decides two things only: which units go, and what the consumer's kept columns (and bias) become.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from ...input_stats import InputStats
from ...models.base import UnitKind


@dataclass
class Removal:
    """What a method decided for one sub-block."""

    keep: torch.Tensor                  # kept unit indices, ascending
    removed: torch.Tensor               # removed unit indices, in the order they were chosen
    consumer_weight: torch.Tensor       # the consumer's new weight [out, kept columns]
    consumer_bias: torch.Tensor | None  # the consumer's new bias, or None to keep it as it is
    saliency: torch.Tensor              # per unit (dense index): the score it was ranked by when chosen or kept


def unit_sum(per_column: torch.Tensor, kind: UnitKind) -> torch.Tensor:
    """Sum a per-input-column score of the consumer over each unit's columns: [count]."""
    return per_column.reshape(kind.count, kind.consumer_cols).sum(dim=1)


def lowest_per_group(scores: torch.Tensor, kind: UnitKind, n: int) -> torch.Tensor:
    """The `n` lowest-scoring units; for a grouped kind the n / groups lowest of every group."""
    if kind.groups == 1:
        return torch.argsort(scores, stable=True)[:n]
    per_group = torch.argsort(scores.reshape(kind.groups, kind.per_group), dim=1, stable=True)[:, :n // kind.groups]
    offsets = torch.arange(kind.groups, device=scores.device)[:, None] * kind.per_group
    return (per_group + offsets).reshape(-1)


class StructuredMethod(ABC):
    """One method = one small class: `importance` ranks the units; `remove` takes the n least important."""

    name: str = ""
    needs_stats: bool = True        # reads the consumer's input statistics
    needs_hessian: bool = False     # ... including X^T X
    compensates_bias: bool = False  # writes the removed units' mean contribution into the consumer's bias
    needs_gradients: bool = False   # reads the dense model's loss gradients (`prepare`, before any layer shrinks)

    def prepare(self, model: nn.Module, layers: nn.ModuleList, calib: torch.Tensor, batch_size: int) -> None:
        """Whole-model work before the layer walk (the Taylor baseline's backward pass); most methods need none."""

    @abstractmethod
    def importance(self, kind: UnitKind, layer: nn.Module, stats: InputStats | None) -> torch.Tensor:
        """Per unit, how much the layer needs it: [count] float, higher = keep."""

    @torch.no_grad()
    def remove(self, kind: UnitKind, layer: nn.Module, stats: InputStats | None, n: int) -> Removal:
        """Remove the `n` least important units at once (n / groups from each group of a grouped kind); the
        consumer's kept columns are left as they were."""
        scores = self.importance(kind, layer, stats)
        removed = lowest_per_group(scores, kind, n)
        keep = torch.tensor(sorted(set(range(kind.count)) - set(removed.tolist())), dtype=torch.long,
                            device=scores.device)
        weight = layer.get_submodule(kind.consumer).weight.detach()
        return Removal(keep, removed, weight[:, kind.rows(kind.consumer, keep)].clone(), None, scores)
