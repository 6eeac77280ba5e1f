"""What the layer engine needs to know about a model family, and nothing more.

An adapter names a family's decoder layers, the linear layers of each sub-block, which linears share an
input (so their statistics are gathered once), and how to run one sub-block on captured inputs. Calling
the decoder layers themselves goes through transformers' own modules with the keyword arguments that
the model passes them (captured once), so RoPE, masks and GQA stay transformers' business.

Exporters that rebuild the decoder op by op (the ONNX graph) read the family's `DecoderLayout`: where each
piece lives and what it computes, as plain data.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import ConfigError


@dataclass(frozen=True)
class SubBlock:
    """A residual branch of a decoder layer: attention or MLP.

    entry: module whose call receives the branch input (after the norm) as its first argument or as
           `hidden_states=`; exit: module whose output is the branch output, before the residual add.
    run(layer, args, kwargs): recompute the branch output of `layer` from the captured entry call.
    """

    name: str
    linears: tuple[str, ...]
    entry: str
    exit: str
    run: Callable[[nn.Module, tuple, dict], torch.Tensor]


@dataclass(frozen=True)
class DecoderLayout:
    """A decoder-only LM as an exporter rebuilds it: embedding (+ projection) (+ learned positions), then per
    layer attention and MLP branches, each with its norm before the branch (pre-norm) or after the residual
    add (post-norm), then the final norm (+ projection) and the LM head.

    Model-level paths are module paths from the model root; per-layer paths are relative to a decoder layer.
    An optional path may also name an attribute that holds None in a given model (OPT's projections)."""

    embed: str                        # token embedding, an nn.Embedding
    layers: str                       # the decoder layers, an nn.ModuleList
    final_norm: str | None            # after the last layer
    norm: str                         # "rms" (RMSNorm: weight, eps) or "layer" (LayerNorm: weight, bias, eps)
    attn_norm: str                    # per layer: the attention branch's norm
    mlp_norm: str                     # per layer: the MLP branch's norm
    attention: str                    # per layer: the attention module (its `scaling` multiplies q k^T)
    qkvo: tuple[str, str, str, str]   # per layer: q, k, v and output projections
    mlp: tuple[str, ...]              # per layer: (gate, up, down) for a gated MLP act(gate) * up, or (fc1, fc2)
    rotary: str | None = None         # rotary embedding (inv_freq, rope_type, attention_scaling), or None
    positions: str | None = None      # learned position table (with its `offset`), or None
    project_in: str | None = None     # linear after the embedding, when the embedding is narrower
    project_out: str | None = None    # linear before the LM head
    #: graph names of the residual sums, formatted with the layer's path; None leaves them named by op type
    residual_names: tuple[str, str] | None = None

    def __post_init__(self):
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"DecoderLayout.norm must be 'rms' or 'layer', got {self.norm!r}")
        if len(self.mlp) not in (2, 3):
            raise ValueError(f"DecoderLayout.mlp names (gate, up, down) or (fc1, fc2), got {self.mlp!r}")

    @property
    def gated_mlp(self) -> bool:
        return len(self.mlp) == 3


@dataclass(frozen=True)
class UnitKind:
    """One kind of removable structure of a decoder layer, and everything that depends on it.

    Unit u owns rows [u * rows, (u + 1) * rows) of every producer (the linears that write the unit's
    activations: q/k/v for a KV group, gate/up or fc1 for MLP channels) and the same block of `consumer_cols`
    input columns of the consumer (o_proj, down_proj, fc2), which reads those activations. Removing a unit
    removes exactly those columns from the consumer's input, so the branch output changes only through them.
    """

    name: str                                  # "kv_group" or "channels"
    block: str                                 # the sub-block: "attn" or "mlp"
    producers: tuple[tuple[str, int], ...]     # (linear, its output rows per unit)
    consumer: str                              # the linear whose input columns the units are
    consumer_cols: int                         # the consumer's input columns per unit
    count: int                                 # units in the layer
    bias_flag: str | None = None               # config switch that gives the block's linears biases, if any
    #: the units split into this many equal consecutive groups (query heads by KV group), and every group must
    #: lose the same number of them; `parent` is the kind whose units the groups are
    groups: int = 1
    parent: str | None = None

    @property
    def per_group(self) -> int:
        return self.count // self.groups

    def rows(self, name: str, units: "torch.Tensor") -> torch.Tensor:
        """Row indices of producer `name` (or columns of the consumer) that `units` own, in unit order."""
        size = self.consumer_cols if name == self.consumer else dict(self.producers)[name]
        return (units[:, None] * size + torch.arange(size, device=units.device)[None, :]).reshape(-1)


