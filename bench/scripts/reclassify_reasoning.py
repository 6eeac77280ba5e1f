"""Classify a reasoning result's stored generations again under the current failure rules, without generating.

`toolchain bench reasoning` keeps every item's generation (<out>/reasoning_<model>/<row>/samples_<task>.jsonl).
When the taxonomy's rules change (toolchain/tasks/failures.py), this re-reads those files and rewrites each
generative task's failure classes, taxonomy counts and run-on items, then the analysis, the table and the plot
of <out>/reasoning_<model>.{json,md,png}. Accuracy, flips and perplexity are the stored ones: an item's
correctness in its samples file must equal the stored one, or nothing is written.

    .venv/bin/python bench/scripts/reclassify_reasoning.py --model qwen05 [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from toolchain.bench.common import result_stem, slug, work_dir, write_result
from toolchain.bench.reasoning import ROW_ORDER, analyse, generative_summary, plot_taxonomy, reasoning_table
from toolchain.errors import ToolchainError
from toolchain.reference_runs import dense_hf_dir


def reclassify(model: str, out_dir: str | Path) -> dict:
    from transformers import AutoTokenizer

    stem = result_stem(Path(out_dir), "reasoning", model)
    path = Path(f"{stem}.json")
    if not path.is_file():
        raise ToolchainError(f"no reasoning result to reclassify: {path}")
    result = json.loads(path.read_text())
    # the tokenizer only counts a generation's tokens against the cap; the benchmark's dense copy has it
    tokenizer = AutoTokenizer.from_pretrained(dense_hf_dir(model, work_dir(Path(out_dir))))
    cap = result["settings"]["max_gen_toks"]
    for row in result["rows"]:
        for name, stored in row["tasks"].items():
            samples_file = stem / slug(row["name"]) / f"samples_{name}.jsonl"
            if not samples_file.is_file():
                raise ToolchainError(f"{samples_file} is missing: {path}'s {row['name']} {name} column cannot be "
                                     "classified again without its generations")
            samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
            task = {"metrics": stored["metrics"], "stderr": {stored["metric"]: stored["stderr"]}, "samples": samples}
            summary = generative_summary(name, task, tokenizer, cap)
            if summary["correct"] != stored["correct"]:
                raise ToolchainError(f"{samples_file}: its items' correctness differs from {path}'s {row['name']} "
                                     f"{name} row; the samples are not that row's")
            row["tasks"][name] = {**stored, **summary}
    result["analysis"] = analyse(result["rows"], tuple(result["settings"]["tasks"]))
    result["plot"] = plot_taxonomy(result, Path(f"{stem}.png"))
    write_result(stem, result, ROW_ORDER, lambda r: r["name"], reasoning_table)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the --model the benchmark ran on (smollm2, qwen05, ...)")
    parser.add_argument("--out", default="bench/results", help="the benchmark's --out (default %(default)s)")
    args = parser.parse_args()
    try:
        result = reclassify(args.model, args.out)
    except ToolchainError as exc:
        raise SystemExit(f"reclassify_reasoning: error: {exc}") from None
    for row in result["rows"]:
        for name, task in row["tasks"].items():
            print(f"{row['name']:28} {name:8} wrong by class {task['taxonomy']}, ran on {len(task['ran_on'])}")


if __name__ == "__main__":
    main()
