"""The decoder-only LM graph with a KV cache, written op by op from the model's modules as the family's
adapter lays them out (`toolchain.models.base.DecoderLayout`): one builder for every family.

Every linear goes through the `LinearWriter`, the one place where its weight form is decided. Inputs and
outputs follow optimum / onnxruntime-genai: `input_ids`, `attention_mask`, `position_ids`,
`past_key_values.{i}.key|value` [batch, kv_heads, past, head_dim] in; `logits`, `present.{i}.key|value` out.
"""
from __future__ import annotations

import numpy as np
import torch

from ...errors import ConfigError, ModelLoadError
from ...models import ArchAdapter
from .graph import MS_DOMAIN, OPSET, Dims, to_numpy
from .weights import LinearWriter, lm_head_codes, lossless_int8_blocks

NEG_LARGE = float(np.finfo(np.float32).min)  # masked scores, as transformers does (finite: no NaN rows)
ACTIVATIONS = ("silu", "relu")


def optional_module(model: torch.nn.Module, path: str | None) -> torch.nn.Module | None:
    """The module at `path`, or None where the layout has no such piece or this model holds None there."""
    if path is None:
        return None
    module = model
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


class DecoderGraph:
    """Writes embedding, positions, attention mask, the layers with their KV cache, final norm and LM head."""

    def __init__(self, model: torch.nn.Module, adapter: ArchAdapter, linear: LinearWriter, stream=None):
        """`stream` (`models/streaming.py: StreamingCheckpoint`, whose model is `model`): the decoder layers
        stay on `meta` and each is read when the builder reaches it and returned to `meta` once written."""
        if adapter.layout is None:
            raise ModelLoadError(f"ONNX export has no decoder layout for the {adapter.family!r} family")
        self.model, self.adapter, self.layout = model, adapter, adapter.layout
        self.stream = stream
        self.linear, self.g = linear, linear.g
        c = model.config
        head_dim = adapter.head_dim(c)
        q_name, k_name = self.layout.qkvo[:2]
        layer_heads = tuple((layer.get_submodule(q_name).out_features // head_dim,
                             layer.get_submodule(k_name).out_features // head_dim)
                            for layer in model.get_submodule(self.layout.layers))
        self.dims = Dims(c.num_hidden_layers, c.num_attention_heads, adapter.kv_heads(c), head_dim,
                         c.hidden_size, c.vocab_size, layer_heads)

    # -- the decoder layers, loaded one at a time when streamed
    def layer_count(self) -> int:
        return len(self.model.get_submodule(self.layout.layers))

    def load_layer(self, i: int) -> torch.nn.Module:
        return self.stream.load_layer(i) if self.stream is not None else self.model.get_submodule(self.layout.layers)[i]

    def free_layer(self, i: int) -> None:
        if self.stream is not None:
            self.stream.free_layer(i)

    # -- model-wide pieces
    def shape_of(self, x: str, start: int, end: int) -> str:
        return self.g.op("Shape", [x], hint="shape", start=start, end=end)

    def embed(self, input_ids: str, name: str, weight: torch.Tensor) -> str:
        """Token embedding lookup. In the quantized forms a table that is exactly int8 blocks of 32 (see
        `lossless_int8_blocks`) is stored as those codes and rebuilt by Cast and Mul of initializers, which
        onnxruntime (and TensorRT) fold into a float table once, at load: a small file, float speed, and the
        same values. A tied lm_head multiplies by that same table.

        With `--lm-head int8` such a tied table is stored once, as the LM head's MatMulNBits codes, and the
        lookup is a GatherBlockQuantized of those codes: no float table at all, the same values."""
        g = self.g
        self.table_width = weight.shape[1]   # the hidden size, or narrower where project_in/out widen it
        self.shared_head = None
        shared = (self.linear.lm_head == "int8" and self.model.config.tie_word_embeddings
                  and "lm_head" not in self.linear.quant)
        blocks = lossless_int8_blocks(weight) if self.linear.form != "float" or shared else None
        if blocks is not None and shared:
            codes, scales = blocks
            rows, cols = codes.shape
            qweight = g.init("lm_head.qweight", (codes.astype(np.int16) + 128).astype(np.uint8).reshape(rows, -1, 32))
            self.shared_head = (qweight, g.init("lm_head.scales", scales), rows, cols)
            self.linear.embedding = "int8 blocks of 32 (lossless), the LM head's codes (GatherBlockQuantized)"
            table = g.op("Reshape", [qweight, g.const([rows, cols])], hint="embed/codes")
            return g.op("GatherBlockQuantized", [table, input_ids, self.shared_head[1]], domain=MS_DOMAIN, bits=8,
                        block_size=32, quantize_axis=1, gather_axis=0, hint="embed")
        if blocks is None:
            self.table, self.linear.embedding = g.init(name, to_numpy(weight)), "float32"
        else:
            codes, scales = blocks
            rows, cols = codes.shape
            codes = g.init(f"{name}.codes", codes.reshape(rows, -1, 32))
            scales = g.init(f"{name}.scales", scales[..., None])
            table = g.op("Mul", [g.op("Cast", [codes], to=1), scales], hint="embed/table")
            self.table = g.op("Reshape", [table, g.const([rows, cols])], hint="embed/table")
            self.linear.embedding = "int8 blocks of 32 (lossless)"
        return g.op("Gather", [self.table, input_ids], hint="embed")

    def learned_positions(self, x: str, position_ids: str, path: str, table: torch.nn.Module) -> str:
        """x plus the learned position table's rows at position_ids (+ the table's offset)."""
        g = self.g
        positions = g.init(f"{path}.weight", to_numpy(table.weight))
        offset = g.const(getattr(table, "offset", 0))
        return g.op("Add", [x, g.op("Gather", [positions, g.op("Add", [position_ids, offset])])])

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

    def rope_tables(self, position_ids: str, rotary: torch.nn.Module) -> tuple[str, str]:
        """cos, sin [B, 1, S, D] from the model's own inverse frequencies (any static RoPE scaling type)."""
        g = self.g
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

    # -- per-layer pieces
    def norm(self, x: str, norm: torch.nn.Module, name: str) -> str:
        g = self.g
        if self.layout.norm == "layer":
            return g.op("LayerNormalization", [x, g.init(f"{name}.weight", to_numpy(norm.weight)),
                                               g.init(f"{name}.bias", to_numpy(norm.bias))],
                        axis=-1, epsilon=float(norm.eps), hint=name)
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        var = g.op("ReduceMean", [g.op("Mul", [x, x]), g.const([-1])], keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.const(eps, np.float32)])])])
        return g.op("Mul", [g.init(f"{name}.weight", to_numpy(norm.weight)), g.op("Mul", [x, inv])], hint=name)

    def split_heads(self, x: str, heads: int) -> str:
        """[B, S, heads*D] -> [B, heads, S, D]."""
        g = self.g
        x = g.op("Reshape", [x, g.const([0, 0, heads, self.dims.head_dim])])
        return g.op("Transpose", [x], perm=[0, 2, 1, 3])

    def rotate(self, x: str, cos: str, sin: str) -> str:
        """RoPE, rotate-half form: x * cos + [-x2, x1] * sin."""
        g = self.g
        half = self.dims.head_dim // 2
        x1, x2 = g.op("Split", [x, g.const([half, half])], axis=-1, outputs=2)
        rotated = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])

    def attention(self, i: int, q: str, k: str, v: str, mask: str, scale: float) -> str:
        """q [B,H,S,D], k/v [B,KV,S,D] (positions already applied): append to the cache, attend, merge heads.
        GQA without copying K/V: q is viewed as [B, KV, H/KV, S, D] and K/V as [B, KV, 1, T, D], so MatMul's
        broadcasting pairs query head h with KV head h // (H/KV), as transformers' repeat_kv does."""
        g, d = self.g, self.dims
        heads, kv_heads = d.layer_heads[i]
        k = g.op("Concat", [f"past_key_values.{i}.key", k], outputs=[f"present.{i}.key"], axis=2)
        v = g.op("Concat", [f"past_key_values.{i}.value", v], outputs=[f"present.{i}.value"], axis=2)
        group = heads // kv_heads
        q5 = g.op("Reshape", [q, g.const([0, kv_heads, group, -1, d.head_dim])])
        k5 = g.op("Unsqueeze", [k, g.const([2])])
        v5 = g.op("Unsqueeze", [v, g.const([2])])
        scores = g.op("MatMul", [q5, g.op("Transpose", [k5], perm=[0, 1, 2, 4, 3])], hint=f"layers.{i}/scores")
        if scale != 1.0:
            scores = g.op("Mul", [scores, g.const(scale, np.float32)])
        probs = g.op("Softmax", [g.op("Add", [scores, mask])], axis=-1, hint=f"layers.{i}/probs")
        ctx = g.op("MatMul", [probs, v5])                                                  # [B,KV,G,S,D]
        ctx = g.op("Reshape", [ctx, g.const([0, heads, -1, d.head_dim])])
        ctx = g.op("Transpose", [ctx], perm=[0, 2, 1, 3])
        return g.op("Reshape", [ctx, g.const([0, 0, heads * d.head_dim])], hint=f"layers.{i}/attn_out")

    def activation(self, x: str, kind: str, prefix: str) -> str:
        g = self.g
        if kind == "silu":
            return g.op("Mul", [x, g.op("Sigmoid", [x])], hint=f"{prefix}/silu")
        return g.op("Relu", [x])

    def residual(self, x: str, branch: str, prefix: str, which: int) -> str:
        """x + branch; `which` picks the sum's name from the layout (0 attention, 1 MLP)."""
        names = self.layout.residual_names
        return self.g.op("Add", [x, branch], hint=names[which].format(layer=prefix) if names else None)

    def attention_branch(self, i: int, prefix: str, h: str, mask: str, rope: tuple[str, str] | None,
                         layer: torch.nn.Module) -> str:
        """The attention branch's output (before the residual add) from its normed input h."""
        lin = self.linear
        heads, kv_heads = self.dims.layer_heads[i]
        q_name, k_name, v_name, o_name = self.layout.qkvo
        q = self.split_heads(lin(h, f"{prefix}.{q_name}", layer.get_submodule(q_name)), heads)
        if rope:
            q = self.rotate(q, *rope)
        k = self.split_heads(lin(h, f"{prefix}.{k_name}", layer.get_submodule(k_name)), kv_heads)
        if rope:
            k = self.rotate(k, *rope)
        v = self.split_heads(lin(h, f"{prefix}.{v_name}", layer.get_submodule(v_name)), kv_heads)
        scale = float(layer.get_submodule(self.layout.attention).scaling)
        a = self.attention(i, q, k, v, mask, scale)
        return lin(a, f"{prefix}.{o_name}", layer.get_submodule(o_name))

    def mlp_branch(self, prefix: str, h: str, layer: torch.nn.Module) -> str:
        """The MLP branch's output (before the residual add): down(act(gate(h)) * up(h)), or fc2(act(fc1(h)))."""
        lin, act = self.linear, self.adapter.activation(self.model.config)
        names = self.layout.mlp
        if self.layout.gated_mlp:
            gate = lin(h, f"{prefix}.{names[0]}", layer.get_submodule(names[0]))
            up = lin(h, f"{prefix}.{names[1]}", layer.get_submodule(names[1]))
            inner = self.g.op("Mul", [self.activation(gate, act, prefix), up])
        else:
            inner = self.activation(lin(h, f"{prefix}.{names[0]}", layer.get_submodule(names[0])), act, prefix)
        return lin(inner, f"{prefix}.{names[-1]}", layer.get_submodule(names[-1]))

    def decoder_layer(self, i: int, x: str, mask: str, rope: tuple[str, str] | None,
                      layer: torch.nn.Module) -> str:
        """One layer: each branch reads its normed input (pre-norm) or the residual stream itself, then its
        output is added to the stream (and, post-norm, the sum is normed)."""
        prefix, pre = f"{self.layout.layers}.{i}", self.adapter.norm_before(layer)
        attn_norm, mlp_norm = (layer.get_submodule(n) for n in (self.layout.attn_norm, self.layout.mlp_norm))
        attn_norm_name, mlp_norm_name = f"{prefix}.{self.layout.attn_norm}", f"{prefix}.{self.layout.mlp_norm}"

        h = self.norm(x, attn_norm, attn_norm_name) if pre else x
        x = self.residual(x, self.attention_branch(i, prefix, h, mask, rope, layer), prefix, 0)
        if not pre:
            x = self.norm(x, attn_norm, attn_norm_name)

        h = self.norm(x, mlp_norm, mlp_norm_name) if pre else x
        x = self.residual(x, self.mlp_branch(prefix, h, layer), prefix, 1)
        if not pre:
            x = self.norm(x, mlp_norm, mlp_norm_name)
        return x

    def body(self, input_ids: str, position_ids: str) -> str:
        """Write the graph from token ids to logits; return the logits' name."""
        m, lay = self.model, self.layout
        act = self.adapter.activation(m.config)
        if act not in ACTIVATIONS:
            raise ConfigError(f"{self.adapter.family} activation {act!r}: ONNX export supports "
                              f"{', '.join(ACTIVATIONS)}")
        x = self.embed(input_ids, f"{lay.embed}.weight", m.get_submodule(lay.embed).weight)
        project_in = optional_module(m, lay.project_in)
        if project_in is not None:
            x = self.linear(x, lay.project_in, project_in)
        positions = optional_module(m, lay.positions)
        if positions is not None:
            x = self.learned_positions(x, position_ids, lay.positions, positions)
        mask = self.attention_mask(input_ids, "attention_mask", self.adapter.attention_window(m.config))
        rotary = optional_module(m, lay.rotary)
        rope = self.rope_tables(position_ids, rotary) if rotary is not None else None
        for i in range(self.layer_count()):
            x = self.decoder_layer(i, x, mask, rope, self.load_layer(i))
            self.free_layer(i)
        final_norm = optional_module(m, lay.final_norm)
        if final_norm is not None:
            x = self.norm(x, final_norm, lay.final_norm)
        project_out = optional_module(m, lay.project_out)
        if project_out is not None:
            x = self.linear(x, lay.project_out, project_out)
        return self.lm_head(x)

    def lm_head(self, x: str) -> str:
        lm_head = self.model.get_output_embeddings()
        if self.shared_head is not None:   # the embedding's int8 codes, offset by MatMulNBits' zero point 128
            qweight, scales, rows, cols = self.shared_head
            self.linear.layers["lm_head"] = {"form": "matmulnbits", "bits": 8, "container": 8, "block_size": 32,
                                             "codes": "its own int8 blocks (exact), shared with the embedding"}
            return self.g.op("MatMulNBits", [x, qweight, scales], hint="lm_head", domain=MS_DOMAIN, K=cols, N=rows,
                             bits=8, block_size=32, accuracy_level=self.linear.accuracy_level)
        if self.linear.lm_head != "float" and "lm_head" not in self.linear.quant:
            qw, how = lm_head_codes(lm_head.weight, self.linear.lm_head)
            y = self.linear._matmulnbits(x, "lm_head", qw)
            self.linear.layers["lm_head"]["codes"] = how
            if lm_head.bias is not None:
                y = self.g.op("Add", [y, self.g.init("lm_head.bias", to_numpy(lm_head.bias))], hint="lm_head/bias")
            return y
        if "lm_head" in self.linear.quant or not self.model.config.tie_word_embeddings:
            return self.linear(x, "lm_head", lm_head, keep_fp32=True)
        g = self.g
        # tied: Gemm against the embedding table itself (transB), so the file holds the matrix once
        x2 = g.op("Reshape", [x, g.const([-1, self.table_width])])
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
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                ["batch_size", "total_sequence_length"]),
                  helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", d.vocab])]
        for i, (_, kv_heads) in enumerate(d.layer_heads):
            kv = ["batch_size", kv_heads, "past_sequence_length", d.head_dim]
            kv_out = ["batch_size", kv_heads, "total_sequence_length", d.head_dim]
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, kv))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, kv_out))
        graph = helper.make_graph(self.g.nodes, "toolchain_decoder", inputs, outputs, self.g.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                                 producer_name="toolchain")
