"""SmoothQuant's migration and int8 weights, and the per-layer choice of its strength."""
from __future__ import annotations

import numpy as np
import torch

from conftest import random_ids, tiny_loaded
from toolchain.quant.smoothquant import (INT8_MAX_ERROR, SMOOTH_ALPHAS, calibrate_input_amax, int8_per_channel,
                                         plan_int8, smoothed_int8_weight, smoothquant_scales)


def test_migration_leaves_the_product_unchanged():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 32)) * np.where(np.arange(32) == 3, 50.0, 1.0)   # one outlier channel
    w = rng.standard_normal((8, 32))
    smooth, act_scale = smoothquant_scales(np.abs(x).max(0), w, 0.5)
    assert np.allclose((x / smooth) @ (w * smooth).T, x @ w.T)
    assert act_scale < np.abs(x).max() / 127          # the outlier no longer sets the input scale
    smooth, _ = smoothquant_scales(np.zeros(32), w, 0.5)
    assert (smooth == 1).all()                         # dead inputs are not scaled


def test_int8_per_channel_keeps_zeros_and_bounds():
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    w[:, ::2] = 0
    w[5] = 0
    codes, scales = int8_per_channel(w)
    assert codes.dtype == np.int8 and np.abs(codes).max() == 127
    assert (codes[:, ::2] == 0).all() and (codes[5] == 0).all() and scales[5] == 1.0
    assert np.abs(codes * scales[:, None] - w.numpy()).max() <= scales.max() / 2 + 1e-7
    smoothed, _ = smoothed_int8_weight(w.numpy(), np.full(16, 2.0))
    assert (smoothed == codes).all()                   # a uniform migration scales the grid, not the codes


def test_plan_picks_a_strength_per_layer():
    loaded = tiny_loaded("llama")
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    windows = random_ids(4, 16)
    amax = calibrate_input_amax(loaded, names, windows)
    assert all(a.shape == (loaded.model.get_submodule(n).in_features,) and (a > 0).all() for n, a in amax.items())
    plan = plan_int8(loaded, names, windows, amax)
    for name in names:
        assert plan[name]["alpha"] in SMOOTH_ALPHAS and plan[name]["error"] >= 0
        assert plan[name]["int8"] == (plan[name]["error"] <= INT8_MAX_ERROR)
