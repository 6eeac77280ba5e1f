"""`toolchain prune --structured`: remove whole KV groups and MLP channel blocks layer by layer, so the written
model is a smaller dense model that stock transformers loads."""
from __future__ import annotations

import dataclasses
import time
import warnings

import torch

from ..engine import LayerEngine
from ..errors import ConfigError
from ..models import LoadedModel
from ..prune.structured import DEPTH_METHOD, Budget, global_removal, make_structured, uniform_removal
from ..prune.structured.depth import layers_to_remove
from ..prune.structured.search import MaskedFitness, evolve
from ..prune.structured.surgery import add_zero_biases, bias_params, layer_params, shrink, unit_params
from ..prune.structured.widths import native_per_layer_widths
from .config import PruneConfig
from .depth import prune_depth_loaded


def _budget(loaded: LoadedModel, cfg: PruneConfig, method) -> Budget:
    adapter, model = loaded.adapter, loaded.model
    layers = adapter.decoder_layers(model)
    shapes = {tuple((n, tuple(p.shape)) for n, p in layer.named_parameters()) for layer in layers}
    if len(shapes) > 1:
        raise ConfigError("the decoder layers differ in shape (an already structurally pruned model?); "
                          "structured pruning needs layers of one shape")
    layer = layers[0]
    kinds = adapter.structured_units(layer, model.config, cfg.channel_multiple)
    blocks = set()
    if method.compensates_bias:
        for kind in kinds:
            if layer.get_submodule(kind.consumer).bias is None:
                if kind.bias_flag is None:
                    raise ConfigError(f"{method.name} writes its bias compensation into {kind.consumer}'s bias, "
                                      f"which transformers' {model.config.model_type} has no config switch for; "
                                      f"choose another --method")
                blocks.add(kind.block)
    extra = (lambda removal: bias_params(layer, kinds, removal, blocks)) if blocks else None
    budget = Budget(len(layers), layer_params(layer), kinds, {k.name: unit_params(layer, k) for k in kinds}, extra,
                    frozenset(blocks))
    checked: dict[tuple, bool] = {}

    def legal(removal: dict[str, int]) -> bool:
        key = tuple(sorted(removal.items()))
        if key not in checked:
            checked[key] = _loadable(loaded, budget, removal)
        return checked[key]

    budget.legal = legal
    return budget


def _loadable(loaded: LoadedModel, budget: Budget, removal: dict[str, int]) -> bool:
    """Whether the family's config class accepts the attention widths `removal` leaves (its own validation)."""
    kept = {k.name: budget.limit(k) - removal.get(k.name, 0) for k in budget.kinds[:-1]}
    config = loaded.model.config
    values = loaded.adapter.structured_config(config, kept, set())
    try:
        type(config).from_dict({**config.to_dict(), **values})
    except Exception:   # transformers' strict validators raise several types
        return False
    return True


def _consumer_stats(engine, layer, hidden, kind, method):
    if not method.needs_stats:
        return None
    return engine.collect_stats(layer, hidden, method.needs_hessian, only=(kind.consumer,))[kind.consumer]


def _global_counts(engine, budget, method, sparsity, progress, every_kind: bool = False):
    """One pass over the dense model for every unit's score, the global ranking, and the widths every layer
    gets when the installed transformers cannot give each layer its own: the ranking's mean attention share.
    Returns (those widths, the ranking's per-layer removal, the per-layer scores of the ranked kinds, or of every
    kind with `every_kind`)."""
    scored_kinds = budget.kinds if every_kind else [k for k in budget.kinds if k.groups == 1]

    def score(i, layer, hidden):
        return {"scores": {k.name: method.importance(k, layer, _consumer_stats(engine, layer, hidden, k, method))
                           .cpu() for k in scored_kinds}}

    scored = engine.walk(score, needs_inputs=method.needs_stats, desc=f"score {method.name}", progress=progress)
    scores = [e["scores"] for e in scored]
    per_layer = global_removal(budget, scores, sparsity)
    attention = sum(budget.attention_fraction(r) for r in per_layer) / len(per_layer)
    return uniform_removal(budget, sparsity, attention), per_layer, scores


