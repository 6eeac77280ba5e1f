"""Run tasks through lm-evaluation-harness on a loaded model, and write what it found.

`evaluate_tasks` picks the items (all, or a seeded subset of `limit` per task), builds our task definitions,
runs lm-eval's evaluator with the `toolchain` backend (or lm-eval's own `hf` backend, for comparison) and
returns the metrics with every item's output. `write_task_results` writes results.json, results.md and one
samples_<task>.jsonl per task.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from pathlib import Path

from ..atomic import atomic_file
from ..errors import DataError
from .definitions import DEFINITIONS, build_tasks
from .files import task_file

# Metrics reported per task, in table order: (lm-eval metric key, label).
METRICS = ("acc,none", "acc_norm,none", "exact_match,strict-match", "exact_match,flexible-extract",
           "exact_match,none", "math_verify,none")


def select_items(names: tuple[str, ...], limit: int | None, seed: int,
                 exclude: dict[str, list[int]] | None = None) -> dict[str, list[int]] | None:
    """The item indices each task is scored on: a seeded random subset of `limit`, sorted, or None for all.
    `exclude`: per task, items never scored (a recovered model's training items); the subset is drawn from the
    rest, so two models with the same exclusion, limit and seed are scored on the same items."""
    exclude = {name: set(items) for name, items in (exclude or {}).items() if name in names}
    if limit is None and not exclude:
        return None
    if limit is not None and limit <= 0:
        raise DataError(f"--limit must be positive, got {limit}")
    picks = {}
    for name in names:
        pool = [i for i in range(task_file(name).items) if i not in exclude.get(name, ())]
        picks[name] = pool if limit is None else sorted(random.Random(seed).sample(pool, min(limit, len(pool))))
    return picks


def _offline() -> None:
    """The task files are local; nothing may reach for a hub."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")


def evaluate_tasks(loaded=None, names: tuple[str, ...] = (), limit: int | None = None, seed: int = 0,
                   backend: str = "toolchain", hf_model_dir: str | None = None, batch_size: int = 1,
                   max_gen_toks: int | None = None, progress: bool = True, lm=None,
                   exclude: dict[str, list[int]] | None = None) -> dict:
    """Metrics and per-item outputs of `names` on a model.

    backend `toolchain`: our batched backend around `loaded`. backend `hf`: lm-eval's HFLM reading the
    Hugging Face directory `hf_model_dir` itself (float32, CPU, `batch_size`), as `lm_eval --model hf` does.
    `lm`: an lm-eval model already built (either kind), reused across calls. `exclude`: per task, items left
    out (see `select_items`).
    """
    _offline()
    try:
        import lm_eval
        from lm_eval.evaluator import simple_evaluate
    except ImportError:
        raise DataError("task evaluation runs on lm-evaluation-harness: pip install 'toolchain[eval]'") from None
    if not progress:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    items = select_items(names, limit, seed, exclude)
    tasks = build_tasks(names)
    if lm is not None:
        model, model_args = lm, None
    elif backend == "toolchain":
        from .backend import ToolchainLM

        model, model_args = ToolchainLM(loaded=loaded), None
    elif backend == "hf":
        model = "hf"
        model_args = {"pretrained": str(hf_model_dir), "dtype": "float32", "device": "cpu"}
    else:
        raise DataError(f"unknown backend {backend!r}; choose toolchain or hf")
    start = time.perf_counter()
    raw = simple_evaluate(model=model, model_args=model_args, tasks=tasks, samples=items, batch_size=batch_size,
                          task_manager=_task_manager(model_args),
                          gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
                          log_samples=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                          fewshot_random_seed=seed)
    seconds = time.perf_counter() - start
    by_name = {task.config.task: task for task in tasks}
    return {
        "backend": backend,
        "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else _version("lm_eval"),
        "limit": limit,
        "seed": seed,
        "excluded": {name: len(set(ids)) for name, ids in (exclude or {}).items() if name in names},
        "seconds": seconds,
        "tasks": {name: _task_summary(name, raw["results"][name], raw["samples"][name], by_name[name])
                  for name in names},
    }


def _task_manager(model_args: dict | None):
    """An lm-eval task manager with an empty index. Our tasks are built objects (`build_tasks`), never looked up
    by name; left to itself, `simple_evaluate` makes a manager that parses every task YAML lm-eval ships (about
    14,000 files, seconds of CPU) on every call."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False, metadata=dict(model_args or {}))


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _task_summary(name: str, metrics: dict, samples: list[dict], task) -> dict:
    definition = DEFINITIONS[name]
    values = {key: metrics[key] for key in METRICS if key in metrics}
    errors = {key: metrics.get(key.replace(",", "_stderr,", 1)) for key in values}
    items = _items(samples, task)
    return {
        "lm_eval_task": definition.base,
        "data": task.config.dataset_kwargs["data_files"],
        "items": len(items),
        "metrics": values,
        "stderr": {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None) for k, v in errors.items()},
        "samples": items,
    }


def _items(samples: list[dict], task) -> list[dict]:
    """One record per item, in item order. lm-eval logs an item once per answer filter (gsm8k has two); the
    filters' extractions and metrics are merged under the filter's name."""
    merged: dict[int, dict] = {}
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        item = merged.setdefault(sample["doc_id"], {"doc_id": sample["doc_id"], "target": sample["target"]})
        if task.OUTPUT_TYPE == "multiple_choice":
            # The log-likelihoods and the two predictions, raw and length-normalised, as acc and acc_norm pick.
            lls = [float(r[0]) for r in sample["filtered_resps"]]
            lengths = [float(len(c)) for c in task.doc_to_choice(sample["doc"])]
            item["loglikelihoods"] = lls
            item["prediction"] = max(range(len(lls)), key=lls.__getitem__)
            item["prediction_norm"] = max(range(len(lls)), key=lambda i: lls[i] / lengths[i])
            item.update({k: sample[k] for k in ("acc", "acc_norm") if k in sample})
        else:
            item["generation"] = sample["resps"][0][0] if sample["resps"] and sample["resps"][0] else ""
            suffix = "" if sample.get("filter", "none") == "none" else f",{sample['filter']}"
            item.setdefault("extracted", {})[sample.get("filter", "none")] = sample["filtered_resps"]
            item.update({k + suffix: sample[k] for k in ("exact_match", "math_verify") if k in sample})
    return list(merged.values())


def markdown_table(result: dict, title: str | None = None) -> str:
    """Results as a Markdown table: one row per task and metric, with the standard error."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| task | metric | value | stderr | items |", "|---|---|---|---|---|"]
    for name, task in result["tasks"].items():
        for key, value in task["metrics"].items():
            err = task["stderr"].get(key)
            lines.append(f"| {name} | {key.replace(',none', '')} | {value:.4f} | "
                         f"{'' if err is None else f'{err:.4f}'} | {task['items']} |")
    return "\n".join(lines) + "\n"


def write_task_results(result: dict, out_dir: str | Path, extra: dict | None = None) -> Path:
    """results.json (metrics, no samples), results.md, and samples_<task>.jsonl with every item's output."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, task in result["tasks"].items():
        with atomic_file(out / f"samples_{name}.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(s, default=str) + "\n" for s in task["samples"]))
    summary = {k: v for k, v in result.items() if k != "tasks"} | (extra or {})
    summary["tasks"] = {n: {k: v for k, v in t.items() if k != "samples"} for n, t in result["tasks"].items()}
    with atomic_file(out / "results.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    with atomic_file(out / "results.md") as tmp:
        tmp.write_text(markdown_table(result))
    return out
