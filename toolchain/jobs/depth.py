"""`toolchain prune --structured --method depth`: remove whole decoder layers, the ones with the lowest Block
Influence, so the written model is the same dense model with fewer layers."""
from __future__ import annotations

import time

import torch

from ..engine import LayerEngine
from ..models import LoadedModel
from ..prune.structured.depth import block_influence, drop_layers, layers_to_remove
from ..prune.structured.surgery import layer_params
from .config import PruneConfig


def prune_depth_loaded(loaded: LoadedModel, calib: torch.Tensor, cfg: PruneConfig, device,
                       progress: bool = True) -> dict:
    """Remove `loaded.model`'s lowest-Block-Influence decoder layers in place (its config updated to match)
    until `--sparsity` of the decoder-layer parameters is gone, to within one layer. Returns the report."""
    target = cfg.validate()[0]
    adapter, model = loaded.adapter, loaded.model
    params = [layer_params(layer) for layer in adapter.decoder_layers(model)]
    n_layers = len(params)
    # refuse a budget that removes no layer or every layer before any forward pass (for layers of one size the
    # count does not depend on the scores)
    layers_to_remove([0.0] * n_layers, params, target.sparsity)
    t0 = time.perf_counter()

    def score(desc):
        return block_influence(LayerEngine(model, adapter, calib, cfg.batch_size, device), progress, desc)

    dense_scores = score("score block influence")
    rescored: list[dict[str, float]] = []
    if not cfg.rescore:
        removed = layers_to_remove(dense_scores, params, target.sparsity)
        drop_layers(model, adapter, removed)
    else:
        # ShortGPT scores once; re-scoring sees how the remaining layers act once a layer is gone (the layers
        # after it read a different residual stream). Same rule as layers_to_remove, one layer at a time.
        removed, current, scores, gone = [], list(range(n_layers)), dense_scores, 0
        budget = target.sparsity * sum(params)
        while len(current) > 1:
            j = min(range(len(current)), key=lambda k: (scores[k], k))
            if gone + params[current[j]] / 2 > budget:
                break
            gone += params[current[j]]
            removed.append(current.pop(j))
            drop_layers(model, adapter, [j])
            if len(current) == 1 or gone + min(params[i] for i in current) / 2 > budget:
                break
            scores = score(f"re-score block influence ({len(removed)} removed)")
            rescored.append({str(i): round(s, 6) for i, s in zip(current, scores)})
    kept = [i for i in range(n_layers) if i not in removed]
    before, after = sum(params), sum(params[i] for i in kept)
    order = {layer: k for k, layer in enumerate(removed)}
    return {
        "method": "depth", "init": None, "structured": True, "sparsity": f"{target.sparsity:g}", "nm": None,
        "allocation": None, "allocation_info": {},
        "depth": {"score": "block_influence", "rescore": cfg.rescore, "removed_layers": removed,
                  "kept_layers": kept, "block_influence": [round(s, 6) for s in dense_scores],
                  **({"rescored": rescored} if cfg.rescore else {})},
        "decoder_params": {"before": before, "after": after, "removed_fraction": 1 - after / before,
                           "target_fraction": target.sparsity, "layer_params": params},
        "global_sparsity": 1 - after / before,
        "widths": {"num_hidden_layers": len(kept)},
        "seconds": {"allocation": round(time.perf_counter() - t0, 3), "total": round(time.perf_counter() - t0, 3)},
        "layers": [{"layer": i, "params": params[i], "block_influence": round(dense_scores[i], 6),
                    "removed": i in order, **({"removal_order": order[i]} if i in order else {})}
                   for i in range(n_layers)],
    }