def _searched_counts(loaded, engine, budget, method, sparsity, heldout, cfg, progress):
    """`--allocation search`: the global ranking's widths evolved by KL to the dense model on the held-out windows.
    The layers are tied (one width per kind): no family we prune can be written with per-layer widths."""
    seed, ranked, scores = _global_counts(engine, budget, method, sparsity, progress, every_kind=True)
    layers = loaded.adapter.decoder_layers(loaded.model)
    # one window per forward pass: the dense log-probabilities are kept, the candidate's are vocabulary-wide
    fitness = MaskedFitness(loaded.model, layers, budget.kinds, scores, heldout, 1)
    try:
        result = evolve(budget, [seed] * budget.n_layers, fitness, sparsity, cfg.search_budget, tied=True,
                        rng_seed=cfg.seed)
    finally:
        fitness.close()
    info = {"global_ranking": ranked, "search": {
        "tied_layers": True, "heldout_windows": int(heldout.shape[0]), "candidates_evaluated": result.evaluated,
        "budget": cfg.search_budget, "seed": seed, "seed_kl": result.seed_fitness, "best": result.best[0],
        "best_kl": result.fitness, "kl_history": [round(f, 6) for f in result.history]}}
    return result.best[0], info


def _layers_first_count(loaded: LoadedModel, share: float) -> int:
    """How many layers a share of the decoder's parameters removes (the layers are of one shape, so the count
    does not depend on their scores); 0 when the share is less than half a layer."""
    params = [layer_params(layer) for layer in loaded.adapter.decoder_layers(loaded.model)]
    try:
        return len(layers_to_remove([0.0] * len(params), params, share))
    except ConfigError:
        return 0


def _remove_layers_first(loaded: LoadedModel, calib: torch.Tensor, cfg: PruneConfig, sparsity: float, device,
                         progress: bool) -> tuple[dict | None, str | None]:
    """`--depth-share`: whole layers by Block Influence worth that share of the budget (to within half a layer),
    removed in place before the width method sees the model. Returns the depth report, or, where the default
    share removes no layer or the whole budget, None and why (an explicit --depth-share is refused instead)."""
    share_of_budget = cfg.layer_share()
    share = share_of_budget * sparsity
    n_layers = len(loaded.adapter.decoder_layers(loaded.model))
    count = _layers_first_count(loaded, share)
    problem = None
    if count == 0:
        problem = (f"--depth-share {share_of_budget:g} of --sparsity {sparsity:g} is {share:.4g} of the decoder "
                   f"parameters, less than half of one of the {n_layers} layers: no layer would go")
    elif count / n_layers >= sparsity:
        problem = (f"--depth-share {share_of_budget:g}: {count} of {n_layers} whole layers already meet --sparsity "
                   f"{sparsity:g}, leaving the width method nothing")
    if problem is not None:
        if cfg.depth_share is not None:
            raise ConfigError(problem + "; choose another --depth-share (0: widths only)")
        return None, problem.replace(f"--depth-share {share_of_budget:g}", "the default layer share") + \
            "; widths only"
    layers_cfg = dataclasses.replace(cfg, method=DEPTH_METHOD, sparsity=f"{share:.6g}", allocation="uniform",
                                     rescore=False, depth_share=0.0)
    return prune_depth_loaded(loaded, calib, layers_cfg, device, progress), None


