"""Pruning methods (one module each), masks, and per-layer sparsity allocation."""
from __future__ import annotations

from ..errors import ConfigError
from .barber import Barber, rebuild_mask
from .base import PruneMethod
from .magnitude import Magnitude
from .masks import SparsityTarget, check_nm, nm_prune_mask, row_prune_mask, select_prune_mask
from .sparsegpt import SparseGPT
from .wanda import Wanda

INIT_METHODS: dict[str, type[PruneMethod]] = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT}
METHODS = (*INIT_METHODS, "barber")


def make_method(name: str) -> PruneMethod:
    if name not in INIT_METHODS:
        raise ConfigError(f"unknown pruning method {name!r}; choose one of {', '.join(METHODS)}")
    return INIT_METHODS[name]()


__all__ = ["Barber", "Magnitude", "Wanda", "SparseGPT", "PruneMethod", "SparsityTarget", "INIT_METHODS", "METHODS",
           "make_method", "rebuild_mask", "check_nm", "nm_prune_mask", "row_prune_mask", "select_prune_mask"]