class ArchAdapter(ABC):
    """Base class for one model family."""

    family: str = ""
    model_types: tuple[str, ...] = ()

    @abstractmethod
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers, in order."""

    @abstractmethod
    def subblocks(self, layer: nn.Module) -> Sequence[SubBlock]:
        """Attention then MLP."""

    @abstractmethod
    def input_groups(self) -> Sequence[tuple[str, ...]]:
        """Linears that read the same tensor; the first one's input is hooked for the whole group."""

    #: q, k and v projections; their output rows are heads of head_dim consecutive rows (APTQ's per-head Hessians)
    attention_qkv: tuple[str, str, str] = ()

    #: where the decoder's pieces live and what they compute, for exporters
    layout: DecoderLayout | None = None

    def activation(self, config) -> str:
        """The MLP's activation function, by its transformers name."""
        return config.hidden_act

    def norm_before(self, layer: nn.Module) -> bool:
        """True when each branch normalizes its input (pre-norm); False when the norm follows the residual add."""
        return True

    def kv_heads(self, config) -> int:
        """Key/value heads (fewer than the query heads under grouped-query attention)."""
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    def head_dim(self, config) -> int:
        """Width of one attention head."""
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def attention_window(self, config) -> int | None:
        """The sliding attention window in tokens, or None when every earlier token is visible."""
        return getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None

    def query_scale(self, layer: nn.Module) -> float:
        """A factor the family applies to the query projection's output before attention (OPT scales q by
        head_dim^-0.5 itself and calls attention with scale 1); 1 where the attention call does the scaling."""
        return 1.0

    def output_adds_last_block(self, layer: nn.Module) -> bool:
        """True when the layer's output is its last sub-block's residual plus that block's exit output (a
        pre-norm decoder), so a change of the last block shifts the output by exactly the change of its exit
        output. Families where a norm follows the residual add say False (the default)."""
        return False

    def structured_units(self, layer: nn.Module, config, channel_multiple: int) -> tuple[UnitKind, ...]:
        """The removable structures of `layer`, attention first; `channel_multiple` MLP channels form one unit."""
        raise ConfigError(f"structured pruning supports the llama and opt families, not {self.family}")

    def structured_config(self, config, kept: dict[str, int], biases: set[str]) -> dict:
        """Config values for a model whose every layer keeps `kept[kind]` units of each kind (per group for a
        grouped kind; MLP widths in channels), with the bias switches in `biases` turned on."""
        raise ConfigError(f"structured pruning supports the llama and opt families, not {self.family}")

    def depth_config(self, config, kept: list[int]) -> dict:
        """Config values for the model that keeps only decoder layers `kept` (original indices, ascending): the
        layer count, and every per-layer list (a config attribute with one entry per layer, such as
        `layer_types`) cut to the kept layers."""
        n = config.num_hidden_layers
        values = {"num_hidden_layers": len(kept)}
        for key, value in config.to_dict().items():
            if key != "num_hidden_layers" and isinstance(value, (list, tuple)) and len(value) == n and n > 1:
                values[key] = type(value)(value[i] for i in kept)
        return values

    def sync_structure(self, layer: nn.Module) -> None:
        """Update the attributes a family's modules derive from their widths after units were removed."""

    def linear_names(self) -> list[str]:
        return [name for group in self.input_groups() for name in group]

    def linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        return {name: layer.get_submodule(name) for name in self.linear_names()}


def first_tensor(out) -> torch.Tensor:
    """Modules return a tensor or a tuple whose first item is the tensor, depending on version."""
    return out[0] if isinstance(out, (tuple, list)) else out
