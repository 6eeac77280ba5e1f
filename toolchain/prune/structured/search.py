"""Training-free evolutionary search over per-layer widths (`--allocation search`).

Search for Efficient LLMs (Shen et al., 2024) evolves per-layer widths from an importance-based seed and scores
each candidate by the subnet that inherits the dense weights; Týr-the-Pruner (2025) scores candidates by the KL
divergence of their next-token distribution to the dense model's. Both are here:

- a candidate is a removal per layer (units of each kind; per group for a grouped kind), always on the budget:
  every operator keeps the decoder's parameters within one MLP unit of the target (one unit per layer when the
  layers are tied);
- its fitness is KL(dense || candidate), per token, on calibration windows held out from the pruning statistics
  (never the evaluation text). The candidate is the dense model with each layer's lowest-ranked units masked
  (their consumer columns zeroed; the ranking is the method's own importance on the dense model), the
  inherited-weights subnet of the seed paper: one forward pass per candidate, no pruning;
- the seed is the global ranking's allocation; the search evaluates at most `--search-budget` candidates (the seed
  included), each distinct candidate once, and keeps the best: its fitness is never worse than the seed's;
- the winner's widths are then pruned for real by the method, layer by layer, with its refit.

`tied`: every layer gets the same widths, for families whose transformers config cannot give each layer its own
(Llama, Qwen2, Mistral, OPT in transformers 5.x); the search then picks the attention/MLP split.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .budget import Budget

Genome = tuple[tuple[tuple[str, int], ...], ...]   # per layer, sorted (kind, removed) pairs: hashable


def as_genome(per_layer: list[dict[str, int]]) -> Genome:
    return tuple(tuple(sorted(r.items())) for r in per_layer)


def as_removals(genome: Genome) -> list[dict[str, int]]:
    return [dict(layer) for layer in genome]


def removed_params(budget: Budget, per_layer: list[dict[str, int]]) -> int:
    return sum(budget.layer_params - budget.after(r) for r in per_layer)


def _fill_channels(budget: Budget, per_layer: list[dict[str, int]], target: int, rng: random.Random,
                   tied: bool) -> list[dict[str, int]] | None:
    """Set the MLP channel removals (the finest kind) so the decoder loses `target` parameters as nearly as the
    granularity allows: one channel unit in all (tied: one per layer). None when no setting gets within it."""
    fine = budget.kinds[-1]
    limit = budget.limit(fine) - 1
    if tied:
        coarse = {k: v for k, v in per_layer[0].items() if k != fine.name}
        per_layer_target = target / len(per_layer)
        best = min(range(limit + 1), key=lambda m: abs(budget.layer_params - budget.after({**coarse, fine.name: m})
                                                        - per_layer_target))
        out = [{**coarse, fine.name: best} for _ in per_layer]
        return out if abs(removed_params(budget, out) - target) <= len(out) * budget.unit_params[fine.name] else None
    out = [dict(r) for r in per_layer]
    unit = budget.unit_params[fine.name]
    gap = target - removed_params(budget, out)
    order = list(range(len(out)))
    while abs(gap) > unit / 2:
        step = 1 if gap > 0 else -1
        rng.shuffle(order)
        movable = [i for i in order if 0 <= out[i][fine.name] + step <= limit]
        if not movable:
            return None
        out[movable[0]][fine.name] += step
        gap = target - removed_params(budget, out)
    return out


def _legal(budget: Budget, removal: dict[str, int]) -> bool:
    if any(not 0 <= removal[k.name] < budget.limit(k) for k in budget.kinds):
        return False
    coarse = {k.name: removal[k.name] for k in budget.kinds[:-1]}
    return budget.legal is None or budget.legal(coarse)


def mutate(budget: Budget, per_layer: list[dict[str, int]], target: int, rng: random.Random,
           tied: bool) -> list[dict[str, int]] | None:
    """One random change that stays on the budget: an attention kind of a layer (of every layer, tied) up or down
    by one with the channels refilled, or, untied, channel units moved from one layer to another."""
    out = [dict(r) for r in per_layer]
    coarse = budget.kinds[:-1]
    fine = budget.kinds[-1]
    if not tied and (not coarse or rng.random() < 0.6):
        i, j = rng.sample(range(len(out)), 2)
        step = rng.randint(1, max(1, budget.limit(fine) // 16))
        step = min(step, budget.limit(fine) - 1 - out[i][fine.name], out[j][fine.name])
        if step <= 0:
            return None
        out[i][fine.name] += step
        out[j][fine.name] -= step
        return out
    if not coarse:
        return None
    kind = rng.choice(coarse)
    delta = rng.choice((-1, 1))
    layers = range(len(out)) if tied else [rng.randrange(len(out))]
    for i in layers:
        out[i][kind.name] += delta
        if not _legal(budget, {**out[i], fine.name: 0}):
            return None
    return _fill_channels(budget, out, target, rng, tied)


def crossover(a: list[dict[str, int]], b: list[dict[str, int]], rng: random.Random) -> list[dict[str, int]]:
    """Each layer's widths from one parent or the other (the budget is repaired afterwards)."""
    return [dict(x if rng.random() < 0.5 else y) for x, y in zip(a, b)]


@dataclass
class SearchResult:
    best: list[dict[str, int]]
    fitness: float
    seed_fitness: float
    evaluated: int
    history: list[float] = field(default_factory=list)   # fitness of every evaluated candidate, in order


