"""APTQ's mixed precision: measure each decoder linear's sensitivity, then choose its width so the average
over all weights meets the budget.

The cost of giving linear l width b is S_l * ||W_l - RTN_b(W_l)||_F^2: its sensitivity (a Hessian trace per
weight) times the squared error that width brings. `quant.allocate` picks the widths by an exact knapsack.
Two sensitivities: the full-model loss's Hessian trace (Hutchinson, HAWQ-V2; sees how an early error grows
through later layers) or each linear's local objective (APTQ's attention-aware Hessian for q/k/v)."""
from __future__ import annotations

import numpy as np
import torch

from ..engine import LayerEngine
from ..sensitivity import linear_hessian_traces
from .allocate import allocate_bits
from .aptq import collect_aptq_stats
from .quantizer import QuantSpec, pruned_positions
from .rtn import rtn_quantize


def rtn_errors(w: torch.Tensor, specs: list[QuantSpec]) -> list[float]:
    """||W - RTN_b(W)||_F^2 at every candidate width, pruned weights kept at zero."""
    mask = pruned_positions(w)
    return [float((rtn_quantize(w, spec, mask).dequantize() - w).square().sum()) for spec in specs]


def model_sensitivity(loaded, calib: torch.Tensor, specs: list[QuantSpec], samples: int, seed: int, device,
                      progress: bool) -> list[dict]:
    """HAWQ-V2 sensitivity from the full-model loss: S_l = Hutchinson tr(H_l)/n_l, H_l the Hessian of the
    model's cross-entropy with respect to linear l, on `samples` calibration windows."""
    traces = linear_hessian_traces(loaded.model, loaded.adapter, calib, samples, seed, device, progress)
    out = []
    for i, (layer, per_linear) in enumerate(zip(loaded.adapter.decoder_layers(loaded.model), traces)):
        entry = {}
        for name, lin in loaded.adapter.linears(layer).items():
            w = lin.weight.detach().float()
            entry[name] = {"sensitivity": per_linear[name], "rtn_sq_error": rtn_errors(w, specs),
                           "weights": w.numel()}
        out.append({"layer": i, "linears": entry})
    return out


def local_sensitivity(engine: LayerEngine, specs: list[QuantSpec], progress: bool) -> list[dict]:
    """A pass over the unquantized model: per linear, S = mean diagonal of its layer-local Hessian
    (attention-aware for q/k/v, 2XX^T/n otherwise) and the squared RTN error at every candidate width."""
    qkv = engine.adapter.attention_qkv

    def measure(i, layer, hidden):
        stats, attention = collect_aptq_stats(engine, layer, hidden, traces_only=True)
        entry = {}
        for name, lin in engine.adapter.linears(layer).items():
            w = lin.weight.detach().float()
            sens = (attention.mean_diagonal("qkv"[qkv.index(name)]) if name in qkv
                    else stats[name].hessian_mean_diagonal)
            entry[name] = {"sensitivity": sens, "rtn_sq_error": rtn_errors(w, specs), "weights": w.numel()}
        return {"linears": entry}

    return engine.walk(measure, desc=f"aptq sensitivity ({len(engine.layers)} layers)", progress=progress)


def choose_widths(measured: list[dict], candidates: list[int], budget: float
                  ) -> tuple[dict[tuple[int, str], int], dict[tuple[int, str], float]]:
    """Widths per (layer, linear) that minimise the summed cost within the average `budget`, and each
    linear's sensitivity."""
    keys = [(e["layer"], name) for e in measured for name in e["linears"]]
    items = [e["linears"][name] for e in measured for name in e["linears"]]
    costs = np.array([[it["sensitivity"] * err for err in it["rtn_sq_error"]] for it in items])
    picks = allocate_bits([it["weights"] for it in items], costs, list(candidates), budget)
    return dict(zip(keys, picks)), {key: it["sensitivity"] for key, it in zip(keys, items)}
