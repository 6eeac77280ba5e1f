"""`toolchain gpu-bench`: dense fp16 against 2:4 semi-structured linears, honestly labelled.

On a CUDA device every distinct linear shape of the model's decoder is *timed* (`measure_cuda`): a dense fp16
`torch.nn.functional.linear` against the same weight as `torch.sparse.to_sparse_semi_structured`, at the token
counts of the GPU issue. Without CUDA nothing is timed: `run_gpu_bench` says so and writes a roofline *estimate*
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

import functools
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..atomic import atomic_file
from ..errors import ConfigError, ToolchainError

# The token counts the GPU issue names ("at 1, 16, 64, 256 and 2048 tokens").
TOKENS: tuple[int, ...] = (1, 16, 64, 256, 2048)
# The GPU issue's target: "the 2:4 semi-structured linear is >= 1.3x faster than dense fp16 on SmolLM2's MLP
# shapes at >= 64 tokens on an H100" (a goal to check against a measurement, not a hardware figure).
TARGET_SPEEDUP = 1.3
TARGET_MIN_TOKENS = 64

# IEEE 754-2008 binary16 (fp16) is 16 bits = 2 bytes per value (IEEE Std 754-2008, section 3.6, Table 3.5).
FP16_BYTES = 2
# 2:4 keeps 2 values of every 4 along K; its metadata is a 2-bit index per kept value (the 4-bit code of each
# group of 4 holds "the index of the True value at the lowest index" in its lower two bits and the other index
# in its higher two bits: PyTorch, torch/sparse/_semi_structured_conversions.py,
# sparse_semi_structured_from_dense_cutlass, https://github.com/pytorch/pytorch/blob/main/torch/sparse/_semi_structured_conversions.py).
KEPT_FRACTION = 0.5            # 2 of 4
METADATA_BITS_PER_KEPT = 2
BITS_PER_BYTE = 8
GROUP = 4                      # 2:4 groups run along K in groups of 4
# SI prefixes: tera = 1e12, giga = 1e9; microseconds per second = 1e6, per millisecond = 1e3.
TERA, GIGA, US_PER_S, US_PER_MS = 1e12, 1e9, 1e6, 1e3


class NoCudaError(ToolchainError, RuntimeError):
    """A measurement was asked for on a machine without a usable CUDA device."""


@dataclass(frozen=True)
class GPUSpec:
    """Vendor peak figures for one GPU. All figures are VENDOR PEAK FIGURES (datasheet / whitepaper), never
    measurements; the roofline built on them is an estimate.

    dense_fp16_tflops: published dense FP16 tensor-core peak, or None where the vendor publishes only the
        sparse figure (then `dense_peak()` derives it from the sparse one with the factor the same vendor
        document states, and says so).
    sparse_fp16_tflops: published FP16 tensor-core peak "with sparsity" (2:4), dense-equivalent FLOPs.
    mem_bw_gbs: published peak memory bandwidth, GB/s.
    """

    name: str
    dense_fp16_tflops: float | None
    sparse_fp16_tflops: float
    mem_bw_gbs: float
    accumulate: str
    sources: tuple[str, ...]
    notes: str = ""
    device_name_patterns: tuple[str, ...] = ()
    # factor the vendor states between the sparse and the dense tensor peak, with its source; used only when
    # dense_fp16_tflops is None
    sparse_over_dense_stated: float | None = None
    sparse_over_dense_source: str = ""

    def dense_peak(self) -> tuple[float, str]:
        """(dense FP16 tensor peak in TFLOPS, provenance)."""
        if self.dense_fp16_tflops is not None:
            return self.dense_fp16_tflops, "published vendor peak"
        if not self.sparse_over_dense_stated:
            raise ConfigError(f"{self.name}: no published dense FP16 tensor peak and no stated sparse/dense factor")
        return (self.sparse_fp16_tflops / self.sparse_over_dense_stated,
                f"derived: published sparse peak / {self.sparse_over_dense_stated:g} "
                f"({self.sparse_over_dense_source}); the vendor publishes no dense FP16 tensor figure")

    def figures(self) -> dict:
        dense, provenance = self.dense_peak()
        return {"name": self.name, "label": "vendor peak figures (not measurements)",
                "dense_fp16_tensor_tflops": dense, "dense_provenance": provenance,
                "sparse24_fp16_tensor_tflops": self.sparse_fp16_tflops,
                "memory_bandwidth_gbs": self.mem_bw_gbs, "accumulate": self.accumulate,
                "sources": list(self.sources), "notes": self.notes}


H100_DATASHEET = ("NVIDIA H100 Tensor Core GPU datasheet, https://resources.nvidia.com/en-us-tensor-core/"
                  "nvidia-tensor-core-gpu-datasheet (product page https://www.nvidia.com/en-us/data-center/h100/): "
                  "'FP16 Tensor Core 1,979 teraFLOPS*' (SXM), '1,513 teraFLOPS*' (PCIe), '* With sparsity' / "
                  "'Shown with sparsity. Specifications 1/2 lower without sparsity'; 'GPU Memory Bandwidth "
                  "3.35TB/s' (SXM), '2TB/s' (PCIe)")
H100_WHITEPAPER = ("NVIDIA H100 Tensor Core GPU Architecture whitepaper (V1.04, 'final TFLOPS performance specs'), "
                   "https://resources.nvidia.com/en-us-tensor-core/gtc22-whitepaper-hopper, Table 3: 'Peak FP16 "
                   "Tensor TFLOPS with FP16 Accumulate' and '... with FP32 Accumulate' 989.4/1978.9 (H100 SXM5), "
                   "756/1513 (H100 PCIe); second number 'Effective TFLOPS / TOPS using the Sparsity feature'")
A100_DATASHEET = ("NVIDIA A100 Tensor Core GPU datasheet, https://www.nvidia.com/content/dam/en-zz/Solutions/"
                  "Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf: 'FP16 Tensor Core "
                  "312 TFLOPS | 624 TFLOPS*', '* With sparsity'; 'GPU Memory Bandwidth ... A100 80GB SXM 2,039GB/s'")
A100_WHITEPAPER = ("NVIDIA A100 Tensor Core GPU Architecture whitepaper, https://images.nvidia.com/aem-dam/en-zz/"
                   "Solutions/data-center/nvidia-ampere-architecture-whitepaper.pdf: 'Peak FP16 Tensor TFLOPS with "
                   "FP16 Accumulate 312/624' and 'with FP32 Accumulate 312/624' (second number with sparsity)")
L40S_DATASHEET = ("NVIDIA L40S datasheet, https://resources.nvidia.com/en-us-l40s/l40s-datasheet-28413 (product page "
                  "https://www.nvidia.com/en-us/data-center/l40s/): 'FP16 Tensor Core TFLOPS 362.05 | 733*', "
                  "'* With Sparsity'; 'Memory Bandwidth 864GB/s'")
ORIN_DATASHEET = ("NVIDIA Jetson AGX Orin Series Data Sheet DS-10662-001 v1.6 (December 5, 2024), Jetson Download "
                  "Center https://developer.nvidia.com/embedded/downloads: Table 1-2 'JAO 64GB: Ampere GPU ... Up to "
                  "170 INT8 Sparse TOPS or 85 Sparse FP16 TFLOPS (Tensor Cores)'; Table 1-3 'Maximum Memory Bus "
                  "Bandwidth (up to) 204.8 GB/s'; section 4.1 'Sparsity: fine grained structured sparsity doubles "
                  "throughput', 4.1.1 'The Tensor Cores in Ampere can provide up to 2x higher performance for "
                  "inference of sparse models'")

GPUS: dict[str, GPUSpec] = {
    "H100-SXM": GPUSpec(
        name="H100-SXM",
        # vendor peak figure, dense (without sparsity), FP16 or FP32 accumulate: H100 whitepaper V1.04 Table 3
        dense_fp16_tflops=989.4,
        # vendor peak figure, with sparsity, FP16 or FP32 accumulate: H100 whitepaper Table 3 (datasheet: 1,979*)
        sparse_fp16_tflops=1978.9,
        # vendor peak figure: H100 datasheet "GPU Memory Bandwidth 3.35TB/s" (H100 SXM)
        mem_bw_gbs=3350.0,
        accumulate="FP16 or FP32 accumulate (the whitepaper lists the same peak for both)",
        sources=(H100_WHITEPAPER, H100_DATASHEET),
        notes="80GB HBM3 SXM5 module; peaks at boost clock",
        device_name_patterns=(r"H100.*(SXM|HBM3)",),
    ),
    "H100-PCIe": GPUSpec(
        name="H100-PCIe",
        # vendor peak figure, dense, FP16 or FP32 accumulate: H100 whitepaper V1.04 Table 3 (756/1513)
        dense_fp16_tflops=756.0,
        # vendor peak figure, with sparsity: H100 whitepaper Table 3; datasheet "1,513 teraFLOPS*"
        sparse_fp16_tflops=1513.0,
        # vendor peak figure: H100 datasheet "GPU Memory Bandwidth 2TB/s" (H100 PCIe)
        mem_bw_gbs=2000.0,
        accumulate="FP16 or FP32 accumulate (the whitepaper lists the same peak for both)",
        sources=(H100_WHITEPAPER, H100_DATASHEET),
        notes="80GB HBM2e PCIe card as in the whitepaper and the first datasheet; the current product page lists "
              "the H100 NVL instead, whose figures differ and are not in this table",
        device_name_patterns=(r"H100.*PCIe",),
    ),
    "A100-SXM-80GB": GPUSpec(
        name="A100-SXM-80GB",
        # vendor peak figure, dense, FP16 or FP32 accumulate: A100 datasheet "312 TFLOPS", whitepaper 312/624
        dense_fp16_tflops=312.0,
        # vendor peak figure, with sparsity: A100 datasheet "624 TFLOPS*"
        sparse_fp16_tflops=624.0,
        # vendor peak figure: A100 datasheet "A100 80GB SXM 2,039GB/s"
        mem_bw_gbs=2039.0,
        accumulate="FP16 or FP32 accumulate (the whitepaper lists the same peak for both)",
        sources=(A100_DATASHEET, A100_WHITEPAPER),
        notes="80GB HBM2e SXM4 module (the 40GB and the PCIe cards have lower bandwidth and are not this entry)",
        device_name_patterns=(r"A100.*SXM.*80GB",),
    ),
    "L40S": GPUSpec(
        name="L40S",
        # vendor peak figure, dense: L40S datasheet "FP16 Tensor Core 362.05"
        dense_fp16_tflops=362.05,
        # vendor peak figure, with sparsity: L40S datasheet "733*" (as published; not exactly 2 x 362.05)
        sparse_fp16_tflops=733.0,
        # vendor peak figure: L40S datasheet "Memory Bandwidth 864GB/s"
        mem_bw_gbs=864.0,
        accumulate="not stated in the datasheet",
        sources=(L40S_DATASHEET,),
        notes="48GB GDDR6 PCIe card; the datasheet's sparse figure is not exactly twice its dense one; both are "
              "kept as published",
        device_name_patterns=(r"L40S",),
    ),
    "Jetson-AGX-Orin-64GB": GPUSpec(
        name="Jetson-AGX-Orin-64GB",
        # no dense FP16 tensor figure is published for this module; derived from the sparse one below
        dense_fp16_tflops=None,
        # vendor peak figure, with sparsity: Orin data sheet Table 1-2 "85 Sparse FP16 TFLOPS (Tensor Cores)"
        sparse_fp16_tflops=85.0,
        # vendor peak figure: Orin data sheet Table 1-3 "Maximum Memory Bus Bandwidth (up to) 204.8 GB/s"
        mem_bw_gbs=204.8,
        accumulate="not stated in the data sheet",
        sources=(ORIN_DATASHEET,),
        notes="GPU at its maximum 1.3 GHz (data sheet); memory is LPDDR5 shared with the CPU. Not matched "
              "automatically on a device: the 32GB and Industrial modules report the same device name",
        # the data sheet's own statement "doubles throughput" / "up to 2x" (section 4.1, 4.1.1)
        sparse_over_dense_stated=2.0,
        sparse_over_dense_source="Jetson AGX Orin data sheet DS-10662-001 v1.6, section 4.1: sparsity "
                                 "'doubles throughput'",
    ),
}


def get_gpu(gpu: str | GPUSpec) -> GPUSpec:
    """A table entry by name (case-insensitive), or the spec itself."""
    if isinstance(gpu, GPUSpec):
        return gpu
    for name, spec in GPUS.items():
        if name.lower() == str(gpu).lower():
            return spec
    raise ConfigError(f"unknown GPU {gpu!r}; the table has: {', '.join(GPUS)}")


def match_gpu(device_name: str) -> GPUSpec | None:
    """The table entry for a CUDA device name (torch.cuda.get_device_name()), or None when none fits."""
    for spec in GPUS.values():
        if any(re.search(p, device_name, re.IGNORECASE) for p in spec.device_name_patterns):
            return spec
    return None


# --------------------------------------------------------------------------------------------------------------
# shapes


def _llama_config_shapes(config) -> list[tuple[str, str, int, int]]:
    """(block, linear name, N, K) of one LLaMA-family decoder layer from its transformers config."""
    hidden, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return [("attn", "self_attn.q_proj", heads * head_dim, hidden),
            ("attn", "self_attn.k_proj", kv_heads * head_dim, hidden),
            ("attn", "self_attn.v_proj", kv_heads * head_dim, hidden),
            ("attn", "self_attn.o_proj", hidden, heads * head_dim),
            ("mlp", "mlp.gate_proj", inter, hidden),
            ("mlp", "mlp.up_proj", inter, hidden),
            ("mlp", "mlp.down_proj", hidden, inter)]


def linear_shapes(model_or_config) -> list[dict]:
    """The distinct (N, K) shapes of the decoder's linears ([N, K] = [out_features, in_features]) with counts.

    Accepts a LoadedModel, a model with a supported adapter, or a LLaMA-family transformers config. Each entry:
    {"n", "k", "count" (over all layers), "linears" (names within a layer), "blocks" ("attn"/"mlp")}."""
    from torch import nn

    from ..models import adapter_for

    entries: list[tuple[str, str, int, int]] = []
    model, adapter = model_or_config, None
    if hasattr(model_or_config, "adapter") and isinstance(getattr(model_or_config, "model", None), nn.Module):
        model, adapter = model_or_config.model, model_or_config.adapter  # a LoadedModel
    if isinstance(model, nn.Module):
        adapter = adapter or adapter_for(model)
        for layer in adapter.decoder_layers(model):
            block_of = {name: sb.name for sb in adapter.subblocks(layer) for name in sb.linears}
            for name, lin in adapter.linears(layer).items():
                n, k = lin.weight.shape
                entries.append((block_of.get(name, "other"), name, int(n), int(k)))
    else:
        config = model_or_config
        adapter = adapter_for(config)  # raises a clear error for unsupported families
        if adapter.family != "llama":
            raise ConfigError(f"shapes from a config are computed for the LLaMA family only (got {adapter.family!r});"
                              f" pass the loaded model instead")
        for _ in range(config.num_hidden_layers):
            entries.extend(_llama_config_shapes(config))
    if not entries:
        raise ConfigError("the model has no decoder linears")
    shapes: dict[tuple[int, int], dict] = {}
    for block, name, n, k in entries:
        s = shapes.setdefault((n, k), {"n": n, "k": k, "count": 0, "linears": [], "blocks": []})
        s["count"] += 1
        if name not in s["linears"]:
            s["linears"].append(name)
        if block not in s["blocks"]:
            s["blocks"].append(block)
    return list(shapes.values())


def _is_mlp(shape: dict) -> bool:
    return shape["blocks"] == ["mlp"]


# --------------------------------------------------------------------------------------------------------------
# roofline (estimate)


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
    if sparse and k % GROUP:
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


def _summary(rows: list[dict], key: str, label: str) -> dict:
    """Speedups of the MLP shapes at >= TARGET_MIN_TOKENS tokens, against the issue's target."""
    mlp = [r for r in rows if r["blocks"] == ["mlp"] and r["tokens"] >= TARGET_MIN_TOKENS and r.get(key)]
    if not mlp:
        return {"kind": label, "mlp_rows": 0}
    worst = min(r[key] for r in mlp)
    return {"kind": label, "mlp_rows": len(mlp), f"mlp_min_{key}_at_{TARGET_MIN_TOKENS}plus_tokens": worst,
            "by_shape": {f"{r['n']}x{r['k']}@{r['tokens']}": r[key] for r in mlp},
            "target": f">= {TARGET_SPEEDUP}x at >= {TARGET_MIN_TOKENS} tokens (GPU issue)",
            f"target_met_by_{label}": worst >= TARGET_SPEEDUP}


