"""How many units each layer loses, so that the decoder loses the asked fraction of its parameters.

The budget is the fraction of decoder-layer parameters removed. Every layer of the families we prune has the
same shape, so a layer's parameters after removing (a, m) units of its two kinds are a closed form (plus the
biases a bias-compensating method switches on), and the widths are chosen from it directly:

- uniform: every layer removes the same units, attention at about the asked fraction of its KV groups, the MLP
  the rest; met to within one MLP unit per layer.
- global (FLAP's adaptive allocation, or our saliency): every unit's score is standardised within its layer and
  sub-block, then units are removed in ascending order of that score across the whole decoder, each costing
  its parameters, until the budget is met.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...errors import ConfigError
from ...models.base import UnitKind


@dataclass
class Budget:
    n_layers: int
    layer_params: int                           # parameters of one dense decoder layer
    kinds: tuple[UnitKind, ...]                 # attention first when the family has attention units
    unit_params: dict[str, int]                 # parameters of one unit of each kind
    bias_params: dict[str, Callable[[int], int]]  # kind -> parameters its switched-on biases add, given kept units

    @property
    def total(self) -> int:
        return self.n_layers * self.layer_params

    def after(self, removed: dict[str, int]) -> int:
        """Parameters of one layer after removing `removed[kind]` units of each kind."""
        params = self.layer_params
        for kind in self.kinds:
            n = removed.get(kind.name, 0)
            params -= n * self.unit_params[kind.name]
            if n and kind.name in self.bias_params:   # biases are switched on only where units go
                params += self.bias_params[kind.name](kind.count - n)
        return params

    def max_fraction(self) -> float:
        """The largest fraction that can go while every layer keeps one unit of each kind."""
        return 1 - self.after({k.name: k.count - 1 for k in self.kinds}) / self.layer_params


def uniform_removal(budget: Budget, sparsity: float, prefer: int | None = None) -> dict[str, int]:
    """Units of each kind every layer removes. With two kinds, the first (KV groups, coarse) is taken as close to
    `prefer` (default: the asked fraction of them) as still lets the second (MLP channels) meet the budget."""
    target = (1 - sparsity) * budget.layer_params
    fine = budget.kinds[-1]
    coarse = budget.kinds[0] if len(budget.kinds) > 1 else None
    candidates = []
    for a in range(coarse.count if coarse else 1):
        removed = {coarse.name: a} if coarse else {}
        # at most count - 1 removed: a layer keeps one unit of each kind
        after = torch.tensor([budget.after({**removed, fine.name: k}) for k in range(fine.count)])
        best = int(torch.argmin((after - target).abs()))
        candidates.append(({**removed, fine.name: best}, abs(float(after[best]) - target)))
    unit = budget.unit_params[fine.name]
    if min(err for _, err in candidates) > unit:
        raise ConfigError(f"--sparsity {sparsity:g} cannot be met: every layer must keep one unit of each kind "
                          f"({', '.join(k.name for k in budget.kinds)}), so at most "
                          f"{100 * budget.max_fraction():.1f}% of the decoder parameters can go")
    wanted = round(sparsity * coarse.count) if prefer is None and coarse else (prefer or 0)
    wanted = min(max(wanted, 0), coarse.count - 1) if coarse else 0
    fits = [c for c in candidates if c[1] <= unit / 2] or [min(candidates, key=lambda c: c[1])]
    removed = min(fits, key=lambda c: (abs(c[0].get(coarse.name, 0) - wanted) if coarse else 0, c[1]))[0]
    if not any(removed.values()):
        raise ConfigError(f"--sparsity {sparsity:g} is below one unit per layer ({unit} parameters of "
                          f"{budget.layer_params}): nothing would be removed")
    return removed


def standardise(scores: torch.Tensor) -> torch.Tensor:
    std = scores.std() if scores.numel() > 1 else torch.tensor(0.0)
    return (scores - scores.mean()) / std if std > 0 else torch.zeros_like(scores)


def global_removal(budget: Budget, scores: list[dict[str, torch.Tensor]], sparsity: float) -> list[dict[str, int]]:
    """Per layer, the units of each kind removed by the global ranking of standardised scores (higher = keep)."""
    target = sparsity * budget.total
    z, cost, owner = [], [], []
    for i, layer_scores in enumerate(scores):
        for kind in budget.kinds:
            s = standardise(layer_scores[kind.name].double().cpu())
            z.append(s)
            cost += [budget.unit_params[kind.name]] * len(s)
            owner += [(i, kind.name)] * len(s)
    order = torch.argsort(torch.cat(z), stable=True).tolist()
    removed = [{k.name: 0 for k in budget.kinds} for _ in scores]
    counts = {k.name: k.count for k in budget.kinds}
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
