"""`toolchain quantize` (RTN, GPTQ, APTQ with mixed precision) and `toolchain compress` (prune, then quantize).

APTQ = GPTQ's solver with attention-aware Hessians for q/k/v (`toolchain.quant.aptq`), plus, for an average
budget, per-linear widths chosen from the candidates by Hessian-trace sensitivity (`toolchain.quant.allocate`)
in a first pass over the unquantized model.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import distributed
from ..engine import LayerEngine, default_device, set_weight
from ..errors import ConfigError
from ..models import LoadedModel
from ..quant import QuantizedWeight, rtn_quantize, write_quant_state
from ..quant.aptq import collect_aptq_stats
from ..quant.gptq import gptq_quantize_many
from ..quant.mixed_precision import choose_widths, local_sensitivity, model_sensitivity
from ..quant.quantizer import pruned_positions
from .common import check_distributed, run_job, write_output
from .config import PruneConfig, QuantConfig, compress_validate
from .prune import prune_loaded


def average_bits(weights: dict[str, QuantizedWeight]) -> dict:
    """Average bits per weight over all quantized weights, without and with scale/zero storage."""
    n = sum(qw.codes.numel() for qw in weights.values())
    code_bits = sum(qw.codes.numel() * qw.spec.bits for qw in weights.values())
    param_bits = sum(qw.scales.numel() * (16 + (0 if qw.spec.symmetric else qw.spec.bits))
                     for qw in weights.values())
    return {"weights": n, "avg_bits": code_bits / n, "avg_bits_with_params": (code_bits + param_bits) / n,
            "weight_bytes": (code_bits + param_bits) / 8}


def quantize_loaded(loaded: LoadedModel, calib: torch.Tensor | None, cfg: QuantConfig, device=None,
                    progress: bool = True) -> tuple[dict, dict[str, QuantizedWeight]]:
    """Quantize every decoder linear of `loaded.model` in place (weights become their dequantized values).

    Exact zeros in a weight are treated as pruned and stay exactly zero (their code is the zero code).
    Returns the report and the integer state per full module name.
    """
    plan = cfg.validate()
    device = torch.device(device) if device is not None else default_device()
    adapter, model = loaded.adapter, loaded.model
    layers = adapter.decoder_layers(model)
    streamed = loaded.stream is not None

    def check_layer(i, layer):
        for name, lin in adapter.linears(layer).items():
            for b in plan.candidates or (plan.spec.bits,):
                plan.spec_for(b).check_weight(f"layer {i} {name}", lin.weight)

    for i, layer in enumerate(layers):   # streamed: the shapes now, the values as each layer is loaded
        if not streamed:
            check_layer(i, layer)
        else:
            for name, lin in adapter.linears(layer).items():
                plan.spec_for(plan.spec.bits).check_shape(f"layer {i} {name}", lin.weight)
    full_names = {id(module): name for name, module in model.named_modules()}
    needs_calibration = cfg.method in ("gptq", "aptq")
    if needs_calibration and calib is None:
        raise ConfigError(f"{cfg.method} needs calibration data")
    engine = LayerEngine(model, adapter, calib if calib is not None else torch.zeros(1, 2, dtype=torch.long),
                         cfg.batch_size, device, stream=loaded.stream)
    t0 = time.perf_counter()

    widths: dict[tuple[int, str], int] = {}
    sensitivity: dict[tuple[int, str], float] = {}
    allocation = None
    if plan.budget is not None:
        specs = [plan.spec_for(b) for b in plan.candidates]
        measured = (model_sensitivity(loaded, calib, specs, cfg.hutchinson_samples, cfg.seed, device, progress)
                    if cfg.sensitivity == "model" else local_sensitivity(engine, specs, progress))
        widths, sensitivity = choose_widths(measured, plan.candidates, plan.budget)
        allocation = {"budget": plan.budget, "candidates": list(plan.candidates), "sensitivity": cfg.sensitivity,
                      "seconds": round(time.perf_counter() - t0, 3),
                      "objective": "sum of sensitivity * squared RTN error, exact knapsack (toolchain.quant.allocate)",
                      "layers": [{"layer": e["layer"], "linears": e["linears"]} for e in measured]}
    qkv = adapter.attention_qkv if cfg.method == "aptq" else ()
    state: dict[str, QuantizedWeight] = {}

    def quantize_layer(i, layer, hidden):
        if streamed:
            check_layer(i, layer)
        if cfg.method == "aptq":
            stats, attention = collect_aptq_stats(engine, layer, hidden)
        else:
            stats = engine.collect_stats(layer, hidden, hessian=True) if needs_calibration else {}
        linears = adapter.linears(layer)
        weights = {n: lin.weight.detach().float() for n, lin in linears.items()}
        masks = {n: pruned_positions(w) for n, w in weights.items()}
        specs = {n: plan.spec_for(widths.get((i, n), plan.spec.bits)) for n in linears}
        results: dict[str, QuantizedWeight] = {}
        hessians: dict[str, torch.Tensor] = {}
        if needs_calibration:
            # Linears of one width that read the same input (GPTQ: one H) or that are APTQ's per-head q/k/v
            # stacks share one GPTQ sweep; their rows are independent given H, so this is one call each.
            shared: dict[int, torch.Tensor] = {}
            jobs: dict[tuple, list[str]] = {}
            for n in linears:
                if n in qkv:
                    hessians[n], key = attention.hessian("qkv"[qkv.index(n)]), "attention"
                else:
                    hessians[n] = shared.setdefault(id(stats[n]), stats[n].hessian)
                    key = id(stats[n])
                jobs.setdefault((key, specs[n].bits), []).append(n)
            groups = list(jobs.values())
            # One GPTQ sweep per group; under torch.distributed they are shared out across ranks and broadcast.
            distributed.share(
                [lambda names=names: gptq_quantize_many(
                    [weights[n] for n in names], [hessians[n] for n in names], specs[names[0]],
                    [masks[n] for n in names], percdamp=cfg.percdamp, act_order=cfg.act_order,
                    name=f"layer {i} {'+'.join(names)}") for names in groups],
                lambda j, qws: results.update(zip(groups[j], qws)))
        else:
            results = {n: rtn_quantize(weights[n], specs[n], masks[n]) for n in linears}
        entry = {"linears": {}}
        for name, lin in linears.items():
            qw, w = results[name], weights[name]
            deq = qw.dequantize()
            info = {"bits": qw.spec.bits, "pruned": 0.0 if masks[name] is None else float(masks[name].float().mean())}
            if needs_calibration:
                # relative error of the method's own objective: tr(dW H dW^T) / tr(W H W^T)
                # (both from GPTQ's sweep and its factor of H^-1: no product with H, docs/quantization.md)
                info["rel_error"] = float(qw.row_error.sum()) / max(float(qw.row_energy.sum()), 1e-30)
                info["hessian"] = "attention" if name in qkv else "layer"
            if sensitivity:
                info["sensitivity"] = sensitivity[(i, name)]
            set_weight(lin, deq)
            state[full_names[id(lin)]] = qw
            entry["linears"][name] = info
        if loaded.output is not None:   # streamed: this layer's codes go to disk now, their shapes stay
            layer_state = {full_names[id(lin)]: state[full_names[id(lin)]] for lin in linears.values()}
            loaded.output.spill_quant_state(i, layer_state)
            state.update(layer_state)
        return entry

    label = f"{plan.budget} avg" if plan.budget is not None else f"{plan.spec.bits}-bit"
    per_layer = engine.walk(quantize_layer, needs_inputs=needs_calibration,
                            desc=f"quantize {cfg.method} {label} g{plan.spec.group_size}", progress=progress,
                            sink=loaded.output.sink if loaded.output is not None else None)
    report = {"method": cfg.method, "bits": plan.budget if plan.budget is not None else plan.spec.bits,
              "group_size": plan.spec.group_size, "symmetric": plan.spec.symmetric, "act_order": cfg.act_order,
              "damp": cfg.percdamp if cfg.calibrates() else None,
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
    # streamed: the state was written layer by layer and is merged here
    quant_state = (loaded.output.write_quant_state if loaded.output is not None
                   else lambda p: write_quant_state(p, state))
    path = write_output(loaded, out, {"compression.json": compression}, {"quant_state.safetensors": quant_state})
    compression["out"] = str(path)
    return compression


def run_quantize(model_spec: str, out: str | Path, cfg: QuantConfig, device=None, progress: bool = True,
                 given: set[str] | None = None) -> dict:
    """Load, calibrate (GPTQ/APTQ), quantize, and write the HF directory + quant_state.safetensors +
    compression.json, atomically. `given`: the options set on the command line (refused where they would
    have no effect)."""
    cfg.validate(given)
    check_distributed(quant=cfg)
    loaded, (report, state), facts = run_job(
        model_spec, out, cfg, lambda lm, calib: quantize_loaded(lm, calib, cfg, device=device, progress=progress),
        calibrate=cfg.calibrates())
    report["seconds"]["load"] = facts.pop("load_seconds")
    compression = {**facts, "quantization": report, "prune": _input_prune_record(model_spec, loaded),
                   "config": asdict(cfg)}
    return _write(loaded, out, compression, state)


def run_compress(model_spec: str, out: str | Path, prune_cfg: PruneConfig, quant_cfg: QuantConfig, device=None,
                 progress: bool = True, given: set[str] | None = None) -> dict:
    """Prune, then quantize the pruned model, in one process: one model load, one tokenization and one set of
    calibration windows serve both (the quantization pass sees the pruned model's own activations)."""
    compress_validate(prune_cfg, quant_cfg, given)
    check_distributed(prune=prune_cfg, quant=quant_cfg)

    def work(lm, calib):
        # streamed: the pruned layers are kept as float32 shards for the quantization walk to read back
        with lm.output.first_pass() if lm.output is not None else contextlib.nullcontext():
            pruned = prune_loaded(lm, calib, prune_cfg, device=device, progress=progress)
        return pruned, *quantize_loaded(lm, calib, quant_cfg, device=device, progress=progress)

    loaded, (prune_report, quant_report, state), facts = run_job(
        model_spec, out, prune_cfg, work, calibrate=prune_cfg.calibrates() or quant_cfg.calibrates(),
        configs=(prune_cfg, quant_cfg))
    quant_report["seconds"]["load"] = facts.pop("load_seconds")
    compression = {**facts, "prune": prune_report, "quantization": quant_report,
                   "config": {"prune": asdict(prune_cfg), "quantize": asdict(quant_cfg)}}
    return _write(loaded, out, compression, state)