def evolve(budget: Budget, seed: list[dict[str, int]], fitness: Callable[[list[dict[str, int]]], float],
           sparsity: float, candidates: int, tied: bool, population: int = 8, rng_seed: int = 0) -> SearchResult:
    """Evaluate at most `candidates` distinct candidates, starting with `seed`; return the fittest (lowest)."""
    rng = random.Random(rng_seed)
    target = round(sparsity * budget.total)
    seen: dict[Genome, float] = {}
    history: list[float] = []

    def evaluate(per_layer):
        key = as_genome(per_layer)
        if key not in seen and len(seen) < candidates:
            seen[key] = float(fitness(per_layer))
            history.append(seen[key])
        return seen.get(key)

    if not tied:   # per-layer widths can meet the budget to one unit in all, not just one per layer
        seed = _fill_channels(budget, seed, target, rng, tied=False) or seed
    seed_fitness = evaluate(seed)
    parents = [seed]
    attempts = 0
    # the small tied space runs dry long before the attempts do; then every candidate has been seen
    while len(seen) < candidates and attempts < 50 * candidates:
        attempts += 1
        if not tied and len(parents) > 1 and rng.random() < 0.5:
            child = _fill_channels(budget, crossover(*rng.sample(parents, 2), rng), target, rng, tied=False)
            child = mutate(budget, child, target, rng, tied) if child is not None and rng.random() < 0.5 else child
        else:
            child = mutate(budget, rng.choice(parents), target, rng, tied)
        if child is None or as_genome(child) in seen:
            continue
        evaluate(child)
        ranked = sorted(seen.items(), key=lambda item: item[1])
        parents = [as_removals(g) for g, _ in ranked[:population]]
    best, score = min(seen.items(), key=lambda item: item[1])
    return SearchResult(as_removals(best), score, seed_fitness, len(seen), history)


class MaskedFitness:
    """KL(dense || candidate) per token on held-out windows, the candidate being the dense model with each layer's
    lowest-ranked units masked out (their consumer's input columns zeroed)."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, kinds, scores: list[dict[str, torch.Tensor]],
                 windows: torch.Tensor, batch_size: int):
        self.model, self.layers, self.kinds = model, layers, {k.name: k for k in kinds}
        self.scores, self.windows, self.batch_size = scores, windows, max(1, batch_size)
        self._masks: dict[tuple[int, str], torch.Tensor] = {}
        handles = []
        for i, layer in enumerate(layers):
            for consumer in dict.fromkeys(k.consumer for k in kinds):
                handles.append(layer.get_submodule(consumer).register_forward_pre_hook(self._hook(i, consumer)))
        self._handles = handles
        self.dense = [torch.log_softmax(self._logits(s), dim=-1).half() for s in self._slices()]

    def _slices(self):
        n = self.windows.shape[0]
        return [slice(a, min(a + self.batch_size, n)) for a in range(0, n, self.batch_size)]

    def _hook(self, i: int, consumer: str):
        def apply(module, args):
            mask = self._masks.get((i, consumer))
            return None if mask is None else (args[0] * mask, *args[1:])
        return apply

    @torch.no_grad()
    def _logits(self, s: slice) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return self.model(self.windows[s].to(device), use_cache=False).logits.float()

    def masks(self, per_layer: list[dict[str, int]]) -> dict[tuple[int, str], torch.Tensor]:
        """Per layer and consumer, 1 for the input columns of the kept units, 0 for the removed ones: the ungrouped
        kinds lose their lowest-scoring units, a grouped kind (query heads) its lowest in every kept group."""
        masks = {}
        for i, removal in enumerate(per_layer):
            layer_masks = {}
            dropped_groups = torch.tensor([], dtype=torch.long)
            for name, kind in self.kinds.items():
                weight = self.layers[i].get_submodule(kind.consumer).weight
                mask = layer_masks.setdefault(kind.consumer, torch.ones(weight.shape[1], device=weight.device,
                                                                         dtype=weight.dtype))
                n = removal.get(name, 0)
                scores = self.scores[i][name].to(weight.device)
                if kind.groups == 1:
                    units = torch.argsort(scores, stable=True)[:n]
                    if kind.parent is None and kind.block == "attn":
                        dropped_groups = units.cpu()
                else:
                    per_group = scores.reshape(kind.groups, kind.per_group)
                    kept_groups = [g for g in range(kind.groups) if g not in set(dropped_groups.tolist())]
                    units = torch.cat([torch.argsort(per_group[g], stable=True)[:n] + g * kind.per_group
                                       for g in kept_groups]) if kept_groups and n else torch.tensor([], dtype=torch.long)
                if len(units):
                    mask[kind.rows(kind.consumer, units.to(weight.device))] = 0
            masks.update({(i, consumer): m for consumer, m in layer_masks.items()})
        return masks

    @torch.no_grad()
    def __call__(self, per_layer: list[dict[str, int]]) -> float:
        self._masks = self.masks(per_layer)
        total, tokens = 0.0, 0
        try:
            for s, dense in zip(self._slices(), self.dense):
                logq = torch.log_softmax(self._logits(s), dim=-1)
                logp = dense.float()
                total += float((logp.exp() * (logp - logq)).sum())
                tokens += logp.shape[0] * logp.shape[1]
        finally:
            self._masks = {}
        return total / tokens

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.dense = []
