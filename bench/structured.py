"""`toolchain bench structured`: structured pruning methods on SmolLM2, quality against speed.

Every method of `toolchain prune --structured` at 20% and 30% (and 40%) of the decoder parameters removed, each
pruned in its own process with the reference budget (32 x 512 pydoc calibration windows), so its wall time and
peak RSS are its own. Each row: held-out perplexity on pydoc (the calibration domain), wiki and science; the
decoder's parameters; the float ONNX graph's onnxruntime prefill (128 tokens) and decode latency as a ratio to
the dense model's graph, timed back to back with it in the same process (this machine is shared, so the pair
is what is comparable); and the FPGA cycles per token of the decoder linears, from the accelerator's cycle
formula (`AccelConfig.layer_cycles`, every PE busy; not a simulation) on the dense design.

Allocation: FLAP runs its own global standardised ranking (`--allocation global`, which sets the attention/MLP
split here: transformers cannot load per-layer widths for Llama), LLM-Pruner's Taylor baseline block-wise
uniform as in its paper, Wanda-sp and magnitude uniform as in FLAP's comparison; ours (obs-refit) narrowing
only (`--depth-share 0`) uniform, and
with `--allocation search` (32 candidates) and with half the budget taken first as whole layers
(`--depth-share 0.5`, ours' default) as rows of their own. Depth pruning (`--method depth`, whole decoder
layers by Block Influence, ShortGPT's one-shot ranking, and re-scored after each removal with `--rescore`) runs
at the same budgets: 20/30/40% of SmolLM2's 30 layers are 6, 9 and 12 layers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from toolchain.reference_runs import CALIB_SAMPLES, EVAL_DATASETS, SEQLEN, dense_hf_dir, heldout_perplexities, \
    prune_in_subprocess

from .common import check_only, result_stem, slug, work_dir, write_result

SPARSITIES = ("0.2", "0.3", "0.4")
#: (row name, --method, extra flags), ours first
CONFIGS = (("obs-refit", "obs-refit", ["--depth-share", "0"]),
           ("obs-refit search", "obs-refit", ["--depth-share", "0", "--allocation", "search", "--search-budget", "32"]),
           ("obs-refit + depth", "obs-refit", ["--depth-share", "0.5"]),
           ("flap", "flap", ["--allocation", "global"]),
           ("taylor", "taylor", []),
           ("wanda-sp", "wanda-sp", []),
           ("magnitude", "magnitude", []),
           ("depth", "depth", []),
           ("depth rescore", "depth", ["--rescore"]))
PREFILL, DECODE_STEPS, REPEATS = 128, 32, 5
#: the first windows of each held-out split scored (16 x 512 = 8K tokens): a dozen models x three texts stay
#: affordable on a shared CPU
EVAL_WINDOWS = 16


def structured_runs(only: list[str] | None) -> list[tuple[str, str, list[str], str]]:
    """(row name, method, extra flags, sparsity) of the runs `--only` selects (NAME or NAME@SPARSITY), in the
    order asked for; all of them without it."""
    names = [c[0] for c in CONFIGS]
    check_only("structured", only, ["dense", *names, *(f"{n}@{s}" for n in names for s in SPARSITIES)])
    runs = [(name, method, extra, s) for s in SPARSITIES for name, method, extra in CONFIGS
            if not only or name in only or f"{name}@{s}" in only]
    if only:
        runs.sort(key=lambda r: min(i for i, o in enumerate(only) if o in (r[0], f"{r[0]}@{r[3]}")))
    return runs


def decoder_cycles(model_dir: Path) -> int:
    """FPGA cycles per token through every decoder linear on the dense design (N = M), by the cycle formula."""
    from safetensors import safe_open

    from toolchain.fpga.config import AccelConfig

    design = AccelConfig().dense_twin()
    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                shape = h.get_slice(key).get_shape()
                if ".layers." in key and key.endswith(".weight") and len(shape) == 2:
                    rows, k = shape
                    total += design.layer_cycles(k, rows)
    return total


def decoder_params(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                if ".layers." in key:
                    n = 1
                    for d in h.get_slice(key).get_shape():
                        n *= d
                    total += n
    return total


def float_onnx(model_dir: Path) -> Path:
    """The model's float ONNX graph (onnxruntime-ready), written once beside it."""
    from toolchain.export.onnx import export_onnx

    path = model_dir.parent / f"{model_dir.name}.float.onnx"
    if not path.is_file():
        export_onnx(model_dir, path, "float")
    return path


