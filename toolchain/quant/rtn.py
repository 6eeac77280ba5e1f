"""Round-to-nearest: every group quantized on its own min/max grid; pruned weights stay exactly zero."""
from __future__ import annotations

import torch

from .quantizer import QuantizedWeight, QuantSpec, fit_params, quantize_codes


def rtn_quantize(weight: torch.Tensor, spec: QuantSpec, prune_mask: torch.Tensor | None = None) -> QuantizedWeight:
    w = weight.detach().float()
    rows, cols = w.shape
    groups = spec.groups(cols)
    codes = torch.empty(rows, cols, dtype=torch.int32, device=w.device)
    scales = torch.empty(rows, len(groups), device=w.device)
    zeros = torch.empty(rows, len(groups), dtype=torch.int32, device=w.device)
    for gi, (a, b) in enumerate(groups):
        scales[:, gi], zeros[:, gi] = fit_params(w[:, a:b], spec)
        codes[:, a:b] = quantize_codes(w[:, a:b], scales[:, gi], zeros[:, gi], spec)
    if prune_mask is not None:
        codes = torch.where(prune_mask, zeros.repeat_interleave(
            torch.tensor([b - a for a, b in groups], device=w.device), dim=1), codes)
    return QuantizedWeight(codes, scales, zeros, spec, prune_mask)
