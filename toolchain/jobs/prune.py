"""`toolchain prune`: prune a model layer by layer and write it with its compression.json."""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import distributed
from ..engine import LayerEngine, default_device, set_weight
from ..models import LoadedModel
from ..prune import Barber, SparsityTarget, check_nm, make_method
from ..prune.allocation import owl_from_outlier_ratios, owl_outlier_ratios, rank_linear
from ..prune.lstsq import lstsq_rows, resolve_layer
from ..prune.reconstruct import reconstruct_layer
from ..sensitivity import layer_hessian_traces
from .common import check_distributed, run_job, write_output
from .config import PruneConfig
from .structured import prune_structured_loaded


def layer_sparsities(loaded: LoadedModel, calib: torch.Tensor, cfg: PruneConfig, target: SparsityTarget,
                     device, progress: bool) -> tuple[list[float], dict]:
    n_layers = len(loaded.adapter.decoder_layers(loaded.model))
    if cfg.allocation == "uniform":
        return [target.sparsity] * n_layers, {}
    if cfg.allocation == "owl":
        engine = LayerEngine(loaded.model, loaded.adapter, calib, cfg.batch_size, device, stream=loaded.stream)
        ratios = owl_outlier_ratios(engine, progress=progress)
        return owl_from_outlier_ratios(ratios, target.sparsity), {"outlier_ratio": ratios}
    traces = layer_hessian_traces(loaded.model, loaded.adapter, calib, cfg.hessian_samples, cfg.seed, device, progress)
    return rank_linear(traces, target.sparsity), {"hessian_trace_per_param": traces}


def prune_loaded(loaded: LoadedModel, calib: torch.Tensor, cfg: PruneConfig, device=None,
                 progress: bool = True) -> dict:
    """Prune `loaded.model` in place, layer by layer. Returns the per-layer report."""
    target, init = cfg.validate()
    device = torch.device(device) if device is not None else default_device()
    if cfg.structured:
        return prune_structured_loaded(loaded, calib, cfg, device, progress)
    adapter, model = loaded.adapter, loaded.model
    layers = adapter.decoder_layers(model)
    for i, layer in enumerate(layers):  # fail before any work if a shape does not fit the target
        for name, lin in adapter.linears(layer).items():
            target.check_weight(f"layer {i} {name}", lin.weight)

    t0 = time.perf_counter()
    sparsities, alloc_info = layer_sparsities(loaded, calib, cfg, target, device, progress)
    t_alloc = time.perf_counter() - t0

    method = make_method(init)
    barber = Barber(cfg.rebuild_ratio, cfg.keep_updates, cfg.loss_guard, cfg.rebuild_granularity,
                    score=cfg.rebuild_score) if cfg.method == "barber" else None
    if calib is None:   # magnitude pruning with uniform sparsity reads no activations
        calib = torch.zeros(1, 2, dtype=torch.long)
    engine = LayerEngine(model, adapter, calib, cfg.batch_size, device, stream=loaded.stream)
    # Only an init that updates weights (SparseGPT) has rows to re-solve; it also brings the Hessians.
    rebuild_solver = None if not method.needs_hessian else (
        lstsq_rows if cfg.rebuild_solver == "lstsq" else method.solve_with_mask)
    counts = {"pruned": 0, "total": 0}

    def prune_layer(i, layer, hidden):
        layer_target = target if target.is_nm else SparsityTarget.unstructured(sparsities[i])
        dense_layer = copy.deepcopy(layer) if barber or cfg.reconstruct == "block" else None
        lstsq = cfg.resolve_mode == "lstsq"
        stats, recorded = {}, None
        if method.needs_stats or lstsq:
            # Barber: the statistics pass runs on the dense copy (same weights) and its attention forward is
            # recorded with the graph, so Barber's pass does not run the dense attention again.
            with barber.record_first_block(engine, dense_layer) if barber else contextlib.nullcontext() as recorded:
                stats = engine.collect_stats(dense_layer if barber else layer, hidden, method.needs_hessian or lstsq)
        masks, targets = {}, {}
        linears = adapter.linears(layer)
        names = list(linears)
        dense_w = {n: lin.weight.detach().float().clone() for n, lin in linears.items()} if lstsq else {}

        def apply(j, result):
            weight, mask = result
            set_weight(linears[names[j]], weight)
            masks[names[j]], targets[names[j]] = mask, layer_target

        # One solve per linear; under torch.distributed they are shared out across the ranks and broadcast.
        distributed.share([lambda n=n: method.prune(linears[n].weight, stats.get(n), layer_target) for n in names],
                          apply)
        entry = {"target": layer_target.label}
        outputs = None
        if barber:
            entry["barber"], outputs = barber.rebuild_layer(engine, layer, dense_layer, hidden, masks, targets,
                                                            stats, rebuild_solver, recorded)
            recorded = None
        if lstsq:
            entry["resolve"] = resolve_layer(adapter.linears(layer), dense_w, stats, masks)
            outputs = None   # the re-solved layer's outputs are recomputed for the next layer
        if cfg.reconstruct == "block":
            entry["reconstruct"], outputs = reconstruct_layer(engine, layer, dense_layer, hidden, masks,
                                                              cfg.reconstruct_epochs, cfg.reconstruct_lr, cfg.seed,
                                                              cfg.reconstruct_batch)
        counts["pruned"] += sum(int(m.sum()) for m in masks.values())
        counts["total"] += sum(m.numel() for m in masks.values())
        entry["linears"] = {
            name: {"sparsity": float(mask.float().mean()),
                   **({"nm_valid": check_nm(mask, target.n, target.m)} if target.is_nm else {})}
            for name, mask in masks.items()}
        return entry, outputs

    desc = f"prune {cfg.method}{'/' + init if barber else ''} {target.label}"
    per_layer = engine.walk(prune_layer, needs_inputs=method.needs_stats or barber is not None
                            or cfg.reconstruct == "block" or cfg.resolve_mode == "lstsq", desc=desc,
                            progress=progress, sink=loaded.output.sink if loaded.output is not None else None)
    return {
        "method": cfg.method, "init": init if barber else None, "sparsity": target.label,
        "nm": [target.n, target.m] if target.is_nm else None,
        "global_sparsity": counts["pruned"] / counts["total"], "allocation": cfg.allocation, "allocation_info": alloc_info,
        "layer_sparsity": sparsities,
        "seconds": {"allocation": round(t_alloc, 3), "total": round(time.perf_counter() - t0, 3)},
        "layers": per_layer,
    }


def run_prune(model_spec: str, out: str | Path, cfg: PruneConfig, device=None, progress: bool = True,
              given: set[str] | None = None) -> dict:
    """Load, calibrate, prune, and write an HF directory plus compression.json (atomically). `given`: the
    options set on the command line (refused where they would have no effect)."""
    cfg.validate(given)
    check_distributed(prune=cfg)
    loaded, report, facts = run_job(model_spec, out, cfg, lambda lm, calib: prune_loaded(
        lm, calib, cfg, device=device, progress=progress), calibrate=cfg.calibrates())
    report["seconds"]["load"] = facts.pop("load_seconds")
    report.update({**facts, "config": asdict(cfg)})
    path = write_output(loaded, out, {"compression.json": report})
    report["out"] = str(path)
    return report
