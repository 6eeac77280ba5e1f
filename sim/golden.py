"""The integer golden model of the sparse-MAC accelerator: the numeric contract, executed in numpy.

Contract (also written to every bundle's contract.json):
1. activations: per token, symmetric: scale = max|x| / (2^(AB-1) - 1), a = clamp(floor(x / scale + 1/2),
   -(2^(AB-1) - 1), 2^(AB-1) - 1) (round half up; computed on the host in float64);
2. weights: the quantizer's signed WB-bit codes, unchanged (two's complement); pruned weights are 0;
3. scales: the fp16 group scales converted offline to unsigned 16-bit mantissas with one per-layer fraction
   width s (scale ~ mantissa / 2^s, from the blob's `scales_fixed`);
4. per group: gsum = sum of code * a over the group's K inputs, exact (the RTL's group accumulator is
   proven wide enough; `wrap` mirrors its two's-complement register anyway);
5. per row: total = sum over groups of gsum * mantissa (exact, proven to fit);
6. output: floor((total + 2^(s-1)) / 2^s) (round half up: ties go toward +inf), then saturate to the signed
   OUTW range. Only the output rounds or saturates. out * activation scale estimates the float output.

Everything is integer arithmetic: products and group sums go through float64 matrix products, which are
exact because every partial sum stays far below 2^53 (checked), then to int64.
"""
from __future__ import annotations

import numpy as np

ROUNDINGS = ("half_up", "truncate", "half_even")   # only half_up is the contract; the others exist for tests


def wrap(x: np.ndarray, bits: int) -> np.ndarray:
    """Two's-complement wrap to `bits`, as a register of that width does."""
    x = np.asarray(x, dtype=np.int64)
    mask = np.int64((1 << bits) - 1)
    u = x & mask
    return np.where(u >> (bits - 1), u - (1 << bits), u)


def quantize_activations(x: np.ndarray, act_bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Per-token symmetric activations: (codes int64 [T, K], scale float64 [T])."""
    x = np.asarray(x, dtype=np.float64)
    qmax = (1 << (act_bits - 1)) - 1
    amax = np.abs(x).max(axis=-1)
    scale = np.where(amax > 0, amax / qmax, 1.0)
    codes = np.floor(x / scale[:, None] + 0.5)
    return np.clip(codes, -qmax, qmax).astype(np.int64), scale


def round_shift(total: np.ndarray, shift: int, rounding: str = "half_up") -> np.ndarray:
    """total / 2^shift rounded to an integer (int64 arithmetic: >> is floor)."""
    if rounding == "half_up":
        return (total + (np.int64(1) << (shift - 1))) >> shift
    if rounding == "truncate":
        return total >> shift
    if rounding == "half_even":
        q = total >> shift
        rem = total - (q << shift)
        half = np.int64(1) << (shift - 1)
        return q + ((rem > half) | ((rem == half) & (q & 1 == 1)))
    raise ValueError(f"rounding must be one of {ROUNDINGS}")


def group_sums(codes: np.ndarray, acts: np.ndarray, group_size: int) -> np.ndarray:
    """Exact per-group integer dot products: [T, rows, n_groups] int64 from codes [rows, K], acts [T, K]."""
    rows, k = codes.shape
    n_groups = k // group_size
    w = codes.reshape(rows, n_groups, group_size).astype(np.float64)
    a = acts.reshape(acts.shape[0], n_groups, group_size).astype(np.float64)
    bound = float(np.abs(w).max(initial=0)) * float(np.abs(a).max(initial=0)) * group_size
    if bound >= 2.0 ** 52:
        raise ValueError("group sums would not be exact in float64")
    sums = np.einsum("tgk,rgk->trg", a, w, optimize=True)
    return sums.astype(np.int64)


def layer_outputs(codes: np.ndarray, scales_fixed: np.ndarray, shift: int, acts: np.ndarray, group_size: int,
                  gacc_bits: int, total_bits: int, out_bits: int, rounding: str = "half_up") -> np.ndarray:
    """The accelerator's outputs [T, rows] for activation codes `acts` [T, K] through one layer:
    codes [rows, K] (signed), scales_fixed [rows, n_groups] (unsigned mantissas), fraction width `shift`."""
    gsum = wrap(group_sums(codes, acts, group_size), gacc_bits)
    scaled = gsum * scales_fixed.astype(np.int64)[None, :, :]
    total = wrap(scaled.sum(axis=-1), total_bits)
    return saturate(round_shift(total, shift, rounding), out_bits)


def saturate(out: np.ndarray, out_bits: int) -> np.ndarray:
    """Clamp to the signed `out_bits` range, as the output stage does."""
    return np.clip(out, -(1 << (out_bits - 1)), (1 << (out_bits - 1)) - 1)


def float_error(out: np.ndarray, act_scale: np.ndarray, reference: np.ndarray, out_bits: int) -> dict:
    """How the integer outputs (times each token's activation scale) compare with the float layer."""
    est = out.astype(np.float64) * act_scale[:, None]
    ref = np.asarray(reference, dtype=np.float64)
    err = est - ref
    lo, hi = -(1 << (out_bits - 1)), (1 << (out_bits - 1)) - 1
    return {"relative_rms": float(np.sqrt((err ** 2).mean() / max((ref ** 2).mean(), 1e-30))),
            "max_abs": float(np.abs(err).max()), "reference_rms": float(np.sqrt((ref ** 2).mean())),
            "saturated": int(((out == lo) | (out == hi)).sum()), "outputs": int(out.size)}
