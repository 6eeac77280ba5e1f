"""The functions the CLI calls (and the tests call): prune a model, evaluate it."""
from __future__ import annotations

import copy
import platform
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .data import calibration_windows, get_corpus, model_max_seqlen, tokenize
from .engine import LayerEngine, default_device
from .errors import ConfigError
from .models import LoadedModel, load_model, save_model
from .prune import INIT_METHODS, METHODS, Barber, SparsityTarget, check_nm, make_method
from .prune.allocation import ALLOCATIONS, check_allocation, hessian_traces, owl_from_outlier_ratios, \
    owl_outlier_ratios, rank_linear


@dataclass
class PruneConfig:
    method: str = "wanda"
    init: str | None = None          # Barber's initial pruner (default wanda)
    sparsity: str = "0.5"            # fraction, or N:M (N kept of every M)
    allocation: str = "uniform"
    rebuild_ratio: float = 0.01      # Barber's alpha: fraction of the beneficial swaps that are made
    keep_updates: bool = True        # Barber: keep the init method's updated weights on kept positions
    calib_samples: int = 128
    seqlen: int = 2048
    seed: int = 0
    dataset: str | None = None
    text_file: str | None = None
    batch_size: int = 8
    hessian_samples: int = 4         # windows for the Hutchinson trace (--allocation hessian)

    def resolve(self) -> tuple[SparsityTarget, str]:
        """Validate; return the sparsity target and the name of the method that makes the first mask."""
        if self.method not in METHODS:
            raise ConfigError(f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method != "barber" and self.init is not None:
            raise ConfigError("--init only applies to --method barber")
        init = (self.init or "wanda") if self.method == "barber" else self.method
        if init not in INIT_METHODS:
            raise ConfigError(f"unknown --init {init!r}; choose one of {', '.join(INIT_METHODS)}")
        if not 0.0 <= self.rebuild_ratio <= 1.0:
            raise ConfigError(f"--rebuild-ratio must be in [0, 1], got {self.rebuild_ratio}")
        if self.calib_samples < 1:
            raise ConfigError(f"--calib-samples must be >= 1, got {self.calib_samples}")
        if self.seqlen < 2:
            raise ConfigError(f"--seqlen must be >= 2, got {self.seqlen}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"--allocation {self.allocation!r}: choose one of {', '.join(ALLOCATIONS)}")
        target = SparsityTarget.parse(self.sparsity)
        check_allocation(self.allocation, target)
        return target, init


def library_versions() -> dict:
    import numpy
    import transformers

    return {"toolchain": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def layer_sparsities(loaded: LoadedModel, calib: torch.Tensor, cfg: PruneConfig, target: SparsityTarget,
                     device, progress: bool) -> tuple[list[float], dict]:
    n_layers = len(loaded.adapter.decoder_layers(loaded.model))
    if cfg.allocation == "uniform":
        return [target.sparsity] * n_layers, {}
    if cfg.allocation == "owl":
        engine = LayerEngine(loaded.model, loaded.adapter, calib, cfg.batch_size, device)
        ratios = owl_outlier_ratios(engine, progress=progress)
        return owl_from_outlier_ratios(ratios, target.sparsity), {"outlier_ratio": ratios}
    traces = hessian_traces(loaded.model, loaded.adapter, calib, cfg.hessian_samples, cfg.seed, device, progress)
    return rank_linear(traces, target.sparsity), {"hessian_trace_per_param": traces}


def prune_loaded(loaded: LoadedModel, calib: torch.Tensor, cfg: PruneConfig, device=None,
                 progress: bool = True) -> dict:
    """Prune `loaded.model` in place, layer by layer. Returns the per-layer report."""
    target, init = cfg.resolve()
    device = torch.device(device) if device is not None else default_device()
    adapter, model = loaded.adapter, loaded.model
    layers = adapter.decoder_layers(model)
    for i, layer in enumerate(layers):  # fail before any work if a shape does not fit the target
        for name, lin in adapter.linears(layer).items():
            target.check_weight(f"layer {i} {name}", lin.weight)

    t0 = time.perf_counter()
    sparsities, alloc_info = layer_sparsities(loaded, calib, cfg, target, device, progress)
    t_alloc = time.perf_counter() - t0

    method = make_method(init)
    barber = Barber(cfg.rebuild_ratio, cfg.keep_updates) if cfg.method == "barber" else None
    engine = LayerEngine(model, adapter, calib, cfg.batch_size, device)
    hidden = engine.capture_inputs() if method.needs_stats or barber else None
    out_buf = torch.empty_like(hidden) if hidden is not None else None
    per_layer, pruned_total, weights_total = [], 0, 0
    bar = tqdm(list(enumerate(layers)), desc=f"prune {cfg.method}{'/' + init if barber else ''} {target.label}",
               disable=not progress, unit="layer")
    for i, layer in bar:
        t_layer = time.perf_counter()
        layer.to(device)
        layer_target = target if target.is_nm else SparsityTarget.unstructured(sparsities[i])
        dense_layer = copy.deepcopy(layer) if barber else None
        stats = engine.collect_stats(layer, hidden, method.needs_hessian) if method.needs_stats else {}
        masks, targets = {}, {}
        for name, lin in adapter.linears(layer).items():
            weight, mask = method.prune(lin.weight, stats.get(name), layer_target)
            lin.weight.data = weight.to(lin.weight.dtype)
            masks[name], targets[name] = mask, layer_target
        del stats
        entry = {"layer": i, "target": layer_target.label}
        if barber:
            entry["barber"] = barber.rebuild_layer(engine, layer, dense_layer, hidden, masks, targets)
            del dense_layer
        pruned_total += sum(int(m.sum()) for m in masks.values())
        weights_total += sum(m.numel() for m in masks.values())
        entry["linears"] = {
            name: {"sparsity": float(mask.float().mean()),
                   **({"nm_valid": check_nm(mask, target.n, target.m)} if target.is_nm else {})}
            for name, mask in masks.items()}
        if hidden is not None and i + 1 < len(layers):
            hidden, out_buf = engine.forward_layer(layer, hidden, out_buf), hidden
        layer.to("cpu")
        entry["seconds"] = round(time.perf_counter() - t_layer, 3)
        per_layer.append(entry)
        bar.set_postfix(s=f"{sum(m['sparsity'] for m in entry['linears'].values()) / len(masks):.3f}")

    return {
        "method": cfg.method, "init": init if barber else None, "sparsity": target.label,
        "nm": [target.n, target.m] if target.is_nm else None,
        "global_sparsity": pruned_total / weights_total, "allocation": cfg.allocation, "allocation_info": alloc_info,
        "layer_sparsity": sparsities,
        "seconds": {"allocation": round(t_alloc, 3), "total": round(time.perf_counter() - t0, 3)},
        "layers": per_layer,
    }


def calibration_data(loaded: LoadedModel, cfg: PruneConfig) -> tuple[torch.Tensor, dict]:
    corpus = get_corpus(cfg.dataset, cfg.text_file)
    seqlen = min(cfg.seqlen, model_max_seqlen(loaded.model))
    ids = tokenize(loaded.tokenizer, corpus.calib_text)
    calib = calibration_windows(ids, cfg.calib_samples, seqlen, cfg.seed)
    return calib, {"dataset": corpus.name, "samples": cfg.calib_samples, "seqlen": seqlen, "seed": cfg.seed,
                   "split_tokens": int(ids.numel())}


def run_prune(model_spec: str, out: str | Path, cfg: PruneConfig, device=None, progress: bool = True) -> dict:
    """Load, calibrate, prune, and write an HF directory plus compression.json (atomically)."""
    cfg.resolve()
    t0 = time.perf_counter()
    loaded = load_model(model_spec)
    t_load = time.perf_counter() - t0
    calib, calib_info = calibration_data(loaded, cfg)
    report = prune_loaded(loaded, calib, cfg, device=device, progress=progress)
    report["seconds"]["load"] = round(t_load, 3)
    report.update({"format": "toolchain.compression/1", "source": loaded.source, "calibration": calib_info,
                   "config": asdict(cfg), "versions": library_versions(), "peak_rss_mib": round(peak_rss_mib(), 1)})
    path = save_model(loaded, out, extra_json={"compression.json": report})
    report["out"] = str(path)
    return report
