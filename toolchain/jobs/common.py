"""What every model-writing job shares: refuse an output that would overwrite the input, load the model,
make the calibration windows, measure memory, and record the facts compression.json carries."""
from __future__ import annotations

import time
from pathlib import Path

from ..data import calibration_data
from ..machine import AnonPeak, library_versions, machine_description, peak_rss_mib
from ..models import load_model
from ..models.loading import check_out_dir, is_named_model
from .config import CalibConfig

COMPRESSION_FORMAT = "toolchain.compression/1"


def calibration_for(loaded, cfg: CalibConfig):
    """The calibration windows `cfg` asks for, and their record."""
    return calibration_data(loaded, cfg.calib_samples, cfg.seqlen, cfg.seed, cfg.dataset, cfg.text_file)


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
        result = work(loaded, calib)
    facts = {"format": COMPRESSION_FORMAT, "source": loaded.source, "calibration": calib_info,
             "versions": library_versions(), "machine": machine_description(), "load_seconds": round(t_load, 3),
             "peak_rss_mib": round(peak_rss_mib(), 1), "peak_anon_mib": round(anon.peak_mib, 1)}
    return loaded, result, facts
