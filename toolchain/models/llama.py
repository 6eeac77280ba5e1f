"""LLaMA-style decoders: Llama, Mistral, Qwen2, SmolLM (q/k/v/o attention with GQA, SwiGLU MLP)."""
from __future__ import annotations

from ..errors import ConfigError
from .base import ArchAdapter, DecoderLayout, SubBlock, UnitKind, first_tensor


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

    def structured_units(self, layer, config, channel_multiple):
        # A KV group is one key/value head and the query heads that read it; removing whole groups, or the same
        # number of query heads from every group, keeps the query/KV ratio (transformers' num_key_value_groups)
        # an integer and the same for every group.
        attn, mlp = layer.self_attn, layer.mlp
        head_dim = self.head_dim(config)
        kv = attn.k_proj.out_features // head_dim
        ratio = attn.q_proj.out_features // (head_dim * kv)
        channels = mlp.gate_proj.out_features
        if channels % channel_multiple:
            raise ConfigError(f"--channel-multiple {channel_multiple} does not divide the MLP width {channels}; "
                              f"choose a divisor of it")
        # Only Llama's config can switch on the o_proj / down_proj biases (FLAP's bias compensation needs them).
        llama = config.model_type == "llama"
        kinds = [UnitKind("kv_group", "attn", (("self_attn.q_proj", ratio * head_dim), ("self_attn.k_proj", head_dim),
                                                ("self_attn.v_proj", head_dim)),
                          "self_attn.o_proj", ratio * head_dim, kv, "attention_bias" if llama else None)]
        if ratio > 1:
            kinds.append(UnitKind("q_head", "attn", (("self_attn.q_proj", head_dim),), "self_attn.o_proj", head_dim,
                                  kv * ratio, "attention_bias" if llama else None, groups=kv, parent="kv_group"))
        kinds.append(UnitKind("channels", "mlp", (("mlp.gate_proj", channel_multiple), ("mlp.up_proj", channel_multiple)),
                              "mlp.down_proj", channel_multiple, channels // channel_multiple,
                              "mlp_bias" if llama else None))
        return tuple(kinds)

    def structured_config(self, config, kept, biases):
        head_dim = self.head_dim(config)
        ratio = kept.get("q_head", config.num_attention_heads // self.kv_heads(config))
        kv = kept.get("kv_group", self.kv_heads(config))
        values = {"head_dim": head_dim, "num_key_value_heads": kv, "num_attention_heads": kv * ratio}
        if "channels" in kept:
            values["intermediate_size"] = kept["channels"]
        values.update({flag: True for flag in biases})
        return values   # head_dim is explicit: hidden_size / heads no longer gives it

    def depth_config(self, config, kept):
        values = super().depth_config(config, kept)
        # Qwen2 slides the attention window in the layers from max_window_layers on; the kept layers keep their
        # order, so the threshold becomes the count of kept layers below it.
        limit = getattr(config, "max_window_layers", None)
        if isinstance(limit, int):
            values["max_window_layers"] = sum(1 for i in kept if i < limit)
        return values

    def sync_structure(self, layer):
        attn = layer.self_attn
        attn.num_key_value_groups = attn.q_proj.out_features // attn.k_proj.out_features
