"""`toolchain bench prune`: every pruning method at 50% and 2:4 on a real model.

Each configuration prunes in its own process (`toolchain prune`), so its wall time and peak RSS are its own;
perplexity is then measured on the held-out pydoc split.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from toolchain.reference_runs import CALIB_SAMPLES, SEQLEN, dense_hf_dir, heldout_perplexity, prune_in_subprocess

from .common import check_only, model_fp32_mib, result_stem, work_dir, write_result

PRUNE_CONFIGS = [
    # name, method, init, extra flags
    ("magnitude", "magnitude", None, []),
    ("wanda", "wanda", None, []),
    ("sparsegpt", "sparsegpt", None, []),
    ("barber(wanda)", "barber", "wanda", []),
    ("barber(sparsegpt)", "barber", "sparsegpt", []),
    # Control: the rebuilt rows re-solved by SparseGPT's own OBS sweep instead of least squares (the default)
    # The reference's score everywhere (--rebuild-score grad-rms); the rows below it use it too
    ("barber(wanda) grad-rms", "barber", "wanda", ["--rebuild-score", "grad-rms"]),
    ("barber(sparsegpt) grad-rms", "barber", "sparsegpt", ["--rebuild-score", "grad-rms"]),
    ("barber(sparsegpt) obs re-solve", "barber", "sparsegpt", ["--rebuild-score", "grad-rms",
                                                               "--rebuild-solver", "obs"]),
    ("barber(sparsegpt) reset to dense", "barber", "sparsegpt", ["--rebuild-score", "grad-rms",
                                                                 "--no-keep-updates", "--no-loss-guard"]),
    # SmolLM2's 576-wide rows rarely reach floor(0.01 * R) >= 1 swap; a larger ratio shows what rebuilding can do
    ("barber(wanda) ratio 0.05", "barber", "wanda", ["--rebuild-score", "grad-rms", "--rebuild-ratio", "0.05"]),
    ("barber(sparsegpt) ratio 0.05", "barber", "sparsegpt", ["--rebuild-score", "grad-rms",
                                                             "--rebuild-ratio", "0.05"]),
]
SPARSITIES = ("0.5", "2:4")


def prune_runs(only: list[str] | None = None) -> list[tuple[str, str, str | None, list[str], str]]:
    """(name, method, init, extra flags, sparsity) of every run `--only` selects (NAME or NAME@SPARSITY; all
    without it), sparsity by sparsity in the table's order."""
    check_only("prune", only, ["dense", *(n for n, *_ in PRUNE_CONFIGS),
                               *(f"{n}@{s}" for s in SPARSITIES for n, *_ in PRUNE_CONFIGS)])
    return [(name, method, init, extra, sparsity) for sparsity in SPARSITIES
            for name, method, init, extra in PRUNE_CONFIGS
            if not only or name in only or f"{name}@{sparsity}" in only]


def model_dir_name(name: str, sparsity: str) -> str:
    """The folder of a pruned model under the work dir, e.g. barber-sparsegpt-2of4 (the quantization benchmark
    starts from that one)."""
    return f"{name.replace('(', '-').replace(')', '').replace('+', '-')}-{sparsity.replace(':', 'of')}"


def run_prune_bench(model: str, out_dir: str | Path, only: list[str] | None = None) -> dict:
    from toolchain.machine import library_versions

    runs = prune_runs(only)
    out_dir = Path(out_dir)
    work = work_dir(out_dir)
    src = dense_hf_dir(model, work)
    fp32_mib = model_fp32_mib(src)
    rows = []
    if not only or "dense" in only:
        rows.append({"name": "dense", "sparsity": "-", "ppl": heldout_perplexity(src)})
        print(f"dense: ppl {rows[-1]['ppl']:.3f}", flush=True)
    for name, method, init, extra, sparsity in runs:
        target = work / model_dir_name(name, sparsity)
        row = {"name": name, "sparsity": sparsity, **prune_in_subprocess(src, target, method, init, sparsity, extra)}
        row["ppl"] = heldout_perplexity(target)
        row["peak_rss_x_fp32"] = round(row["peak_rss_mib"] / fp32_mib, 2)
        row["peak_anon_x_fp32"] = round(row["peak_anon_mib"] / fp32_mib, 2)
        rows.append(row)
        print(f"{name} {sparsity}: ppl {row['ppl']:.3f}, {row['prune_seconds']:.1f} s, "
              f"peak {row['peak_rss_mib']:.0f} MiB", flush=True)
    result = {"benchmark": "prune", "model": str(model), "calibration": f"pydoc {CALIB_SAMPLES}x{SEQLEN}, seed 0",
              "eval": f"pydoc held-out split, seqlen {SEQLEN}", "model_fp32_mib": round(fp32_mib, 1),
              "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
              "versions": library_versions(), "rows": rows, "partial": bool(only)}
    order = ["dense@-"] + [f"{n}@{s}" for s in SPARSITIES for n, *_ in PRUNE_CONFIGS]
    write_result(result_stem(out_dir, "prune", model), result, order, lambda r: f"{r['name']}@{r['sparsity']}",
                 markdown_table)
    return result


def markdown_table(result: dict) -> str:
    lines = [f"Model: {result['model']}; calibration {result['calibration']}; eval {result['eval']}; "
             f"fp32 weights {result['model_fp32_mib']} MiB.", "",
             "| method | sparsity | perplexity | prune time (s) | peak RSS (MiB) | peak RSS / fp32 | "
             "peak anon (MiB) | peak anon / fp32 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['sparsity']} | {r['ppl']:.2f} | {r.get('prune_seconds', '-')} | "
                     f"{r.get('peak_rss_mib', '-')} | {r.get('peak_rss_x_fp32', '-')} | "
                     f"{r.get('peak_anon_mib', '-')} | {r.get('peak_anon_x_fp32', '-')} |")
    return "\n".join(lines) + "\n"
