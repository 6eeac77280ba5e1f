"""Quantize a model (RTN, GPTQ, APTQ with mixed precision), and `compress` = prune then quantize.

APTQ = GPTQ's solver with attention-aware Hessians for q/k/v (`toolchain.quant.aptq`), plus, for an average
budget, per-linear widths chosen from the candidates by Hessian-trace sensitivity (`toolchain.quant.allocate`)
in a first pass over the unquantized model.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .engine import LayerEngine, default_device
from .errors import ConfigError
from .models import LoadedModel, load_model, save_model
from .models.loading import check_out_dir
from .pipeline import AnonPeak, CalibConfig, PruneConfig, calibration_data, library_versions, peak_rss_mib, \
    prune_loaded, set_weight
from .quant import SUPPORTED_BITS, QuantizedWeight, QuantSpec, gptq_quantize, rtn_quantize, write_quant_state
from .quant.allocate import allocate_bits
from .quant.aptq import collect_aptq_stats

QUANT_METHODS = ("rtn", "gptq", "aptq")
DEFAULT_CANDIDATES = (2, 4)


@dataclass
class QuantPlan:
    """What a validated QuantConfig asks for."""

    spec: QuantSpec                 # group size and symmetry; the width of a uniform run
    budget: float | None = None     # average bits of a mixed-precision run (APTQ), else None
    candidates: tuple[int, ...] = ()

    def spec_for(self, bits: int) -> QuantSpec:
        return QuantSpec(bits, self.spec.group_size, self.spec.symmetric)


@dataclass
class QuantConfig(CalibConfig):
    method: str = "gptq"
    bits: str | int | float = 4      # a width, or (APTQ) an average such as 3.5 or 3.0
    candidates: str | None = None    # APTQ mixed precision: widths to choose from (default 2,4)
    group_size: int = 128            # -1: one group per output row
    asym: bool = False
    act_order: bool = False          # GPTQ/APTQ: columns by decreasing Hessian diagonal, static groups
    percdamp: float = 0.01

    def resolve(self) -> QuantPlan:
        if self.method not in QUANT_METHODS:
            raise ConfigError(f"unknown quantization method {self.method!r}; choose one of {', '.join(QUANT_METHODS)}")
        try:
            bits = float(self.bits)
        except ValueError:
            raise ConfigError(f"--bits {self.bits!r} is not a number") from None
        # An average is asked for by a fractional value, a written decimal ("3.0") or explicit candidates.
        mixed = bits != int(bits) or "." in str(self.bits) or self.candidates is not None
        if mixed and self.method != "aptq":
            raise ConfigError(f"--bits {self.bits}: an average bit budget (mixed precision) needs --method aptq; "
                              f"{self.method} takes one of {', '.join(map(str, SUPPORTED_BITS))}")
        self.check_calibration()
        if not 0 < self.percdamp < 1:
            raise ConfigError(f"damping must be in (0, 1), got {self.percdamp}")
        if not mixed:
            return QuantPlan(QuantSpec(int(bits), self.group_size, not self.asym))
        candidates = DEFAULT_CANDIDATES if self.candidates is None else self._parse_candidates(self.candidates)
        for b in candidates:
            QuantSpec(b, self.group_size, not self.asym)   # validates each width and the group size
        if not candidates[0] <= bits <= candidates[-1]:
            raise ConfigError(f"--bits {self.bits} is outside the candidate widths {','.join(map(str, candidates))}: "
                              f"an average must lie in [{candidates[0]}, {candidates[-1]}]")
        return QuantPlan(QuantSpec(candidates[-1], self.group_size, not self.asym), bits, candidates)

    @staticmethod
    def _parse_candidates(text: str) -> tuple[int, ...]:
        try:
            widths = sorted({int(v) for v in str(text).split(",") if v.strip()})
        except ValueError:
            raise ConfigError(f"--candidates {text!r}: expected comma-separated widths such as 2,4") from None
        if len(widths) < 1:
            raise ConfigError("--candidates is empty")
        bad = [b for b in widths if b not in SUPPORTED_BITS]
        if bad:
            raise ConfigError(f"--candidates: unsupported width(s) {bad}; choose from {', '.join(map(str, SUPPORTED_BITS))}")
        return tuple(widths)


def average_bits(weights: dict[str, QuantizedWeight]) -> dict:
    """Average bits per weight over all quantized weights, without and with scale/zero storage."""
    n = sum(qw.codes.numel() for qw in weights.values())
    code_bits = sum(qw.codes.numel() * qw.spec.bits for qw in weights.values())
    param_bits = sum(qw.scales.numel() * (16 + (0 if qw.spec.symmetric else qw.spec.bits))
                     for qw in weights.values())
    return {"weights": n, "avg_bits": code_bits / n, "avg_bits_with_params": (code_bits + param_bits) / n,
            "weight_bytes": (code_bits + param_bits) / 8}


def hessian_error(dw: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(dW H dW^T), with H one matrix or a stack [k, in, in] over k equal row blocks."""
    if hessian.dim() == 2:
        return float(((dw @ hessian) * dw).sum())
    k = hessian.shape[0]
    blocks = dw.reshape(k, -1, dw.shape[1])
    return float((torch.bmm(blocks, hessian) * blocks).sum())


