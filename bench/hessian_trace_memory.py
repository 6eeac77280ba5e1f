"""Peak memory and time of one Hutchinson probe (`toolchain.sensitivity.linear_hessian_traces`, one window).

The traces drive `--allocation hessian` and APTQ's `--sensitivity model`. RssAnon is sampled every 10 ms
around the call on an already loaded model, so the figure is the probe's own peak (the model included).

    PYTHONPATH=. .venv/bin/python bench/hessian_trace_memory.py [--model out/bench/smollm2-hf] [--seqlen 512]

(`toolchain bench prune` leaves the dense SmolLM2 directory at out/bench/smollm2-hf.) Run at commit d2a7db7^
(the double backward) the same script measures the implementation this one replaced.
"""
from __future__ import annotations

import argparse
import threading
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from toolchain.data import calibration_windows, pydoc_corpus, tokenize
from toolchain.models import adapter_for
from toolchain.pipeline import proc_status_mib
from toolchain.sensitivity import linear_hessian_traces


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="out/bench/smollm2-hf")
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ids = calibration_windows(tokenize(tok, pydoc_corpus().calib_text), 1, args.seqlen, 0)
    peak, done = [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc_status_mib("RssAnon") or 0.0)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t = time.perf_counter()
    try:
        linear_hessian_traces(model, adapter_for(model), ids, 1, 0, "cpu", progress=False)
    finally:
        done.set()
        sampler.join()
    fp32 = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    print(f"one {args.seqlen}-token probe: peak RssAnon {peak[0]:.0f} MiB = {peak[0] / fp32:.2f}x the fp32 weights "
          f"({fp32:.1f} MiB), {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
