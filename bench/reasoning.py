"""`toolchain bench reasoning`: does a compressed model still reason?

Rows: the dense model; RTN, GPTQ and APTQ at 4 and 3 bits and APTQ at an average of 3.5 (over 2 and 4 bits, the
paper's scheme, and over 2, 3 and 4); Wanda, SparseGPT and Barber (on SparseGPT) at 2:4; GPTQ 3-bit after `toolchain
recover`; and the rows that re-check the pruning defaults chosen on pydoc: Barber on both inits at 2:4 and 50%,
Barber's reference score (grad-rms), its OBS re-solve, its loss guard off, five times its swap fraction, and
SparseGPT with the least-squares re-solve and block reconstruction. Each compression runs in its own process
(`toolchain quantize` / `prune` / `recover`, the quant and prune benchmarks' budget: 32 x 512 pydoc calibration
windows, group size 64); a quantized or recovered directory that the same command already wrote is reused. Every
row is then measured on the same items:
- GSM8K (8-shot chain of thought; a seeded subset of `limit` items of its held-out half, which recovery never
  trains on) and MATH-500 (4-shot; `limit` seeded items) accuracy, with the standard error, through
  `toolchain eval --tasks` (lm-eval on the local task files, docs/evaluation.md);
- the zero-shot suite on a seeded subset of `zero_shot_limit` items per task;
- perplexity on pydoc (the calibration domain) and the out-of-domain wiki and science texts, PPL_WINDOWS
  windows of 512 tokens each.
For each generative task, every item a row gets wrong is classified on its text up to the answer the task
scores (toolchain/tasks/failures.py: truncation or loop, format, arithmetic slip, wrong reasoning path) and
compared with the dense model's answer (flips right->wrong and wrong->right); the items that answer and then
run on to the cap or loop, right or wrong, are counted apart. Across the compressed rows, Spearman's rank
correlation between the perplexity increase and the accuracy loss says whether perplexity predicted the damage.

Results: <out>/reasoning_<model>.{json,md,png} (the plot: wrong answers per class and row), written after every
row, and every item's generation under <out>/reasoning_<model>/<row>/samples_<task>.jsonl. A run adds its rows
and tasks to an earlier result's where the settings agree (`_merged`). The compressed models stay under
<out>/work/reasoning/<model>/<row>.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from toolchain.reference_runs import (CALIB_SAMPLES, EVAL_DATASETS, GROUP_SIZE, SEED, SEQLEN, dense_hf_dir,
                                      prune_in_subprocess, quantize_in_subprocess, recover_in_subprocess)

from .common import check_only, merge_rows, result_stem, slug, work_dir, write_result

# A recovery within a benchmark's budget on two cores: 300 training items, each seen once.
RECOVER_FLAGS = ["--examples", "300", "--steps", "75", "--batch-size", "4"]

# name, command ("quantize", "prune" or "recover"), method, bits or sparsity, init (prune) or the row recovered,
# extra flags
REASONING_CONFIGS = [
    ("rtn 4-bit", "quantize", "rtn", "4", None, []),
    ("gptq 4-bit", "quantize", "gptq", "4", None, []),
    ("aptq 4-bit", "quantize", "aptq", "4", None, []),
    ("rtn 3-bit", "quantize", "rtn", "3", None, []),
    ("gptq 3-bit", "quantize", "gptq", "3", None, []),
    ("aptq 3-bit", "quantize", "aptq", "3", None, []),
    # the APTQ paper's scheme (2 and 4 bits), then the same average over three widths, the default
    ("aptq 3.5 avg", "quantize", "aptq", "3.5", None, ["--candidates", "2,4"]),
    ("aptq 3.5 avg 2/3/4", "quantize", "aptq", "3.5", None, ["--candidates", "2,3,4"]),
    ("wanda 2:4", "prune", "wanda", "2:4", None, []),
    ("sparsegpt 2:4", "prune", "sparsegpt", "2:4", None, []),
    ("barber 2:4", "prune", "barber", "2:4", "sparsegpt", []),
    # The pruning defaults chosen on the pydoc split, re-checked out of domain and on the zero-shot suite: Barber
    # against its init at 50% and 2:4, on both inits; its score (the reference's grad-rms against the default
    # taylor-exit); its re-solve of changed rows (SparseGPT's OBS sweep against the default lstsq); its loss guard;
    # its swap fraction α (five times the default 0.01); the opt-in least-squares re-solve and block reconstruction.
    ("barber(wanda) 2:4", "prune", "barber", "2:4", "wanda", []),
    ("barber grad-rms 2:4", "prune", "barber", "2:4", "sparsegpt", ["--rebuild-score", "grad-rms"]),
    ("barber obs 2:4", "prune", "barber", "2:4", "sparsegpt", ["--rebuild-solver", "obs"]),
    ("barber no guard 2:4", "prune", "barber", "2:4", "sparsegpt", ["--no-loss-guard"]),
    ("barber alpha=0.05 2:4", "prune", "barber", "2:4", "sparsegpt", ["--rebuild-ratio", "0.05"]),
    ("sparsegpt lstsq 2:4", "prune", "sparsegpt", "2:4", None, ["--resolve", "lstsq"]),
    ("sparsegpt lstsq block 2:4", "prune", "sparsegpt", "2:4", None, ["--resolve", "lstsq", "--reconstruct", "block"]),
    ("wanda 50%", "prune", "wanda", "0.5", None, []),
    ("barber(wanda) 50%", "prune", "barber", "0.5", "wanda", []),
    ("sparsegpt 50%", "prune", "sparsegpt", "0.5", None, []),
    ("barber 50%", "prune", "barber", "0.5", "sparsegpt", []),
    # Deployment-safe recovery (`toolchain recover`, scales, norms and biases only) of a quantized row, here in
    # the init column: trained on GSM8K's training half, scored like every row on its held-out half.
    ("gptq 3-bit recovered", "recover", None, None, "gptq 3-bit", RECOVER_FLAGS),
]
ROW_ORDER = ["dense", *(c[0] for c in REASONING_CONFIGS)]

GENERATIVE = ("gsm8k", "math500")
# The per-item score each generative task is judged by: GSM8K's strict match asks for "The answer is N."
# (the flexible match is reported beside it); MATH's Minerva exact match after normalisation.
PRIMARY = {"gsm8k": "exact_match,strict-match", "math500": "exact_match,none"}
ITEM_KEY = {"gsm8k": "exact_match,strict-match", "math500": "exact_match"}
LIMIT = 50            # items per generative task
ZERO_SHOT_LIMIT = 50  # items per zero-shot task
MAX_GEN_TOKS = 256    # lm-eval's default cap on a chain of thought
PPL_WINDOWS = 16      # 512-token windows of each perplexity text (8K tokens)
TASK_SEED = 0
# Every row is scored on GSM8K items `toolchain recover` never trains on, so a recovered row is comparable.
HELDOUT_POOL = "the held-out half (toolchain/tasks/splits.py)"


def reasoning_runs(only: list[str] | None = None) -> list[tuple]:
    """The compressions `--only` selects (all without it). With `--only` they run in the order asked for, so
    the rows that matter most are on disk first if a long run is stopped."""
    check_only("reasoning", only, ROW_ORDER)
    if not only:
        return list(REASONING_CONFIGS)
    return sorted((c for c in REASONING_CONFIGS if c[0] in only), key=lambda c: only.index(c[0]))


def parse_reasoning_tasks(text: str | None) -> tuple[str, ...]:
    """`--tasks` of the bench: a comma list of gsm8k, math500 and zero-shot (default all three)."""
    from toolchain.errors import ConfigError

    names = tuple(t.strip() for t in (text or "gsm8k,math500,zero-shot").split(",") if t.strip())
    unknown = [n for n in names if n not in (*GENERATIVE, "zero-shot")]
    if unknown or not names:
        raise ConfigError(f"bench reasoning --tasks: unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
                          "choose from gsm8k, math500, zero-shot")
    return names


def run_reasoning_bench(model: str, out_dir: str | Path, only: list[str] | None = None, limit: int = LIMIT,
                        zero_shot_limit: int = ZERO_SHOT_LIMIT, max_gen_toks: int = MAX_GEN_TOKS,
                        tasks: str | None = None, ppl_windows: int = PPL_WINDOWS, calib_samples: int = CALIB_SAMPLES,
                        seqlen: int = SEQLEN) -> dict:
    """The reasoning table on `model`. `calib_samples` x `seqlen`: the pruning calibration (and `seqlen` the
    perplexity windows); smaller than the reference budget only for tests on tiny models."""
    from toolchain.machine import library_versions

    from toolchain.errors import ConfigError

    runs = reasoning_runs(only)
    task_names = parse_reasoning_tasks(tasks)
    for flag, value in (("--limit", limit), ("--zero-shot-limit", zero_shot_limit), ("--max-gen-toks", max_gen_toks),
                        ("--ppl-windows", ppl_windows)):
        if value <= 0:
            raise ConfigError(f"bench reasoning {flag} must be positive, got {value}")
    out_dir = Path(out_dir)
    work = work_dir(out_dir)
    src = dense_hf_dir(model, work)
    stem = result_stem(out_dir, "reasoning", model)
    samples_dir = Path(f"{stem}")
    settings = {"tasks": list(task_names), "limit": limit, "zero_shot_limit": zero_shot_limit, "seed": TASK_SEED,
                "max_gen_toks": max_gen_toks, "ppl_windows": ppl_windows, "seqlen": seqlen}
    if "gsm8k" in task_names:
        settings["gsm8k_pool"] = HELDOUT_POOL
    command = _command(model, only, settings)
    rows: list[dict] = []

    def save() -> dict:
        merged_rows, merged_settings, earlier_commands = _merged(stem, rows, settings)
        result = {"benchmark": "reasoning", "model": str(model), "command": command, "settings": merged_settings,
                  "commands": list(dict.fromkeys([*earlier_commands, command])),
                  "calibration": f"pydoc {calib_samples}x{seqlen}, seed {SEED}; group size {GROUP_SIZE}",
                  "cpu_count": os.cpu_count(), "versions": library_versions(), "rows": merged_rows}
        result["analysis"] = analyse(result["rows"], tuple(merged_settings["tasks"]))
        result["plot"] = plot_taxonomy(result, Path(f"{stem}.png"))
        write_result(stem, result, ROW_ORDER, lambda r: r["name"], reasoning_table)
        return result

    result = None
    if not only or "dense" in only:
        rows.append({"name": "dense", **measure(src, task_names, settings, samples_dir / "dense")})
        result = save()
    for name, command_name, method, level, init, extra in runs:
        target = work / "reasoning" / slug(Path(str(model)).name) / slug(name)   # named as its result files
        if command_name == "quantize":
            facts = quantize_in_subprocess(src, target, method, level, extra, reuse=True)
        elif command_name == "recover":
            _, _, base_method, base_level, _, base_extra = next(c for c in REASONING_CONFIGS if c[0] == init)
            base = target.parent / slug(init)
            quantize_in_subprocess(src, base, base_method, base_level, base_extra, reuse=True)
            facts = {**recover_in_subprocess(base, target, extra, reuse=True), "recovered_from": init}
            facts["command"] = facts["command"].replace(f"--model {base}", f"--model <{init} output>")
        else:
            facts = prune_in_subprocess(src, target, method, init, level, extra, calib_samples, seqlen)
        # The command as a user types it: the model by name, an output of their choice.
        facts["command"] = (facts["command"].replace(f"--model {src}", f"--model {model}")
                            .replace(f"--out {target}", "--out OUT").replace(" --quiet", ""))
        rows.append({"name": name, **facts, **measure(target, task_names, settings, samples_dir / slug(name))})
        result = save()   # every finished row is on disk, so a stopped run keeps it
    return result if result is not None else save()


def _command(model: str, only: list[str] | None, settings: dict) -> str:
    parts = [f"toolchain bench reasoning --model {model}"]
    if only:
        parts.append(f"--only '{','.join(only)}'")
    defaults = {"tasks": ["gsm8k", "math500", "zero-shot"], "limit": LIMIT, "zero_shot_limit": ZERO_SHOT_LIMIT,
                "max_gen_toks": MAX_GEN_TOKS, "ppl_windows": PPL_WINDOWS}
    for key, default in defaults.items():
        if settings[key] != default:
            value = ",".join(settings[key]) if isinstance(settings[key], list) else settings[key]
            parts.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(parts)


# The settings every measure depends on, and those each task's measure depends on.
SHARED_SETTINGS = ("seed", "ppl_windows", "seqlen")
TASK_SETTINGS = {"gsm8k": ("limit", "max_gen_toks", "gsm8k_pool"), "math500": ("limit", "max_gen_toks"),
                 "zero-shot": ("zero_shot_limit",)}


def _merged(stem: Path, rows: list[dict], settings: dict) -> tuple[list[dict], dict, list[str]]:
    """This run's rows over an earlier result's, the settings of the merged table, and the commands that
    measured the earlier rows kept.

    Flips and correlations need the same items, caps and texts, so an earlier measure is kept only where its
    settings are this run's: with other perplexity windows or seed the earlier rows are dropped; an earlier task
    measured with other settings for that task is dropped from every row. A row measured again keeps its
    earlier measures of the tasks this run did not measure (so `--tasks zero-shot` adds a column to a GSM8K
    table)."""
    path = Path(f"{stem}.json")
    merged = dict(settings)
    if not path.is_file():
        return merge_rows([], rows, ROW_ORDER, lambda r: r["name"]), merged, []
    saved = json.loads(path.read_text())
    before = saved.get("settings", {})
    if any(before.get(k) != settings[k] for k in SHARED_SETTINGS):
        print(f"{path}: earlier rows were measured with other perplexity windows or seed; they are replaced",
              flush=True)
        return merge_rows([], rows, ROW_ORDER, lambda r: r["name"]), merged, []
    mine = set(settings["tasks"])
    used = {k for t in mine for k in TASK_SETTINGS[t]}
    for t in (t for t in before.get("tasks", []) if t not in mine):
        merged.update({k: before[k] for k in TASK_SETTINGS[t] if k not in used and k in before})
    kept = [t for t in before.get("tasks", []) if all(before.get(k) == merged.get(k) for k in TASK_SETTINGS[t])]
    dropped = [t for t in before.get("tasks", []) if t not in kept]
    if dropped:
        print(f"{path}: earlier {', '.join(dropped)} results were measured with other settings; they are dropped",
              flush=True)
    merged["tasks"] = [t for t in (*GENERATIVE, "zero-shot") if t in mine or t in kept]

    def earlier_measures(row: dict) -> dict:
        row = {**row, "tasks": {t: v for t, v in row.get("tasks", {}).items() if t in kept}}
        if "zero-shot" not in kept:
            row.pop("zero_shot", None)
        return row

    earlier = {r["name"]: earlier_measures(r) for r in saved.get("rows", [])}
    fresh = []
    for row in rows:
        old = earlier.get(row["name"], {})
        fresh.append({**old, **row, "tasks": {**old.get("tasks", {}), **row["tasks"]},
                      **({"zero_shot": old["zero_shot"]} if "zero_shot" in old and "zero_shot" not in row else {})})
    commands = saved.get("commands", [saved["command"]] if "command" in saved else [])
    # The earlier commands stay listed while something they measured is left: a row this run did not measure
    # again, or a task column kept. When this run replaced all of it they measured nothing in the table.
    if not kept and set(earlier) <= {r["name"] for r in rows}:
        commands = []
    return merge_rows(list(earlier.values()), fresh, ROW_ORDER, lambda r: r["name"]), merged, commands


# --- measuring one model ----------------------------------------------------------------------------------


def perplexities(loaded, windows: int = PPL_WINDOWS, seqlen: int = SEQLEN) -> dict[str, float]:
    """Perplexity on the first `windows` windows of each evaluation text (pydoc, then out of domain)."""
    from toolchain.data import eval_windows, get_corpus, tokenize
    from toolchain.evaluate import perplexity

    return {name: perplexity(loaded.model, eval_windows(tokenize(loaded.tokenizer, get_corpus(name).eval_text),
                                                        seqlen, windows), progress=False)
            for name in EVAL_DATASETS}


def measure(model_dir: Path, task_names: tuple[str, ...], settings: dict, samples_dir: Path) -> dict:
    """Perplexities, generative-task accuracy with every wrong item classified, and the zero-shot suite."""
    import torch

    from toolchain.models import load_model
    from toolchain.tasks import ZERO_SHOT
    from toolchain.tasks.backend import ToolchainLM
    from toolchain.tasks.run import evaluate_tasks, write_task_results
    from toolchain.tasks.splits import gsm8k_split

    start = time.perf_counter()
    loaded = load_model(model_dir)
    row: dict = {"ppl": perplexities(loaded, settings["ppl_windows"], settings["seqlen"])}
    lm = ToolchainLM(loaded=loaded)
    row["tasks"] = {}
    for name in (n for n in task_names if n in GENERATIVE):
        t0 = time.perf_counter()
        exclude = {"gsm8k": gsm8k_split()[0]} if name == "gsm8k" else None
        result = evaluate_tasks(names=(name,), limit=settings["limit"], seed=settings["seed"], lm=lm,
                                max_gen_toks=settings["max_gen_toks"], progress=False, exclude=exclude)
        write_task_results(result, samples_dir)
        task = result["tasks"][name]
        row["tasks"][name] = {**generative_summary(name, task, loaded.tokenizer, settings["max_gen_toks"]),
                              "seconds": round(time.perf_counter() - t0, 1)}
        print(f"  {name}: {row['tasks'][name]['accuracy']:.3f} ± {row['tasks'][name]['stderr']:.3f} "
              f"({row['tasks'][name]['seconds']:.0f} s)", flush=True)
    if "zero-shot" in task_names:
        t0 = time.perf_counter()
        result = evaluate_tasks(names=ZERO_SHOT, limit=settings["zero_shot_limit"], seed=settings["seed"], lm=lm,
                                progress=False)
        write_task_results(result, samples_dir / "zero-shot")
        accs = {n: {"acc": t["metrics"]["acc,none"], "stderr": t["stderr"].get("acc,none"), "items": t["items"]}
                for n, t in result["tasks"].items()}
        row["zero_shot"] = {"tasks": accs, "average": sum(a["acc"] for a in accs.values()) / len(accs),
                            "seconds": round(time.perf_counter() - t0, 1)}
    row["eval_seconds"] = round(time.perf_counter() - start, 1)
    # Rows of one result come from runs at different thread counts (two benchmarks side by side run at one
    # thread each); a row's seconds mean nothing without its own.
    row["threads"] = torch.get_num_threads()
    return row


def generative_summary(name: str, task: dict, tokenizer, max_gen_toks: int) -> dict:
    """Accuracy ± standard error, and every item's correctness, whether it ran on past its answer, and (when
    wrong) its failure class."""
    from toolchain.tasks.answers import answer_end
    from toolchain.tasks.failures import CLASSES, classify_failure, runs_on

    metrics = {k: v for k, v in task["metrics"].items()}
    correct, failures, ran_on = {}, {}, []
    for item in task["samples"]:
        ok = bool(item[ITEM_KEY[name]])
        correct[item["doc_id"]] = ok
        text = item["generation"]
        # The stop string is cut from the text; a generation that stopped on it is shorter than the cap.
        # Re-encoding may merge a token or two, hence the slack.
        truncated = len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= max_gen_toks - 2
        end = answer_end(name, text)
        if runs_on(text, end, truncated):
            ran_on.append(item["doc_id"])
        if not ok:
            failures[item["doc_id"]] = classify_failure(text, end, truncated)
    return {"metric": PRIMARY[name], "accuracy": metrics[PRIMARY[name]], "stderr": task["stderr"][PRIMARY[name]],
            "metrics": metrics, "items": len(correct),
            "correct": {str(k): v for k, v in correct.items()},
            "failures": {str(k): v for k, v in failures.items()},
            "taxonomy": {c: sum(v == c for v in failures.values()) for c in CLASSES},
            "ran_on": sorted(ran_on)}


# --- across rows ------------------------------------------------------------------------------------------


def analyse(rows: list[dict], task_names: tuple[str, ...]) -> dict:
    """Flips of every row against dense, and per generative task and perplexity text the Spearman
    correlation between the relative perplexity increase and the accuracy change across the compressed rows."""
    from toolchain.tasks.failures import flips, spearman

    dense = next((r for r in rows if r["name"] == "dense"), None)
    if dense is None:
        return {"note": "no dense row: no flips or correlations"}
    out: dict = {"flips": {}, "spearman": {}}
    others = [r for r in rows if r["name"] != "dense"]
    measures = [n for n in task_names if n in GENERATIVE] + (["zero-shot"] if "zero-shot" in task_names else [])
    for r in others:
        out["flips"][r["name"]] = {}
        for name in (n for n in task_names if n in GENERATIVE and n in dense["tasks"] and n in r["tasks"]):
            f = flips({int(k): v for k, v in dense["tasks"][name]["correct"].items()},
                      {int(k): v for k, v in r["tasks"][name]["correct"].items()})
            out["flips"][r["name"]][name] = f
    for measure_name in (m for m in measures if _accuracy(dense, m) is not None):
        measured = [r for r in others if _accuracy(r, measure_name) is not None]
        for text in dense["ppl"]:
            ppl_change = [r["ppl"][text] / dense["ppl"][text] - 1 for r in measured]
            acc_change = [_accuracy(r, measure_name) - _accuracy(dense, measure_name) for r in measured]
            out["spearman"][f"{measure_name} vs ppl {text}"] = {"rho": spearman(ppl_change, acc_change),
                                                                 "rows": len(measured)}
    return out


def _accuracy(row: dict, measure_name: str) -> float | None:
    """The row's accuracy on a generative task or its zero-shot average; None where the row lacks it."""
    if measure_name == "zero-shot":
        return row["zero_shot"]["average"] if "zero_shot" in row else None
    task = row.get("tasks", {}).get(measure_name)
    return None if task is None else task["accuracy"]


