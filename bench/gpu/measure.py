"""MEASURED time of dense fp16 against 2:4 semi-structured linears on a CUDA device (`measure_cuda`)."""
from __future__ import annotations

import functools
import math
import statistics
from typing import Iterable

from toolchain.errors import ToolchainError
from toolchain.numerics.nm import fits_groups

from .specs import FP16_BYTES, GROUP, KEPT_FRACTION, TOKENS, US_PER_MS


class NoCudaError(ToolchainError, RuntimeError):
    """A measurement was asked for on a machine without a usable CUDA device."""


def _require_cuda():
    import torch

    if not torch.cuda.is_available():
        raise NoCudaError(f"measure_cuda needs a CUDA device, and torch.cuda.is_available() is False (torch "
                          f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none, a CPU-only build'}). "
                          f"Nothing was measured; run_gpu_bench writes a labelled roofline ESTIMATE instead.")
    return torch


def _two_four_mask(w):
    """Keep the 2 largest magnitudes of every 4 consecutive values along K (dim 1)."""
    n, k = w.shape
    groups = w.abs().reshape(n, k // GROUP, GROUP)
    keep = groups.topk(int(GROUP * KEPT_FRACTION), dim=-1).indices
    mask = groups.new_zeros(groups.shape, dtype=w.dtype).scatter_(-1, keep, 1)
    return w * mask.reshape(n, k)


def _time_calls(torch, calls: list, warmup: int, repeats: int, use_graph: bool) -> tuple[float, str]:
    """Median time per call, in microseconds, of running `calls` (zero-argument callables) back to back.

    With `use_graph` the sequence is captured once in a CUDA graph and replayed, so the GPU time of small
    kernels is not hidden behind Python launch overhead; if capture fails, eager launches are timed instead and
    the returned mode says why. Timed with CUDA events; the median of `repeats` runs after `warmup` runs."""
    def run_all():
        for call in calls:
            call()

    mode, replay = "eager launches", run_all
    for _ in range(warmup):
        run_all()
    if use_graph:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                run_all()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run_all()
            mode, replay = "CUDA graph replay", graph.replay
            for _ in range(warmup):
                replay()
        except Exception as exc:  # a kernel that cannot be captured: time eager launches and say so
            mode = f"eager launches (CUDA graph capture failed: {type(exc).__name__}: {exc})"
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * US_PER_MS / len(calls))  # elapsed_time is in ms
    return statistics.median(samples), mode


def measure_cuda(shapes: list[dict], tokens: Iterable[int] = TOKENS, warmup: int = 5, repeats: int = 20,
                 inner: int = 20, seed: int = 0, cold_weights: bool = True, cuda_graph: bool = True) -> dict:
    """MEASURED time of `F.linear` with a dense fp16 weight against the same weight (2:4-pruned along K) as
    `torch.sparse.to_sparse_semi_structured`, per shape and token count, on the current CUDA device.

    Each timing runs at least `inner` calls back to back (captured in a CUDA graph unless `cuda_graph` is False
    or capture fails), timed with CUDA events: `warmup` untimed runs, then the median of `repeats` runs, per
    call. With `cold_weights` the calls cycle through enough copies of the weight to exceed the device's L2
    twice over, so weights come from device memory as they do when a whole model runs. Shapes the sparse
    kernels reject are skipped with the kernel's reason. (warmup/repeats/inner are run-length choices, not
    hardware figures.)"""
    torch = _require_cuda()
    import torch.nn.functional as F

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    l2 = int(getattr(props, "L2_cache_size", 0) or 0)
    gen = torch.Generator(device=device).manual_seed(seed)
    rows, skipped = [], []
    for s in shapes:
        n, k = s["n"], s["k"]
        if not fits_groups(k, GROUP):
            skipped.append({"n": n, "k": k, "reason": f"K = {k} is not divisible by {GROUP}"})
            continue
        base = _two_four_mask(torch.randn(n, k, generator=gen, device=device, dtype=torch.float16))
        copies = 1
        if cold_weights and l2:
            copies = math.ceil(2 * l2 / (n * k * FP16_BYTES)) + 1
        dense_ws = [base] + [base.clone() for _ in range(copies - 1)]
        try:
            sparse_ws = [torch.sparse.to_sparse_semi_structured(w) for w in dense_ws]
        except Exception as exc:  # the kernels' own shape/dtype checks
            skipped.append({"n": n, "k": k, "reason": f"to_sparse_semi_structured rejected it: "
                                                      f"{type(exc).__name__}: {exc}"})
            continue
        n_calls = max(inner, copies)
        for t in tokens:
            x = torch.randn(int(t), k, generator=gen, device=device, dtype=torch.float16)
            try:
                ref = F.linear(x, base)
                out = F.linear(x, sparse_ws[0])
            except Exception as exc:
                skipped.append({"n": n, "k": k, "tokens": int(t),
                                "reason": f"sparse linear failed: {type(exc).__name__}: {exc}"})
                continue
            err = float((out.float() - ref.float()).abs().max())
            # equality check with 8 fp16 epsilons of headroom on the output scale (a tolerance choice)
            tol = 8 * torch.finfo(torch.float16).eps * float(ref.float().abs().max())
            dense_calls = [functools.partial(F.linear, x, dense_ws[i % copies]) for i in range(n_calls)]
            sparse_calls = [functools.partial(F.linear, x, sparse_ws[i % copies]) for i in range(n_calls)]
            dense_us, dense_mode = _time_calls(torch, dense_calls, warmup, repeats, cuda_graph)
            sparse_us, sparse_mode = _time_calls(torch, sparse_calls, warmup, repeats, cuda_graph)
            rows.append({"kind": "measured", "n": n, "k": k, "linears": s["linears"], "blocks": s["blocks"],
                         "count": s["count"], "tokens": int(t), "dense_us_measured": dense_us,
                         "sparse24_us_measured": sparse_us, "speedup_measured": dense_us / sparse_us,
                         "timing_dense": dense_mode, "timing_sparse": sparse_mode,
                         "sparse_backend": type(sparse_ws[0]).__name__, "max_abs_err_vs_dense": err,
                         "outputs_match": err <= tol, "weight_copies": copies, "calls_per_run": n_calls})
        del dense_ws, sparse_ws
        torch.cuda.empty_cache()
    return {"kind": "measured", "device": torch.cuda.get_device_name(device),
            "capability": list(torch.cuda.get_device_capability(device)), "torch": torch.__version__,
            "cuda": torch.version.cuda, "l2_bytes": l2, "method": (
                f"CUDA events around >= {inner} back-to-back F.linear calls "
                f"({'captured in a CUDA graph' if cuda_graph else 'eager launches'}); {warmup} warmup runs; "
                f"median of {repeats} runs, per call; random fp16 weights 2:4-pruned along K (seed {seed}); "
                + ("calls cycle through weight copies exceeding 2x L2 (weights read from device memory)"
                   if cold_weights else "one weight copy (may stay in L2)")),
            "rows": rows, "skipped": skipped}
