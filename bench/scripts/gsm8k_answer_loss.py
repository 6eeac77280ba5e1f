"""Held-out GSM8K answer loss: the mean negative log-likelihood per token of the reference chains of thought of
GSM8K's held-out items (the half `toolchain recover` never trains on), each after its question in the frame of the
8-shot CoT prompt (`Q: ...\\nA:`, then ` <steps> The answer is N.\\n\\n`, as recovery trains on its own half).

Accuracy on a few dozen items of a small model moves by whole items; this loss moves smoothly, so it shows what
recovery regains on items it never saw. For each model: the loss, its perplexity, and, given --dense and --base,
the share of the base model's loss increase over dense that the model regains.

    .venv/bin/python bench/scripts/gsm8k_answer_loss.py --models DENSE,QUANTIZED,RECOVERED [--items 200]
        [--seed 0] [--dense DENSE --base QUANTIZED]
"""
from __future__ import annotations

import argparse
import json
import math
import random

from toolchain.models import load_model
from toolchain.tasks.files import load_docs
from toolchain.tasks.scoring import score_continuations
from toolchain.tasks.splits import SPLIT_TASK, cot_pair, gsm8k_split


def answer_loss(model_dir: str, items: list[int]) -> dict:
    loaded = load_model(model_dir)
    docs = load_docs(SPLIT_TASK)
    tok = loaded.tokenizer
    pairs = [tuple(tok(text, add_special_tokens=False).input_ids for text in cot_pair(docs[i])) for i in items]
    scores = score_continuations(loaded.model, pairs)
    tokens = sum(len(t) for _, t in pairs)
    nll = -sum(s for s, _ in scores) / tokens
    return {"model": model_dir, "items": len(items), "tokens": tokens, "nll": nll, "ppl": math.exp(nll)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", required=True, help="comma list of model directories or names")
    parser.add_argument("--items", type=int, default=200, help="held-out items, a seeded sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dense", help="the dense model among --models, for the regained share")
    parser.add_argument("--base", help="the compressed model before recovery among --models")
    args = parser.parse_args()
    models = args.models.split(",")
    if args.items < 1:
        parser.error(f"--items must be positive, got {args.items}")
    if (args.dense or args.base) and not (args.dense in models and args.base in models):
        parser.error("--dense and --base go together and must each be one of --models")
    heldout = gsm8k_split()[1]
    items = sorted(random.Random(args.seed).sample(heldout, min(args.items, len(heldout))))
    rows = {m: answer_loss(m, items) for m in models}
    for m, r in rows.items():
        line = f"{m}: nll {r['nll']:.4f} per token, ppl {r['ppl']:.3f} ({r['items']} items, {r['tokens']} tokens)"
        if args.dense in rows and args.base in rows and m not in (args.dense, args.base):
            lost = rows[args.base]["nll"] - rows[args.dense]["nll"]
            line += f"; regains {(rows[args.base]['nll'] - r['nll']) / lost:.1%} of the base's loss increase"
        print(line, flush=True)
    print(json.dumps(list(rows.values())))


if __name__ == "__main__":
    main()