# --- the report -------------------------------------------------------------------------------------------


def plot_taxonomy(result: dict, path: Path) -> str | None:
    """Stacked bars: the wrong answers of each row by failure class, one panel per generative task. Returns
    the file name, or None when there is nothing to plot or no matplotlib."""
    from toolchain.atomic import atomic_file
    from toolchain.tasks.failures import CLASSES

    rows = result["rows"]
    names = [n for n in result["settings"]["tasks"] if n in GENERATIVE and any(n in r["tasks"] for r in rows)]
    if not names or not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(max(6, 0.9 * len(rows)) * len(names), 4.5), squeeze=False)
    colours = {"truncation": "#d62728", "format": "#ff7f0e", "arithmetic": "#1f77b4", "reasoning": "#7f7f7f"}
    for ax, name in zip(axes[0], names):
        measured = [r for r in rows if name in r["tasks"]]
        bottom = [0] * len(measured)
        for cls in CLASSES:
            counts = [r["tasks"][name]["taxonomy"][cls] for r in measured]
            ax.bar(range(len(measured)), counts, bottom=bottom, label=cls, color=colours[cls])
            bottom = [b + c for b, c in zip(bottom, counts)]
        ax.set_xticks(range(len(measured)), [r["name"] for r in measured], rotation=40, ha="right")
        ax.set_ylabel(f"wrong answers (of {measured[0]['tasks'][name]['items']})")
        ax.set_title(f"{result['model']}: {name} failures by class")
        ax.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path.name


