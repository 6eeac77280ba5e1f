"""The fused decoder graph: the contrib ops onnxruntime ships on CPU and CUDA, as onnxruntime-genai runs them.

Per layer it writes one `GroupQueryAttention` (rotary inside, from cos/sin caches built from the model's own
inverse frequencies; the KV cache is `past_key_values.{i}` in, `present.{i}` out, which the runtime may back
by one max-length buffer filled in place), `SkipSimplifiedLayerNormalization` for each residual add and the
norm after it, and one weight for q/k/v and one for gate/up where their codes allow it (the same width, group
size and symmetry: the rows are stacked, the codes are the ones in quant_state.safetensors, never
re-quantized). A layer whose projections cannot share one weight keeps them apart, with a warning naming it.

It applies to pre-norm RMSNorm decoders with rotary positions (LLaMA, Mistral, Qwen2); `fused_unsupported`
says why a model is not one (OPT keeps the plain graph).
"""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch

from ...quant import QuantizedWeight
from .decoder import DecoderGraph, optional_module
from .graph import MS_DOMAIN, to_numpy
from .weights import ExportWarning


def fused_unsupported(model: torch.nn.Module, adapter) -> str | None:
    """Why the fused graph cannot represent `model` (then the plain graph is written), or None."""
    lay = adapter.layout
    if lay.norm != "rms" or lay.rotary is None or not lay.gated_mlp:
        return (f"the {adapter.family} family (norm {lay.norm!r}, {'rotary' if lay.rotary else 'learned'} "
                f"positions) has no fused form; it needs pre-norm RMSNorm, rotary positions and a gated MLP")
    if not all(adapter.norm_before(layer) for layer in model.get_submodule(lay.layers)):
        return "post-norm layers have no fused form"
    rotary = optional_module(model, lay.rotary)
    rope_type = str(getattr(rotary, "rope_type", "default"))
    if "dynamic" in rope_type or "longrope" in rope_type:
        return f"RoPE type {rope_type!r} changes with the sequence length; the fused graph's cos/sin caches are fixed"
    return None


def _merge_reason(parts: list[tuple[str, QuantizedWeight | None]]) -> str | None:
    """Why these linears' weights cannot be stacked into one, or None."""
    quantized = [qw is not None for _, qw in parts]
    if any(quantized) and not all(quantized):
        floats = [n.rsplit(".", 1)[-1] for n, qw in parts if qw is None]
        return f"{', '.join(floats)} not quantized, the others are"
    specs = {(qw.spec.bits, qw.spec.group_size, qw.spec.symmetric) for _, qw in parts if qw is not None}
    if len(specs) > 1:
        desc = ", ".join(f"{n.rsplit('.', 1)[-1]} {qw.spec.bits}-bit g{qw.spec.group_size}"
                         f"{'' if qw.spec.symmetric else ' asym'}" for n, qw in parts)
        return f"codes differ in width or grouping ({desc})"
    return None


