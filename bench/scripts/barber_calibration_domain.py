"""Does Barber's rebuild fit the calibration text? Prune one model with the init alone and with Barber on it,
both calibrated on a chosen text (the reasoning benchmark's budget: 32 x 512 windows), and give each the
perplexity on pydoc, wiki and science (the reasoning benchmark's windows, so rows compare with its table).

If the rebuild's gain follows the calibration text (it wins on whichever text it calibrated on, and less or not
at all on the others), what it adds over its init is fitted to that text rather than a better mask in general.

    .venv/bin/python bench/scripts/barber_calibration_domain.py --model qwen05 --dataset wiki \
        [--init wanda] [--sparsity 2:4] [--windows 8] [--work bench/results/work] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from toolchain.atomic import atomic_file
from toolchain.bench.reasoning import perplexities
from toolchain.models import load_model
from toolchain.reference_runs import SEQLEN, dense_hf_dir, prune_in_subprocess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model name (smollm2, qwen05) or directory")
    parser.add_argument("--dataset", required=True, choices=("pydoc", "wiki", "science"),
                        help="the calibration text of both prunes")
    parser.add_argument("--init", default="wanda", choices=("wanda", "sparsegpt"))
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--windows", type=int, default=8, help="perplexity windows of 512 tokens per text")
    parser.add_argument("--work", default="bench/results/work",
                        help="the benchmarks' work folder: the dense model is taken from it, the pruned ones go to "
                             "its barber-domain/")
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args()
    if args.windows < 1:
        parser.error("--windows must be positive")

    work = Path(args.work)
    src = dense_hf_dir(args.model, work)
    rows = []
    for method, init in ((args.init, None), ("barber", args.init)):
        name = f"{method if init is None else f'barber({init})'} {args.sparsity} on {args.dataset}"
        out = work / "barber-domain" / f"{Path(args.model).name}-{method}-{args.init}-{args.sparsity.replace(':', 'of')}-{args.dataset}"
        facts = prune_in_subprocess(src, out, method, init, args.sparsity, ["--dataset", args.dataset])
        ppl = perplexities(load_model(out), args.windows, SEQLEN)
        rows.append({"name": name, "ppl": ppl, "prune_seconds": facts["prune_seconds"], "command": facts["command"]})
        print(f"{name}: " + " / ".join(f"{k} {v:.2f}" for k, v in ppl.items()), flush=True)
    base, barber = (r["ppl"] for r in rows)
    print("barber against its init: " + ", ".join(f"{k} {barber[k] / base[k] - 1:+.1%}" for k in base))
    if args.json:
        with atomic_file(Path(args.json)) as tmp:
            tmp.write_text(json.dumps({"model": args.model, "dataset": args.dataset, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
