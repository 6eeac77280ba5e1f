"""The data-parallel scaling calculation of docs/scale.md: per decoder layer, the bytes all-reduced and
broadcast and the FLOPs of each phase, from the layer shapes; then the time per layer at K ranks for assumed
throughputs. A calculation, not a measurement: the inputs are printed with the table.

    python bench/scripts/distributed_scaling.py [--flops 50e12] [--solve-flops 50e12 5e12] [--busbw 360e9]
"""
from __future__ import annotations

import argparse

MODELS = {  # name: (hidden d, MLP f, query heads, KV heads, head dim, layers)
    "llama-3-8b": (4096, 14336, 32, 8, 128, 32),
    "llama-3-70b": (8192, 28672, 64, 8, 128, 80),
}


def layer_figures(d: int, f: int, hq: int, hkv: int, dh: int, windows: int, seqlen: int) -> dict:
    dkv = hkv * dh
    params = 2 * d * d + 2 * d * dkv + 3 * d * f          # q, o; k, v; gate, up, down
    tokens = windows * seqlen
    inputs = [d, d, d, f]                                   # the four input groups: qkv, o, gate/up, down
    hessian_floats = sum(i * i for i in inputs)
    stats_bytes = 4 * (hessian_floats + sum(inputs)) + 8 * len(inputs)   # X^T X, sum x^2, token counts
    forward = 2 * tokens * params + 2 * tokens * seqlen * d             # linears + causal attention
    xtx = 2 * tokens * hessian_floats

    def solve(out: int, inp: int) -> float:                # Cholesky inverse + the sweep's rank-1 updates
        return 4 / 3 * inp ** 3 + 2 * out * inp * inp

    gptq_jobs = [solve(d + 2 * dkv, d), solve(d, d), solve(2 * f, d), solve(d, f)]   # one per shared H
    sparsegpt_jobs = [solve(d, d), solve(dkv, d), solve(dkv, d), solve(d, d), solve(f, d), solve(f, d), solve(d, f)]
    return {"params": params, "stats_bytes": stats_bytes, "wanda_bytes": 4 * sum(inputs) + 8 * len(inputs),
            "aptq_extra_bytes": 4 * (hq + 2 * hkv) * d * d, "result_bytes": 5 * params,   # int32 codes|fp32 W + mask
            "data_parallel_flops": 2 * forward + xtx, "gptq_jobs": gptq_jobs, "sparsegpt_jobs": sparsegpt_jobs}


def seconds_per_layer(fig: dict, jobs: list[float], ranks: int, flops: float, solve_flops: float, busbw: float):
    data = fig["data_parallel_flops"] / ranks / flops
    per_rank = [0.0] * ranks
    for j, job in enumerate(jobs):                          # job j runs on rank j mod K
        per_rank[j % ranks] += job
    solve = max(per_rank) / solve_flops
    comm = 0.0 if ranks == 1 else (2 * (ranks - 1) / ranks * fig["stats_bytes"] + fig["result_bytes"]) / busbw
    return data, solve, comm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flops", type=float, default=50e12, help="achieved float32 matmul FLOP/s per rank")
    p.add_argument("--solve-flops", type=float, nargs="+", default=[50e12, 5e12],
                   help="achieved FLOP/s of the GPTQ/SparseGPT solve (its column sweep is less efficient)")
    p.add_argument("--busbw", type=float, default=360e9, help="all-reduce bus bandwidth, bytes/s")
    p.add_argument("--windows", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    a = p.parse_args()
    print(f"inputs: {a.windows} windows x {a.seqlen} tokens, matmul {a.flops:.3g} FLOP/s, bus {a.busbw:.3g} B/s")
    for name, (d, f, hq, hkv, dh, layers) in MODELS.items():
        fig = layer_figures(d, f, hq, hkv, dh, a.windows, a.seqlen)
        print(f"\n{name}: {fig['params'] / 1e6:.1f}M params/layer; all-reduced per layer: GPTQ/SparseGPT "
              f"{fig['stats_bytes'] / 1e9:.3f} GB, Wanda {fig['wanda_bytes'] / 1e3:.1f} kB, APTQ adds "
              f"{fig['aptq_extra_bytes'] / 1e9:.2f} GB; broadcast results {fig['result_bytes'] / 1e9:.2f} GB; "
              f"data-parallel work {fig['data_parallel_flops']:.3g} FLOP, GPTQ solves {sum(fig['gptq_jobs']):.3g} "
              f"FLOP (largest {max(fig['gptq_jobs']):.3g})")
        for solve_flops in a.solve_flops:
            base = sum(seconds_per_layer(fig, fig["gptq_jobs"], 1, a.flops, solve_flops, a.busbw))
            for ranks in (1, 2, 4, 8):
                data, solve, comm = seconds_per_layer(fig, fig["gptq_jobs"], ranks, a.flops, solve_flops, a.busbw)
                total = data + solve + comm
                print(f"  solve {solve_flops:.0e} FLOP/s  K={ranks}: data {data:6.2f} s  solve {solve:5.2f} s  "
                      f"comm {comm:5.3f} s  = {total:6.2f} s/layer, {total * layers / 60:6.1f} min model, "
                      f"speed-up {base / total:4.2f}")


if __name__ == "__main__":
    main()