def reasoning_table(result: dict) -> str:
    from toolchain.tasks.failures import CLASSES

    s = result["settings"]
    gen = [n for n in s["tasks"] if n in GENERATIVE]
    texts = list(dict.fromkeys(k for r in result["rows"] for k in r["ppl"]))
    flips = result["analysis"].get("flips", {})
    items = []
    if gen:
        items.append(f"{s['limit']} per generative task" + (" (GSM8K's from its held-out half)"
                                                            if s.get("gsm8k_pool") else ""))
    if "zero-shot" in s["tasks"]:
        items.append(f"{s['zero_shot_limit']} per zero-shot task")
    commands = result.get("commands", [result["command"]])
    lines = [*(line for c in commands for line in (f"`{c}`", "")),
             f"Model: {result['model']}; calibration {result['calibration']}. Items: {', '.join(items)} (seed "
             f"{s['seed']}, the same items for every row measured on a task); "
             + (f"generation capped at {s['max_gen_toks']} tokens; " if gen else "")
             + f"perplexity on {s['ppl_windows']} windows of "
             f"{s['seqlen']} tokens per text (wiki and science are out of the calibration domain). Accuracy ± "
             "standard error; flips against dense: right->wrong / wrong->right; wrong answers by class, judged "
             "on the text up to the answer the task scores: " + ", ".join(CLASSES) + "; ran on: items (right or "
             "wrong) that gave their answer, then ran to the cap or looped instead of stopping.", ""]
    head = ["configuration", *(f"ppl {t}" for t in texts)]
    for n in gen:
        metric = next((r["tasks"][n]["metric"].replace(",none", "") for r in result["rows"] if n in r["tasks"]), None)
        head += [f"{n} ({metric})" if metric else n, f"{n} flips", f"{n} failures T/F/A/R", f"{n} ran on"]
    if "zero-shot" in s["tasks"]:
        head.append("zero-shot avg acc")
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in result["rows"]:
        cells = [r["name"], *(f"{r['ppl'][t]:.2f}" if t in r["ppl"] else "-" for t in texts)]
        for n in gen:
            t = r["tasks"].get(n)
            if t is None:   # a row measured only on other tasks
                cells += ["-", "-", "-", "-"]
                continue
            cells.append(f"{t['accuracy']:.3f} ± {t['stderr']:.3f}" if t["stderr"] is not None
                         else f"{t['accuracy']:.3f}")
            f = flips.get(r["name"], {}).get(n)
            cells.append(f"{len(f['right_to_wrong'])} / {len(f['wrong_to_right'])}" if f else "-")
            cells.append("/".join(str(t["taxonomy"][c]) for c in CLASSES))
            cells.append(str(len(t["ran_on"])) if "ran_on" in t else "-")
        if "zero-shot" in s["tasks"]:
            cells.append(f"{r['zero_shot']['average']:.3f}" if "zero_shot" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += _recovery_lines(result["rows"], gen)
    rho = result["analysis"].get("spearman", {})
    if rho:
        lines += ["", "Spearman rank correlation across the compressed rows between the relative perplexity "
                  "increase and the accuracy change (near -1: perplexity predicted the loss; near 0: it did not):",
                  ""]
        lines += [f"- {k}: {_rho_text(v['rho'])} (over {v['rows']} compressed rows)" for k, v in rho.items()]
    if result.get("plot"):
        lines += ["", f"Failure classes per row: {result['plot']}"]
    return "\n".join(lines) + "\n"


def _recovery_lines(rows: list[dict], gen: list[str]) -> list[str]:
    """Per recovered row: what the recovery ran, and per generative task the share of the accuracy its base row
    lost against dense that it regains."""
    by_name = {r["name"]: r for r in rows}
    lines = []
    for r in rows:
        base, dense = by_name.get(r.get("recovered_from")), by_name.get("dense")
        if base is None:
            continue
        lines += ["", f"{r['name']}: `toolchain recover` of the {base['name']} row, {r['recover_steps']} steps on "
                      f"{r['recover_examples']} GSM8K training-half examples in {r['recover_seconds']:.0f} s (training "
                      f"loss {r['recover_loss']['before']:.3f} -> {r['recover_loss']['after']:.3f})."]
        for n in (n for n in gen if n in base["tasks"] and n in r["tasks"]):
            b, got = base["tasks"][n]["accuracy"], r["tasks"][n]["accuracy"]
            text = f"- {n}: {b:.3f} -> {got:.3f}"
            if dense is not None and n in dense["tasks"] and dense["tasks"][n]["accuracy"] > b:
                text += (f" (dense {dense['tasks'][n]['accuracy']:.3f}): regains "
                         f"{(got - b) / (dense['tasks'][n]['accuracy'] - b):.0%} of the accuracy lost")
            lines.append(text)
    return lines


def _rho_text(rho: float | None) -> str:
    return "undefined" if rho is None else f"{rho:+.2f}"
