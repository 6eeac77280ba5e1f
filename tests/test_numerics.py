"""The shared numerics: N:M validity, the supported code widths and array geometry."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from toolchain.numerics.geometry import group_count, row_passes
from toolchain.numerics.nm import MAX_M, fits_groups, groups_breaking, index_bits, is_nm, is_pattern, kept_per_group
from toolchain.numerics.widths import SUPPORTED_BITS


def test_pattern_bounds():
    assert is_pattern(2, 4) and is_pattern(1, 2) and is_pattern(np.int64(255), MAX_M)
    for n, m in [(0, 4), (4, 4), (5, 4), (1, MAX_M + 1), (True, 4), (2.0, 4), ("2", 4)]:
        assert not is_pattern(n, m), (n, m)


def test_index_bits():
    assert [index_bits(m) for m in (1, 2, 3, 4, 5, 8, 9, 16, 256)] == [1, 1, 2, 2, 3, 3, 4, 4, 8]


@pytest.mark.parametrize("as_tensor", [False, True])
def test_nm_mask_checks_numpy_and_torch(as_tensor):
    keep = np.array([[1, 1, 0, 0, 1, 0, 0, 0],
                     [0, 1, 1, 1, 0, 1, 1, 0]], bool)
    if as_tensor:
        keep = torch.from_numpy(keep)
    counts = kept_per_group(keep, 4)
    assert np.asarray(counts).tolist() == [[2, 1], [3, 2]]
    assert groups_breaking(counts, 2) == 1                  # the group keeping 3
    assert groups_breaking(counts, 2, exact=True) == 2      # and the one keeping 1
    assert not is_nm(keep, 2, 4) and is_nm(keep, 3, 4) and not is_nm(keep, 3, 4, exact=True)
    assert is_nm(keep[:1], 2, 4) and not is_nm(keep[:1], 2, 4, exact=True)


def test_nm_mask_needs_whole_groups():
    assert fits_groups(8, 4) and not fits_groups(6, 4)
    with pytest.raises(ValueError, match="multiple of 4"):
        kept_per_group(np.ones((2, 6), bool), 4)


def test_widths_and_geometry():
    assert SUPPORTED_BITS == (2, 3, 4, 8)
    assert [row_passes(r, 8) for r in (1, 8, 9, 16, 17)] == [1, 1, 2, 2, 3]
    assert [group_count(c, g) for c, g in [(0, 64), (0, -1), (576, -1), (576, 128), (512, 128), (1, 64)]] == \
        [0, 0, 1, 5, 4, 1]