def ort_pair(dense: Path, pruned: Path, threads: int) -> dict:
    """Prefill and decode latency of the pruned graph and the dense one, timed back to back (pruned, dense,
    pruned, dense): each figure the lower of its two, and the ratios."""
    from toolchain.export.ort_runtime import OrtDecoder, ort_session, time_decoder

    sessions = {name: OrtDecoder(ort_session(path, "all", threads=threads))
                for name, path in (("pruned", pruned), ("dense", dense))}
    best = {name: {"prefill_ms": float("inf"), "decode_ms_per_token": float("inf")} for name in sessions}
    for _ in range(2):
        for name, dec in sessions.items():
            t = time_decoder(dec, PREFILL, DECODE_STEPS, REPEATS)
            for key in best[name]:
                best[name][key] = min(best[name][key], t[key])
    return {"prefill_ms": round(best["pruned"]["prefill_ms"], 1),
            "decode_ms_per_token": round(best["pruned"]["decode_ms_per_token"], 2),
            "dense_prefill_ms": round(best["dense"]["prefill_ms"], 1),
            "dense_decode_ms_per_token": round(best["dense"]["decode_ms_per_token"], 2),
            "prefill_x_dense": round(best["pruned"]["prefill_ms"] / best["dense"]["prefill_ms"], 3),
            "decode_x_dense": round(best["pruned"]["decode_ms_per_token"] / best["dense"]["decode_ms_per_token"], 3)}


