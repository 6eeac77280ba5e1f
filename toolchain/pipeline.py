"""The functions the CLI calls (and the tests call) to prune a model, and what every job shares:
calibration settings and data, memory measurement, library versions. Quantization: `toolchain.quantize`."""
from __future__ import annotations

import contextlib
import copy
import platform
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import __version__
from .data import calibration_windows, get_corpus, model_max_seqlen, tokenize
from .engine import LayerEngine, default_device
from .errors import ConfigError
from .models import LoadedModel, load_model, save_model
from .models.loading import check_out_dir
from .sensitivity import layer_hessian_traces
from .prune import INIT_METHODS, METHODS, Barber, SparsityTarget, check_nm, make_method
from .prune.barber import check_granularity, check_score
from .prune.lstsq import lstsq_rows, resolve_layer
from .prune.reconstruct import reconstruct_layer
from .prune.allocation import ALLOCATIONS, check_allocation, owl_from_outlier_ratios, \
    owl_outlier_ratios, rank_linear

REBUILD_SOLVERS = ("lstsq", "obs")   # how Barber re-solves the rows it changed (SparseGPT init)


@dataclass
class CalibConfig:
    """Calibration settings shared by every layer-by-layer job."""

    calib_samples: int = 128
    seqlen: int = 2048
    seed: int = 0
    dataset: str | None = None
    text_file: str | None = None
    batch_size: int = 8

    def check_calibration(self) -> None:
        if self.calib_samples < 1:
            raise ConfigError(f"--calib-samples must be >= 1, got {self.calib_samples}")
        if self.seqlen < 2:
            raise ConfigError(f"--seqlen must be >= 2, got {self.seqlen}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")


@dataclass
class PruneConfig(CalibConfig):
    method: str = "wanda"
    init: str | None = None          # Barber's initial pruner (default wanda)
    sparsity: str = "0.5"            # fraction, or N:M (N kept of every M)
    allocation: str = "uniform"
    rebuild_ratio: float = 0.01      # Barber's alpha: fraction of the beneficial swaps that are made
    rebuild_granularity: str = "row"  # Barber's swap ranking group: row, layer or block
    rebuild_score: str = "taylor-exit"  # Barber's score: taylor-exit (ours) or the reference's grad-rms
    keep_updates: bool = True        # Barber: keep the init method's updated weights on kept positions
    rebuild_solver: str = "lstsq"    # Barber on SparseGPT: re-solve changed rows by least squares or OBS
    loss_guard: bool = True          # Barber: keep a block's rebuild only if its block loss does not rise
    hessian_samples: int = 4         # windows for the Hutchinson trace (--allocation hessian)
    resolve_mode: str = "none"       # "lstsq": re-solve every kept weight exactly under the final mask
    reconstruct: str = "none"        # "block": tune each pruned layer's kept weights to the dense blocks' outputs
    reconstruct_epochs: int = 1
    reconstruct_lr: float = 5e-4
    reconstruct_batch: int = 4       # windows per Adam step

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
        self.check_calibration()
        if self.resolve_mode not in ("none", "lstsq"):
            raise ConfigError(f"--resolve {self.resolve_mode!r}: choose none or lstsq")
        if self.reconstruct not in ("none", "block"):
            raise ConfigError(f"--reconstruct {self.reconstruct!r}: choose none or block")
        if self.reconstruct_epochs < 1 or not self.reconstruct_lr > 0 or self.reconstruct_batch < 1:
            raise ConfigError(f"--reconstruct-epochs and --reconstruct-batch must be >= 1 and --reconstruct-lr > 0 "
                              f"(got {self.reconstruct_epochs}, {self.reconstruct_batch}, {self.reconstruct_lr})")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"--allocation {self.allocation!r}: choose one of {', '.join(ALLOCATIONS)}")
        target = SparsityTarget.parse(self.sparsity)
        check_allocation(self.allocation, target)
        check_granularity(self.rebuild_granularity, target)
        check_score(self.rebuild_score, self.rebuild_granularity)
        if self.rebuild_solver not in REBUILD_SOLVERS:
            raise ConfigError(f"--rebuild-solver {self.rebuild_solver!r}: choose one of {', '.join(REBUILD_SOLVERS)}")
        return target, init


def library_versions() -> dict:
    import numpy
    import transformers

    return {"toolchain": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def machine_description() -> dict:
    """What a timing (and, through kernel choice, float rounding) depends on: the CPU, the vector extensions
    PyTorch dispatches to, and the threads it uses."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def proc_status_mib(field: str) -> float | None:
    """A kB field of /proc/self/status in MiB, or None where there is no such file (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


class AnonPeak:
    """Samples the process's anonymous resident memory (RssAnon) every 20 ms while active.

    Peak RSS (VmHWM) also counts the clean, file-backed pages of the memory-mapped input checkpoint, which
    are page cache the kernel can drop; RssAnon is the memory the process itself allocated."""

    def __init__(self, interval: float = 0.02):
        import threading

        self.interval, self.peak_mib = interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read_mib() -> float:
        return proc_status_mib("RssAnon") or 0.0

    def _run(self):
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, self.read_mib())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, self.read_mib())


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: the latter survives fork+exec, so a
    child started by a big parent would report the parent's peak."""
    hwm = proc_status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@torch.no_grad()
