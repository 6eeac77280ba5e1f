"""What the layer engine needs to know about a model family, and nothing more.

An adapter names a family's decoder layers, the linear layers of each sub-block, which linears share an
input (so their statistics are gathered once), and how to run one sub-block on captured inputs. Calling
the decoder layers themselves goes through transformers' own modules with the keyword arguments that
the model passes them (captured once), so RoPE, masks and GQA stay transformers' business.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


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
    # MLP blocks: exit_input(layer, args, kwargs, channels) is the last linear's input at `channels` only, where
    # channel c is made by row c of the other linears. With it a change to a few rows or columns costs a
    # few channels instead of the whole block (Barber's guard, `barber.rerun_block`).
    exit_input: Callable[[nn.Module, tuple, dict, torch.Tensor], torch.Tensor] | None = None


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

    def query_scale(self, layer: nn.Module) -> float:
        """A factor the family applies to the query projection's output before attention (OPT scales q by
        head_dim^-0.5 itself and calls attention with scale 1); 1 where the attention call does the scaling."""
        return 1.0

    def output_adds_last_block(self, layer: nn.Module) -> bool:
        """True when the layer's output is its last sub-block's residual plus that block's exit output (a
        pre-norm decoder), so a change of the last block shifts the output by exactly the change of its exit
        output. Families where a norm follows the residual add say False (the default)."""
        return False

    def linear_names(self) -> list[str]:
        return [name for group in self.input_groups() for name in group]

    def linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        return {name: layer.get_submodule(name) for name in self.linear_names()}


def rows_linear(x: torch.Tensor, linear: nn.Linear, rows: torch.Tensor) -> torch.Tensor:
    """`linear(x)` at the output features `rows` only."""
    return F.linear(x, linear.weight[rows], None if linear.bias is None else linear.bias[rows])


def first_tensor(out) -> torch.Tensor:
    """Modules return a tensor or a tuple whose first item is the tensor, depending on version."""
    return out[0] if isinstance(out, (tuple, list)) else out
