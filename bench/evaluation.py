"""`toolchain bench eval`: the `toolchain` lm-eval backend against lm-eval's own `hf` backend on the zero-shot
suite, the same items, the same model files, one process.

The model is written once as a dense Hugging Face directory; each backend is built once from it (what
`toolchain eval --tasks` and `lm_eval --model hf --model_args pretrained=DIR,dtype=float32 --batch_size 1`
build), then every task runs on both, one after the other, on a seeded subset of LIMIT items. Reported per
task: wall seconds of each, their ratio, and whether every item's two predictions (the acc and the acc_norm
choice) are identical.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from toolchain.reference_runs import dense_hf_dir

from .common import check_only, merge_rows, result_stem, work_dir, write_result

LIMIT = 200  # items per task
SEED = 0


def _agreement(ours: list[dict], theirs: list[dict]) -> dict:
    same_items = [a["doc_id"] for a in ours] == [b["doc_id"] for b in theirs]
    pred = sum(a["prediction"] == b["prediction"] for a, b in zip(ours, theirs))
    norm = sum(a["prediction_norm"] == b["prediction_norm"] for a, b in zip(ours, theirs))
    worst = max(max(abs(x - y) for x, y in zip(a["loglikelihoods"], b["loglikelihoods"]))
                for a, b in zip(ours, theirs))
    return {"same_items": same_items, "identical_predictions": pred, "identical_predictions_norm": norm,
            "max_abs_loglikelihood_diff": worst}


def run_eval_bench(model: str, out_dir: str | Path, only: list[str] | None = None, limit: int = LIMIT) -> dict:
    """Wall time and per-item agreement of the two backends on the zero-shot suite (`limit` items per task)."""
    from lm_eval.models.huggingface import HFLM

    from toolchain.machine import library_versions
    from toolchain.models import load_model
    from toolchain.tasks import ZERO_SHOT
    from toolchain.tasks.backend import ToolchainLM
    from toolchain.tasks.run import evaluate_tasks

    check_only("eval", only, ZERO_SHOT)
    names = tuple(n for n in ZERO_SHOT if not only or n in only)
    out_dir = Path(out_dir)
    src = dense_hf_dir(model, work_dir(out_dir))
    start = time.perf_counter()
    ours_lm = ToolchainLM(loaded=load_model(src))
    load_ours = time.perf_counter() - start
    start = time.perf_counter()
    hf_lm = HFLM(pretrained=str(src), dtype="float32", device="cpu", batch_size=1)
    load_hf = time.perf_counter() - start
    rows = []
    stem = result_stem(out_dir, "eval", model)
    for name in names:
        ours = evaluate_tasks(names=(name,), limit=limit, seed=SEED, lm=ours_lm, progress=False)
        theirs = evaluate_tasks(names=(name,), limit=limit, seed=SEED, lm=hf_lm, batch_size=1, progress=False)
        a, b = ours["tasks"][name], theirs["tasks"][name]
        rows.append({"task": name, "items": a["items"], "toolchain_s": ours["seconds"], "hf_s": theirs["seconds"],
                     "speedup": theirs["seconds"] / ours["seconds"], "metrics_toolchain": a["metrics"],
                     "metrics_hf": b["metrics"], **_agreement(a["samples"], b["samples"])})
        print(f"{name}: toolchain {ours['seconds']:.1f} s, hf {theirs['seconds']:.1f} s, "
              f"{rows[-1]['identical_predictions']}/{a['items']} identical", flush=True)
        # Written after every task, so a long run that is stopped keeps the tasks it finished; the other tasks'
        # rows of an earlier run with the same items stay, and the suite's totals are over all of them.
        merged, earlier_command = _with_earlier(stem, rows, limit)
        result = _result(model, only, limit, load_ours, load_hf, merged, library_versions())
        if earlier_command:
            result["earlier_rows_from"] = earlier_command
        write_result(stem, result, list(ZERO_SHOT), lambda r: r["task"], eval_table)
    return result


def _with_earlier(stem: Path, rows: list[dict], limit: int) -> tuple[list[dict], str | None]:
    """This run's rows over those of the saved result for the other tasks, when it scored the same items."""
    path = Path(f"{stem}.json")
    if not path.is_file():
        return list(rows), None
    saved = json.loads(path.read_text())
    if (saved.get("limit"), saved.get("seed")) != (limit, SEED):
        return list(rows), None
    mine = {r["task"] for r in rows}
    kept = [r for r in saved.get("rows", []) if r["task"] not in mine]
    if not kept:
        return list(rows), None
    command = saved.get("earlier_rows_from") or saved.get("command")
    from toolchain.tasks import ZERO_SHOT

    return merge_rows(kept, rows, list(ZERO_SHOT), lambda r: r["task"]), command


def _result(model: str, only, limit: int, load_ours: float, load_hf: float, rows: list[dict], versions) -> dict:
    total_ours = load_ours + sum(r["toolchain_s"] for r in rows)
    total_hf = load_hf + sum(r["hf_s"] for r in rows)
    return {
        "model": model, "limit": limit, "seed": SEED, "hf_batch_size": 1,
        "command": (f"toolchain bench eval --model {model}" + (f" --only {','.join(only)}" if only else "")
                    if limit == LIMIT else f"python -c 'from toolchain.bench.evaluation import run_eval_bench; "
                    f"run_eval_bench(\"{model}\", OUT, limit={limit})'"),
        "load_s": {"toolchain": load_ours, "hf": load_hf},
        "total_s": {"toolchain": total_ours, "hf": total_hf}, "speedup": total_hf / total_ours,
        "versions": versions, "rows": list(rows),
    }


def eval_table(result: dict) -> str:
    lines = [f"`{result['command']}`: {result['limit']} items per task (seed {result['seed']}); lm-eval `hf` at "
             f"batch size {result['hf_batch_size']}, float32, CPU"
             + (f"; the other tasks' rows are from `{result['earlier_rows_from']}`, on the same items"
                if result.get("earlier_rows_from") else ""), "",
             "| task | items | toolchain s | lm-eval hf s | speedup | identical acc / acc_norm predictions | "
             "acc (toolchain / hf) | acc_norm (toolchain / hf) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        acc = f"{r['metrics_toolchain']['acc,none']:.3f} / {r['metrics_hf']['acc,none']:.3f}"
        norm = (f"{r['metrics_toolchain']['acc_norm,none']:.3f} / {r['metrics_hf']['acc_norm,none']:.3f}"
                if "acc_norm,none" in r["metrics_toolchain"] else "")
        lines.append(f"| {r['task']} | {r['items']} | {r['toolchain_s']:.1f} | {r['hf_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['identical_predictions']}/{r['items']} / "
                     f"{r['identical_predictions_norm']}/{r['items']} | {acc} | {norm} |")
    total = result["total_s"]
    lines += ["", f"Total with model load: toolchain {total['toolchain']:.1f} s, lm-eval hf {total['hf']:.1f} s: "
                  f"**{result['speedup']:.2f}x**"]
    return "\n".join(lines) + "\n"