def run_structured_bench(model: str, out_dir: str | Path, only: list[str] | None = None) -> dict:
    runs = structured_runs(only)
    out_dir = Path(out_dir)
    work = work_dir(out_dir)
    src = dense_hf_dir(model, work)
    threads = os.cpu_count() or 1
    dense_onnx = float_onnx(src)
    dense = {"name": "dense", "sparsity": "0", "decoder_params": decoder_params(src), "cycles": decoder_cycles(src),
             **{f"ppl_{k}": round(v, 3) for k, v in heldout_perplexities(src, max_windows=EVAL_WINDOWS).items()}}
    print(json.dumps(dense), flush=True)
    stem = result_stem(out_dir, "structured", model)
    order = [f"{n}@{s}" for s in SPARSITIES for n, _, _ in CONFIGS]

    def save(rows, partial):
        result = {"model": model, "calibration": f"pydoc {CALIB_SAMPLES}x{SEQLEN}, seed 0", "threads": threads,
                  "eval": f"first {EVAL_WINDOWS} windows of {SEQLEN} tokens of each held-out split", "dense": dense,
                  "rows": list(rows), "partial": partial}
        write_result(stem, result, order, lambda r: f"{r['name']}@{r['sparsity']}", structured_table)
        return result

    rows = []
    for name, method, extra, sparsity in runs:
        out = work / f"structured-{slug(name)}-{sparsity}"
        t0 = time.perf_counter()
        if not (out / "compression.json").is_file():
            run = prune_in_subprocess(src, out, method, None, sparsity, ["--structured", *extra])
        else:   # a model an earlier run made: its own process's figures are in its compression.json
            report = json.loads((out / "compression.json").read_text())
            run = {"prune_seconds": report["seconds"]["total"], "peak_rss_mib": report["peak_rss_mib"],
                   "global_sparsity": report["global_sparsity"], "process_seconds": None,
                   "command": None}
        report = json.loads((out / "compression.json").read_text())
        row = {"name": name, "sparsity": sparsity, "method": method,
               "removed_fraction": round(report["decoder_params"]["removed_fraction"], 4),
               "decoder_params": decoder_params(out), "widths": report["widths"],
               "prune_seconds": run["prune_seconds"], "process_seconds": run["process_seconds"],
               "peak_rss_mib": run["peak_rss_mib"], "command": run["command"],
               **{f"ppl_{k}": round(v, 3) for k, v in heldout_perplexities(out, max_windows=EVAL_WINDOWS).items()},
               "cycles": decoder_cycles(out)}
        row["cycles_x_dense"] = round(row["cycles"] / dense["cycles"], 3)
        if "search" in report.get("allocation_info", {}):
            s = report["allocation_info"]["search"]
            row["search"] = {k: s[k] for k in ("candidates_evaluated", "seed_kl", "best_kl", "seed", "best")}
        row.update(ort_pair(dense_onnx, float_onnx(out), threads))
        row["bench_seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        save([row], partial=True)   # each row as it is measured: a long run interrupted keeps what it made
    return save(rows, partial=bool(only))


def _bold_best(rows: list[dict], key: str, lower: bool = True) -> set[int]:
    values = [r.get(key) for r in rows]
    present = [v for v in values if v is not None]
    if not present:
        return set()
    best = min(present) if lower else max(present)
    return {i for i, v in enumerate(values) if v == best}


def structured_table(r: dict) -> str:
    d = r["dense"]
    lines = [f"# Structured pruning benchmark: {r['model']}", "",
             f"Calibration {r['calibration']}; perplexity on the {r['eval']} (pydoc is the calibration domain). "
             f"ONNX float graphs in onnxruntime CPU, {r['threads']} threads, batch 1, prefill {PREFILL} tokens; each "
             f"pruned graph timed back to back with the dense one. FPGA: decoder-linear cycles per token by the "
             f"cycle formula on the dense design. Bold: best of the column within a sparsity.", "",
             f"Dense: {d['decoder_params'] / 1e6:.2f} M decoder parameters; perplexity pydoc {d['ppl_pydoc']:.2f}, "
             f"wiki {d['ppl_wiki']:.2f}, science {d['ppl_science']:.2f}; {d['cycles']:,} cycles per token.", "",
             "| removed | method | decoder params (M) | ppl pydoc | ppl wiki | ppl science | prune s | peak RSS MiB "
             "| prefill x dense | decode x dense | decode ms/token | FPGA cycles x dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for sparsity in SPARSITIES:
        rows = [row for row in r["rows"] if row["sparsity"] == sparsity]
        if not rows:
            continue
        bold = {key: _bold_best(rows, key) for key in ("ppl_pydoc", "ppl_wiki", "ppl_science", "prune_seconds",
                                                       "peak_rss_mib", "prefill_x_dense", "decode_x_dense",
                                                       "cycles_x_dense")}

        def cell(i, row, key, fmt):
            text = fmt.format(row[key])
            return f"**{text}**" if i in bold.get(key, ()) else text

        for i, row in enumerate(rows):
            lines.append(f"| {100 * row['removed_fraction']:.1f}% | {row['name']} | "
                         f"{row['decoder_params'] / 1e6:.2f} | {cell(i, row, 'ppl_pydoc', '{:.2f}')} | "
                         f"{cell(i, row, 'ppl_wiki', '{:.2f}')} | {cell(i, row, 'ppl_science', '{:.2f}')} | "
                         f"{cell(i, row, 'prune_seconds', '{:.0f}')} | {cell(i, row, 'peak_rss_mib', '{:.0f}')} | "
                         f"{cell(i, row, 'prefill_x_dense', '{:.3f}')} | {cell(i, row, 'decode_x_dense', '{:.3f}')} | "
                         f"{row['decode_ms_per_token']} | {cell(i, row, 'cycles_x_dense', '{:.3f}')} |")
    lines += ["", "Commands:", ""]
    lines += [f"- {row['name']} @ {row['sparsity']}: `{row['command']}`" for row in r["rows"] if row.get("command")]
    return "\n".join(lines) + "\n"
