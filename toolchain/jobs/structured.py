"""`toolchain prune --structured`: remove whole KV groups and MLP channel blocks layer by layer, so the written
model is a smaller dense model that stock transformers loads."""
from __future__ import annotations

import time
import warnings

import torch

from ..engine import LayerEngine
from ..errors import ConfigError
from ..models import LoadedModel
from ..prune.structured import Budget, global_removal, make_structured, uniform_removal
from ..prune.structured.surgery import add_zero_biases, bias_params, layer_params, shrink, unit_params
from ..prune.structured.widths import native_per_layer_widths
from .config import PruneConfig


def _budget(loaded: LoadedModel, cfg: PruneConfig, method) -> Budget:
    adapter, model = loaded.adapter, loaded.model
    layers = adapter.decoder_layers(model)
    shapes = {tuple((n, tuple(p.shape)) for n, p in layer.named_parameters()) for layer in layers}
    if len(shapes) > 1:
        raise ConfigError("the decoder layers differ in shape (an already structurally pruned model?); "
                          "structured pruning needs layers of one shape")
    layer = layers[0]
    kinds = adapter.structured_units(layer, model.config, cfg.channel_multiple)
    extra = {}
    if method.compensates_bias:
        for kind in kinds:
            if layer.get_submodule(kind.consumer).bias is None:
                if kind.bias_flag is None:
                    raise ConfigError(f"{method.name} writes its bias compensation into {kind.consumer}'s bias, "
                                      f"which transformers' {model.config.model_type} has no config switch for; "
                                      f"choose another --method")
                extra[kind.name] = lambda kept, kind=kind: bias_params(layer, kind, kept)
    return Budget(len(layers), layer_params(layer), kinds, {k.name: unit_params(layer, k) for k in kinds}, extra)


def _consumer_stats(engine, layer, hidden, kind, method):
    if not method.needs_stats:
        return None
    return engine.collect_stats(layer, hidden, method.needs_hessian, only=(kind.consumer,))[kind.consumer]


def _global_counts(engine, budget, method, sparsity, progress) -> tuple[dict[str, int], list[dict[str, int]], list]:
    """One pass over the dense model for every unit's score, the global ranking, and the widths every layer
    gets when the installed transformers cannot give each layer its own."""
    def score(i, layer, hidden):
        return {"scores": {k.name: method.importance(k, layer, _consumer_stats(engine, layer, hidden, k, method))
                           .cpu() for k in budget.kinds}}

    scored = engine.walk(score, needs_inputs=method.needs_stats, desc=f"score {method.name}", progress=progress)
    per_layer = global_removal(budget, [e["scores"] for e in scored], sparsity)
    coarse = budget.kinds[0] if len(budget.kinds) > 1 else None
    prefer = round(sum(r[coarse.name] for r in per_layer) / len(per_layer)) if coarse else None
    return uniform_removal(budget, sparsity, prefer), per_layer, scored


def prune_structured_loaded(loaded: LoadedModel, calib: torch.Tensor | None, cfg: PruneConfig, device,
                            progress: bool = True) -> dict:
    """Prune `loaded.model` in place into a narrower model (its config updated to match). Returns the report."""
    target = cfg.validate()[0]
    method = make_structured(cfg.structured_method())
    adapter, model = loaded.adapter, loaded.model
    budget = _budget(loaded, cfg, method)
    t0 = time.perf_counter()
    if calib is None:   # magnitude reads no activations
        calib = torch.zeros(1, 2, dtype=torch.long)
    engine = LayerEngine(model, adapter, calib, cfg.batch_size, device)
    allocation_info = {}
    if cfg.allocation == "global":
        removal, ranked, _ = _global_counts(engine, budget, method, target.sparsity, progress)
        allocation_info["global_ranking"] = ranked
        if any(r != ranked[0] for r in ranked):
            probe = adapter.structured_config(model.config, {k.name: k.count - 1 for k in budget.kinds}, set())
            native = native_per_layer_widths(model, probe)
            # Supported or not, the written model has one width per kind: no family we prune builds per-layer
            # widths from per_layer_config in transformers 5.x (the probe says so when that changes).
            warnings.warn(f"the global ranking gives the layers different widths, which transformers "
                          f"{'could' if native else 'cannot'} load for {model.config.model_type} through its "
                          f"per_layer_config{' but this writer does not use yet' if native else ''}; every layer "
                          f"gets the same widths with the ranking's attention/MLP split ({removal})")
            allocation_info["native_per_layer_widths"] = native
    else:
        removal = uniform_removal(budget, target.sparsity)
    t_alloc = time.perf_counter() - t0

    def prune_layer(i, layer, hidden):
        entry = {"params_before": layer_params(layer)}
        for kind in budget.kinds:
            n = removal[kind.name]
            info = {"units": kind.count, "kept": kind.count - n}
            if n:
                stats = _consumer_stats(engine, layer, hidden, kind, method)
                cut = method.remove(kind, layer, stats, n)
                shrink(layer, kind, cut.keep, cut.consumer_weight, cut.consumer_bias)
                info.update(kept_units=cut.keep.tolist(), removed_units=cut.removed.tolist(),
                            saliency=[round(float(s), 6) for s in cut.saliency])
            if n and kind.name in budget.bias_params:
                add_zero_biases(layer, kind)
            entry[kind.name] = info
        entry["params_after"] = layer_params(layer)
        return entry

    per_layer = engine.walk(prune_layer, needs_inputs=method.needs_stats, progress=progress,
                            desc=f"prune --structured {method.name} {target.sparsity:g}")
    kept = {k.name: k.count - removal[k.name] for k in budget.kinds}
    widths = {k.name: kept[k.name] * (k.consumer_cols if k.name == "channels" else 1) for k in budget.kinds}
    biases = {k.bias_flag for k in budget.kinds if removal[k.name] and k.name in budget.bias_params}
    for key, value in adapter.structured_config(model.config, widths, biases).items():
        setattr(model.config, key, value)
    after = sum(e["params_after"] for e in per_layer)
    return {
        "method": method.name, "init": None, "structured": True, "sparsity": f"{target.sparsity:g}",
        "nm": None, "allocation": cfg.allocation, "allocation_info": allocation_info,
        "channel_multiple": cfg.channel_multiple,
        "decoder_params": {"before": budget.total, "after": after, "removed_fraction": 1 - after / budget.total,
                           "target_fraction": target.sparsity,
                           "unit_params": budget.unit_params},
        "global_sparsity": 1 - after / budget.total,
        "widths": {**widths, **({"attention_heads": int(model.config.num_attention_heads)}
                                if "kv_group" in widths else {})},
        "seconds": {"allocation": round(t_alloc, 3), "total": round(time.perf_counter() - t0, 3)},
        "layers": per_layer,
    }
