"""`toolchain bench quant`: RTN, GPTQ and APTQ at 4 and 3 bits, APTQ at 3.5 and 3.0 average bits, and the
prune benchmark's 2:4 Barber model with 4-bit GPTQ and APTQ, on a real model.

Each configuration quantizes in its own process (`toolchain quantize`, symmetric, GROUP_SIZE groups);
perplexity is then measured on the held-out pydoc split.
"""
from __future__ import annotations

import os
from pathlib import Path

from toolchain.reference_runs import (CALIB_SAMPLES, GROUP_SIZE, SEQLEN, dense_hf_dir, heldout_perplexity,
                                      prune_in_subprocess, quantize_in_subprocess)

from .common import check_only, result_stem, slug, work_dir, write_result

QUANT_CONFIGS = [
    # name, input ("dense" or a pruned model from the prune bench), method, bits, extra flags
    ("rtn 4-bit", "dense", "rtn", "4", []),
    ("gptq 4-bit", "dense", "gptq", "4", []),
    ("aptq 4-bit", "dense", "aptq", "4", []),
    ("rtn 3-bit", "dense", "rtn", "3", []),
    ("gptq 3-bit", "dense", "gptq", "3", []),
    ("aptq 3-bit", "dense", "aptq", "3", []),
    ("aptq 3.5 avg (2/4)", "dense", "aptq", "3.5", []),
    ("aptq 3.0 avg (2/4)", "dense", "aptq", "3.0", []),
    ("aptq 3.5 avg (2/3/4)", "dense", "aptq", "3.5", ["--candidates", "2,3,4"]),
    ("aptq 3.0 avg (2/3/4)", "dense", "aptq", "3.0", ["--candidates", "2,3,4"]),
    ("barber 2:4 + gptq 4-bit", "barber-sparsegpt-2of4", "gptq", "4", []),
    ("barber 2:4 + aptq 4-bit", "barber-sparsegpt-2of4", "aptq", "4", []),
]


def quant_runs(only: list[str] | None = None) -> list[tuple[str, str, str, str, list[str]]]:
    """(name, input, method, bits, extra flags) of every configuration `--only` selects (all without it)."""
    check_only("quant", only, ["dense", *(c[0] for c in QUANT_CONFIGS)])
    return [c for c in QUANT_CONFIGS if not only or c[0] in only]


def run_quant_bench(model: str, out_dir: str | Path, only: list[str] | None = None) -> dict:
    """Quantization table: RTN/GPTQ/APTQ at 4 and 3 bits, APTQ at 3.5 and 3.0 average, and the 2:4 Barber
    model (from the prune benchmark, pruned here if missing) with 4-bit GPTQ and APTQ."""
    from toolchain.machine import library_versions

    runs = quant_runs(only)
    out_dir = Path(out_dir)
    work = work_dir(out_dir)
    src = dense_hf_dir(model, work)
    rows = []
    if not only or "dense" in only:
        rows.append({"name": "dense (fp32)", "ppl": heldout_perplexity(src)})
    for name, source, method, bits, extra in runs:
        model_dir = src
        if source != "dense":
            model_dir = work / source
            if not (model_dir / "compression.json").is_file():
                prune_in_subprocess(src, model_dir, "barber", "sparsegpt", "2:4", [])
            if not any(r["name"] == "barber 2:4 (unquantized)" for r in rows):
                rows.append({"name": "barber 2:4 (unquantized)", "ppl": heldout_perplexity(model_dir)})
        target = work / "quant" / slug(name)
        row = {"name": name, **quantize_in_subprocess(model_dir, target, method, bits, extra)}
        row["ppl"] = heldout_perplexity(target)
        rows.append(row)
        print(f"{name}: ppl {row['ppl']:.3f}, {row['quant_seconds']:.1f} s, {row['avg_bits']} bits", flush=True)
    result = {"benchmark": "quant", "model": str(model), "group_size": GROUP_SIZE,
              "calibration": f"pydoc {CALIB_SAMPLES}x{SEQLEN}, seed 0",
              "eval": f"pydoc held-out split, seqlen {SEQLEN}",
              "cpu_threads": os.cpu_count(), "versions": library_versions(), "rows": rows, "partial": bool(only)}
    dense_rows = [c[0] for c in QUANT_CONFIGS if c[1] == "dense"]
    order = ["dense (fp32)", *dense_rows, "barber 2:4 (unquantized)", *(c[0] for c in QUANT_CONFIGS if c[1] != "dense")]
    write_result(result_stem(out_dir, "quant", model), result, order, lambda r: r["name"], quant_table)
    return result


def quant_table(result: dict) -> str:
    lines = [f"Model: {result['model']}; symmetric, group size {result['group_size']}; calibration "
             f"{result['calibration']}; eval {result['eval']}. Weight MiB = codes at their width plus fp16 "
             "scales of the quantized decoder linears (pruned weights counted as codes).", "",
             "| configuration | perplexity | avg bits | avg bits incl. scales | weight MiB | quantize time (s) | "
             "peak RSS (MiB) |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['ppl']:.2f} | {r.get('avg_bits', '-')} | {r.get('avg_bits_with_params', '-')} "
                     f"| {r.get('weight_mib', '-')} | {r.get('quant_seconds', '-')} | {r.get('peak_rss_mib', '-')} |")
    return "\n".join(lines) + "\n"
