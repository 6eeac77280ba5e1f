"""The weight forms of a linear layer in the ONNX graph, chosen per layer by `LinearWriter`:

- `float`: MatMul with the dequantized float weight (what `model.safetensors` holds); for the GPU target
  optionally an fp16 GEMM, or an int8 Q/DQ GEMM with SmoothQuant migration (`int8_plan`);
- `qdq`: opset-21 blocked `DequantizeLinear` of int4/int8 codes (uint4/uint8 with zero points when
  asymmetric), then MatMul: the explicit-quantization form TensorRT's strongly typed networks accept;
- `matmulnbits`: onnxruntime's `com.microsoft.MatMulNBits` (4 and 8 bits, 2 where the installed onnxruntime
  runs it).

Codes come from `quant_state.safetensors` and are never re-quantized. A width a form cannot hold goes into
the next wider container the form has (3-bit codes in int4: exact, only larger), with a warning naming the
layer; a layer the form cannot represent at all (a group size MatMulNBits cannot block) falls back to
float, also with a warning.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from ...quant import QuantizedWeight
from ...quant.smoothquant import SMOOTH_ALPHA, smoothed_int8_weight, smoothquant_scales
from ..blob import pack_codes  # LSB-first bit streams: the layout of MatMulNBits blobs and ONNX INT4 data
from .graph import MS_DOMAIN, OPSET, Dims, Graph, to_numpy

FORMS = ("float", "qdq", "matmulnbits")
LM_HEADS = ("float", "int8", "int4")   # --lm-head: the LM head's weight (int8/int4 through MatMulNBits)
LM_HEAD_BLOCK = 32


class ExportWarning(UserWarning):
    """A layer was exported in a wider container or a different form than asked for."""


def lossless_int8_blocks(weight: torch.Tensor, block: int = 32) -> tuple[np.ndarray, np.ndarray] | None:
    """int8 codes [rows, cols] and fp32 scales [rows, cols / block] that reproduce `weight` exactly in
    float32 (scale * code), or None when no such pair exists.

    Tables that came from a GGUF Q8_0 tensor (SmolLM2's embedding) are exactly this: fp16 block scales
    times int8 codes, dequantized by transformers in float32. Storing them that way is lossless."""
    w = to_numpy(weight)
    if w.ndim != 2 or w.shape[1] % block:
        return None
    codes = np.empty(w.shape, np.int8)
    scales = np.empty((w.shape[0], w.shape[1] // block), np.float32)
    step = max(1, (1 << 22) // max(1, w.shape[1]))   # rows at a time: the temporaries stay small for any table
    for r in range(0, w.shape[0], step):
        b = w[r:r + step].reshape(-1, w.shape[1] // block, block)
        s = (np.abs(b).max(-1) / 127).astype(np.float16).astype(np.float32)
        s = np.where(s > 0, s, np.float32(1.0))
        c = np.round(b / s[..., None])
        if np.abs(c).max(initial=0) > 127 or not np.array_equal(s[..., None] * c.astype(np.float32), b):
            return None
        codes[r:r + step] = c.reshape(-1, w.shape[1])
        scales[r:r + step] = s
    return codes, scales


def lm_head_codes(weight: torch.Tensor, mode: str) -> tuple[QuantizedWeight, str]:
    """Codes for an LM head that was never quantized (`--lm-head int8|int4`), symmetric blocks of 32, and how
    they were made. int8 takes the table's own codes where it is exactly int8 blocks (a GGUF Q8_0 table:
    lossless); otherwise round-to-nearest, which changes the logits (onnx-check measures by how much)."""
    from ...quant import QuantSpec, rtn_quantize

    bits = 8 if mode == "int8" else 4
    spec = QuantSpec(bits, LM_HEAD_BLOCK, True)
    blocks = lossless_int8_blocks(weight, LM_HEAD_BLOCK) if bits == 8 else None
    if blocks is not None:
        codes, scales = blocks
        return (QuantizedWeight(torch.from_numpy(codes.astype(np.int32)), torch.from_numpy(scales),
                                torch.zeros(scales.shape, dtype=torch.int32), spec), "its own int8 blocks (exact)")
    return rtn_quantize(weight, spec), f"round-to-nearest {bits}-bit blocks of {LM_HEAD_BLOCK} (approximate)"


@lru_cache(maxsize=None)
def matmulnbits_widths() -> frozenset[int]:
    """The MatMulNBits widths the installed onnxruntime's CPU provider runs (probed on a tiny graph)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    ok = set()
    for bits in (2, 4, 8):
        k, n, block = 32, 8, 32
        rng = np.random.default_rng(0)
        codes = rng.integers(0, 1 << bits, size=(n, k))
        g = Graph()
        b = g.init("B", pack_codes(codes, bits, signed=False).reshape(n, 1, block * bits // 8))
        s = g.init("S", np.ones((n, 1), np.float32))
        g.op("MatMulNBits", ["A", b, s], outputs=["Y"], domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=block)
        graph = helper.make_graph(g.nodes, "probe", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])], g.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid(MS_DOMAIN, 1)])
        try:
            sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            a = np.ones((1, k), np.float32)
            y = sess.run(None, {"A": a})[0]
            if np.allclose(y[0], (codes - (1 << (bits - 1))).sum(1), atol=1e-3):
                ok.add(bits)
        except Exception:
            pass
    return frozenset(ok)