def prune_structured_loaded(loaded: LoadedModel, calib: torch.Tensor | None, cfg: PruneConfig, device,
                            progress: bool = True) -> dict:
    """Prune `loaded.model` in place into a narrower model (its config updated to match). Returns the report."""
    if cfg.structured_method() == DEPTH_METHOD:
        return prune_depth_loaded(loaded, calib, cfg, device, progress)
    target = cfg.validate()[0]
    method = make_structured(cfg.structured_method())
    adapter, model = loaded.adapter, loaded.model
    t0 = time.perf_counter()
    heldout = None
    if cfg.heldout_windows():
        if calib is None or calib.shape[0] <= cfg.heldout_windows():
            raise ConfigError(f"--allocation search holds out the last {cfg.heldout_windows()} calibration windows "
                              f"for its fitness and needs at least one more to prune with")
        calib, heldout = calib[:-cfg.heldout_windows()], calib[-cfg.heldout_windows():]
    depth, sparsity, layers_skipped = None, target.sparsity, None
    if cfg.layer_share() > 0:
        depth, layers_skipped = _remove_layers_first(loaded, calib, cfg, target.sparsity, device, progress)
    if depth is not None:
        gone = depth["decoder_params"]["removed_fraction"]
        sparsity = (target.sparsity - gone) / (1 - gone)   # of the parameters the kept layers hold
    budget = _budget(loaded, cfg, method)
    if calib is None:   # magnitude reads no activations
        calib = torch.zeros(1, 2, dtype=torch.long)
    engine = LayerEngine(model, adapter, calib, cfg.batch_size, device)
    if method.needs_gradients:
        # one window per backward pass: the vocabulary-wide logits and their gradient dominate the memory
        method.prepare(model, adapter.decoder_layers(model), calib, 1)
    allocation_info = {}
    if cfg.allocation == "search":
        removal, allocation_info = _searched_counts(loaded, engine, budget, method, sparsity, heldout, cfg,
                                                    progress)
    elif cfg.allocation == "global":
        removal, ranked, _ = _global_counts(engine, budget, method, sparsity, progress)
        allocation_info["global_ranking"] = ranked
        if any(r != ranked[0] for r in ranked):
            mlp = budget.kinds[-1]
            probe = adapter.structured_config(model.config, {"channels": (mlp.count - 1) * mlp.consumer_cols}, set())
            native = native_per_layer_widths(model, probe)
            # Supported or not, the written model has one width per kind: no family we prune builds per-layer
            # widths from per_layer_config in transformers 5.x (the probe says so when that changes).
            warnings.warn(f"the global ranking gives the layers different widths, which transformers "
                          f"{'could' if native else 'cannot'} load for {model.config.model_type} through its "
                          f"per_layer_config{' but this writer does not use yet' if native else ''}; every layer "
                          f"gets the same widths with the ranking's attention/MLP split ({removal})")
            allocation_info["native_per_layer_widths"] = native
    else:
        removal = uniform_removal(budget, sparsity)
    t_alloc = time.perf_counter() - t0

    def prune_layer(i, layer, hidden):
        entry = {"params_before": layer_params(layer)}
        for name in [k.name for k in budget.kinds]:
            # the kinds as the layer is now: removing KV groups leaves fewer query heads to choose from
            kind = {k.name: k for k in adapter.structured_units(layer, model.config, cfg.channel_multiple)}[name]
            n = removal[name] * kind.groups
            info = {"units": kind.count, "kept": kind.count - n}
            if n:
                stats = _consumer_stats(engine, layer, hidden, kind, method)
                cut = method.remove(kind, layer, stats, n)
                shrink(layer, kind, cut.keep, cut.consumer_weight, cut.consumer_bias)
                adapter.sync_structure(layer)
                info.update(kept_units=cut.keep.tolist(), removed_units=cut.removed.tolist(),
                            saliency=[round(float(s), 6) for s in cut.saliency])
            entry[name] = info
        for kind in budget.kinds:
            if kind.block in biased:
                add_zero_biases(layer, kind)
        entry["params_after"] = layer_params(layer)
        return entry

    biased = {k.block for k in budget.kinds if k.block in budget.bias_blocks and removal[k.name]}
    per_layer = engine.walk(prune_layer, needs_inputs=method.needs_stats, progress=progress,
                            desc=f"prune --structured {method.name} {sparsity:.4g}")
    kept = {k.name: budget.limit(k) - removal[k.name] for k in budget.kinds}
    kept["channels"] *= budget.kinds[-1].consumer_cols
    biases = {k.bias_flag for k in budget.kinds if k.block in biased}
    for key, value in adapter.structured_config(model.config, kept, biases).items():
        setattr(model.config, key, value)
    after = sum(e["params_after"] for e in per_layer)
    before = budget.total if depth is None else depth["decoder_params"]["before"]
    return {
        "method": method.name, "init": None, "structured": True, "sparsity": f"{target.sparsity:g}",
        "nm": None, "allocation": cfg.allocation, "allocation_info": allocation_info,
        "channel_multiple": cfg.channel_multiple,
        "depth_share": cfg.layer_share() if depth is not None else 0.0,
        **({"depth_share_skipped": layers_skipped} if layers_skipped else {}),
        **({} if depth is None else {"depth": {
            **depth["depth"], "removed_fraction": depth["decoder_params"]["removed_fraction"],
            "width_sparsity_of_kept_layers": sparsity}}),
        "decoder_params": {"before": before, "after": after, "removed_fraction": 1 - after / before,
                           "target_fraction": target.sparsity,
                           "unit_params": budget.unit_params},
        "removal_per_layer": removal,
        "global_sparsity": 1 - after / before,
        "widths": {"mlp_channels": kept["channels"],
                   **({"kv_heads": kept["kv_group"], "attention_heads": int(model.config.num_attention_heads)}
                      if "kv_group" in kept else {}),
                   **({} if depth is None else {"num_hidden_layers": len(depth["depth"]["kept_layers"])})},
        "seconds": {"allocation": round(t_alloc, 3), "total": round(time.perf_counter() - t0, 3)},
        "layers": per_layer,
    }
