"""`toolchain bench prune-quality`: the pruning-quality table on a real model.

Every method and flag combination that can beat the plain references, each pruned in its own process
(`toolchain prune`, as in the prune benchmark) with the benchmark budget (32 x 512 calibration windows):
- the references: Wanda and SparseGPT (the best plain method here) at 50%, SparseGPT at 2:4;
- Barber on SparseGPT over the rebuild ratio alpha and the ranking granularity (row, layer, block; N:M only
  allows row);
- per-layer allocation (OWL, Hessian trace) at 50%, 60% and 70% unstructured;
- the exact least-squares re-solve (`--resolve lstsq`) on SparseGPT and on Barber;
- block reconstruction (`--reconstruct block`) on SparseGPT, on OWL allocation and after the re-solve.
The table has one column per sparsity with perplexity, prune wall time and peak anonymous memory; the best
perplexity of each column is bold and compared with its reference, its time with SparseGPT's.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from toolchain.reference_runs import CALIB_SAMPLES, SEQLEN, dense_hf_dir, heldout_perplexity, prune_in_subprocess

from .common import check_only, model_fp32_mib, result_stem, slug, work_dir, write_result

ALPHAS = ("0.01", "0.05", "0.1", "0.2")
COLUMNS = ("0.5", "2:4", "0.6", "0.7")
REFERENCE = {"0.5": "sparsegpt", "2:4": "sparsegpt", "0.6": "sparsegpt", "0.7": "sparsegpt"}
TIME_BOUND = 3.0   # the best configuration must stay under 3x SparseGPT's wall time to count


def quality_configs() -> list[tuple[str, str, str | None, list[str], tuple[str, ...]]]:
    """(name, method, init, extra flags, sparsities) for every row of the table."""
    rows = [("wanda", "wanda", None, [], ("0.5", "2:4")),
            ("sparsegpt", "sparsegpt", None, [], COLUMNS)]
    for granularity in ("row", "layer", "block"):
        for alpha in ALPHAS:
            rows.append((f"barber(sparsegpt) α={alpha} {granularity}", "barber", "sparsegpt",
                         ["--rebuild-ratio", alpha, "--rebuild-granularity", granularity]
                         + (["--rebuild-score", "grad-rms"] if granularity == "block" else []),
                         ("0.5", "2:4") if granularity == "row" else ("0.5",)))
    for allocation in ("owl", "hessian"):
        rows.append((f"sparsegpt {allocation}", "sparsegpt", None, ["--allocation", allocation], ("0.5", "0.6", "0.7")))
    rows.append(("sparsegpt + reconstruct", "sparsegpt", None, ["--reconstruct", "block"], ("0.5", "2:4")))
    rows.append(("sparsegpt + lstsq", "sparsegpt", None, ["--resolve", "lstsq"], ("0.5", "2:4")))
    rows.append(("sparsegpt + lstsq + reconstruct", "sparsegpt", None, ["--resolve", "lstsq", "--reconstruct", "block"],
                 ("0.5", "2:4")))
    rows.append(("barber(sparsegpt) + lstsq", "barber", "sparsegpt", ["--resolve", "lstsq"], ("0.5", "2:4")))
    rows.append(("sparsegpt owl + reconstruct", "sparsegpt", None, ["--allocation", "owl", "--reconstruct", "block"],
                 ("0.5",)))
    return rows


def quality_runs(only: list[str] | None = None) -> list[tuple[str, str, str | None, list[str], str]]:
    """(name, method, init, extra flags, sparsity) of every run `--only` selects (NAME or NAME@SPARSITY; all
    without it). With `--only` the runs come in the order asked for, so the rows that matter most go first."""
    configs = quality_configs()
    check_only("prune-quality", only, ["dense", *(c[0] for c in configs),
                                       *(f"{n}@{s}" for n, _, _, _, sp in configs for s in sp)])
    runs = [(name, method, init, extra, sparsity) for name, method, init, extra, sparsities in configs
            for sparsity in sparsities if not only or name in only or f"{name}@{sparsity}" in only]
    if only:
        runs.sort(key=lambda r: min(i for i, o in enumerate(only) if o in (r[0], f"{r[0]}@{r[4]}")))
    return runs


def run_quality_bench(model: str, out_dir: str | Path, only: list[str] | None = None) -> dict:
    from toolchain.machine import library_versions

    runs = quality_runs(only)
    out_dir = Path(out_dir)
    src = dense_hf_dir(model, work_dir(out_dir))
    work = work_dir(out_dir) / "quality"
    work.mkdir(exist_ok=True)
    fp32_mib = model_fp32_mib(src)
    stem, rows = result_stem(out_dir, "prune_quality", model), []
    order = ["dense@-"] + [f"{n}@{s}" for n, _, _, _, sp in quality_configs() for s in sp]

    def save(partial: bool) -> dict:
        result = {"benchmark": "prune-quality", "model": str(model),
                  "calibration": f"pydoc {CALIB_SAMPLES}x{SEQLEN}, seed 0",
                  "eval": f"pydoc held-out split, seqlen {SEQLEN}", "model_fp32_mib": round(fp32_mib, 1),
                  "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                  "versions": library_versions(), "rows": list(rows),
                  "partial": partial}
        write_result(stem, result, order, lambda r: f"{r['name']}@{r['sparsity']}", quality_table)
        return result

    if not only or "dense" in only:
        rows.append({"name": "dense", "sparsity": "-", "ppl": heldout_perplexity(src)})
    for name, method, init, extra, sparsity in runs:
        target = work / slug(f"{name}-{sparsity.replace(':', 'of')}")
        row = {"name": name, "sparsity": sparsity, **prune_in_subprocess(src, target, method, init, sparsity, extra)}
        # The command as a user types it: the model by name, an output of their choice.
        row["command"] = (row["command"].replace(f"--model {src}", f"--model {model}")
                          .replace(f"--out {target}", "--out OUT").replace(" --quiet", ""))
        row["ppl"] = heldout_perplexity(target)
        row["peak_anon_x_fp32"] = round(row["peak_anon_mib"] / fp32_mib, 2)
        rows.append(row)
        print(f"{name} @ {sparsity}: ppl {row['ppl']:.3f}, {row['prune_seconds']:.1f} s", flush=True)
        save(partial=True)   # every finished row is on disk, so an interrupted run loses nothing
    return save(partial=bool(only))


def best_per_column(rows: list[dict]) -> dict[str, dict]:
    best: dict[str, dict] = {}
    for r in rows:
        if r["sparsity"] in COLUMNS and (r["sparsity"] not in best or r["ppl"] < best[r["sparsity"]]["ppl"]):
            best[r["sparsity"]] = r
    return best


def quality_table(result: dict) -> str:
    rows = [r for r in result["rows"] if r["sparsity"] != "-"]
    columns = [c for c in COLUMNS if any(r["sparsity"] == c for r in rows)]
    cells = {(r["name"], r["sparsity"]): r for r in rows}
    names = list(dict.fromkeys(r["name"] for r in rows))
    best = best_per_column(rows)
    label = {"0.5": "50%", "0.6": "60%", "0.7": "70%"}
    dense = next((r["ppl"] for r in result["rows"] if r["name"] == "dense"), None)
    lines = [f"Model: {result['model']}; calibration {result['calibration']}; eval {result['eval']}"
             + (f"; dense perplexity {dense:.2f}" if dense else "") + ".",
             "Each cell: perplexity · prune wall time · peak anonymous memory (× fp32 weights). Bold: best of the column.",
             "", "| configuration | " + " | ".join(label.get(c, c) for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name in names:
        out = []
        for c in columns:
            r = cells.get((name, c))
            if r is None:
                out.append("")
                continue
            ppl = f"{r['ppl']:.2f}"
            out.append(f"{'**' + ppl + '**' if best.get(c) is r else ppl} · {r['prune_seconds']:.0f} s · "
                       f"{r['peak_anon_x_fp32']}×")
        lines.append(f"| {name} | " + " | ".join(out) + " |")
    lines += ["", "Best of each column against the references (SparseGPT is the best plain method at every sparsity "
              f"here; Wanda 50% is listed for comparison), overall and within {TIME_BOUND:g}× SparseGPT's time:", ""]
    for c in columns:
        ref = cells.get((REFERENCE[c], c))
        if ref is None:
            continue
        bounded = best_per_column([r for r in rows if r["prune_seconds"] <= TIME_BOUND * ref["prune_seconds"]])
        for tag, b in (("best", best[c]), (f"best within {TIME_BOUND:g}×", bounded.get(c))):
            if b is None or (tag != "best" and b is best[c]):
                continue
            lines.append(f"- {label.get(c, c)}, {tag}: **{b['name']}** {b['ppl']:.2f} vs {ref['name']} {ref['ppl']:.2f} "
                         f"({100 * (b['ppl'] / ref['ppl'] - 1):+.1f}%), time {b['prune_seconds'] / ref['prune_seconds']:.2f}× "
                         f"SparseGPT's. Command: `{b['command']}`")
    return "\n".join(lines) + "\n"
