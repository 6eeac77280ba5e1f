"""The per-layer interface every pruning method implements."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from .masks import SparsityTarget
from ..input_stats import InputStats


class PruneMethod(ABC):
    """One method = one small class. The engine gathers `InputStats` for each linear, then calls `prune`."""

    name: str = ""
    needs_stats: bool = True      # needs a forward pass over calibration data at all
    needs_hessian: bool = False   # needs X X^T (not only column norms)

    @abstractmethod
    def prune(self, weight: torch.Tensor, stats: InputStats | None, target: SparsityTarget
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (new float32 weight with pruned entries exactly zero, prune_mask)."""
