"""Peak memory and time of one Hutchinson probe (`toolchain.sensitivity.linear_hessian_traces`, one window).

The traces drive `--allocation hessian` and APTQ's `--sensitivity model`. RssAnon is sampled (`AnonPeak`, as
in compression.json) around the call on an already loaded model, so the figure is the probe's own peak, the
model included.

    .venv/bin/python bench/scripts/hessian_trace_memory.py [--model bench/results/work/smollm2-hf] [--seqlen 512]

(`toolchain bench prune` leaves the dense SmolLM2 directory at bench/results/work/smollm2-hf.)
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from toolchain.data import calibration_windows, pydoc_corpus, tokenize
from toolchain.models import adapter_for
from toolchain.machine import AnonPeak
from toolchain.sensitivity import linear_hessian_traces


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bench/results/work/smollm2-hf")
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ids = calibration_windows(tokenize(tok, pydoc_corpus().calib_text), 1, args.seqlen, 0)
    t = time.perf_counter()
    with AnonPeak(interval=0.01) as anon:
        linear_hessian_traces(model, adapter_for(model), ids, 1, 0, "cpu", progress=False)
    fp32 = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    print(f"one {args.seqlen}-token probe: peak RssAnon {anon.peak_mib:.0f} MiB = {anon.peak_mib / fp32:.2f}x "
          f"the fp32 weights ({fp32:.1f} MiB), {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
