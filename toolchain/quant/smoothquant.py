"""SmoothQuant for int8 GEMMs (Xiao et al., 2023): per-input-channel migration of activation outliers into
the weights, symmetric int8 weights per output channel, and the per-layer choice of migration strength.

For a linear y = x W^T with per-channel input maxima amax_j, s_j = amax_j^a / max|W[:, j]|^(1-a): the input
is divided by s (its per-tensor int8 scale shrinks to max_j(amax_j / s_j) / 127) and W's columns are
multiplied by s, so the product is unchanged before rounding. `plan_int8` picks a per layer from
SMOOTH_ALPHAS by the layer's int8 output error on calibration windows, and keeps a layer in fp16 when even
the best a is too lossy.
"""
from __future__ import annotations

import numpy as np
import torch

SMOOTH_ALPHA = 0.5   # SmoothQuant's default migration strength, when no per-layer choice was made
SMOOTH_ALPHAS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
INT8_MAX_ERROR = 1e-3   # a layer whose best int8 output error (relative, on calibration) exceeds this stays fp16
SEARCH_WINDOWS = 2      # calibration windows on which each layer's migration strength is chosen


def smoothquant_scales(act_amax: np.ndarray, w: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """SmoothQuant's per-input-channel s_j = amax_j^alpha / max|W[:, j]|^(1-alpha) (1 where either is 0), and
    the per-tensor int8 scale of the smoothed input, max_j(amax_j / s_j) / 127."""
    act_amax = np.asarray(act_amax, np.float64)
    w_amax = np.abs(np.asarray(w)).max(axis=0).astype(np.float64)
    ok = (act_amax > 0) & (w_amax > 0)
    smooth = np.ones_like(act_amax)
    smooth[ok] = act_amax[ok] ** alpha / w_amax[ok] ** (1 - alpha)
    act_scale = float((act_amax / smooth).max() / 127.0) or 1.0
    return smooth, act_scale


def int8_per_channel(weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes [N, K] and fp32 scales [N], one per output channel: scale = max|w| / 127,
    codes = round(w / scale). Zero weights stay exactly zero."""
    w = weight.detach().to(torch.float32).cpu().numpy()
    scales = np.abs(w).max(axis=1) / 127.0
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    codes = np.clip(np.round(w / scales[:, None]), -127, 127).astype(np.int8)
    return codes, scales


def smoothed_int8_weight(w: np.ndarray, smooth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes [N, K] and scales [N] of W with its columns multiplied by the migration scales s."""
    return int8_per_channel(torch.from_numpy((w * smooth[None, :]).astype(np.float32)))


def calibrate_input_amax(loaded, names: list[str], windows, batch: int = 8) -> dict[str, np.ndarray]:
    """Per-channel max |x| of each named linear's input over the calibration windows."""
    amax: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(module, args, name=name):
            m = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
            amax[name] = m if name not in amax else torch.maximum(amax[name], m)
        handles.append(loaded.model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch):
                loaded.model(input_ids=windows[start:start + batch])
    finally:
        for h in handles:
            h.remove()
    return {name: value.numpy().astype(np.float64) for name, value in amax.items()}


def plan_int8(loaded, names: list[str], windows, amax: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per layer: the SmoothQuant strength minimising the layer's int8 output error on calibration windows
    (||XW^T - Q(X/s) Q(W s)^T||^2 / ||XW^T||^2), that error, and whether the layer goes int8 (error at most
    INT8_MAX_ERROR) or stays fp16."""
    errors = {name: np.zeros((len(SMOOTH_ALPHAS), 2)) for name in names}
    candidates = {}
    for name in names:
        w = loaded.model.get_submodule(name).weight.detach().float().numpy()
        per_alpha = []
        for alpha in SMOOTH_ALPHAS:
            smooth, act_scale = smoothquant_scales(amax[name], w, alpha)
            codes, scales = smoothed_int8_weight(w, smooth)
            w_q = torch.from_numpy((codes.astype(np.float32) * scales[:, None]).T.copy())          # [K, N]
            per_alpha.append((torch.from_numpy((1.0 / smooth).astype(np.float32)), act_scale, w_q))
        candidates[name] = (torch.from_numpy(w.T.copy()), per_alpha)

    def hook(module, args, name):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        w_t, per_alpha = candidates[name]
        ref = x @ w_t
        ref_energy = float((ref ** 2).sum())
        for i, (inv_smooth, act_scale, w_q) in enumerate(per_alpha):
            x_q = torch.clamp(torch.round(x * inv_smooth / act_scale), -127, 127) * act_scale
            errors[name][i] += (float(((x_q @ w_q - ref) ** 2).sum()), ref_energy)

    handles = [loaded.model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n in names]
    try:
        with torch.no_grad():
            for start in range(min(SEARCH_WINDOWS, windows.shape[0])):
                loaded.model(input_ids=windows[start:start + 1])
    finally:
        for h in handles:
            h.remove()
    plan = {}
    for name in names:
        rel = errors[name][:, 0] / np.maximum(errors[name][:, 1], 1e-30)
        best = int(rel.argmin())
        plan[name] = {"amax": amax[name], "alpha": SMOOTH_ALPHAS[best], "error": float(rel[best]),
                      "int8": bool(rel[best] <= INT8_MAX_ERROR)}
    return plan
