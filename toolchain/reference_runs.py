"""Reference runs on a real model, shared by `toolchain demo` and the benchmarks.

A run prunes or quantizes in its own process (`toolchain prune` / `toolchain quantize`), so its wall time and
peak RSS are its own, and returns the facts of the `compression.json` it wrote. Perplexity is measured on the
held-out pydoc split. Every run uses the reference budget: CALIB_SAMPLES calibration windows of SEQLEN tokens.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from .data import OUT_OF_DOMAIN, eval_windows, get_corpus, tokenize
from .evaluate import perplexity
from .models import load_model, save_model

CALIB_SAMPLES, SEQLEN = 32, 512   # the reference budget: 32 calibration windows of 512 tokens
SEED = 0                          # the calibration windows' seed (the commands' default --seed)
# SmolLM2's hidden size 576 is not a multiple of 128, so the reference quantization groups are 64 wide
GROUP_SIZE = 64


# The evaluation splits of the quality benchmarks: the calibration domain, then the texts outside it.
EVAL_DATASETS = ("pydoc", *OUT_OF_DOMAIN)
# At most this many windows of each split (the first ones): 32K tokens at SEQLEN, all of pydoc's held-out split.
EVAL_MAX_WINDOWS = 64


def heldout_perplexity(model_dir: str | Path, seqlen: int = SEQLEN) -> float:
    """Perplexity of the model directory on the held-out pydoc split, in windows of `seqlen` tokens."""
    return heldout_perplexities(model_dir, ("pydoc",), seqlen)["pydoc"]


def heldout_perplexities(model_dir: str | Path, datasets: tuple[str, ...] = EVAL_DATASETS,
                         seqlen: int = SEQLEN, max_windows: int = EVAL_MAX_WINDOWS) -> dict[str, float]:
    """Perplexity of the model directory on the evaluation split of each dataset, loading the model once."""
    return loaded_perplexities(load_model(model_dir), datasets, seqlen, max_windows)


def loaded_perplexities(loaded, datasets: tuple[str, ...] = EVAL_DATASETS, seqlen: int = SEQLEN,
                        max_windows: int = EVAL_MAX_WINDOWS) -> dict[str, float]:
    """Perplexity of a loaded model on the evaluation split of each dataset, in its first `max_windows` windows
    of `seqlen` tokens."""
    result = {}
    for name in datasets:
        windows = eval_windows(tokenize(loaded.tokenizer, get_corpus(name).eval_text), seqlen, max_windows)
        result[name] = perplexity(loaded.model, windows, progress=False)
    return result


def dense_hf_dir(model: str, cache: Path) -> Path:
    """The model as a plain HF directory under `cache` (loaded once, e.g. from GGUF), so every run loads it
    the same fast way."""
    path = cache / f"{Path(str(model)).name}-hf"
    if not (path / "config.json").exists():
        save_model(load_model(model), path)
    return path


def _toolchain_command(command: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "toolchain.cli", command, *args]


def _as_typed(cmd: list[str]) -> str:
    """The command as a user types it: `toolchain prune ...` without the interpreter."""
    return "toolchain " + " ".join(cmd[3:])


def _calibration_args(command: str, args: list[str], calib: int, seqlen: int) -> list[str]:
    """The calibration flags, for a job that calibrates (the CLI refuses them where they would do nothing)."""
    from .cli import build_parser
    from .jobs.config import PruneConfig, QuantConfig
    from .jobs.options import config_from_args

    parsed = build_parser().parse_args([command, *args])
    cfg, _ = config_from_args(PruneConfig if command == "prune" else QuantConfig, parsed)
    return ["--calib-samples", str(calib), "--seqlen", str(seqlen)] if cfg.calibrates() else []


def prune_command(model_dir: Path, out: Path, method: str, init: str | None, sparsity: str, extra: list[str],
                  calib: int = CALIB_SAMPLES, seqlen: int = SEQLEN, quiet: bool = True) -> list[str]:
    args = ["--model", str(model_dir), "--method", method, "--sparsity", sparsity, "--out", str(out),
            *(["--quiet"] if quiet else []), *(["--init", init] if init else []), *extra]
    return _toolchain_command("prune", *args, *_calibration_args("prune", args, calib, seqlen))


def quantize_command(model_dir: Path, out: Path, method: str, bits: str, extra: list[str],
                     quiet: bool = True) -> list[str]:
    args = ["--model", str(model_dir), "--method", method, "--bits", bits, "--group-size", str(GROUP_SIZE),
            "--out", str(out), *(["--quiet"] if quiet else []), *extra]
    return _toolchain_command("quantize", *args, *_calibration_args("quantize", args, CALIB_SAMPLES, SEQLEN))


# How long a stopped child may take to remove its temporary and scratch directories before it is killed.
CHILD_CLEANUP_SECONDS = 120


def run_command(cmd: list[str], **popen_kwargs) -> None:
    """`subprocess.run(cmd, check=True)`, except when this process is stopped (Ctrl-C, SIGTERM) while the child
    runs: the child is then sent SIGTERM and waited for, so that it removes its temporary and scratch
    directories (a job's --out and streaming scratch) as any stopped `toolchain` command does; `subprocess.run`
    would kill it a quarter second after the interrupt, leaving them behind."""
    process = subprocess.Popen(cmd, **popen_kwargs)
    try:
        code = process.wait()
    except KeyboardInterrupt:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=CHILD_CLEANUP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        raise
    if code:
        raise subprocess.CalledProcessError(code, cmd)


def prune_in_subprocess(model_dir: Path, out: Path, method: str, init: str | None, sparsity: str,
                        extra: list[str], calib: int = CALIB_SAMPLES, seqlen: int = SEQLEN,
                        quiet: bool = True) -> dict:
    """`toolchain prune` in its own process; its time, peak memory and global sparsity."""
    cmd = prune_command(model_dir, out, method, init, sparsity, extra, calib, seqlen, quiet)
    t0 = time.perf_counter()
    run_command(cmd)
    wall = time.perf_counter() - t0
    report = json.loads((out / "compression.json").read_text())
    return {"prune_seconds": report["seconds"]["total"], "process_seconds": round(wall, 1),
            "peak_rss_mib": report["peak_rss_mib"], "peak_anon_mib": report.get("peak_anon_mib"),
            "global_sparsity": report["global_sparsity"],
            "cpu_capability": report.get("machine", {}).get("cpu_capability"),
            "command": _as_typed(cmd)}


def _run_once(cmd: list[str], out: Path, reuse: bool) -> dict:
    """Run `cmd`, which writes `out`, and return its compression.json. With `reuse`, an `out` this very command
    wrote before (its `bench_command.json` holds the command) is taken as it is, so a stopped benchmark resumes
    without running it again."""
    marker = out / "bench_command.json"
    if reuse and marker.is_file() and json.loads(marker.read_text()) == _as_typed(cmd) \
            and (out / "compression.json").is_file():
        print(f"reusing {out} (made by the same command)", flush=True)
    else:
        run_command(cmd)
        marker.write_text(json.dumps(_as_typed(cmd)) + "\n")
    return json.loads((out / "compression.json").read_text())


def quantize_in_subprocess(model_dir: Path, out: Path, method: str, bits: str, extra: list[str],
                           quiet: bool = True, reuse: bool = False) -> dict:
    """`toolchain quantize` (symmetric, GROUP_SIZE groups) in its own process; its time, bits and memory.

    reuse: see `_run_once`."""
    cmd = quantize_command(model_dir, out, method, bits, extra, quiet)
    report = _run_once(cmd, out, reuse)
    q = report["quantization"]
    return {"quant_seconds": q["seconds"]["total"], "avg_bits": round(q["avg_bits"], 4),
            "avg_bits_with_params": round(q["avg_bits_with_params"], 4),
            "weight_mib": round(q["weight_bytes"] / 2**20, 2), "peak_rss_mib": report["peak_rss_mib"],
            "command": _as_typed(cmd)}


def recover_in_subprocess(model_dir: Path, out: Path, extra: list[str], quiet: bool = True,
                          reuse: bool = False) -> dict:
    """`toolchain recover` of a quantized directory in its own process; its time, memory and loss.

    reuse: see `_run_once`."""
    cmd = _toolchain_command("recover", "--model", str(model_dir), "--out", str(out),
                             *(["--quiet"] if quiet else []), *extra)
    report = _run_once(cmd, out, reuse)
    r = report["recovery"]
    return {"recover_seconds": r["total_seconds"], "recover_steps": r["steps"], "recover_examples": r["data"]["examples"],
            "recover_loss": {k: r["loss"][k] for k in ("before", "after")}, "peak_rss_mib": r["peak_rss_mib"],
            "command": _as_typed(cmd)}
