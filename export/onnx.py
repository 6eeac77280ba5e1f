"""ONNX export of a whole decoder LM with a KV cache, in three weight forms.

The graph is written op by op from the model's modules (one graph class per family, picked by the family's
adapter), so every linear is one place where the weight form is decided:

- `float`: MatMul with the dequantized float weight (what `model.safetensors` holds);
- `qdq`: opset-21 blocked `DequantizeLinear` of int4/int8 codes (uint4/uint8 with zero points when
  asymmetric), then MatMul: the explicit-quantization form TensorRT's strongly typed networks accept;
- `matmulnbits`: onnxruntime's `com.microsoft.MatMulNBits` (4 and 8 bits, 2 where the installed onnxruntime
  runs it).

Codes come from `quant_state.safetensors` and are never re-quantized. A width a form cannot hold goes into
the next wider container the form has (3-bit codes in int4: exact, only larger), with a warning naming the
layer; a layer the form cannot represent at all (a group size MatMulNBits cannot block) falls back to
float, also with a warning.

Inputs and outputs follow optimum / onnxruntime-genai: `input_ids`, `attention_mask`, `position_ids`,
`past_key_values.{i}.key|value` [batch, kv_heads, past, head_dim] in; `logits`, `present.{i}.key|value` out.
"""
from __future__ import annotations

import math
import os
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, ModelLoadError
from ..quant import QuantizedWeight
from .blob import pack_codes  # LSB-first bit streams: the layout of MatMulNBits blobs and ONNX INT4 data

OPSET = 21
MS_DOMAIN = "com.microsoft"
FORMS = ("float", "qdq", "matmulnbits")
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GiB cap: larger graphs keep weights in a side file
NEG_LARGE = float(np.finfo(np.float32).min)  # masked scores, as transformers does (finite: no NaN rows)
SMOOTH_ALPHA = 0.5   # SmoothQuant's default migration strength (Xiao et al., 2023), when no per-layer choice


class ExportWarning(UserWarning):
    """A layer was exported in a wider container or a different form than asked for."""