@dataclass
class LinearWriter:
    """Emits one linear layer in the requested weight form; records what each layer became."""

    g: Graph
    form: str
    quant: dict[str, QuantizedWeight]
    layers: dict[str, dict] = field(default_factory=dict)
    embedding: str = "float32"   # how the token embedding table was stored
    accuracy_level: int = 0      # MatMulNBits: 0 computes in fp32 from the exact weights; 4 quantizes A to int8
    fp16_gemm: bool = False      # float form: fp16 weights and GEMMs (the GPU target), fp32 everywhere else
    dims: Dims | None = None   # the written graph's dimensions, set by build_onnx
    graph: str | None = None   # the decoder written (fused or plain), set by build_onnx
    graph_fallback: str | None = None   # why a fused graph was asked for and the plain one written
    lm_head: str = "float"     # --lm-head: float, or int8/int4 MatMulNBits for a head that was never quantized
    int8_plan: dict[str, dict] | None = None   # float form: int8 Q/DQ GEMMs: {"amax": per-channel input max, "alpha"}

    def __call__(self, x: str, module_name: str, module: torch.nn.Linear, keep_fp32: bool = False) -> str:
        qw = self.quant.get(module_name) if self.form != "float" else None
        bias = module.bias
        if self.int8_plan is not None and module_name in self.int8_plan and not keep_fp32:
            plan = self.int8_plan[module_name]
            y = self._int8(x, module_name, module.weight, plan["amax"], plan.get("alpha", SMOOTH_ALPHA))
        elif qw is None and self.fp16_gemm and not keep_fp32:
            y = self._fp16(x, module_name, module.weight)
        elif qw is None:
            y = self._float(x, module_name, module.weight)
        elif self.form == "qdq":
            y = self._qdq(x, module_name, qw)
        else:
            y = self._matmulnbits(x, module_name, qw)
        if bias is not None:
            y = self.g.op("Add", [y, self.g.init(f"{module_name}.bias", to_numpy(bias))], hint=f"{module_name}/bias")
        return y

    def _note(self, name: str, form: str, **info) -> None:
        self.layers.setdefault(name, {}).update(form=form, **info)

    def _warn(self, name: str, message: str) -> None:
        warnings.warn(f"{name}: {message}", ExportWarning, stacklevel=3)
        self.layers.setdefault(name, {})["warning"] = message

    def _float(self, x: str, name: str, weight: torch.Tensor, note: bool = True) -> str:
        if note:
            self._note(name, "float")
        w_t = self.g.init(f"{name}.weight_t", to_numpy(weight).T)
        return self.g.op("MatMul", [x, w_t], hint=name)

    def _fp16(self, x: str, name: str, weight: torch.Tensor) -> str:
        """Cast in, an fp16 GEMM against the fp16 weight [K, N] (its 2:4 pattern runs along K, the layout
        TensorRT's sparse kernels use), cast out: norms, softmax and residual sums stay fp32."""
        self._note(name, "fp16")
        w_t = self.g.init(f"{name}.weight_t", weight.detach().to(torch.float16).cpu().numpy().T)
        x16 = self.g.op("Cast", [x], hint=f"{name}/to_fp16", to=10)
        return self.g.op("Cast", [self.g.op("MatMul", [x16, w_t], hint=name)], hint=f"{name}/to_fp32", to=1)

    def _int8(self, x: str, name: str, weight: torch.Tensor, act_amax: np.ndarray, alpha: float) -> str:
        """Explicit int8 quantization, as TensorRT's strongly typed networks take it, with SmoothQuant's
        per-channel migration: the input is multiplied by 1/s (a `Mul` before the quantizer, as ModelOpt's
        pre_quant_scale) and the weight's columns by s, s_j = amax_j^a / max|W_j|^(1-a) with a =
        `alpha` (chosen per layer by the GPU bundle), so activation outliers no longer dominate the per-tensor
        input scale. The input then goes
        through Quantize/DequantizeLinear with a static per-tensor scale; the weight [K, N] is int8, symmetric
        per output channel, zeros kept (2:4 along K survives), through one DequantizeLinear; then MatMul."""
        g = self.g
        w = to_numpy(weight)
        smooth, act_scale = smoothquant_scales(act_amax, w, alpha)
        codes, scales = smoothed_int8_weight(w, smooth)
        self._note(name, "int8", act_scale=act_scale, alpha=alpha)
        xs = g.op("Mul", [x, g.init(f"{name}.pre_quant_scale", (1.0 / smooth).astype(np.float32))], hint=f"{name}/smooth")
        s_x = g.init(f"{name}.input_scale", np.array(act_scale, np.float32))
        zp = g.const(0, np.int8)
        xq = g.op("QuantizeLinear", [xs, s_x, zp], hint=f"{name}/q_in")
        xdq = g.op("DequantizeLinear", [xq, s_x, zp], hint=f"{name}/dq_in")
        w = g.op("DequantizeLinear", [g.init(f"{name}.weight_t_int8", codes.T.copy()),
                                      g.init(f"{name}.weight_scale", scales)], axis=1, hint=f"{name}/dq_w")
        return g.op("MatMul", [xdq, w], hint=name)

    def _qdq(self, x: str, name: str, qw: QuantizedWeight) -> str:
        from onnx import TensorProto

        out_f, in_f = qw.codes.shape
        spec = qw.spec
        container = 4 if spec.bits <= 4 else 8
        if container != spec.bits:
            self._warn(name, f"{spec.bits}-bit codes stored as {'' if spec.symmetric else 'u'}int{container} "
                             f"(DequantizeLinear has no {spec.bits}-bit type); exact, larger")
        block = in_f if spec.group_size == -1 else spec.group_size
        codes_t = qw.codes.T.contiguous().numpy()                      # [in, out], blocked along axis 0
        scales_t = qw.scales.T.contiguous().numpy().astype(np.float32)  # [n_groups, out]
        if container == 4:
            dtype = TensorProto.INT4 if spec.symmetric else TensorProto.UINT4
            codes = self.g.init_raw(f"{name}.codes", dtype, [in_f, out_f], pack_codes(codes_t, 4).tobytes())
        else:
            codes = self.g.init(f"{name}.codes", codes_t.astype(np.int8 if spec.symmetric else np.uint8))
        inputs = [codes, self.g.init(f"{name}.scales", scales_t)]
        if not spec.symmetric:
            zeros_t = qw.zeros.T.contiguous().numpy()
            if container == 4:
                inputs.append(self.g.init_raw(f"{name}.zeros", TensorProto.UINT4, list(zeros_t.shape),
                                              pack_codes(zeros_t, 4, signed=False).tobytes()))
            else:
                inputs.append(self.g.init(f"{name}.zeros", zeros_t.astype(np.uint8)))
        w = self.g.op("DequantizeLinear", inputs, hint=f"{name}/dq", axis=0, block_size=block)
        self._note(name, "qdq", bits=spec.bits, container=container, block_size=block)
        return self.g.op("MatMul", [x, w], hint=name)

    def _matmulnbits(self, x: str, name: str, qw: QuantizedWeight) -> str:
        out_f, in_f = qw.codes.shape
        spec = qw.spec
        widths = sorted(w for w in matmulnbits_widths() if w >= spec.bits)
        if not widths:
            self._warn(name, f"onnxruntime has no MatMulNBits kernel for {spec.bits}-bit codes; exported as float")
            self._note(name, "float")
            return self._float(x, name, qw.dequantize(), note=False)
        container = widths[0]
        if spec.group_size == -1:
            block = max(16, 1 << math.ceil(math.log2(in_f)))   # one block per row, padded: exact
        elif spec.group_size >= 16 and spec.group_size & (spec.group_size - 1) == 0:
            block = spec.group_size
        else:
            self._warn(name, f"MatMulNBits needs a power-of-two block size >= 16, group size is "
                             f"{spec.group_size}; exported as float")
            self._note(name, "float")
            return self._float(x, name, qw.dequantize(), note=False)
        if container != spec.bits:
            self._warn(name, f"{spec.bits}-bit codes stored as {container}-bit MatMulNBits (onnxruntime has no "
                             f"{spec.bits}-bit kernel); exact, larger")
        k_blocks = -(-in_f // block)
        offset = (1 << (container - 1)) if spec.symmetric else 0   # the kernel's default zero point is 2^(b-1)
        codes = np.empty((out_f, k_blocks * block), dtype=np.int32)
        np.add(qw.codes.numpy(), offset, out=codes[:, :in_f])   # in place: no third copy of a large layer's codes
        # padded columns hold the zero point, so they dequantize to exactly 0 whatever A holds there
        codes[:, in_f:] = offset if spec.symmetric else np.repeat(qw.zeros[:, -1:].numpy(), k_blocks * block - in_f, 1)
        packed = pack_codes(codes, container, signed=False).reshape(out_f, k_blocks, block * container // 8)
        inputs = [x, self.g.init(f"{name}.qweight", packed),
                  self.g.init(f"{name}.scales", qw.scales.numpy().astype(np.float32).reshape(out_f, k_blocks))]
        if not spec.symmetric:
            per_byte = 8 // container
            zp = np.zeros((out_f, -(-k_blocks // per_byte) * per_byte), dtype=np.int32)
            zp[:, :k_blocks] = qw.zeros.numpy()
            inputs.append(self.g.init(f"{name}.zero_points", pack_codes(zp, container, signed=False)))
        self._note(name, "matmulnbits", bits=spec.bits, container=container, block_size=block)
        return self.g.op("MatMulNBits", inputs, hint=name, domain=MS_DOMAIN, K=in_f, N=out_f, bits=container,
                         block_size=block, accuracy_level=self.accuracy_level)
