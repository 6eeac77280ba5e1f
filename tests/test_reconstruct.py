"""Block reconstruction: masks never change, block losses fall, runs are deterministic under a seed."""
from __future__ import annotations

import copy

import torch

from conftest import random_ids, tiny_loaded
from toolchain.engine import LayerEngine
from toolchain.prune import SparsityTarget, Wanda
from toolchain.prune.reconstruct import reconstruct_layer


def _run(family: str, target: SparsityTarget, seed: int = 0):
    from toolchain.engine import set_weight

    loaded = tiny_loaded(family)
    engine = LayerEngine(loaded.model, loaded.adapter, random_ids(8, 32), 4, torch.device("cpu"))
    result = {}

    def process(i, layer, hidden):
        if i:
            return {}, None
        dense = copy.deepcopy(layer)
        stats = engine.collect_stats(layer, hidden, False)
        masks = {}
        for name, lin in loaded.adapter.linears(layer).items():
            weight, masks[name] = Wanda().prune(lin.weight, stats[name], target)
            set_weight(lin, weight)
        result["masks"] = {n: m.clone() for n, m in masks.items()}
        result["report"], outputs = reconstruct_layer(engine, layer, dense, hidden, masks, epochs=3, lr=1e-3,
                                                      seed=seed)
        result["weights"] = {n: lin.weight.detach().clone() for n, lin in loaded.adapter.linears(layer).items()}
        result["outputs"], result["forward"] = outputs, engine.forward_layer(layer, hidden)
        return {}, None

    engine.walk(process, needs_inputs=True, desc="t", progress=False)
    return result


def test_mask_is_fixed_and_block_losses_fall():
    for family, target in (("llama", SparsityTarget.parse("2:4")), ("opt", SparsityTarget.parse("0.5"))):
        r = _run(family, target)
        for name, w in r["weights"].items():
            assert bool((w[r["masks"][name]] == 0).all())                       # pruned stays exactly zero
            if target.is_nm:
                kept = (~r["masks"][name]).reshape(w.shape[0], -1, 4).sum(-1)
                assert bool((kept <= 2).all())
        for block, losses in r["report"].items():
            assert losses["loss_after"] < losses["loss_before"], (family, block, losses)


def test_deterministic_under_a_seed():
    a, b = _run("llama", SparsityTarget.parse("2:4"), seed=3), _run("llama", SparsityTarget.parse("2:4"), seed=3)
    assert all(torch.equal(a["weights"][n], b["weights"][n]) for n in a["weights"])
    assert a["report"] == b["report"]


def test_returned_outputs_are_the_tuned_layers_outputs():
    # Pre-norm layers hand the next layer's inputs over (recorded output + change of the MLP output).
    for family in ("llama", "opt"):
        r = _run(family, SparsityTarget.parse("0.5"))
        torch.testing.assert_close(r["outputs"], r["forward"], rtol=1e-5, atol=1e-5)
