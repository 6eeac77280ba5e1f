"""GPTQ against a direct, unoptimised transcription of the algorithm, on one tiny layer.

The transcription below is the OBS form of GPTQ in float64: one column at a time, no blocks, no lazy updates and
no Cholesky factor. After quantizing column c it spreads the error over the columns not yet quantized with the
inverse Hessian of those columns, then removes c from that inverse by one Gaussian elimination step. The shipped
sweep (`toolchain/quant/gptq.py`) computes the same thing in float32 through the upper Cholesky factor of H^-1 in
128-column blocks, so the codes agree except where float32 and float64 round a value on opposite sides of a step.
Each setting the quantizer has (activation order with static groups, natural order with dynamic groups, damping,
error propagation, pruned weights) is pinned against it.
"""
from __future__ import annotations

import pytest
import torch

from toolchain.input_stats import InputStats
from toolchain.quant import QuantSpec, gptq_quantize, rtn_quantize


def _grid(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric scale per row: absmax over half the number of steps, rounded to fp16 (1 where the row is 0)."""
    scale = 2 * w.abs().amax(dim=1) / ((1 << bits) - 1)
    return torch.where(scale > 0, scale, torch.ones_like(scale)).half().double()


def transcribed_gptq(W: torch.Tensor, H: torch.Tensor, bits: int, group: int, act_order: bool, percdamp: float,
                     pruned: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [rows, cols] and scales [rows, groups] of symmetric GPTQ, the plain way."""
    W, H = W.double().clone(), H.double().clone()
    rows, cols = W.shape
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    pruned = torch.zeros_like(W, dtype=torch.bool) if pruned is None else pruned
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    starts = list(range(0, cols, group))
    scales = torch.zeros(rows, len(starts), dtype=torch.float64)
    if act_order:          # static groups: every group's scale from the original weights
        for g, a in enumerate(starts):
            scales[:, g] = _grid(W[:, a:a + group], bits)
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    H = H + percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    codes = torch.zeros(rows, cols, dtype=torch.int64)
    remaining = list(range(cols))
    for c in order.tolist():
        g = c // group
        if not act_order and c % group == 0:   # dynamic groups: fit on the weights as updated so far
            scales[:, g] = _grid(W[:, c:c + group], bits)
        q = torch.round(W[:, c] / scales[:, g]).clamp(qmin, qmax)
        q = torch.where(pruned[:, c], torch.zeros_like(q), q)
        codes[:, c] = q.long()
        error = (W[:, c] - scales[:, g] * q) / Hinv[c, c]
        W[:, remaining] -= error[:, None] * Hinv[c, remaining][None, :]
        Hinv = Hinv - Hinv[:, c:c + 1] @ Hinv[c:c + 1, :] / Hinv[c, c]
        remaining.remove(c)
    return codes, scales


def _layer(rows=24, cols=64, tokens=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) * torch.logspace(0, -1.5, cols)[None, :]
    x = torch.randn(tokens, cols, generator=g) @ mix.T
    x[:, 5] *= 10          # an outlier channel in the middle of a group, so activation order moves it first
    x[:, 40] = 0.0         # a dead input
    stats = InputStats(cols, hessian=True)
    stats.add_batch(x)
    return torch.randn(rows, cols, generator=g), x, stats.hessian


def _agree(ours, codes: torch.Tensor) -> float:
    diff = (ours.codes.long() - codes).abs()
    assert int(diff.max()) <= 1, "a code differs by more than one step from the transcription"
    return float((diff == 0).float().mean())


@pytest.mark.parametrize("act_order", [True, False], ids=["act-order", "natural"])
@pytest.mark.parametrize("percdamp", [0.01, 0.1])
def test_gptq_equals_the_transcription(act_order, percdamp):
    w, _, H = _layer()
    spec = QuantSpec(3, 16, True)
    ours = gptq_quantize(w, H, spec, percdamp=percdamp, act_order=act_order)
    codes, scales = transcribed_gptq(w, H, 3, 16, act_order, percdamp)
    assert _agree(ours, codes) >= 0.99
    if act_order:
        assert torch.equal(ours.scales.double(), scales)
    else:
        assert torch.allclose(ours.scales.double(), scales, rtol=2e-3)


def test_gptq_pruned_weights_stay_zero_and_match_the_transcription():
    w, _, H = _layer(seed=1)
    pruned = torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) < 0.5
    spec = QuantSpec(4, 16, True)
    ours = gptq_quantize(w.masked_fill(pruned, 0), H, spec, prune_mask=pruned, act_order=True)
    codes, _ = transcribed_gptq(w.masked_fill(pruned, 0), H, 4, 16, True, 0.01, pruned)
    assert (ours.codes[pruned] == 0).all()
    assert _agree(ours, codes) >= 0.99


def test_each_setting_changes_the_result():
    """The transcription separates the settings, so the agreement above could not hold by accident: activation
    order, the damping and the error propagation each change the codes."""
    w, x, H = _layer()
    spec = QuantSpec(3, 16, True)
    base = transcribed_gptq(w, H, 3, 16, True, 0.01)[0]
    assert (transcribed_gptq(w, H, 3, 16, False, 0.01)[0] != base).float().mean() > 0.05
    assert (transcribed_gptq(w, H, 3, 16, True, 0.1)[0] != base).float().mean() > 0.01
    rtn = rtn_quantize(w.masked_fill(torch.diag(H)[None, :] == 0, 0), spec)
    assert (rtn.codes.long() != base).float().mean() > 0.05

    # propagation is what GPTQ is for: a lower output error on the calibration inputs than rounding to nearest
    def output_error(qw):
        return float(((w - qw.dequantize()) @ x.T).square().sum())

    assert output_error(gptq_quantize(w, H, spec)) < 0.8 * output_error(rtn)


def test_act_order_is_the_default():
    w, _, H = _layer()
    spec = QuantSpec(3, 16, True)
    assert torch.equal(gptq_quantize(w, H, spec).codes, gptq_quantize(w, H, spec, act_order=True).codes)
