"""How many units each layer loses, so that the decoder loses the asked fraction of its parameters.

The budget is the fraction of decoder-layer parameters removed. Every layer of the families we prune has the
same shape, so a layer's parameters after removing (a, m) units of its two kinds are a closed form (plus the
biases a bias-compensating method switches on), and the widths are chosen from it directly:

- uniform: every layer removes the same units: the attention sub-block about the asked fraction of its
  parameters (whole KV groups and the same number of query heads from every kept group), the MLP channels the
  rest; met to within one MLP unit per layer.
- global (FLAP's adaptive allocation, or our saliency): every unit's score is standardised within its layer and
  sub-block, then units are removed in ascending order of that score across the whole decoder, each costing
  its parameters, until the budget is met.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch

from ...errors import ConfigError
from ...models.base import UnitKind


@dataclass
class Budget:
    n_layers: int
    layer_params: int                           # parameters of one dense decoder layer
    kinds: tuple[UnitKind, ...]                 # attention kinds first, MLP channels last
    unit_params: dict[str, int]                 # parameters of one unit of each kind
    #: parameters that switched-on biases add to a layer, given the removal (None: the method adds none)
    bias_extra: Callable[[dict[str, int]], int] | None = None
    bias_blocks: frozenset[str] = frozenset()     # sub-blocks whose biases the method switches on
    #: whether the family's config accepts the widths a removal leaves (LlamaConfig wants heads | hidden_size)
    legal: Callable[[dict[str, int]], bool] | None = None

    @property
    def total(self) -> int:
        return self.n_layers * self.layer_params

    def limit(self, kind: UnitKind) -> int:
        """Removal counts run over range(limit): a layer keeps one unit (per group for a grouped kind)."""
        return kind.per_group if kind.groups > 1 else kind.count

    def removed_params(self, removal: dict[str, int], block: str | None = None) -> int:
        """Parameters one layer's units lose under `removal` (a grouped kind counts per group: its units go from
        every kept unit of its parent), optionally of one sub-block only."""
        total = 0
        kept = {k.name: k.count - removal.get(k.name, 0) for k in self.kinds}
        for kind in self.kinds:
            if block is None or kind.block == block:
                n = removal.get(kind.name, 0) * (kept[kind.parent] if kind.parent else 1)
                total += n * self.unit_params[kind.name]
        return total

    def after(self, removal: dict[str, int]) -> int:
        """Parameters of one layer after `removal`."""
        extra = self.bias_extra(removal) if self.bias_extra else 0
        return self.layer_params - self.removed_params(removal) + extra

    def max_fraction(self) -> float:
        """The largest fraction that can go while every layer keeps one unit of each kind."""
        return 1 - self.after({k.name: self.limit(k) - 1 for k in self.kinds}) / self.layer_params

    def attention_fraction(self, removal: dict[str, int]) -> float:
        dense = self.removed_params({k.name: self.limit(k) for k in self.kinds if k.parent is None}, "attn")
        return self.removed_params(removal, "attn") / dense if dense else 0.0


def uniform_removal(budget: Budget, sparsity: float, attention: float | None = None) -> dict[str, int]:
    """Units of each kind every layer removes (per group for a grouped kind). The attention kinds are chosen so
    the attention sub-block loses the fraction of its parameters closest to `attention` (default: `sparsity`)
    that still lets the MLP channels (the finest kind, last) meet the budget."""
    target = (1 - sparsity) * budget.layer_params
    *coarse, fine = budget.kinds
    candidates = []
    for counts in itertools.product(*(range(budget.limit(k)) for k in coarse)):
        removal = dict(zip((k.name for k in coarse), counts))
        if budget.legal is not None and not budget.legal(removal):
            continue
        after = torch.tensor([budget.after({**removal, fine.name: m}) for m in range(budget.limit(fine))])
        best = int(torch.argmin((after - target).abs()))
        candidates.append(({**removal, fine.name: best}, abs(float(after[best]) - target)))
    unit = budget.unit_params[fine.name]
    if min(err for _, err in candidates) > unit:
        raise ConfigError(f"--sparsity {sparsity:g} cannot be met: every layer must keep one unit of each kind "
                          f"({', '.join(k.name for k in budget.kinds)}), so at most "
                          f"{100 * budget.max_fraction():.1f}% of the decoder parameters can go")
    wanted = sparsity if attention is None else attention
    fits = [c for c in candidates if c[1] <= unit / 2] or [min(candidates, key=lambda c: c[1])]
    removal = min(fits, key=lambda c: (round(abs(budget.attention_fraction(c[0]) - wanted), 9), c[1]))[0]
    if not any(removal.values()):
        raise ConfigError(f"--sparsity {sparsity:g} is below one unit per layer ({unit} parameters of "
                          f"{budget.layer_params}): nothing would be removed")
    return removal


def standardise(scores: torch.Tensor) -> torch.Tensor:
    std = scores.std() if scores.numel() > 1 else torch.tensor(0.0)
    return (scores - scores.mean()) / std if std > 0 else torch.zeros_like(scores)


def global_removal(budget: Budget, scores: list[dict[str, torch.Tensor]], sparsity: float) -> list[dict[str, int]]:
    """Per layer, the units of each ungrouped kind removed by the global ranking of standardised scores
    (higher = keep). Grouped kinds (query heads inside a KV group) are left to the widths that follow."""
    target = sparsity * budget.total
    ranked = [k for k in budget.kinds if k.groups == 1]
    z, cost, owner = [], [], []
    for i, layer_scores in enumerate(scores):
        for kind in ranked:
            s = standardise(layer_scores[kind.name].double().cpu())
            z.append(s)
            cost += [budget.unit_params[kind.name]] * len(s)
            owner += [(i, kind.name)] * len(s)
    order = torch.argsort(torch.cat(z), stable=True).tolist()
    removed = [{k.name: 0 for k in ranked} for _ in scores]
    counts = {k.name: k.count for k in ranked}
    total = 0
    for idx in order:
        i, name = owner[idx]
        if removed[i][name] >= counts[name] - 1:
            continue
        if total + cost[idx] / 2 > target:
            break
        removed[i][name] += 1
        total += cost[idx]
    return removed