def _prune_mask(w: torch.Tensor) -> torch.Tensor | None:
    zero = w == 0
    return zero if bool(zero.any()) else None


def sensitivity_pass(engine: LayerEngine, plan: QuantPlan, progress: bool) -> list[dict]:
    """APTQ's first pass over the unquantized model: per linear, S = mean Hessian diagonal (attention-aware
    for q/k/v, 2XX^T/n otherwise) and the squared RTN error at every candidate width."""
    qkv = engine.adapter.attention_qkv

    def measure(i, layer, hidden):
        stats, attention = collect_aptq_stats(engine, layer, hidden, traces_only=True)
        entry = {}
        for name, lin in engine.adapter.linears(layer).items():
            w = lin.weight.detach().float()
            mask = _prune_mask(w)
            if name in qkv:
                sens = attention.mean_diagonal("qkv"[qkv.index(name)])
            else:
                sens = float(stats[name].sq_sum.sum()) * 2.0 / max(stats[name].tokens, 1) / w.shape[1]
            errors = [float((rtn_quantize(w, plan.spec_for(b), mask).dequantize() - w).square().sum())
                      for b in plan.candidates]
            entry[name] = {"sensitivity": sens, "rtn_sq_error": errors, "weights": w.numel()}
        return {"linears": entry}

    return engine.walk(measure, desc=f"aptq sensitivity ({len(engine.layers)} layers)", progress=progress)


def quantize_loaded(loaded: LoadedModel, calib: torch.Tensor | None, cfg: QuantConfig, device=None,
                    progress: bool = True) -> tuple[dict, dict[str, QuantizedWeight]]:
    """Quantize every decoder linear of `loaded.model` in place (weights become their dequantized values).

    Exact zeros in a weight are treated as pruned and stay exactly zero (their code is the zero code).
    Returns the report and the integer state per full module name.
    """
    plan = cfg.resolve()
    device = torch.device(device) if device is not None else default_device()
    adapter, model = loaded.adapter, loaded.model
    layers = adapter.decoder_layers(model)
    for i, layer in enumerate(layers):
        for name, lin in adapter.linears(layer).items():
            for b in plan.candidates or (plan.spec.bits,):
                plan.spec_for(b).check_weight(f"layer {i} {name}", lin.weight)
    full_names = {id(module): name for name, module in model.named_modules()}
    needs_calibration = cfg.method in ("gptq", "aptq")
    if needs_calibration and calib is None:
        raise ConfigError(f"{cfg.method} needs calibration data")
    engine = LayerEngine(model, adapter, calib if calib is not None else torch.zeros(1, 2, dtype=torch.long),
                         cfg.batch_size, device)
    t0 = time.perf_counter()

    widths: dict[tuple[int, str], int] = {}
    allocation = None
    if plan.budget is not None:
        measured = sensitivity_pass(engine, plan, progress)
        keys = [(e["layer"], name) for e in measured for name in e["linears"]]
        items = [e["linears"][name] for e in measured for name in e["linears"]]
        costs = np.array([[it["sensitivity"] * err for err in it["rtn_sq_error"]] for it in items])
        picks = allocate_bits([it["weights"] for it in items], costs, list(plan.candidates), plan.budget)
        widths = dict(zip(keys, picks))
        allocation = {"budget": plan.budget, "candidates": list(plan.candidates),
                      "seconds": round(time.perf_counter() - t0, 3),
                      "objective": "sum of sensitivity * squared RTN error, exact knapsack (toolchain.quant.allocate)",
                      "layers": [{"layer": e["layer"], "linears": e["linears"]} for e in measured]}
    qkv = adapter.attention_qkv if cfg.method == "aptq" else ()
    state: dict[str, QuantizedWeight] = {}

    def quantize_layer(i, layer, hidden):
        if cfg.method == "aptq":
            stats, attention = collect_aptq_stats(engine, layer, hidden)
        else:
            stats = engine.collect_stats(layer, hidden, hessian=True) if needs_calibration else {}
        entry = {"linears": {}}
        for name, lin in adapter.linears(layer).items():
            w = lin.weight.detach().float()
            mask = _prune_mask(w)
            spec = plan.spec_for(widths.get((i, name), plan.spec.bits))
            info = {"bits": spec.bits, "pruned": 0.0 if mask is None else float(mask.float().mean())}
            if needs_calibration:
                H = attention.hessian("qkv"[qkv.index(name)]) if name in qkv else stats[name].hessian
                qw = gptq_quantize(w, H, spec, mask, percdamp=cfg.percdamp, act_order=cfg.act_order,
                                   name=f"layer {i} {name}")
                deq = qw.dequantize()
                # relative error of the method's own objective: tr(dW H dW^T) / tr(W H W^T)
                info["rel_error"] = hessian_error(deq - w, H) / max(hessian_error(w, H), 1e-30)
                info["hessian"] = "attention" if name in qkv else "layer"
            else:
                qw = rtn_quantize(w, spec, mask)
                deq = qw.dequantize()
            set_weight(lin, deq)
            state[full_names[id(lin)]] = qw
            entry["linears"][name] = info
        return entry

    label = f"{plan.budget} avg" if plan.budget is not None else f"{plan.spec.bits}-bit"
    per_layer = engine.walk(quantize_layer, needs_inputs=needs_calibration,
                            desc=f"quantize {cfg.method} {label} g{plan.spec.group_size}", progress=progress)
    report = {"method": cfg.method, "bits": plan.budget if plan.budget is not None else plan.spec.bits,
              "group_size": plan.spec.group_size, "symmetric": plan.spec.symmetric, "act_order": cfg.act_order,
              **average_bits(state), "allocation": allocation,
              "seconds": {"total": round(time.perf_counter() - t0, 3)}, "layers": per_layer}
    return report, state


