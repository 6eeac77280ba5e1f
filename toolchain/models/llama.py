"""LLaMA-style decoders: Llama, Mistral, Qwen2, SmolLM (q/k/v/o attention with GQA, SwiGLU MLP)."""
from __future__ import annotations

from .base import ArchAdapter, DecoderLayout, SubBlock, first_tensor


def _run_attention(layer, args, kwargs):
    return first_tensor(layer.self_attn(*args, **kwargs))


def _run_mlp(layer, args, kwargs):
    return first_tensor(layer.mlp(*args, **kwargs))


class LlamaAdapter(ArchAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2")
    attention_qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    layout = DecoderLayout(
        embed="model.embed_tokens", layers="model.layers", final_norm="model.norm", norm="rms",
        attn_norm="input_layernorm", mlp_norm="post_attention_layernorm", attention="self_attn",
        qkvo=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
        mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), rotary="model.rotary_emb",
        residual_names=("{layer}/attn_residual", "{layer}/mlp_residual"))

    def decoder_layers(self, model):
        return model.model.layers

    def subblocks(self, layer):
        return (
            SubBlock("attn", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
                     "self_attn", "self_attn", _run_attention),
            SubBlock("mlp", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), "mlp", "mlp", _run_mlp),
        )

    def output_adds_last_block(self, layer):
        return True  # hidden = residual + mlp(post_attention_layernorm(residual))

    def input_groups(self):
        return (
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.o_proj",),
            ("mlp.gate_proj", "mlp.up_proj"),
            ("mlp.down_proj",),
        )
