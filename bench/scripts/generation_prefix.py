"""GSM8K generation with the few-shot prefix shared (`scoring.prefix_cache`) against recomputed with every batch
(the path before it), at several generation batch sizes: one process, one model load, the same seeded items of
GSM8K's held-out half, greedy, 256 new tokens at most. Prints each arm's seconds and strict-match accuracy, then
each arm's speed against the first and how many generations equal the first arm's.

    .venv/bin/python bench/scripts/generation_prefix.py [--model smollm2] [--items 32]
        [--arms recomputed@8,shared@8,shared@16,shared@32]

Timings are only meaningful on an otherwise idle machine (docs/results.md, "Generation").
"""
from __future__ import annotations

import argparse
import time

import toolchain.tasks.backend as backend
from toolchain.models import load_model
from toolchain.tasks.backend import ToolchainLM
from toolchain.tasks.run import evaluate_tasks
from toolchain.tasks.splits import gsm8k_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--arms", default="recomputed@8,shared@8,shared@16,shared@32",
                        help="comma list of shared@BATCH or recomputed@BATCH")
    args = parser.parse_args()
    lm = ToolchainLM(loaded=load_model(args.model))
    shared_prefix = backend.common_prefix_length
    arms = args.arms.split(",")
    results = {}
    for arm in arms:
        kind, batch = arm.split("@")
        if kind not in ("shared", "recomputed"):
            parser.error(f"arm {arm!r}: use shared@BATCH or recomputed@BATCH")
        # Recomputed: no prompt shares a prefix, so every batch runs whole prompts, as before prefix_cache.
        backend.common_prefix_length = shared_prefix if kind == "shared" else (lambda prompts: 0)
        lm.gen_batch_size = int(batch)
        t0 = time.perf_counter()
        result = evaluate_tasks(names=("gsm8k",), limit=args.items, seed=0, lm=lm, max_gen_toks=256,
                                progress=False, exclude={"gsm8k": gsm8k_split()[0]})
        seconds = time.perf_counter() - t0
        task = result["tasks"]["gsm8k"]
        results[arm] = (seconds, [s["generation"] for s in task["samples"]])
        print(f"{arm}: {seconds:.1f} s, strict match {task['metrics']['exact_match,strict-match']:.3f}", flush=True)
    first_seconds, first_text = results[arms[0]]
    for arm in arms[1:]:
        seconds, text = results[arm]
        same = sum(a == b for a, b in zip(first_text, text))
        print(f"{arm}: {first_seconds / seconds:.2f}x the speed of {arms[0]}, identical generations {same}/{len(text)}")


if __name__ == "__main__":
    main()
