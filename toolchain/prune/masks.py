"""Sparsity targets and the mask rules shared by every pruning method.

Conventions, used everywhere in toolchain:
- a weight is [out, in]; N:M groups run along the input (reduction) dimension, M consecutive columns;
- "N:M" keeps N of every M weights (NVIDIA's 2:4 = 2 kept of 4), so the sparsity is 1 - N/M;
- a `prune_mask` is a bool tensor shaped like the weight, True where the weight is pruned (zero);
- unstructured sparsity is exact per output row: every row prunes round(sparsity * in) weights.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..numerics.nm import is_nm


@dataclass(frozen=True)
class SparsityTarget:
    sparsity: float
    n: int | None = None  # kept per group (N:M only)
    m: int | None = None  # group size (N:M only)

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:g}"

    @classmethod
    def parse(cls, text: str | float) -> "SparsityTarget":
        s = str(text).strip()
        nm = re.fullmatch(r"(\d+):(\d+)", s)
        if nm:
            n, m = int(nm.group(1)), int(nm.group(2))
            if m < 2 or not 1 <= n < m:
                raise ConfigError(f"--sparsity {s}: N:M needs 1 <= N < M (N kept of every M), got N={n}, M={m}")
            return cls(sparsity=1 - n / m, n=n, m=m)
        try:
            value = float(s)
        except ValueError:
            raise ConfigError(f"--sparsity {s!r}: expected a fraction in (0, 1) such as 0.5, or N:M such as 2:4") from None
        return cls.unstructured(value)

    @classmethod
    def unstructured(cls, value: float) -> "SparsityTarget":
        if not 0.0 < value < 1.0:
            raise ConfigError(f"sparsity must be in (0, 1), got {value}")
        return cls(sparsity=float(value))

    def prune_per_row(self, cols: int) -> int:
        return int(round(self.sparsity * cols))

    def check_weight(self, name: str, weight: torch.Tensor) -> None:
        if weight.dim() != 2:
            raise ConfigError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
        if self.is_nm and weight.shape[1] % self.m:
            raise ConfigError(f"{name}: input dimension {weight.shape[1]} is not divisible by M={self.m} "
                              f"for {self.label} sparsity")


def row_prune_mask(score: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Prune the k lowest-scoring weights of every row (k an int, or a per-row LongTensor). Ties: lower column."""
    order = torch.argsort(score, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(score.shape[1], device=score.device).expand_as(order))
    k = torch.as_tensor(k, device=score.device)
    return ranks < (k[:, None] if k.dim() else k)


def nm_prune_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of m consecutive input columns of every row, prune the m - n lowest scores."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    order = torch.argsort(groups, dim=2, stable=True)[..., : m - n]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, order, True)
    return mask.reshape(rows, cols)


def select_prune_mask(score: torch.Tensor, target: SparsityTarget) -> torch.Tensor:
    if target.is_nm:
        return nm_prune_mask(score, target.n, target.m)
    return row_prune_mask(score, target.prune_per_row(score.shape[1]))


def check_nm(prune_mask: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m input columns keeps exactly n weights."""
    return is_nm(~prune_mask, n, m, exact=True)
