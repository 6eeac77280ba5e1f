"""What every model-writing job shares: refuse an output that would overwrite the input, load the model (or open
it for streaming), make the calibration windows, measure memory, record the facts compression.json carries, and
write the output."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from .. import distributed
from ..data import calibration_data
from ..errors import ConfigError
from ..machine import AnonPeak, library_versions, machine_description, peak_cuda_mib, peak_rss_mib
from ..models import load_model, save_model
from ..models.loading import check_out_dir, is_named_model
from .config import CalibConfig, QuantConfig, output_dtype, resolve_streaming
from .streamed import StreamedOutput, open_streamed

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


def output_bytes_at_least(model: torch.nn.Module, dtype: torch.dtype, codes: bool) -> int:
    """A lower bound on what the output directory takes: every parameter in the output dtype and, quantizing,
    one byte of code per weight of each decoder layer's linears (scales, masks and the tokenizer come on top)."""
    size = sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()
    if codes:
        size += sum(m.weight.numel() for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}.")
    return size


def check_disk_space(out: str | Path, needed: int) -> None:
    """Refuse, before any work, an --out whose file system has less free space than `needed` bytes: the output
    is written beside it and renamed, so a full disk would otherwise surface only at the end of the run."""
    parent = Path(out).resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise ConfigError(f"--out {out}: its file system has {free / 2**30:.1f} GiB free and the output needs at "
                          f"least {needed / 2**30:.1f} GiB; free some space or choose another directory")


def run_job(model_spec: str, out: str | Path, cfg: CalibConfig, work, calibrate: bool = True,
            configs: tuple[CalibConfig, ...] = ()):
    """Refuse an --out that would overwrite the input (before any work), load the model (or, streaming, open
    it and start the output), make the calibration windows, and run `work(loaded, calib)` while sampling memory.
    Returns (loaded, work's result, facts for compression.json); `write_output` then writes the output.
    `configs`: all the job's configs when there are several (compress), for the streaming decision."""
    if not is_named_model(model_spec):
        check_out_dir(model_spec, out)
    streaming = resolve_streaming(model_spec, *(configs or (cfg,)))
    dtype = output_dtype(model_spec, cfg.dtype)
    loaded = None
    try:
        with AnonPeak() as anon:
            t0 = time.perf_counter()
            loaded = open_streamed(model_spec) if streaming else load_model(model_spec)
            loaded.save_dtype = dtype
            t_load = time.perf_counter() - t0
            codes = any(isinstance(c, QuantConfig) for c in (configs or (cfg,)))
            check_disk_space(out, output_bytes_at_least(loaded.model, dtype, codes))
            calib, calib_info = calibration_for(loaded, cfg) if calibrate else (None, None)
            world = distributed.setup()
            calib, windows_per_rank = distributed.shard_windows(calib, world)
            if streaming:
                loaded.output = StreamedOutput(loaded.stream, out, dtype, writer=world.is_writer)
            result = work(loaded, calib)
    except BaseException as exc:
        if loaded is not None and loaded.output is not None:
            loaded.output.abort(exc)
        raise
    facts = {"format": COMPRESSION_FORMAT, "source": loaded.source, "calibration": calib_info,
             "versions": library_versions(), "machine": machine_description(), "load_seconds": round(t_load, 3),
             "streaming": streaming, "dtype": str(dtype).removeprefix("torch."),
             "peak_rss_mib": round(peak_rss_mib(), 1), "peak_anon_mib": round(anon.peak_mib, 1)}
    cuda = peak_cuda_mib()
    if cuda is not None:
        facts["peak_cuda_mib"] = round(cuda, 1)
    if world.is_distributed:   # one process writes no entry, so its compression.json is unchanged
        facts["distributed"] = distributed.record(world, windows_per_rank)
    return loaded, result, facts


def write_output(loaded, out: str | Path, extra_json: dict[str, dict], extra_files: dict | None = None) -> Path:
    """Write the job's output directory, atomically, on the writing rank: the whole model (in memory), or what a
    streamed run has not written yet (config, tokenizer, these files) before its directory is renamed."""
    if loaded.output is None:
        return distributed.write_once(lambda: save_model(loaded, out, extra_json=extra_json, extra_files=extra_files,
                                                         dtype=loaded.save_dtype))
    try:
        return distributed.write_once(lambda: loaded.output.commit(loaded, extra_json, extra_files))
    finally:
        loaded.output.discard_scratch()