class FusedDecoderGraph(DecoderGraph):
    """The decoder with GroupQueryAttention, SkipSimplifiedLayerNormalization and stacked projections."""

    def stacked_linear(self, x: str, merged: str, names: list[str], modules: list[torch.nn.Module],
                       warn_name: str) -> tuple[list[str], list[int]]:
        """The projections `names` of one input `x` as one weight when their codes allow (outputs: the one
        stacked output, and the widths of its parts), else each on its own (outputs: one per part) with a
        warning naming `warn_name`."""
        lin = self.linear
        widths = [m.out_features for m in modules]
        parts = [(n, lin.quant.get(n) if lin.form != "float" else None) for n in names]
        reason = _merge_reason(parts)
        if reason is not None:
            message = f"{', '.join(n.rsplit('.', 1)[-1] for n in names)} kept apart: {reason}"
            warnings.warn(f"{warn_name}: {message}", ExportWarning, stacklevel=3)
            lin.layers.setdefault(warn_name, {})["warning"] = message
            return [lin(x, n, m) for n, m in zip(names, modules)], widths
        biases = [m.bias for m in modules]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else torch.zeros(w) for b, w in zip(biases, widths)])
        qws = [qw for _, qw in parts]
        del parts   # the parts' codes leave memory once stacked (a streamed export holds as little as it can)
        if qws[0] is None:
            stacked = SimpleNamespace(weight=torch.cat([m.weight for m in modules]), bias=bias)
        else:   # the writer reads the stacked codes; the float weight is never needed
            stacked = SimpleNamespace(weight=None, bias=bias)
            lin.quant[merged] = QuantizedWeight(torch.cat([q.codes for q in qws]), torch.cat([q.scales for q in qws]),
                                                torch.cat([q.zeros for q in qws]), qws[0].spec)
        del qws
        try:
            y = lin(x, merged, stacked)
        finally:
            lin.quant.pop(merged, None)
        record = lin.layers.pop(merged)
        for n in names:
            lin.layers.setdefault(n, {}).update(record, stacked_into=merged)
        return [y], widths

    def rope_caches(self, rotary: torch.nn.Module) -> tuple[str, str]:
        """cos, sin [context, head_dim / 2] for every position, computed as transformers computes the tables
        (float32 position times inverse frequency, then cos/sin and the attention scaling)."""
        context = int(self.model.config.max_position_embeddings)
        positions = torch.arange(context, dtype=torch.float32)[:, None]
        freqs = positions * rotary.inv_freq.float()[None, :]
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        return (self.g.init("rope.cos_cache", to_numpy(freqs.cos() * scaling)),
                self.g.init("rope.sin_cache", to_numpy(freqs.sin() * scaling)))

    def sequence_lengths(self, attention_mask: str) -> tuple[str, str]:
        """GroupQueryAttention's seqlens_k (tokens per row minus one, int32 [B]) and total_sequence_length
        (the mask's width, int32 scalar)."""
        g = self.g
        count = g.op("ReduceSum", [attention_mask, g.const([1])], keepdims=0, hint="mask/tokens")
        seqlens = g.op("Cast", [g.op("Sub", [count, g.const(1)])], to=6, hint="mask/seqlens_k")
        total = g.op("Gather", [self.shape_of(attention_mask, 0, 2), g.const(1)], axis=0)
        return seqlens, g.op("Cast", [total], to=6, hint="mask/total_seq_len")

    def skip_norm(self, x: str, skip: str, norm: torch.nn.Module, name: str) -> tuple[str, str]:
        """normed(x + skip) and the sum itself, in one SkipSimplifiedLayerNormalization."""
        g = self.g
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        outs = [g.name(f"{name}/out"), "", "", g.name(f"{name}/residual")]
        g.op("SkipSimplifiedLayerNormalization", [x, skip, g.init(f"{name}.weight", to_numpy(norm.weight))],
             outputs=outs, domain=MS_DOMAIN, epsilon=eps)
        return outs[0], outs[3]

    def gqa(self, i: int, prefix: str, h: str, layer: torch.nn.Module) -> str:
        """The attention branch's output: stacked q/k/v, GroupQueryAttention with rotary and the cache, o_proj."""
        g, d = self.g, self.dims
        heads, kv_heads = d.layer_heads[i]
        names = [f"{prefix}.{n}" for n in self.layout.qkvo[:3]]
        modules = [layer.get_submodule(n) for n in self.layout.qkvo[:3]]
        qkv, _ = self.stacked_linear(h, f"{prefix}.{self.layout.attention}.qkv_proj", names, modules,
                                     f"{prefix}.{self.layout.attention}")
        q, k, v = qkv if len(qkv) == 3 else (qkv[0], "", "")
        window = self.adapter.attention_window(self.model.config)
        attn = layer.get_submodule(self.layout.attention)
        out = g.op("GroupQueryAttention",
                   [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", self.seqlens, self.total,
                    self.cos, self.sin],
                   outputs=[g.name(f"{prefix}/attn"), f"present.{i}.key", f"present.{i}.value"], domain=MS_DOMAIN,
                   hint=f"{prefix}/attn", num_heads=heads, kv_num_heads=kv_heads, scale=float(attn.scaling),
                   do_rotary=1, rotary_interleaved=0,
                   # transformers' window counts the query itself: window - 1 keys before it
                   local_window_size=int(window) - 1 if window else -1)[0]
        o_name = self.layout.qkvo[3]
        return self.linear(out, f"{prefix}.{o_name}", layer.get_submodule(o_name))

    def gated_mlp(self, prefix: str, h: str, layer: torch.nn.Module) -> str:
        """down(act(gate(h)) * up(h)) with gate and up stacked into one weight where their codes allow."""
        g = self.g
        gate_name, up_name, down_name = self.layout.mlp
        modules = [layer.get_submodule(gate_name), layer.get_submodule(up_name)]
        outs, widths = self.stacked_linear(h, f"{prefix}.mlp.gate_up_proj", [f"{prefix}.{gate_name}",
                                           f"{prefix}.{up_name}"], modules, f"{prefix}.mlp")
        if len(outs) == 1:
            outs = g.op("Split", [outs[0], g.const(widths)], axis=-1, outputs=2, hint=f"{prefix}/gate_up")
        gate, up = outs
        inner = g.op("Mul", [self.activation(gate, self.adapter.activation(self.model.config), prefix), up])
        return self.linear(inner, f"{prefix}.{down_name}", layer.get_submodule(down_name))

    def body(self, input_ids: str, position_ids: str) -> str:
        m, lay = self.model, self.layout
        x = self.embed(input_ids, f"{lay.embed}.weight", m.get_submodule(lay.embed).weight)
        self.seqlens, self.total = self.sequence_lengths("attention_mask")
        self.cos, self.sin = self.rope_caches(optional_module(m, lay.rotary))
        residual, mlp = x, None
        final_norm = optional_module(m, lay.final_norm)
        for i in range(self.layer_count()):
            # layer i's input norm is fused with layer i - 1's MLP residual add: written once layer i is loaded
            # (a streamed export holds one layer at a time)
            layer, prefix = self.load_layer(i), f"{lay.layers}.{i}"
            attn_norm = layer.get_submodule(lay.attn_norm)
            if i == 0:
                h = self.norm(x, attn_norm, f"{prefix}.{lay.attn_norm}")
            else:
                h, residual = self.skip_norm(mlp, residual, attn_norm, f"{prefix}.{lay.attn_norm}")
            attn = self.gqa(i, prefix, h, layer)
            h, residual = self.skip_norm(attn, residual, layer.get_submodule(lay.mlp_norm), f"{prefix}.{lay.mlp_norm}")
            mlp = self.gated_mlp(prefix, h, layer)
            self.free_layer(i)
        if final_norm is not None:
            h, _ = self.skip_norm(mlp, residual, final_norm, lay.final_norm)
        else:
            h = self.g.op("Add", [residual, mlp], hint=f"{prefix}/mlp_residual")
        return self.lm_head(h)