# --------------------------------------------------------------------------------------------------------------
# measurement (CUDA only)


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
        if k % GROUP:
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


# --------------------------------------------------------------------------------------------------------------
# the command


def _model_label(model) -> str:
    return "smollm2" if str(model) == "smollm2" else Path(str(model)).name


def _shapes_for(model: str, source) -> list[dict]:
    """Shapes without loading weights where possible (a config), else from the loaded model."""
    if source is not None:
        return linear_shapes(source)
    from ..models import adapter_for, load_model
    from ..models.loading import smollm2_path

    path = smollm2_path() if str(model) == "smollm2" else Path(str(model))
    config = None
    try:
        from transformers import AutoConfig

        if path.is_file() and path.suffix == ".gguf":
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        elif (path / "config.json").is_file():
            config = AutoConfig.from_pretrained(path)
    except Exception:
        config = None
    if config is not None:
        try:
            if adapter_for(config).family == "llama":
                return linear_shapes(config)
        except ToolchainError:
            pass
    return linear_shapes(load_model(model, with_tokenizer=False))


def _us(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 100 else f"{v:,.0f}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def gpu_table(r: dict) -> str:
    """Markdown for a gpu-bench result: estimates and measurements in separate, labelled tables."""
    lines = [f"# GPU benchmark: {r['model']}", ""]
    if not r["cuda"]:
        lines += [f"**No CUDA device: every number below is a roofline ESTIMATE for {r['estimate']['gpu']['name']} "
                  "from vendor peak figures, not a measurement.**", ""]
    engines = r.get("engines")
    if engines:
        lines += ["## TensorRT engines, end to end (measured)", "",
                  "| engine | prefill 128 tokens ms (measured) | decode ms/token (measured) |", "|---|---|---|"]
        for kind in ("dense", "sparse"):
            lines.append(f"| {kind} | {engines[kind]['prefill_ms']} | {engines[kind]['decode_ms_per_token']} |")
        sp = engines["sparse_speedup"]
        lines += ["", f"Sparse over dense: prefill {sp['prefill_ms']}x, decode {sp['decode_ms_per_token']}x "
                      f"(measured).", ""]
    elif r.get("engines_note"):
        lines += [r["engines_note"] + ".", ""]
    m = r.get("measured")
    if m:
        lines += [f"## Measured on {m['device']} (torch {m['torch']}, CUDA {m['cuda']})", "", m["method"], "",
                  "| kind | N x K | linears | count | tokens | dense us (measured) | 2:4 us (measured) | "
                  "speedup (measured) | outputs match | backend | timing |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for x in m["rows"]:
            timing = (x["timing_dense"] if x["timing_dense"] == x["timing_sparse"]
                      else f"dense: {x['timing_dense']}; 2:4: {x['timing_sparse']}")
            lines.append(f"| measured | {x['n']} x {x['k']} | {', '.join(x['linears'])} | {x['count']} | "
                         f"{x['tokens']} | {_us(x['dense_us_measured'])} | {_us(x['sparse24_us_measured'])} | "
                         f"{_x(x['speedup_measured'])} | {'yes' if x['outputs_match'] else 'NO'} | "
                         f"{x['sparse_backend']} | {timing} |")
        ms = m.get("summary", {})
        mkey = f"mlp_min_speedup_measured_at_{TARGET_MIN_TOKENS}plus_tokens"
        if mkey in ms:
            lines += ["", f"MLP shapes, >= {TARGET_MIN_TOKENS} tokens: smallest MEASURED 2:4 speedup {ms[mkey]:.2f}x; "
                      f"the issue's target is {TARGET_SPEEDUP}x: {'met' if ms['target_met_by_measured'] else 'NOT met'}."]
        lines.append("")
        for x in m["skipped"]:
            lines.append(f"- skipped {x['n']} x {x['k']}" + (f" at {x['tokens']} tokens" if "tokens" in x else "")
                         + f": {x['reason']}")
        lines.append("")
    e = r.get("estimate")
    if e:
        g = e["gpu"]
        lines += [f"## Roofline ESTIMATE for {g['name']} (not a measurement)", "", e["model_of_time"], "",
                  "Vendor peak figures used (estimates rest on these, none is measured here):", "",
                  f"- dense FP16 tensor: {g['dense_fp16_tensor_tflops']:g} TFLOPS ({g['dense_provenance']})",
                  f"- 2:4 sparse FP16 tensor: {g['sparse24_fp16_tensor_tflops']:g} TFLOPS (published, with sparsity)",
                  f"- memory bandwidth: {g['memory_bandwidth_gbs']:g} GB/s",
                  f"- accumulate: {g['accumulate']}", ""]
        lines += ["Sources:", ""] + [f"- {s}" for s in g["sources"]] + [""]
        lines += ["| kind | N x K | linears | count | tokens | dense us (estimate) | dense bound (estimate) | "
                  "2:4 us (estimate) | 2:4 bound (estimate) | 2:4 speedup (estimate) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for x in e["rows"]:
            lines.append(f"| estimate | {x['n']} x {x['k']} | {', '.join(x['linears'])} | {x['count']} | "
                         f"{x['tokens']} | {_us(x['dense_us_estimate'])} | {x['dense_bound_estimate']} (estimate) | "
                         f"{_us(x['sparse24_us_estimate'])} | {x['sparse24_bound_estimate'] or '-'} (estimate) | "
                         f"{_x(x['speedup_estimate'])} (estimate) |")
        s = e["summary"]
        key = f"mlp_min_speedup_estimate_at_{TARGET_MIN_TOKENS}plus_tokens"
        if key in s:
            lines += ["", f"MLP shapes, >= {TARGET_MIN_TOKENS} tokens: smallest 2:4 speedup ESTIMATE "
                      f"{s[key]:.2f}x against the issue's target of {TARGET_SPEEDUP}x. An estimate cannot confirm "
                      "the target; only a measurement on the GPU can."]
    elif r["cuda"]:
        lines += ["", f"No roofline estimate: {r.get('estimate_note', '')}"]
    lines += ["", f"Plot: {r['plot'] or r['plot_note']}", ""]
    return "\n".join(lines)


def _import_pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _plot(r: dict, path: Path) -> str | None:
    """Speedup against tokens per shape; returns a note when no plot is written."""
    plt = _import_pyplot()
    if plt is None:
        return "matplotlib is not installed: no plot written (pip install matplotlib for gpu_<model>.png)"
    fig, ax = plt.subplots()
    series = []
    if r.get("measured"):
        series.append(("measured", "speedup_measured", "-", r["measured"]["rows"]))
    if r.get("estimate"):
        series.append(("ESTIMATE", "speedup_estimate", "--", r["estimate"]["rows"]))
    for label, key, style, rows in series:
        for n, k in sorted({(x["n"], x["k"]) for x in rows}):
            pts = sorted((x["tokens"], x[key]) for x in rows if (x["n"], x["k"]) == (n, k) and x.get(key))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{n}x{k} ({label})")
    ax.axhline(TARGET_SPEEDUP, color="grey", linestyle=":", label=f"issue target {TARGET_SPEEDUP}x")
    ax.axhline(1.0, color="black")  # parity with dense
    ax.set_xscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("2:4 speedup over dense fp16")
    title = f"{r['model']}: 2:4 vs dense fp16 linears"
    if not r["cuda"]:
        title += f" - roofline ESTIMATE for {r['estimate']['gpu']['name']}, not measured"
    ax.set_title(title, fontsize="small")
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
        tmp.chmod(0o644)
    plt.close(fig)
    return None


def run_gpu_bench(model: str = "smollm2", out_dir: str | Path = "bench/results", gpu: str = "H100-SXM", *,
                  source=None, tokens: Iterable[int] = TOKENS, measure_kwargs: dict | None = None,
                  bundle: str | Path | None = None) -> dict:
    """`toolchain gpu-bench`: measure on CUDA, else write a labelled roofline ESTIMATE for `gpu`.

    On CUDA the estimate is written for the detected device when it matches a table entry (`match_gpu`), and
    left out (with the reason) when it does not; `gpu` is then only validated. `source` (a LoadedModel, a model
    or a LLaMA-family config) supplies the shapes instead of loading `model`, which then only names the output
    files <out_dir>/gpu_<model>.{json,md,png}. `measure_kwargs` go to `measure_cuda`. With `bundle` (from
    `toolchain export --target gpu`), CUDA and TensorRT, its sparse and dense engines are built and timed end to
    end (prefill and decode); otherwise the result says why not."""
    import torch

    tokens = tuple(int(t) for t in tokens)
    if not tokens or min(tokens) < 1:
        raise ConfigError(f"tokens must be positive integers, got {tokens}")
    spec = get_gpu(gpu)  # validate the name before any work
    shapes = _shapes_for(model, source)
    label = _model_label(model)
    model_of_time = ("time = max(FLOPs / peak tensor FLOPS, bytes / memory bandwidth); FLOPs = 2*N*K*T "
                     "(dense-equivalent for 2:4, against the 'with sparsity' peak); bytes = weight once (fp16 "
                     "dense N*K*2; 2:4 N*K/2*2 + 2-bit metadata per kept value) + activations T*K*2 in and "
                     "T*N*2 out. Caches, launch overhead and kernel efficiency are ignored: an upper bound on "
                     "what the hardware allows, not a kernel prediction.")
    result: dict = {"benchmark": "gpu", "model": label, "cuda": bool(torch.cuda.is_available()),
                    "tokens": list(tokens), "shapes": shapes, "measured": None, "estimate": None}
    estimate_spec = spec
    if result["cuda"]:
        measure_kwargs = dict(measure_kwargs or {})
        measure_kwargs.setdefault("tokens", tokens)
        result["measured"] = measure_cuda(shapes, **measure_kwargs)
        result["measured"]["summary"] = _summary(result["measured"]["rows"], "speedup_measured", "measured")
        estimate_spec = match_gpu(result["measured"]["device"])
        if estimate_spec is None:
            result["estimate_note"] = (f"the device {result['measured']['device']!r} matches no entry of the "
                                       f"GPU table ({', '.join(GPUS)})")
        print(f"measured on {result['measured']['device']}", flush=True)
    else:
        print(f"no CUDA device: writing a roofline ESTIMATE for {spec.name}, not a measurement", flush=True)
    if bundle is not None:
        import importlib.util

        if not result["cuda"]:
            result["engines_note"] = "TensorRT engines not timed: no CUDA device"
        elif importlib.util.find_spec("tensorrt") is None:
            result["engines_note"] = "TensorRT engines not timed: the tensorrt package is not installed"
        else:
            from .run import engine_timings

            result["engines"] = {"kind": "measured", **engine_timings(bundle)}
    if estimate_spec is not None:
        rows = estimate_rows(shapes, estimate_spec, tokens)
        result["estimate"] = {"kind": "estimate",
                              "label": "roofline ESTIMATE from vendor peak figures, not a measurement",
                              "gpu": estimate_spec.figures(), "model_of_time": model_of_time, "rows": rows,
                              "summary": _summary(rows, "speedup_estimate", "estimate")}
    out = Path(out_dir)
    stem = out / f"gpu_{label}"
    result["plot"], result["plot_note"] = None, None
    note = _plot(result, Path(f"{stem}.png"))
    if note is None:
        result["plot"] = f"{stem}.png"
    else:
        result["plot_note"] = note
        print(note, file=sys.stderr, flush=True)
    table = gpu_table(result)
    for path, text in ((f"{stem}.json", json.dumps(result, indent=2) + "\n"), (f"{stem}.md", table)):
        with atomic_file(path) as tmp:
            tmp.write_text(text)
            tmp.chmod(0o644)  # rw-r--r--, as the other bench results (mkstemp creates files 0600)
    print(table, flush=True)
    return result


__all__ = ["GPUS", "GPUSpec", "NoCudaError", "TOKENS", "get_gpu", "match_gpu", "linear_shapes", "weight_bytes",
           "roofline", "estimate_rows", "measure_cuda", "run_gpu_bench", "gpu_table"]
