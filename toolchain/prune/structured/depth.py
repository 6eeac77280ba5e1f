"""Depth pruning: remove whole decoder layers, ranked by Block Influence (ShortGPT, Men et al., 2024).

A layer's Block Influence is 1 - the mean cosine similarity, over every calibration token, between the hidden
state entering the layer and the one leaving it (both on the residual stream): a layer that barely turns the
residual stream (BI near 0) is the cheapest to drop. The scores come from one walk over the model's own hidden
states (the dense model for the one-shot ranking; the model as it is after each removal when re-scoring). The
last layer's output is taken before the final norm, so every layer is scored on the same footing (reading
transformers' `output_hidden_states`, as ShortGPT's code does, would score the last layer against the normed
state).

Dropping a layer keeps the rest exactly as they were: the output is the same dense model with fewer layers, its
config's layer count and per-layer lists cut to the kept layers, which stock transformers loads.
"""
from __future__ import annotations

import torch
from torch import nn

from ... import distributed
from ...engine import LayerEngine
from ...errors import ConfigError
from ...models.base import ArchAdapter


@torch.no_grad()
def cosine_dissimilarity_sum(inputs: torch.Tensor, outputs: torch.Tensor) -> tuple[float, int]:
    """Sum over tokens of 1 - cos(input, output) ([..., d] each, float64 accumulation), and the token count.
    A zero vector (no direction) counts as half-similar, as in ShortGPT's code."""
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    y = outputs.reshape(-1, outputs.shape[-1]).double()
    cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
    return float((1 - cos.nan_to_num(nan=0.5)).sum()), x.shape[0]


def block_influence(engine: LayerEngine, progress: bool = True, desc: str = "score block influence") -> list[float]:
    """Every decoder layer's Block Influence on the engine's calibration windows, in one walk: each layer runs
    once on its inputs, and its outputs are the next layer's inputs. Under torchrun the sums and token counts
    are added across ranks, so every rank gets the same scores."""
    spare: list[torch.Tensor | None] = [None]

    def score(i, layer, hidden):
        outputs = engine.forward_layer(layer, hidden, spare[0])
        spare[0] = hidden
        total, count = 0.0, 0
        for s in engine.batches():
            part, n = cosine_dissimilarity_sum(hidden[s], outputs[s])
            total, count = total + part, count + n
        sums = torch.tensor([total], dtype=torch.float64)
        (count,) = distributed.all_reduce_sums([sums], [count])
        return {"block_influence": float(sums[0]) / count}, outputs

    entries = engine.walk(score, needs_inputs=True, desc=desc, progress=progress)
    return [e["block_influence"] for e in entries]


def layers_to_remove(scores: list[float], params: list[int], sparsity: float) -> list[int]:
    """The lowest-scoring layers, in ascending score, until the removed parameters are within half a layer of
    `sparsity` of the total (so the budget is met to within one layer). Refuses a budget that removes no layer or
    every layer."""
    total = sum(params)
    target = sparsity * total
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    removed, gone = [], 0
    for i in order:
        if gone + params[i] / 2 > target:
            break
        removed.append(i)
        gone += params[i]
    if not removed:
        raise ConfigError(f"--sparsity {sparsity:g} is below half a decoder layer ({min(params)} parameters of "
                          f"{total}): --method depth would remove nothing")
    if len(removed) == len(scores):
        raise ConfigError(f"--sparsity {sparsity:g} would remove every decoder layer; with {len(scores)} layers "
                          f"--method depth can remove at most {100 * (1 - min(params) / total):.1f}% "
                          f"(all but one layer)")
    return removed


def drop_layers(model: nn.Module, adapter: ArchAdapter, removed: list[int]) -> list[int]:
    """Remove decoder layers `removed` from `model` in place: the kept layers are renumbered (every submodule's
    `layer_idx`, which the KV cache is indexed by) and the config gets the family's values for them. Returns the
    kept layers' original indices."""
    layers = adapter.decoder_layers(model)
    kept = [i for i in range(len(layers)) if i not in set(removed)]
    values = adapter.depth_config(model.config, kept)
    new = nn.ModuleList([layers[i] for i in kept])
    for index, layer in enumerate(new):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index
    parent, _, attr = adapter.layout.layers.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)
    for key, value in values.items():
        setattr(model.config, key, value)
    return kept
