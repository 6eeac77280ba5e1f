"""float32 against bfloat16 matmuls at Barber's shapes on this machine's CPU.

Barber's dense-block gradients only rank weights, so it runs them in bfloat16 where that is faster
(`toolchain.prune.barber.reduced_precision`). Whether it is depends on the CPU: with oneDNN's bfloat16 kernels
(AVX512, AMX) it is faster, on an AVX2-only CPU PyTorch emulates it. This prints both timings and what
`reduced_precision` picks, and writes them to bench/results/matmul_dtype.json.

    .venv/bin/python bench/scripts/matmul_dtype.py
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from toolchain.machine import machine_description
from toolchain.prune.barber import reduced_precision

# SmolLM2-135M, 4 windows of 512 tokens (a half batch of the gradient pass): the MLP's up projection, and the
# batched per-window gradient product of down_proj (its input is 1536 wide, its output 576).
SHAPES = {"mlp forward [2048x576]@[576x1536]": ((2048, 576), (576, 1536)),
          "per-window gradient [4x576x512]@[4x512x1536]": ((4, 576, 512), (4, 512, 1536))}


def _time(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    a @ b   # warm-up (oneDNN primitive creation)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return (time.perf_counter() - t) / repeats * 1000


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for name, (sa, sb) in SHAPES.items():
        a, b = torch.randn(sa), torch.randn(sb)
        fp32 = _time(a, b, 10)
        bf16 = _time(a.bfloat16(), b.bfloat16(), 3)
        rows.append({"product": name, "float32_ms": round(fp32, 2), "bfloat16_ms": round(bf16, 2),
                     "bfloat16_over_float32": round(bf16 / fp32, 2)})
        print(f"{name}: float32 {fp32:.1f} ms, bfloat16 {bf16:.1f} ms ({bf16 / fp32:.2f}x)")
    picked = reduced_precision("cpu")
    result = {**machine_description(), "torch": torch.__version__,
              "barber_picks": str(picked or torch.float32).removeprefix("torch."), "rows": rows}
    print(f"cpu capability {result['cpu_capability']}: Barber's gradients run in {result['barber_picks']}")
    out = Path(__file__).resolve().parents[1] / "results" / "matmul_dtype.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
