"""Make a layer physically smaller: replace the linears of a sub-block by narrower ones holding the kept units,
and count what that leaves."""
from __future__ import annotations

from fractions import Fraction

import torch
from torch import nn

from ...models.base import UnitKind


def _replace(layer: nn.Module, name: str, new: nn.Linear) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(layer.get_submodule(parent) if parent else layer, attr, new)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=like.weight.device,
                    dtype=like.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


@torch.no_grad()
def shrink(layer: nn.Module, kind: UnitKind, keep: torch.Tensor, consumer_weight: torch.Tensor,
           consumer_bias: torch.Tensor | None = None) -> None:
    """Keep only units `keep` of `kind` in `layer`: the producers' rows, the consumer's columns (given as its new
    weight), and the consumer's bias (`consumer_bias`, or its own when None)."""
    keep = keep.to(layer.get_submodule(kind.consumer).weight.device)
    for name, _ in kind.producers:
        old = layer.get_submodule(name)
        rows = kind.rows(name, keep)
        _replace(layer, name, _linear(old.weight[rows], old.bias[rows] if old.bias is not None else None, old))
    old = layer.get_submodule(kind.consumer)
    bias = consumer_bias if consumer_bias is not None else old.bias
    _replace(layer, kind.consumer, _linear(consumer_weight, bias, old))


@torch.no_grad()
def add_zero_biases(layer: nn.Module, kind: UnitKind) -> None:
    """Give every linear of the sub-block a bias (zeros where it had none): the family's config switches the
    biases of the whole block on at once, so a checkpoint must carry all of them."""
    for name in [p for p, _ in kind.producers] + [kind.consumer]:
        old = layer.get_submodule(name)
        if old.bias is None:
            _replace(layer, name, _linear(old.weight, torch.zeros(old.out_features, dtype=old.weight.dtype,
                                                                  device=old.weight.device), old))


def unit_params(layer: nn.Module, kind: UnitKind) -> int:
    """Parameters one unit of `kind` holds in `layer` (weights and the producers' bias rows)."""
    total = 0
    for name, rows in kind.producers:
        lin = layer.get_submodule(name)
        total += rows * (lin.in_features + (lin.bias is not None))
    return total + kind.consumer_cols * layer.get_submodule(kind.consumer).out_features


def bias_params(layer: nn.Module, kinds: tuple[UnitKind, ...], removal: dict[str, int], blocks: set[str]) -> int:
    """Parameters that switching on the biases of the sub-blocks `blocks` adds to `layer` (dense shapes) after
    `removal` (units per kind, per group for a grouped kind); a sub-block that loses nothing keeps its biases off."""
    total = 0
    for block in blocks:
        own = [k for k in kinds if k.block == block]
        if not any(removal.get(k.name, 0) for k in own):
            continue
        names = dict.fromkeys([n for k in own for n, _ in k.producers] + [k.consumer for k in own])
        for name in names:
            linear = layer.get_submodule(name)
            if linear.bias is not None:
                continue
            rows = Fraction(linear.out_features)
            for kind in own:
                if name in dict(kind.producers):
                    units = kind.per_group if kind.groups > 1 else kind.count
                    rows *= Fraction(units - removal.get(kind.name, 0), units)
            total += int(rows)
    return total


def layer_params(layer: nn.Module) -> int:
    return sum(p.numel() for p in layer.parameters())