def set_weight(linear: torch.nn.Linear, weight: torch.Tensor) -> None:
    """Write new weights into the existing tensor: a checkpoint loaded by memory map then turns its pages
    into the process's own copy-on-write pages, instead of holding the old (file) and new copies at once."""
    linear.weight.data.copy_(weight)


def layer_sparsities(loaded: LoadedModel, calib: torch.Tensor, cfg: PruneConfig, target: SparsityTarget,
                     device, progress: bool) -> tuple[list[float], dict]:
    n_layers = len(loaded.adapter.decoder_layers(loaded.model))
    if cfg.allocation == "uniform":
        return [target.sparsity] * n_layers, {}
    if cfg.allocation == "owl":
        engine = LayerEngine(loaded.model, loaded.adapter, calib, cfg.batch_size, device)
        ratios = owl_outlier_ratios(engine, progress=progress)
        return owl_from_outlier_ratios(ratios, target.sparsity), {"outlier_ratio": ratios}
    traces = layer_hessian_traces(loaded.model, loaded.adapter, calib, cfg.hessian_samples, cfg.seed, device, progress)
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
    barber = Barber(cfg.rebuild_ratio, cfg.keep_updates, cfg.loss_guard, cfg.rebuild_granularity,
                    score=cfg.rebuild_score) if cfg.method == "barber" else None
    engine = LayerEngine(model, adapter, calib, cfg.batch_size, device)
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
        masks, targets, dense_w = {}, {}, {}
        for name, lin in adapter.linears(layer).items():
            if lstsq:
                dense_w[name] = lin.weight.detach().float().clone()
            weight, mask = method.prune(lin.weight, stats.get(name), layer_target)
            set_weight(lin, weight)
            masks[name], targets[name] = mask, layer_target
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
                            progress=progress)
    return {
        "method": cfg.method, "init": init if barber else None, "sparsity": target.label,
        "nm": [target.n, target.m] if target.is_nm else None,
        "global_sparsity": counts["pruned"] / counts["total"], "allocation": cfg.allocation, "allocation_info": alloc_info,
        "layer_sparsity": sparsities,
        "seconds": {"allocation": round(t_alloc, 3), "total": round(time.perf_counter() - t0, 3)},
        "layers": per_layer,
    }


def calibration_data(loaded: LoadedModel, cfg: CalibConfig) -> tuple[torch.Tensor, dict]:
    corpus = get_corpus(cfg.dataset, cfg.text_file)
    seqlen = min(cfg.seqlen, model_max_seqlen(loaded.model))
    ids = tokenize(loaded.tokenizer, corpus.calib_text)
    calib = calibration_windows(ids, cfg.calib_samples, seqlen, cfg.seed)
    return calib, {"dataset": corpus.name, "samples": cfg.calib_samples, "seqlen": seqlen, "seed": cfg.seed,
                   "split_tokens": int(ids.numel())}


def run_job(model_spec: str, out: str | Path, cfg: CalibConfig, work, calibrate: bool = True):
    """What prune, quantize and compress share: refuse an --out that would overwrite the input (before any
    work), load the model, make the calibration windows, and run `work(loaded, calib)` while sampling memory.
    Returns (loaded, work's result, facts for compression.json)."""
    if str(model_spec) != "smollm2":
        check_out_dir(model_spec, out)
    with AnonPeak() as anon:
        t0 = time.perf_counter()
        loaded = load_model(model_spec)
        t_load = time.perf_counter() - t0
        calib, calib_info = calibration_data(loaded, cfg) if calibrate else (None, None)
        result = work(loaded, calib)
    facts = {"format": "toolchain.compression/1", "source": loaded.source, "calibration": calib_info,
             "versions": library_versions(), "machine": machine_description(), "load_seconds": round(t_load, 3),
             "peak_rss_mib": round(peak_rss_mib(), 1), "peak_anon_mib": round(anon.peak_mib, 1)}
    return loaded, result, facts


def run_prune(model_spec: str, out: str | Path, cfg: PruneConfig, device=None, progress: bool = True) -> dict:
    """Load, calibrate, prune, and write an HF directory plus compression.json (atomically)."""
    cfg.resolve()
    loaded, report, facts = run_job(model_spec, out, cfg, lambda lm, calib: prune_loaded(
        lm, calib, cfg, device=device, progress=progress))
    report["seconds"]["load"] = facts.pop("load_seconds")
    report.update({**facts, "config": asdict(cfg)})
    path = save_model(loaded, out, extra_json={"compression.json": report})
    report["out"] = str(path)
    return report
