"""The published figures the GPU benchmark rests on: vendor peaks per GPU, the fp16 and 2:4 storage formats,
and the token counts and target of the 2:4 comparison.

Every figure of `GPUS` is a VENDOR PEAK FIGURE (datasheet / whitepaper), never a measurement; the roofline
built on them (`estimate.roofline`) is an estimate.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from toolchain.errors import ConfigError

# The token counts the comparison covers ("at 1, 16, 64, 256 and 2048 tokens").
TOKENS: tuple[int, ...] = (1, 16, 64, 256, 2048)
# The target: "the 2:4 semi-structured linear is >= 1.3x faster than dense fp16 on SmolLM2's MLP
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