def smoothquant_scales(act_amax: np.ndarray, w: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """SmoothQuant's per-input-channel s_j = amax_j^alpha / max|W[:, j]|^(1-alpha) (1 where either is 0), and
    the per-tensor int8 scale of the smoothed input, max_j(amax_j / s_j) / 127."""
    act_amax = np.asarray(act_amax, np.float64)
    w_amax = np.abs(np.asarray(w)).max(axis=0).astype(np.float64)
    ok = (act_amax > 0) & (w_amax > 0)
    smooth = np.ones_like(act_amax)
    smooth[ok] = act_amax[ok] ** alpha / w_amax[ok] ** (1 - alpha)
    act_scale = float((act_amax / smooth).max() / 127.0) or 1.0
    return smooth, act_scale


def int8_per_channel(weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes [N, K] and fp32 scales [N], one per output channel: scale = max|w| / 127,
    codes = round(w / scale). Zero weights stay exactly zero."""
    w = _np(weight)
    scales = np.abs(w).max(axis=1) / 127.0
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    codes = np.clip(np.round(w / scales[:, None]), -127, 127).astype(np.int8)
    return codes, scales


def lossless_int8_blocks(weight: torch.Tensor, block: int = 32) -> tuple[np.ndarray, np.ndarray] | None:
    """int8 codes [rows, cols] and fp32 scales [rows, cols / block] that reproduce `weight` exactly in
    float32 (scale * code), or None when no such pair exists.

    Tables that came from a GGUF Q8_0 tensor (SmolLM2's embedding) are exactly this: fp16 block scales
    times int8 codes, dequantized by transformers in float32. Storing them that way is lossless."""
    w = _np(weight)
    if w.ndim != 2 or w.shape[1] % block:
        return None
    b = w.reshape(w.shape[0], -1, block)
    amax = np.abs(b).max(-1)
    scales = (amax / 127).astype(np.float16).astype(np.float32)
    scales = np.where(scales > 0, scales, np.float32(1.0))
    codes = np.round(b / scales[..., None])
    if np.abs(codes).max(initial=0) > 127 or not np.array_equal(scales[..., None] * codes.astype(np.float32), b):
        return None
    return codes.astype(np.int8).reshape(w.shape), scales


# ------------------------------------------------------------------------------------------ graph builder
class Graph:
    """Nodes, initializers and cached constants, with unique names."""

    def __init__(self):
        self.nodes, self.initializers, self._consts, self._count = [], [], {}, 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs: int | list[str] = 1,
           domain: str = "", **attrs):
        from onnx import helper

        outs = outputs if isinstance(outputs, list) else [self.name(hint or op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(f"{hint or op_type}/node"),
                                           domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def init_raw(self, name: str, data_type: int, dims: list[int], raw: bytes) -> str:
        from onnx import helper

        self.initializers.append(helper.make_tensor(name, data_type, dims, raw, raw=True))
        return name

    def const(self, values, dtype=np.int64) -> str:
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(self.name("const"), arr)
        return self._consts[key]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


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


# ------------------------------------------------------------------------------------------ linear forms
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
    dims: "Dims | None" = None   # the written graph's dimensions, set by build_onnx
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
            y = self.g.op("Add", [y, self.g.init(f"{module_name}.bias", _np(bias))], hint=f"{module_name}/bias")
        return y

    def _note(self, name: str, form: str, **info) -> None:
        self.layers.setdefault(name, {}).update(form=form, **info)

    def _warn(self, name: str, message: str) -> None:
        warnings.warn(f"{name}: {message}", ExportWarning, stacklevel=3)
        self.layers.setdefault(name, {})["warning"] = message

    def _float(self, x: str, name: str, weight: torch.Tensor, note: bool = True) -> str:
        if note:
            self._note(name, "float")
        w_t = self.g.init(f"{name}.weight_t", _np(weight).T)
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
        w = _np(weight)
        smooth, act_scale = smoothquant_scales(act_amax, w, alpha)
        codes, scales = int8_per_channel(torch.from_numpy((w * smooth[None, :]).astype(np.float32)))
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
        codes[:, :in_f] = qw.codes.numpy() + offset
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


# ------------------------------------------------------------------------------------------ decoder graphs
@dataclass
class Dims:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int


class DecoderGraph(ABC):
    """Shared pieces of a decoder-only LM graph: inputs, the attention mask, attention with a KV cache,
    and the output projection. A family subclass writes the embedding, the layers and the final norm."""

    def __init__(self, model: torch.nn.Module, linear: LinearWriter):
        self.model, self.linear, self.g = model, linear, linear.g
        self.dims = self.read_dims(model.config)

    # -- family hooks
    @abstractmethod
    def read_dims(self, config) -> Dims:
        """Layer count, heads, KV heads, head size, hidden size and vocabulary of the family's config."""

    @abstractmethod
    def body(self, input_ids: str, position_ids: str) -> str:
        """Write the graph from token ids to logits; return the logits' name."""

    # -- shared pieces
    def shape_of(self, x: str, start: int, end: int) -> str:
        return self.g.op("Shape", [x], hint="shape", start=start, end=end)

    def attention_mask(self, input_ids: str, attention_mask: str, window: int | None = None) -> str:
        """Additive mask [batch, 1, 1, seq, total]: 0 where a query may attend, a large negative elsewhere.
        Query s sits at absolute position past + s; key t is visible when t <= past + s and attention_mask
        marks it as a token (and, with a sliding window, past + s - t < window)."""
        g = self.g
        seq = g.op("Squeeze", [self.shape_of(input_ids, 1, 2), g.const([0])], hint="seq")
        total = g.op("Squeeze", [self.shape_of(attention_mask, 1, 2), g.const([0])], hint="total")
        past = g.op("Sub", [total, seq], hint="past")
        keys = g.op("Range", [g.const(0), total, g.const(1)], hint="key_pos")                     # [T]
        queries = g.op("Range", [past, total, g.const(1)], hint="query_pos")                       # [S]
        queries = g.op("Unsqueeze", [queries, g.const([1])])                                       # [S, 1]
        allowed = g.op("LessOrEqual", [keys, queries], hint="causal")                              # [S, T]
        if window:
            allowed = g.op("And", [allowed, g.op("Less", [g.op("Sub", [queries, keys]), g.const(window)])],
                           hint="window")
        tokens = g.op("Cast", [attention_mask], to=9)                                              # bool [B, T]
        tokens = g.op("Unsqueeze", [tokens, g.const([1, 2, 3])])                                   # [B,1,1,1,T]
        allowed = g.op("And", [allowed, tokens], hint="allowed")                                   # [B,1,1,S,T]
        return g.op("Where", [allowed, g.const(0.0, np.float32), g.const(NEG_LARGE, np.float32)], hint="mask")

    def split_heads(self, x: str, heads: int) -> str:
        """[B, S, heads*D] -> [B, heads, S, D]."""
        g = self.g
        x = g.op("Reshape", [x, g.const([0, 0, heads, self.dims.head_dim])])
        return g.op("Transpose", [x], perm=[0, 2, 1, 3])

    def attention(self, i: int, q: str, k: str, v: str, mask: str, scale: float) -> str:
        """q [B,H,S,D], k/v [B,KV,S,D] (positions already applied): append to the cache, attend, merge heads.
        GQA without copying K/V: q is viewed as [B, KV, H/KV, S, D] and K/V as [B, KV, 1, T, D], so MatMul's
        broadcasting pairs query head h with KV head h // (H/KV), as transformers' repeat_kv does."""
        g, d = self.g, self.dims
        k = g.op("Concat", [f"past_key_values.{i}.key", k], outputs=[f"present.{i}.key"], axis=2)
        v = g.op("Concat", [f"past_key_values.{i}.value", v], outputs=[f"present.{i}.value"], axis=2)
        group = d.heads // d.kv_heads
        q5 = g.op("Reshape", [q, g.const([0, d.kv_heads, group, -1, d.head_dim])])
        k5 = g.op("Unsqueeze", [k, g.const([2])])
        v5 = g.op("Unsqueeze", [v, g.const([2])])
        scores = g.op("MatMul", [q5, g.op("Transpose", [k5], perm=[0, 1, 2, 4, 3])], hint=f"layers.{i}/scores")
        if scale != 1.0:
            scores = g.op("Mul", [scores, g.const(scale, np.float32)])
        probs = g.op("Softmax", [g.op("Add", [scores, mask])], axis=-1, hint=f"layers.{i}/probs")
        ctx = g.op("MatMul", [probs, v5])                                                  # [B,KV,G,S,D]
        ctx = g.op("Reshape", [ctx, g.const([0, d.heads, -1, d.head_dim])])
        ctx = g.op("Transpose", [ctx], perm=[0, 2, 1, 3])
        return g.op("Reshape", [ctx, g.const([0, 0, d.heads * d.head_dim])], hint=f"layers.{i}/attn_out")

    def embed(self, input_ids: str, name: str, weight: torch.Tensor) -> str:
        """Token embedding lookup. In the quantized forms a table that is exactly int8 blocks of 32 (see
        `lossless_int8_blocks`) is stored as those codes and rebuilt by Cast and Mul of initializers, which
        onnxruntime (and TensorRT) fold into a float table once, at load: a small file, float speed, and the
        same values. A tied lm_head multiplies by that same table."""
        g = self.g
        blocks = lossless_int8_blocks(weight) if self.linear.form != "float" else None
        if blocks is None:
            self.table, self.linear.embedding = g.init(name, _np(weight)), "float32"
        else:
            codes, scales = blocks
            rows, cols = codes.shape
            codes = g.init(f"{name}.codes", codes.reshape(rows, -1, 32))
            scales = g.init(f"{name}.scales", scales[..., None])
            table = g.op("Mul", [g.op("Cast", [codes], to=1), scales], hint="embed/table")
            self.table = g.op("Reshape", [table, g.const([rows, cols])], hint="embed/table")
            self.linear.embedding = "int8 blocks of 32 (lossless)"
        return g.op("Gather", [self.table, input_ids], hint="embed")

    def lm_head(self, x: str) -> str:
        lm_head = self.model.get_output_embeddings()
        if "lm_head" in self.linear.quant or not self.model.config.tie_word_embeddings:
            return self.linear(x, "lm_head", lm_head, keep_fp32=True)
        g = self.g
        # tied: Gemm against the embedding table itself (transB), so the file holds the matrix once
        x2 = g.op("Reshape", [x, g.const([-1, self.dims.hidden])])
        logits = g.op("Gemm", [x2, self.table], transB=1, hint="lm_head")
        batch_seq = self.shape_of(x, 0, 2)
        return g.op("Reshape", [logits, g.op("Concat", [batch_seq, g.const([self.dims.vocab])], axis=0)],
                    outputs=["logits"])

    def build(self):
        from onnx import TensorProto, helper

        d = self.dims
        logits = self.body("input_ids", "position_ids")
        if logits != "logits":
            self.g.op("Identity", [logits], outputs=["logits"])
        kv = ["batch_size", d.kv_heads, "past_sequence_length", d.head_dim]
        kv_out = ["batch_size", d.kv_heads, "total_sequence_length", d.head_dim]
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                ["batch_size", "total_sequence_length"]),
                  helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", d.vocab])]
        for i in range(d.layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, kv))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, kv_out))
        graph = helper.make_graph(self.g.nodes, "toolchain_decoder", inputs, outputs, self.g.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                                 producer_name="toolchain")


