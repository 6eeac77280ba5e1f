"""What every model-writing job shares: refuse an output that would overwrite the input, load the model,
make the calibration windows, measure memory, and record the facts compression.json carries."""
from __future__ import annotations

import time
from pathlib import Path

from .. import distributed
from ..data import calibration_data
from ..errors import ConfigError
from ..machine import AnonPeak, library_versions, machine_description, peak_rss_mib
from ..models import load_model
from ..models.loading import check_out_dir, is_named_model
from .config import CalibConfig

COMPRESSION_FORMAT = "toolchain.compression/1"


def calibration_for(loaded, cfg: CalibConfig):
    """The calibration windows `cfg` asks for, and their record. Windows a job holds out (`heldout_windows`) are
    drawn after the --calib-samples ones, so those are the same windows with or without them."""
    extra = cfg.heldout_windows()
    calib, info = calibration_data(loaded, cfg.calib_samples + extra, cfg.seqlen, cfg.seed, cfg.dataset,
                                   cfg.text_file)
    if extra:
        info = {**info, "samples": cfg.calib_samples, "heldout_samples": extra}
    return calib, info


def check_distributed(prune=None, quant=None) -> None:
    """Under torchrun (WORLD_SIZE > 1), refuse the options whose statistics are not summed across ranks, before
    any work: each would see only its own rank's windows and the ranks' models would differ."""
    size = distributed.env_world_size()
    if size <= 1:
        return
    refused = []
    if prune is not None:
        if prune.method == "barber":
            refused.append("--method barber (its gradients and rebuild run on each rank's own windows)")
        if prune.reconstruct != "none":
            refused.append("--reconstruct block (Adam steps on each rank's own windows)")
        if prune.allocation == "hessian":
            refused.append("--allocation hessian (Hutchinson traces over the whole model)")
        if prune.structured and prune.allocation == "search":
            refused.append("--allocation search (its held-out windows and candidate forward passes are not split)")
    if quant is not None and quant.method == "aptq" and quant.is_mixed() and quant.sensitivity == "model":
        refused.append("--sensitivity model (Hutchinson traces over the whole model; --sensitivity local works)")
    if refused:
        raise ConfigError(f"not supported under torch.distributed (WORLD_SIZE={size}): {'; '.join(refused)}. "
                          f"Run it in one process (without torchrun)")


def run_job(model_spec: str, out: str | Path, cfg: CalibConfig, work, calibrate: bool = True):
    """Refuse an --out that would overwrite the input (before any work), load the model, make the calibration
    windows, and run `work(loaded, calib)` while sampling memory. Returns (loaded, work's result, facts for
    compression.json)."""
    if not is_named_model(model_spec):
        check_out_dir(model_spec, out)
    with AnonPeak() as anon:
        t0 = time.perf_counter()
        loaded = load_model(model_spec)
        t_load = time.perf_counter() - t0
        calib, calib_info = calibration_for(loaded, cfg) if calibrate else (None, None)
        world = distributed.setup()
        calib, windows_per_rank = distributed.shard_windows(calib, world)
        result = work(loaded, calib)
    facts = {"format": COMPRESSION_FORMAT, "source": loaded.source, "calibration": calib_info,
             "versions": library_versions(), "machine": machine_description(), "load_seconds": round(t_load, 3),
             "peak_rss_mib": round(peak_rss_mib(), 1), "peak_anon_mib": round(anon.peak_mib, 1)}
    if world.is_distributed:   # one process writes no entry, so its compression.json is unchanged
        facts["distributed"] = distributed.record(world, windows_per_rank)
    return loaded, result, facts
