"""`toolchain demo` and `toolchain bench prune`: measured runs on a real model.

Each pruning configuration runs in its own process (`toolchain prune`), so its wall time and peak RSS
are its own; perplexity is then measured on the held-out pydoc split.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .data import get_corpus, eval_windows, tokenize
from .evaluate import perplexity
from .models import load_model, save_model

CALIB, SEQLEN = 32, 512   # the benchmark budget named in the issues: 32 windows of 512 tokens

PRUNE_CONFIGS = [
    # name, method, init, extra flags
    ("magnitude", "magnitude", None, []),
    ("wanda", "wanda", None, []),
    ("sparsegpt", "sparsegpt", None, []),
    ("barber(wanda)", "barber", "wanda", []),
    ("barber(sparsegpt)", "barber", "sparsegpt", []),
    ("barber(sparsegpt) reset to dense", "barber", "sparsegpt", ["--no-keep-updates"]),
]
SPARSITIES = ("0.5", "2:4")


def _eval_ppl(model_dir: str | Path) -> float:
    loaded = load_model(model_dir)
    windows = eval_windows(tokenize(loaded.tokenizer, get_corpus().eval_text), SEQLEN)
    return perplexity(loaded.model, windows, progress=False)


def dense_dir(model: str, cache: Path) -> Path:
    """The model as a plain HF directory (loaded once from GGUF), so every run loads it the same fast way."""
    path = cache / f"{Path(str(model)).name}-hf"
    if not (path / "config.json").exists():
        save_model(load_model(model), path)
    return path


def _model_fp32_mib(model_dir: Path) -> float:
    from safetensors import safe_open

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                shape = h.get_slice(k).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n * 4
    return total / 2**20


def run_prune_one(model_dir: Path, out: Path, method: str, init: str | None, sparsity: str, extra: list[str],
                  calib: int = CALIB, seqlen: int = SEQLEN, quiet: bool = True) -> dict:
    cmd = [sys.executable, "-m", "toolchain.cli", "prune", "--model", str(model_dir), "--method", method,
           "--sparsity", sparsity, "--calib-samples", str(calib), "--seqlen", str(seqlen), "--out", str(out),
           *(["--quiet"] if quiet else []), *(["--init", init] if init else []), *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    report = json.loads((out / "compression.json").read_text())
    return {"prune_seconds": report["seconds"]["total"], "process_seconds": round(wall, 1),
            "peak_rss_mib": report["peak_rss_mib"], "peak_anon_mib": report.get("peak_anon_mib"),
            "global_sparsity": report["global_sparsity"],
            "command": "toolchain " + " ".join(cmd[3:])}


def run_prune_bench(model: str, out_dir: str | Path, only: list[str] | None = None) -> dict:
    out_dir = Path(out_dir)
    work = Path("out/bench")
    work.mkdir(parents=True, exist_ok=True)
    src = dense_dir(model, work)
    fp32_mib = _model_fp32_mib(src)
    rows = []
    if not only or "dense" in only:
        rows.append({"name": "dense", "sparsity": "-", "ppl": _eval_ppl(src)})
        print(f"dense: ppl {rows[-1]['ppl']:.3f}", flush=True)
    for sparsity in SPARSITIES:
        for name, method, init, extra in PRUNE_CONFIGS:
            if only and name not in only and f"{name}@{sparsity}" not in only:
                continue
            target = work / f"{name.replace('(', '-').replace(')', '').replace('+', '-')}-{sparsity.replace(':', 'of')}"
            row = {"name": name, "sparsity": sparsity,
                   **run_prune_one(src, target, method, init, sparsity, extra)}
            row["ppl"] = _eval_ppl(target)
            row["peak_rss_x_fp32"] = round(row["peak_rss_mib"] / fp32_mib, 2)
            row["peak_anon_x_fp32"] = round(row["peak_anon_mib"] / fp32_mib, 2)
            rows.append(row)
            print(f"{name} {sparsity}: ppl {row['ppl']:.3f}, {row['prune_seconds']:.1f} s, "
                  f"peak {row['peak_rss_mib']:.0f} MiB", flush=True)
    from .pipeline import library_versions

    result = {"benchmark": "prune", "model": str(model), "calibration": f"pydoc {CALIB}x{SEQLEN}, seed 0",
              "eval": f"pydoc held-out split, seqlen {SEQLEN}", "model_fp32_mib": round(fp32_mib, 1),
              "cpu_threads": os.cpu_count(), "versions": library_versions(), "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / "prune_smollm2" if str(model) == "smollm2" else out_dir / f"prune_{Path(model).name}"
    if only and Path(f"{stem}.json").is_file():  # a partial run replaces its own rows and keeps the others
        fresh = {(r["name"], r["sparsity"]) for r in rows}
        kept = [r for r in json.loads(Path(f"{stem}.json").read_text())["rows"]
                if (r["name"], r["sparsity"]) not in fresh]
        order = ["dense"] + [f"{n}@{s}" for s in SPARSITIES for n, *_ in PRUNE_CONFIGS]
        key = lambda r: order.index("dense" if r["name"] == "dense" else f"{r['name']}@{r['sparsity']}")  # noqa: E731
        rows = sorted(kept + rows, key=key)
        result["rows"] = rows
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{stem}.md").write_text(markdown_table(result))
    print(markdown_table(result))
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


def run_demo(model: str, out: str | Path) -> int:
    """Prune the default model with Barber at 2:4 and compare perplexity with the dense model."""
    out = Path(out)
    work = out / "cache"
    work.mkdir(parents=True, exist_ok=True)
    print(f"[1/3] loading {model} and saving it as a float HF directory", flush=True)
    src = dense_dir(model, work)
    print("[2/3] pruning: LLM-Barber (Wanda init) at 2:4, 32 calibration windows of 512 tokens", flush=True)
    pruned = out / "barber-2of4"
    row = run_prune_one(src, pruned, "barber", "wanda", "2:4", [], quiet=False)
    print("[3/3] perplexity on the held-out pydoc split (seqlen 512)", flush=True)
    dense_ppl, pruned_ppl = _eval_ppl(src), _eval_ppl(pruned)
    print()
    print(f"  dense            perplexity {dense_ppl:8.3f}")
    print(f"  barber 2:4       perplexity {pruned_ppl:8.3f}   pruning time {row['prune_seconds']:.1f} s, "
          f"peak RSS {row['peak_rss_mib']:.0f} MiB")
    print(f"  pruned model:    {pruned}  (compression.json inside)")
    return 0