class LlamaGraph(DecoderGraph):
    """LLaMA-style: RMSNorm, RoPE (rotate-half), GQA attention, SwiGLU MLP; optional q/k/v/o and MLP biases."""

    def read_dims(self, c) -> Dims:
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return Dims(c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads,
                    head_dim, c.hidden_size, c.vocab_size)

    def rms_norm(self, x: str, norm, name: str) -> str:
        g = self.g
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        var = g.op("ReduceMean", [g.op("Mul", [x, x]), g.const([-1])], keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.const(eps, np.float32)])])])
        return g.op("Mul", [g.init(f"{name}.weight", _np(norm.weight)), g.op("Mul", [x, inv])], hint=name)

    def rope_tables(self, position_ids: str) -> tuple[str, str]:
        """cos, sin [B, 1, S, D] from the model's own inverse frequencies (any static RoPE scaling type)."""
        g = self.g
        rotary = self.model.model.rotary_emb
        rope_type = getattr(rotary, "rope_type", "default")
        if "dynamic" in str(rope_type) or "longrope" in str(rope_type):
            raise ConfigError(f"RoPE type {rope_type!r} changes with the sequence length; ONNX export supports "
                              f"static RoPE types (default, linear, llama3, yarn)")
        inv_freq = g.init("rope.inv_freq", rotary.inv_freq.float().numpy().reshape(1, 1, -1))
        pos = g.op("Unsqueeze", [g.op("Cast", [position_ids], to=1), g.const([2])])             # [B, S, 1]
        freqs = g.op("Mul", [pos, inv_freq])
        emb = g.op("Concat", [freqs, freqs], axis=-1)
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        tables = []
        for fn in ("Cos", "Sin"):
            t = g.op(fn, [emb], hint=f"rope.{fn.lower()}")
            if scaling != 1.0:
                t = g.op("Mul", [t, g.const(scaling, np.float32)])
            tables.append(g.op("Unsqueeze", [t, g.const([1])]))
        return tables[0], tables[1]

    def rotate(self, x: str, cos: str, sin: str) -> str:
        g = self.g
        half = self.dims.head_dim // 2
        x1, x2 = g.op("Split", [x, g.const([half, half])], axis=-1, outputs=2)
        rotated = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])

    def body(self, input_ids, position_ids):
        g, d, m = self.g, self.dims, self.model
        x = self.embed(input_ids, "model.embed_tokens.weight", m.model.embed_tokens.weight)
        window = getattr(m.config, "sliding_window", None) if getattr(m.config, "use_sliding_window", True) else None
        mask = self.attention_mask(input_ids, "attention_mask", window)
        cos, sin = self.rope_tables(position_ids)
        for i, layer in enumerate(m.model.layers):
            p, attn = f"model.layers.{i}", layer.self_attn
            h = self.rms_norm(x, layer.input_layernorm, f"{p}.input_layernorm")
            q = self.rotate(self.split_heads(self.linear(h, f"{p}.self_attn.q_proj", attn.q_proj), d.heads), cos, sin)
            k = self.rotate(self.split_heads(self.linear(h, f"{p}.self_attn.k_proj", attn.k_proj), d.kv_heads), cos, sin)
            v = self.split_heads(self.linear(h, f"{p}.self_attn.v_proj", attn.v_proj), d.kv_heads)
            a = self.attention(i, q, k, v, mask, float(attn.scaling))
            x = g.op("Add", [x, self.linear(a, f"{p}.self_attn.o_proj", attn.o_proj)], hint=f"{p}/attn_residual")
            h = self.rms_norm(x, layer.post_attention_layernorm, f"{p}.post_attention_layernorm")
            gate = self.linear(h, f"{p}.mlp.gate_proj", layer.mlp.gate_proj)
            up = self.linear(h, f"{p}.mlp.up_proj", layer.mlp.up_proj)
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate])], hint=f"{p}/silu")
            down = self.linear(g.op("Mul", [act, up]), f"{p}.mlp.down_proj", layer.mlp.down_proj)
            x = g.op("Add", [x, down], hint=f"{p}/mlp_residual")
        x = self.rms_norm(x, m.model.norm, "model.norm")
        return self.lm_head(x)


