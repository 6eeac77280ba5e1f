"""`toolchain bench streaming`: what streaming costs in wall time on a model that fits in memory.

Each job runs twice per round, streamed (`--streaming`: every decoder layer read from the checkpoint when the
layer engine reaches it, written to the output shards and freed) and in memory (`--no-streaming`), each in its
own process, on the benchmark's dense copy of `--model` with the reference calibration (32 x 512 pydoc windows).
The order alternates from round to round (streamed first, then in memory first, ...), and the ratio reported is
the median over rounds of streamed / in-memory wall time of the same round, so a slow spell of the machine
falls on both sides of a ratio. The first round's two outputs are compared tensor by tensor: streaming must give
the same model, bit for bit.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from toolchain.reference_runs import CALIB_SAMPLES, GROUP_SIZE, SEQLEN, dense_hf_dir, run_command

from .common import check_only, result_stem, work_dir, write_result

#: job -> its command without --model/--out and the calibration
JOBS = {
    "wanda 2:4": ["prune", "--method", "wanda", "--sparsity", "2:4"],
    "sparsegpt 2:4": ["prune", "--method", "sparsegpt", "--sparsity", "2:4"],
    "gptq 4-bit": ["quantize", "--method", "gptq", "--bits", "4", "--group-size", str(GROUP_SIZE)],
}
ROUNDS = 3
MODES = {"streamed": "--streaming", "in memory": "--no-streaming"}


def same_tensors(a: Path, b: Path) -> tuple[int, list[str]]:
    """(tensors compared, names that differ) between two model directories' safetensors, quant state included,
    read one tensor at a time."""
    import torch
    from safetensors import safe_open

    def index(directory: Path) -> dict[str, Path]:
        where = {}
        for f in sorted(directory.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                where.update({(f.name if f.name == "quant_state.safetensors" else "") + k: f for k in h.keys()})
        return where

    left, right = index(a), index(b)
    differ = sorted(set(left) ^ set(right))
    for name in sorted(set(left) & set(right)):
        key = name.removeprefix("quant_state.safetensors")
        with safe_open(str(left[name]), framework="pt") as x, safe_open(str(right[name]), framework="pt") as y:
            if not torch.equal(x.get_tensor(key), y.get_tensor(key)):
                differ.append(name)
    return len(set(left) & set(right)), differ


def run_job(src: Path, out: Path, job: str, mode: str, calib: list[str]) -> dict:
    cmd = [sys.executable, "-m", "toolchain.cli", *JOBS[job], *calib, MODES[mode], "--model", str(src), "--out",
           str(out), "--quiet"]
    t0 = time.perf_counter()
    run_command(cmd, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    report = json.loads((out / "compression.json").read_text())
    if bool(report.get("streaming")) != (mode == "streamed"):
        raise RuntimeError(f"{job} {mode}: compression.json says streaming={report.get('streaming')}")
    return {"wall_seconds": round(wall, 1), "peak_rss_mib": report["peak_rss_mib"]}


def run_streaming_bench(model: str, out_dir: str | Path, only: list[str] | None = None, rounds: int = ROUNDS,
                        calib_samples: int = CALIB_SAMPLES, seqlen: int = SEQLEN) -> dict:
    """The table on `model`; `calib_samples` x `seqlen` smaller than the reference only for tests."""
    check_only("streaming", only, JOBS)
    calib = ["--calib-samples", str(calib_samples), "--seqlen", str(seqlen)]
    jobs = [j for j in JOBS if not only or j in only]
    out_dir = Path(out_dir)
    work = work_dir(out_dir)
    src = dense_hf_dir(model, work)
    stem = result_stem(out_dir, "streaming", model)
    rows = []

    def save(partial: bool) -> dict:
        result = {"model": str(model), "threads": os.cpu_count(), "rounds": rounds,
                  "calibration": f"pydoc {calib_samples}x{seqlen}, seed 0", "rows": list(rows), "partial": partial}
        write_result(stem, result, list(JOBS), lambda r: r["job"], table)
        return result

    for job in jobs:
        runs = {mode: [] for mode in MODES}
        ratios, identical = [], None
        for r in range(rounds):
            order = list(MODES) if r % 2 == 0 else list(MODES)[::-1]
            outs = {mode: work / f"streaming-bench-{mode.replace(' ', '-')}" for mode in MODES}
            for mode in order:
                shutil.rmtree(outs[mode], ignore_errors=True)
                runs[mode].append(run_job(src, outs[mode], job, mode, calib))
            ratios.append(runs["streamed"][-1]["wall_seconds"] / runs["in memory"][-1]["wall_seconds"])
            if r == 0:
                compared, differ = same_tensors(outs["streamed"], outs["in memory"])
                identical = {"tensors": compared, "differ": differ[:10]}
            for path in outs.values():
                shutil.rmtree(path, ignore_errors=True)
        rows.append({"job": job, "command": "toolchain " + " ".join([*JOBS[job], *calib]) + " --streaming|--no-streaming",
                     "runs": runs, "ratios": [round(x, 3) for x in ratios],
                     "median_ratio": round(statistics.median(ratios), 3),
                     "median_wall": {m: statistics.median(x["wall_seconds"] for x in runs[m]) for m in MODES},
                     "peak_rss_mib": {m: max(x["peak_rss_mib"] for x in runs[m]) for m in MODES},
                     "identical": identical})
        print(json.dumps(rows[-1]), flush=True)
        save(partial=True)
    return save(partial=bool(only))


def table(result: dict) -> str:
    lines = [f"# Streaming against in memory: {result['model']}", "",
             f"Calibration {result['calibration']}; {result['threads']} threads; {result['rounds']} rounds, the "
             f"order alternated; ratio = median over rounds of streamed / in-memory wall time (whole process).", "",
             "| job | wall s streamed | wall s in memory | streamed / in memory (per round) | peak RSS MiB streamed / "
             "in memory | same tensors |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        same = r["identical"]
        check = (f"{same['tensors']}/{same['tensors']} identical" if not same["differ"]
                 else f"differ: {', '.join(same['differ'])}")
        lines.append(f"| {r['job']} | {r['median_wall']['streamed']} | {r['median_wall']['in memory']} | "
                     f"**{r['median_ratio']}** ({', '.join(map(str, r['ratios']))}) | "
                     f"{r['peak_rss_mib']['streamed']} / {r['peak_rss_mib']['in memory']} | {check} |")
    return "\n".join(lines) + "\n"
