"""Zero-shot subset for two rows of the quant benchmark: our GPTQ 4-bit and llm-compressor's GPTQ 4-bit.

The eight zero-shot tasks (toolchain.tasks.ZERO_SHOT), 50 items each, seed 0, through `toolchain eval`'s
lm-eval backend; the models are the ones `toolchain bench quant` left under WORK (its --out/work): our
quantized directory, and the dense checkpoint with llm-compressor's fake-quantized weights put in.

    .venv/bin/python bench/scripts/quant_zero_shot.py --work bench/results/work --out bench/results/quant_zero_shot_smollm2.json

The dense model's figures on the same items: `toolchain eval --model WORK/smollm2-hf --datasets none --tasks
zero-shot --limit 50 --seed 0`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file

from toolchain.bench.peers import with_weights
from toolchain.models import load_model
from toolchain.tasks import ZERO_SHOT
from toolchain.tasks.run import evaluate_tasks

LIMIT, SEED = 50, 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="the quant benchmark's work directory")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = {
        "gptq 4-bit": lambda: load_model(args.work / "quant" / "gptq-4-bit"),
        "llm-compressor gptq 4-bit": lambda: with_weights(load_model(args.work / "smollm2-hf"),
                                                          load_file(str(args.work / "llmcompressor" / "gptq4-g64.safetensors"))),
    }
    out = {"limit": LIMIT, "seed": SEED, "rows": {}}
    for name, make in rows.items():
        r = evaluate_tasks(loaded=make(), names=ZERO_SHOT, limit=LIMIT, seed=SEED, progress=False)
        out["rows"][name] = {t: v["metrics"] for t, v in r["tasks"].items()}
        args.out.write_text(json.dumps(out, indent=1) + "\n")
        print(name, {t: round(m.get("acc,none", 0), 3) for t, m in out["rows"][name].items()}, flush=True)


if __name__ == "__main__":
    main()