class OptGraph(DecoderGraph):
    """OPT: learned positions (offset 2), LayerNorm before (or, OPT-350m, after) each block, biases, ReLU."""

    def read_dims(self, c) -> Dims:
        return Dims(c.num_hidden_layers, c.num_attention_heads, c.num_attention_heads,
                    c.hidden_size // c.num_attention_heads, c.hidden_size, c.vocab_size)

    def layer_norm(self, x: str, norm, name: str) -> str:
        return self.g.op("LayerNormalization", [x, self.g.init(f"{name}.weight", _np(norm.weight)),
                                                self.g.init(f"{name}.bias", _np(norm.bias))],
                         axis=-1, epsilon=float(norm.eps), hint=name)

    def body(self, input_ids, position_ids):
        g, d, m = self.g, self.dims, self.model
        dec = m.model.decoder
        if m.config.activation_function != "relu":
            raise ConfigError(f"OPT activation {m.config.activation_function!r}: ONNX export supports relu")
        x = self.embed(input_ids, "model.decoder.embed_tokens.weight", dec.embed_tokens.weight)
        if dec.project_in is not None:
            x = self.linear(x, "model.decoder.project_in", dec.project_in)
        positions = g.init("model.decoder.embed_positions.weight", _np(dec.embed_positions.weight))
        x = g.op("Add", [x, g.op("Gather", [positions, g.op("Add", [position_ids, g.const(dec.embed_positions.offset)])])])
        mask = self.attention_mask(input_ids, "attention_mask")
        for i, layer in enumerate(dec.layers):
            p, attn = f"model.decoder.layers.{i}", layer.self_attn
            pre = layer.do_layer_norm_before
            h = self.layer_norm(x, layer.self_attn_layer_norm, f"{p}.self_attn_layer_norm") if pre else x
            q = self.split_heads(self.linear(h, f"{p}.self_attn.q_proj", attn.q_proj), d.heads)
            k = self.split_heads(self.linear(h, f"{p}.self_attn.k_proj", attn.k_proj), d.kv_heads)
            v = self.split_heads(self.linear(h, f"{p}.self_attn.v_proj", attn.v_proj), d.kv_heads)
            a = self.attention(i, q, k, v, mask, float(attn.scaling))
            x = g.op("Add", [x, self.linear(a, f"{p}.self_attn.out_proj", attn.out_proj)])
            if not pre:
                x = self.layer_norm(x, layer.self_attn_layer_norm, f"{p}.self_attn_layer_norm")
            h = self.layer_norm(x, layer.final_layer_norm, f"{p}.final_layer_norm") if pre else x
            h = g.op("Relu", [self.linear(h, f"{p}.fc1", layer.fc1)])
            x = g.op("Add", [x, self.linear(h, f"{p}.fc2", layer.fc2)])
            if not pre:
                x = self.layer_norm(x, layer.final_layer_norm, f"{p}.final_layer_norm")
        if dec.final_layer_norm is not None:
            x = self.layer_norm(x, dec.final_layer_norm, "model.decoder.final_layer_norm")
        if dec.project_out is not None:
            x = self.linear(x, "model.decoder.project_out", dec.project_out)
        return self.lm_head(x)


GRAPHS: dict[str, type[DecoderGraph]] = {"llama": LlamaGraph, "opt": OptGraph}


# ------------------------------------------------------------------------------------------ entry point
def build_onnx(model: torch.nn.Module, family: str, quant: dict[str, QuantizedWeight], form: str = "float",
               accuracy_level: int = 0, fp16_gemm: bool = False, int8_plan: dict[str, dict] | None = None):
    """The ONNX ModelProto of `model` with its linears in `form`, and the LinearWriter holding the record of
    what each layer became."""
    if form not in FORMS:
        raise ConfigError(f"--onnx-weights {form!r}: choose one of {', '.join(FORMS)}")
    if form != "float" and not quant:
        raise ConfigError(f"--onnx-weights {form} needs quantized weights (quant_state.safetensors); "
                          f"this model has none: use --onnx-weights float, or quantize it first")
    if family not in GRAPHS:
        raise ModelLoadError(f"ONNX export has no graph for the {family!r} family (supported: {', '.join(GRAPHS)})")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ConfigError(f"MatMulNBits accuracy level must be 0-4, got {accuracy_level}")
    if (fp16_gemm or int8_plan is not None) and form != "float":
        raise ConfigError("fp16 and int8 GEMMs apply to the float weight form only")
    writer = LinearWriter(Graph(), form, quant, accuracy_level=accuracy_level, fp16_gemm=fp16_gemm,
                          int8_plan=int8_plan)
    with torch.no_grad():
        graph = GRAPHS[family](model, writer)
        proto = graph.build()
    writer.dims = graph.dims
    return proto, writer


def save_onnx(proto, path: str | os.PathLike) -> list[Path]:
    """Write `proto` to `path` (weights in `<name>.data` beside it when the graph would pass protobuf's 2 GiB
    cap). Returns the files written."""
    import onnx

    path = Path(path)
    if proto.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
        return [path, path.with_name(f"{path.name}.data")]
    onnx.save_model(proto, str(path))
    return [path]


def export_onnx(model_dir: str | os.PathLike, out_path: str | os.PathLike, form: str = "float",
                accuracy_level: int = 0) -> dict:
    """Read a compressed model directory and write its ONNX graph in weight form `form` to `out_path`.
    `accuracy_level` is MatMulNBits': 0 (default) is exact fp32 compute, 4 quantizes activations to int8
    (faster on CPU, no longer bit-faithful to the PyTorch model: onnx-check measures by how much)."""
    from ..models import load_model
    from .source import read_compressed

    source = read_compressed(model_dir, require_quant=False)
    loaded = load_model(str(model_dir), with_tokenizer=False)
    proto, writer = build_onnx(loaded.model, loaded.adapter.family, source.quant, form, accuracy_level)
    layers = writer.layers
    files = save_onnx(proto, out_path)
    forms: dict[str, int] = {}
    for info in layers.values():
        forms[info["form"]] = forms.get(info["form"], 0) + 1
    return {"path": str(out_path), "form": form, "opset": OPSET, "files": [str(f) for f in files],
            "bytes": sum(f.stat().st_size for f in files), "linears": forms, "embedding": writer.embedding,
            "accuracy_level": accuracy_level if form == "matmulnbits" else None,
            "warnings": {k: v["warning"] for k, v in layers.items() if "warning" in v},
            "layers": layers}