def _input_prune_record(model_spec: str, loaded: LoadedModel) -> dict | None:
    """The input's pruning record: a prune report itself, or the one nested in a quant report."""
    path = Path(str(model_spec)) / "compression.json"
    if loaded.source.get("kind") != "hf" or not path.is_file():
        return None
    previous = json.loads(path.read_text())
    return previous.get("prune", previous)


def _write(loaded: LoadedModel, out, compression: dict, state: dict[str, QuantizedWeight]) -> dict:
    path = save_model(loaded, out, extra_json={"compression.json": compression},
                      extra_files={"quant_state.safetensors": lambda p: write_quant_state(p, state)})
    compression["out"] = str(path)
    return compression


def run_quantize(model_spec: str, out: str | Path, cfg: QuantConfig, device=None, progress: bool = True) -> dict:
    """Load, calibrate (GPTQ/APTQ), quantize, and write the HF directory + quant_state.safetensors +
    compression.json, atomically."""
    cfg.resolve()
    if str(model_spec) != "smollm2":
        check_out_dir(model_spec, out)
    with AnonPeak() as anon:
        t0 = time.perf_counter()
        loaded = load_model(model_spec)
        t_load = time.perf_counter() - t0
        calib, calib_info = calibration_data(loaded, cfg) if cfg.method != "rtn" else (None, None)
        report, state = quantize_loaded(loaded, calib, cfg, device=device, progress=progress)
    report["seconds"]["load"] = round(t_load, 3)
    compression = {"format": "toolchain.compression/1", "quantization": report,
                   "prune": _input_prune_record(model_spec, loaded),
                   "source": loaded.source, "calibration": calib_info, "config": asdict(cfg),
                   "versions": library_versions(), "peak_rss_mib": round(peak_rss_mib(), 1),
                   "peak_anon_mib": round(anon.peak_mib, 1)}
    return _write(loaded, out, compression, state)


def run_compress(model_spec: str, out: str | Path, prune_cfg: PruneConfig, quant_cfg: QuantConfig, device=None,
                 progress: bool = True) -> dict:
    """Prune, then quantize the pruned model, in one process: one model load, one tokenization and one set of
    calibration windows serve both (the quantization pass sees the pruned model's own activations)."""
    prune_cfg.resolve()
    quant_cfg.resolve()
    if (prune_cfg.calib_samples, prune_cfg.seqlen, prune_cfg.seed, prune_cfg.dataset, prune_cfg.text_file) != \
            (quant_cfg.calib_samples, quant_cfg.seqlen, quant_cfg.seed, quant_cfg.dataset, quant_cfg.text_file):
        raise ConfigError("compress uses one calibration set: prune and quantize settings must match")
    if str(model_spec) != "smollm2":
        check_out_dir(model_spec, out)
    with AnonPeak() as anon:
        t0 = time.perf_counter()
        loaded = load_model(model_spec)
        t_load = time.perf_counter() - t0
        calib, calib_info = calibration_data(loaded, prune_cfg)
        prune_report = prune_loaded(loaded, calib, prune_cfg, device=device, progress=progress)
        quant_report, state = quantize_loaded(loaded, calib, quant_cfg, device=device, progress=progress)
    quant_report["seconds"]["load"] = round(t_load, 3)
    compression = {"format": "toolchain.compression/1", "prune": prune_report, "quantization": quant_report,
                   "source": loaded.source, "calibration": calib_info,
                   "config": {"prune": asdict(prune_cfg), "quantize": asdict(quant_cfg)},
                   "versions": library_versions(), "peak_rss_mib": round(peak_rss_mib(), 1),
                   "peak_anon_mib": round(anon.peak_mib, 1)}
    return _write(loaded, out, compression, state)
