"""N:M sparsity: every group of M consecutive input columns of a [rows, cols] weight keeps at most N weights
(exactly N in a mask a pruner made), and each kept weight's position in its group takes `index_bits(M)` bits.

This is the one place that says what a valid N:M pattern and a valid N:M mask are. The mask functions take
numpy arrays and torch tensors alike, so the pruner, the exporters and the GPU bundle all ask the same
question the same way; each caller words its own error."""
from __future__ import annotations

import math

import numpy as np

MAX_M = 256   # an in-group position must fit the one byte the blob's slot arrays give it


def is_pattern(n, m) -> bool:
    """True when (n, m) is a storable N:M pattern: integers with 1 <= N < M <= MAX_M."""
    integers = all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in (n, m))
    return integers and bool(1 <= n < m <= MAX_M)


def index_bits(m: int) -> int:
    """Bits of a kept weight's position within its group of M: ceil(log2 M), and at least 1."""
    return max(1, math.ceil(math.log2(m)))


def fits_groups(cols: int, m: int) -> bool:
    """True when `cols` input columns split into whole groups of M."""
    return cols % m == 0


def kept_per_group(keep, m: int):
    """How many weights each group keeps: a [rows, cols] keep mask (True = kept; numpy or torch) ->
    [rows, cols / M] counts."""
    rows, cols = keep.shape
    if not fits_groups(cols, m):
        raise ValueError(f"N:M groups of M={m} need a column count that is a multiple of {m}, got {cols}")
    return keep.reshape(rows, cols // m, m).sum(-1)


def groups_breaking(counts, n: int, exact: bool = False) -> int:
    """How many groups break N:M, from each group's kept count: those keeping more than N, or with `exact`
    those keeping any other number than N."""
    bad = counts != n if exact else counts > n
    return int(bad.sum())


def is_nm(keep, n: int, m: int, exact: bool = False) -> bool:
    """True when every group of M columns of a keep mask keeps at most N weights (exactly N with `exact`)."""
    return groups_breaking(kept_per_group(keep, m), n, exact) == 0
