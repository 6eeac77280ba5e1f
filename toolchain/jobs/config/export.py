"""`toolchain export`: artifact forms (ONNX, blob, compressed-tensors) and accelerator bundles (FPGA, GPU)."""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError
from ...gpu.bundle import PRECISIONS as GPU_PRECISIONS, check_bundle_options
from ..options import option, refuse_inapplicable

ARTIFACT_TARGETS = ("onnx", "blob", "compressed-tensors")
BUNDLE_TARGETS = ("fpga", "gpu")


def _fpga(cfg) -> bool:
    return cfg.targets() == ["fpga"]


def _gpu(cfg) -> bool:
    return cfg.targets() == ["gpu"]


def _onnx(cfg) -> bool:
    return "onnx" in cfg.targets()


def _streams(cfg) -> bool:
    return bool({"onnx", "blob", "compressed-tensors"} & set(cfg.targets()))


ONNX_GRAPHS = ("fused", "plain")
LM_HEADS = ("float", "int8", "int4")
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


@dataclass
class ExportConfig:
    target: str = option("all", "--target", "onnx, blob, compressed-tensors, or all; comma list allowed; fpga or "
                         "gpu, each on its own, writes an accelerator bundle to --out")
    onnx_weights: str | None = option(None, "--onnx-weights", "float, qdq, matmulnbits; comma list allowed (default: "
                                      "matmulnbits when the model is quantized, else float)",
                                      applies=_onnx, applies_to="to --target onnx (or all) only")
    onnx_graph: str = option("fused", "--onnx-graph", "fused: onnxruntime's contrib ops (GroupQueryAttention with "
                             "rotary inside and a KV cache it can fill in place, SkipSimplifiedLayerNormalization, "
                             "one weight for q/k/v and one for gate/up where the codes allow), the graph "
                             "onnxruntime-genai runs fastest; plain: op by op, for runtimes without contrib ops "
                             "(TensorRT). A family with no fused form (OPT) is written plain",
                             choices=ONNX_GRAPHS, applies=_onnx, applies_to="to --target onnx (or all) only")
    accuracy_level: int = option(0, "--accuracy-level", "MatMulNBits compute: 0 exact (fp32 activations; matches "
                                 "PyTorch), 1 fp32, 2 fp16, 3 bf16, 4 int8 activations (faster on CPU, no longer "
                                 "exact: onnx-check measures by how much)", type=int, choices=ACCURACY_LEVELS,
                                 applies=_onnx, applies_to="to --target onnx (or all) only")
    lm_head: str = option("float", "--lm-head", "the LM head's weight when it was not quantized: float, or "
                          "MatMulNBits int8 / int4 in symmetric blocks of 32. int8 keeps a table that is exactly "
                          "int8 blocks (a GGUF Q8_0 embedding, tied) exact; otherwise the head is rounded to the "
                          "nearest code and the logits change (onnx-check measures by how much)", choices=LM_HEADS,
                          applies=_onnx, applies_to="to --target onnx (or all) only")
    streaming: bool | None = option(
        None, "--streaming", "never hold the whole model: ONNX reads each decoder layer from the checkpoint (a "
        "Hugging Face safetensors directory, sharded or not) when the graph builder reaches it and writes every "
        "weight straight to model.<form>.onnx.data as it is made; the blob and compressed-tensors read the codes "
        "one linear at a time (docs/scale.md). Same graph and bytes as in memory. Default: streaming when three "
        "float32 copies of the model would not fit in the available RAM; --no-streaming loads the whole model",
        negatable=True, applies=_streams, applies_to="to --target onnx, blob, compressed-tensors (or all) only")
    accel_config: str | None = option(None, "--config", "fpga: accelerator config (keys of accel.json: n, m, "
                                      "groups_per_beat, pes, weight_bits, act_bits, group_size, k_max, scale_bits, "
                                      "out_bits, clock_mhz, mem_gbps); default: a design that runs every layer of "
                                      "the model", metavar="ACCEL_JSON", applies=_fpga,
                                      applies_to="to --target fpga only")
    no_synth: bool = option(False, "--no-synth", "fpga: skip the Yosys resource estimate (UltraScale+ and iCE40)",
                            applies=_fpga, applies_to="to --target fpga only")
    precision: str = option("fp16", "--precision", "gpu: GEMM precision in the graph (TensorRT 11 networks are "
                            "strongly typed): fp16, or int8 with explicit Q/DQ (per-channel weights, static "
                            "per-tensor input scales calibrated on 32 windows of 512 tokens)", choices=GPU_PRECISIONS,
                            applies=_gpu, applies_to="to --target gpu only")
    max_batch: int = option(1, "--max-batch", "gpu: the engine profile's largest batch", type=int,
                            applies=_gpu, applies_to="to --target gpu only")
    max_seq: int = option(2048, "--max-seq", "gpu: the engine profile's longest context, capped at the model's",
                          type=int, applies=_gpu, applies_to="to --target gpu only")

    def streaming_refusals(self) -> list[str]:
        """Nothing an export target asks for needs the whole model (see `_streams` for the targets that stream)."""
        return []

    def targets(self) -> list[str]:
        names = [t.strip() for t in self.target.split(",") if t.strip()]
        return list(ARTIFACT_TARGETS) if names == ["all"] else names

    def validate(self, given: set[str] | None = None) -> list[str]:
        """Check the targets (a bundle target stands alone) and every setting; return the target list."""
        names = self.targets()
        bundles = [t for t in names if t in BUNDLE_TARGETS]
        if bundles and len(names) > 1:
            raise ConfigError(f"--target {bundles[0]} writes a bundle directory of its own; export it on its own")
        bad = [t for t in names if t not in ARTIFACT_TARGETS + BUNDLE_TARGETS]
        if bad or not names:
            raise ConfigError(f"--target {self.target!r}: choose from {', '.join(ARTIFACT_TARGETS)} or all (comma "
                              f"list allowed), or fpga or gpu on its own")
        check_bundle_options(self.precision, self.max_batch, self.max_seq)
        refuse_inapplicable(self, given)
        return names
