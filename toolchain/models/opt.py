"""OPT decoders (q/k/v/out_proj attention, fc1/fc2 MLP with ReLU)."""
from __future__ import annotations

from ..errors import ConfigError
from .base import ArchAdapter, DecoderLayout, SubBlock, UnitKind, first_tensor


def _run_attention(layer, args, kwargs):
    return first_tensor(layer.self_attn(*args, **kwargs))


def _run_mlp(layer, args, kwargs):
    # OPT has no MLP module: the branch is fc2(act(fc1(x))) on the flattened, normed hidden state.
    return layer.fc2(layer.activation_fn(layer.fc1(*args, **kwargs)))


class OPTAdapter(ArchAdapter):
    family = "opt"
    model_types = ("opt",)
    attention_qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    layout = DecoderLayout(
        embed="model.decoder.embed_tokens", layers="model.decoder.layers", final_norm="model.decoder.final_layer_norm",
        norm="layer", attn_norm="self_attn_layer_norm", mlp_norm="final_layer_norm", attention="self_attn",
        qkvo=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
        mlp=("fc1", "fc2"), positions="model.decoder.embed_positions",
        project_in="model.decoder.project_in", project_out="model.decoder.project_out")

    def activation(self, config):
        return config.activation_function

    def norm_before(self, layer):
        return bool(layer.do_layer_norm_before)   # OPT-350m normalizes after each residual add

    def query_scale(self, layer):
        return float(layer.self_attn.scaling)  # q_proj(x) * scaling, then attention with scale 1

    def decoder_layers(self, model):
        return model.model.decoder.layers

    def subblocks(self, layer):
        return (
            SubBlock("attn", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
                     "self_attn", "self_attn", _run_attention),
            SubBlock("mlp", ("fc1", "fc2"), "fc1", "fc2", _run_mlp),
        )

    def output_adds_last_block(self, layer):
        # Pre-norm OPT adds fc2's output to the residual last; OPT-350m (post-norm) normalizes after the add.
        return bool(getattr(layer, "do_layer_norm_before", True))

    def input_groups(self):
        return (
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        )

    def structured_units(self, layer, config, channel_multiple):
        # MLP channels only: transformers' OPTAttention builds q/k/v/out_proj as hidden x hidden and derives
        # head_dim from hidden_size / heads, so a model with fewer heads cannot be expressed in its config.
        channels = layer.fc1.out_features
        if channels % channel_multiple:
            raise ConfigError(f"--channel-multiple {channel_multiple} does not divide the MLP width {channels}; "
                              f"choose a divisor of it")
        return (UnitKind("channels", "mlp", (("fc1", channel_multiple),), "fc2", channel_multiple,
                         channels // channel_multiple, None),)

    def structured_config(self, config, kept, biases):
        return {"ffn_dim": kept["channels"]} if "channels" in kept else {}
