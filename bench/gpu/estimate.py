"""The roofline ESTIMATE of dense fp16 and 2:4 semi-structured linears on a named GPU.

On a CUDA device every distinct linear shape of the model's decoder is *timed* (`measure_cuda`): a dense fp16
`torch.nn.functional.linear` against the same weight as `torch.sparse.to_sparse_semi_structured`, at the token
counts of the GPU target. Without CUDA nothing is timed: `run_gpu_bench` says so and writes a roofline *estimate*
per shape for a named GPU from the vendor's published peak tensor throughput and memory bandwidth (`GPUS`), and
every figure it writes is labelled an estimate.

The roofline (`roofline`) is

    time = max(FLOPs / peak tensor throughput, bytes moved / memory bandwidth)

with FLOPs = 2*N*K*T for a [N, K] weight (N outputs, K inputs) applied to T tokens, and bytes = the weight once
(dense fp16: N*K*2; 2:4 fp16: the kept half N*K/2*2 plus 2-bit metadata per kept value N*K/2*2/8) plus the
activations in (T*K) and out (T*N). The 2:4 kernel is charged its dense-equivalent FLOPs against the vendor's
"with sparsity" peak, which is how the vendors state those peaks. It ignores caches, launch overhead, kernel
efficiency and tile quantisation, so it is an upper bound on what the hardware allows, not a prediction of a
kernel; only `measure_cuda` measures.
"""
from __future__ import annotations

from typing import Iterable

from toolchain.errors import ConfigError
from toolchain.numerics.nm import fits_groups

from .specs import (BITS_PER_BYTE, FP16_BYTES, GIGA, GROUP, KEPT_FRACTION, METADATA_BITS_PER_KEPT, TARGET_MIN_TOKENS,
                    TARGET_SPEEDUP, TERA, TOKENS, US_PER_S, GPUSpec, get_gpu)


def _nk(shape) -> tuple[int, int]:
    if isinstance(shape, dict):
        return int(shape["n"]), int(shape["k"])
    n, k = shape
    return int(n), int(k)


def weight_bytes(n: int, k: int, sparse: bool, bytes_per_weight: float = FP16_BYTES) -> float:
    """Bytes of a [N, K] weight: dense N*K*b; 2:4 the kept half N*K/2*b plus 2 bits of metadata per kept value."""
    if not sparse:
        return n * k * bytes_per_weight
    kept = n * k * KEPT_FRACTION
    return kept * bytes_per_weight + kept * METADATA_BITS_PER_KEPT / BITS_PER_BYTE


def _time(flops: float, nbytes: float, peak_tflops: float, bw_gbs: float) -> tuple[float, float, float, str]:
    compute = flops / (peak_tflops * TERA)
    memory = nbytes / (bw_gbs * GIGA)
    return compute, memory, max(compute, memory), "compute" if compute >= memory else "memory"


def roofline(shape, tokens: int, gpu: str | GPUSpec, sparse: bool, bytes_per_weight: float = FP16_BYTES,
             bytes_per_act: float = FP16_BYTES) -> dict:
    """Roofline ESTIMATE for y = x @ W.T with W [N, K] and x [tokens, K] on `gpu`, dense or 2:4.

    time = max(FLOPs / peak, bytes / bandwidth); FLOPs = 2*N*K*T (dense-equivalent, also for 2:4, against the
    vendor's "with sparsity" peak); bytes = weight (see `weight_bytes`) + T*K + T*N activations. Returns the
    time, which bound it hits, and the speedup of this variant over dense (1.0 for dense). Every value is an
    estimate from vendor peak figures."""
    spec = get_gpu(gpu)
    n, k = _nk(shape)
    if n < 1 or k < 1:
        raise ConfigError(f"shape must be positive [N, K], got [{n}, {k}]")
    if int(tokens) != tokens or tokens < 1:
        raise ConfigError(f"tokens must be a positive integer, got {tokens!r}")
    if bytes_per_weight <= 0 or bytes_per_act <= 0:
        raise ConfigError("bytes_per_weight and bytes_per_act must be positive")
    if sparse and not fits_groups(k, GROUP):
        raise ConfigError(f"2:4 needs K (in_features) divisible by {GROUP}, got K = {k}")
    t = int(tokens)
    flops = 2 * n * k * t  # one multiply and one add per multiply-accumulate
    act = (t * k + t * n) * bytes_per_act
    dense_peak, dense_provenance = spec.dense_peak()

    def variant(is_sparse: bool) -> dict:
        peak = spec.sparse_fp16_tflops if is_sparse else dense_peak
        w = weight_bytes(n, k, is_sparse, bytes_per_weight)
        compute, memory, total, bound = _time(flops, w + act, peak, spec.mem_bw_gbs)
        return {"peak_tflops": peak, "weight_bytes": w, "bytes": w + act, "compute_time_s": compute,
                "memory_time_s": memory, "time_s": total, "bound": bound}

    dense = variant(False)
    this = variant(True) if sparse else dense
    return {"kind": "estimate", "label": "roofline ESTIMATE from vendor peak figures, not a measurement",
            "gpu": spec.name, "n": n, "k": k, "tokens": t, "sparse": bool(sparse), "flops": flops,
            "activation_bytes": act, **this, "mem_bw_gbs": spec.mem_bw_gbs,
            "peak_provenance": "published vendor peak (with sparsity)" if sparse else dense_provenance,
            "dense_time_s": dense["time_s"], "speedup_vs_dense": dense["time_s"] / this["time_s"]}


def estimate_rows(shapes: list[dict], gpu: str | GPUSpec, tokens: Iterable[int] = TOKENS) -> list[dict]:
    """One ESTIMATE row per shape and token count: dense, 2:4 and the speedup, each key labelled estimate."""
    rows = []
    for s in shapes:
        for t in tokens:
            d = roofline(s, t, gpu, sparse=False)
            sp = roofline(s, t, gpu, sparse=True) if s["k"] % GROUP == 0 else None
            rows.append({
                "kind": "estimate", "gpu": d["gpu"], "n": s["n"], "k": s["k"], "linears": s["linears"],
                "blocks": s["blocks"], "count": s["count"], "tokens": t,
                "dense_us_estimate": d["time_s"] * US_PER_S, "dense_bound_estimate": d["bound"],
                "sparse24_us_estimate": sp["time_s"] * US_PER_S if sp else None,
                "sparse24_bound_estimate": sp["bound"] if sp else None,
                "speedup_estimate": sp["speedup_vs_dense"] if sp else None,
                "note_estimate": None if sp else f"K = {s['k']} is not divisible by {GROUP}: no 2:4 layout",
            })
    return rows


def summary(rows: list[dict], key: str, label: str) -> dict:
    """Speedups of the MLP shapes at >= TARGET_MIN_TOKENS tokens, against the target."""
    mlp = [r for r in rows if r["blocks"] == ["mlp"] and r["tokens"] >= TARGET_MIN_TOKENS and r.get(key)]
    if not mlp:
        return {"kind": label, "mlp_rows": 0}
    worst = min(r[key] for r in mlp)
    return {"kind": label, "mlp_rows": len(mlp), f"mlp_min_{key}_at_{TARGET_MIN_TOKENS}plus_tokens": worst,
            "by_shape": {f"{r['n']}x{r['k']}@{r['tokens']}": r[key] for r in mlp},
            "target": f">= {TARGET_SPEEDUP}x at >= {TARGET_MIN_TOKENS} tokens",
            f"target_met_by_{label}": worst >= TARGET_SPEEDUP}
