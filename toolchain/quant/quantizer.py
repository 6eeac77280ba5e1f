"""Weight quantization grid: per group along the input dimension, symmetric (default) or asymmetric.

Codes are integers and the dequantized weight is exactly `scale * (code - zero)`:
- symmetric: signed codes in [-2^(b-1), 2^(b-1) - 1], zero = 0, scale = 2 * absmax / (2^b - 1) (the
  reference GPTQ grid: all 2^b levels are used, the positive extreme lands one level short);
- asymmetric: unsigned codes in [0, 2^b - 1], scale = (max - min) / (2^b - 1), zero = round(-min / scale),
  with the range first widened to contain 0 so that 0 is exactly representable (pruned weights stay 0).
Scales are rounded to fp16 when they are made, so fp16 exports hold exactly the scales used here.
Groups are `group_size` consecutive input columns; the last group is shorter when it does not divide the
input dimension (576 = 4 x 128 + 64); group_size -1 means one group per output row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..numerics.widths import SUPPORTED_BITS

FP16_TINY = 2.0 ** -14  # smallest normal fp16: scales never underflow


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"unsupported bit width {self.bits}; choose one of {', '.join(map(str, SUPPORTED_BITS))}")
        if self.group_size != -1 and self.group_size < 1:
            raise ConfigError(f"--group-size must be -1 (per output row) or >= 1, got {self.group_size}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    def groups(self, cols: int) -> list[tuple[int, int]]:
        size = cols if self.group_size == -1 else self.group_size
        return [(start, min(start + size, cols)) for start in range(0, cols, size)]

    def check_weight(self, name: str, weight: torch.Tensor) -> None:
        self.check_shape(name, weight)
        if not torch.isfinite(weight).all():
            raise ConfigError(f"{name}: weight has non-finite values (NaN or inf); cannot quantize it")

    def check_shape(self, name: str, weight: torch.Tensor) -> None:
        if weight.dim() != 2:
            raise ConfigError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
        if self.group_size > weight.shape[1]:
            raise ConfigError(f"{name}: group size {self.group_size} exceeds the input dimension {weight.shape[1]}; "
                              f"use -1 for one scale per output row")


def pruned_positions(w: torch.Tensor) -> torch.Tensor | None:
    """Where a weight is exactly zero (pruned; its code stays the zero code), or None if nowhere."""
    zero = w == 0
    return zero if bool(zero.any()) else None


def fit_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row for the columns in `w` ([rows, g]); both [rows]."""
    w = w.float()
    levels = (1 << spec.bits) - 1
    if spec.symmetric:
        absmax = w.abs().amax(dim=1)
        scale = 2 * absmax / levels
        zero = torch.zeros_like(scale, dtype=torch.int32)
    else:
        lo = w.amin(dim=1).clamp(max=0)
        hi = w.amax(dim=1).clamp(min=0)
        scale = (hi - lo) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).clamp(min=FP16_TINY).half().float()
    if not spec.symmetric:
        zero = torch.round(-lo / scale).clamp(0, levels).to(torch.int32)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes of `w` ([rows, g]) on the grid of per-row `scale`, `zero` ([rows])."""
    q = torch.round(w.float() / scale[:, None]) + zero[:, None]
    return q.clamp(spec.qmin, spec.qmax).to(torch.int32)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Full-matrix dequantization from per-group params ([rows, n_groups])."""
    out = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    for gi, (a, b) in enumerate(spec.groups(codes.shape[1])):
        out[:, a:b] = scale[:, gi:gi + 1] * (codes[:, a:b] - zero[:, gi:gi + 1]).float()
    return out


@dataclass
class QuantizedWeight:
    """The integer truth of one linear layer."""

    codes: torch.Tensor        # int32 [out, in]
    scales: torch.Tensor       # float32 (fp16-exact) [out, n_groups]
    zeros: torch.Tensor        # int32 [out, n_groups]; all 0 when symmetric
    spec: QuantSpec
    prune_mask: torch.Tensor | None = None   # bool [out, in], True = pruned (code = zero)
    # GPTQ's objective per output row under its calibration H ([out]; None from other methods): the error
    # (w - deq) H (w - deq)^T, and w H w^T, the scale it is relative to
    row_error: torch.Tensor | None = None
    row_energy: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.zeros, self.spec)
