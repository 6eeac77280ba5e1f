"""Which linear weights carry 2:4 along K (the reduction dimension), the only layout TensorRT's and
cuSPARSELt's sparse kernels use."""
from __future__ import annotations

import numpy as np
import torch

from ..numerics.nm import fits_groups, groups_breaking, kept_per_group


def two_four_status(weight: torch.Tensor) -> dict:
    """{"two_four": bool, "reason": str | None} for a [N, K] weight: 2:4 when every aligned group of 4
    consecutive K values holds at most 2 non-zeros."""
    k = weight.shape[1]
    if not fits_groups(k, 4):
        return {"two_four": False, "reason": f"K = {k} is not a multiple of 4"}
    groups = kept_per_group(weight.detach() != 0, 4)
    dense_groups = groups_breaking(groups, 2)
    if dense_groups:
        return {"two_four": False, "reason": f"{dense_groups} of {groups.numel()} groups of 4 along K keep more than 2"}
    return {"two_four": True, "reason": None}


def gemm_flops_fraction(layers: list[dict]) -> float:
    """Fraction of the per-token GEMM work (sum of N*K) in 2:4 layers."""
    total = sum(layer["shape"][0] * layer["shape"][1] for layer in layers)
    sparse = sum(layer["shape"][0] * layer["shape"][1] for layer in layers if layer["two_four"])
    return float(np.round(sparse / total, 6)) if total else 0.0
