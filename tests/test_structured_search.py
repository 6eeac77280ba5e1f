"""--allocation search: every candidate stays on the parameter budget, the search never returns worse than its seed
(and beats a bad one), the fitness is the KL to the dense model of the masked subnet, and the job writes a model
transformers loads."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import VOCAB, random_ids, tiny_loaded
from toolchain.cli import main
from toolchain.errors import ConfigError
from toolchain.jobs.config import PruneConfig
from toolchain.jobs.prune import prune_loaded
from toolchain.jobs.structured import _budget
from toolchain.models import adapter_for, save_model
from toolchain.prune.structured import make_structured, uniform_removal
from toolchain.prune.structured.search import MaskedFitness, evolve, mutate, removed_params

CALIB = dict(calib_samples=8, seqlen=32, seed=0)


def _gqa_llama(layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM
    from toolchain.models.loading import LoadedModel

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                         head_dim=16, num_attention_heads=8, num_key_value_heads=2,
                                         vocab_size=VOCAB)).eval()
    return LoadedModel(model=model, tokenizer=None, adapter=adapter_for(model), source={})


def _budget_of(loaded, sparsity="0.3", method="obs-refit"):
    cfg = PruneConfig(method=method, structured=True, sparsity=sparsity, **CALIB)
    return _budget(loaded, cfg, make_structured(method))


def test_untied_search_stays_on_budget_and_improves_a_bad_seed():
    """A synthetic fitness that wants the MLP channels taken from the last layer: from a uniform seed the search
    moves them there, never leaving the budget by more than one MLP unit."""
    loaded = _gqa_llama(layers=4)
    budget = _budget_of(loaded)
    seed = [uniform_removal(budget, 0.3)] * budget.n_layers
    target = round(0.3 * budget.total)
    unit = budget.unit_params["channels"]
    seen = []

    def fitness(per_layer):
        seen.append(per_layer)
        return float(sum(r["channels"] for r in per_layer[:-1]))

    result = evolve(budget, seed, fitness, 0.3, candidates=40, tied=False)
    assert 1 < result.evaluated <= 40 and len(seen) == result.evaluated
    assert result.seed_fitness == result.history[0] and result.fitness < result.seed_fitness
    assert result.fitness == min(result.history)
    for per_layer in seen:
        assert abs(removed_params(budget, per_layer) - target) <= unit / 2 + 1
        assert all(0 <= r["channels"] < budget.limit(budget.kinds[-1]) for r in per_layer)


def test_tied_mutations_keep_every_layer_equal_and_legal():
    loaded = _gqa_llama()
    budget = _budget_of(loaded)
    seed = [uniform_removal(budget, 0.3)] * budget.n_layers
    target = round(0.3 * budget.total)
    rng = random.Random(0)
    made = [m for m in (mutate(budget, seed, target, rng, tied=True) for _ in range(50)) if m is not None]
    assert made and any(m != seed for m in made)
    for per_layer in made:
        assert all(r == per_layer[0] for r in per_layer)
        assert budget.legal({k: v for k, v in per_layer[0].items() if k != "channels"})
        # one width per kind: the budget is met to within one MLP unit per layer, as uniform allocation
        assert abs(removed_params(budget, per_layer) - target) <= budget.n_layers * budget.unit_params["channels"]


def test_masked_fitness_is_the_kl_of_the_subnet_with_the_lowest_units_zeroed():
    loaded = _gqa_llama(layers=2)
    model = loaded.model
    budget = _budget_of(loaded)
    layers = model.model.layers
    scores = [{"kv_group": torch.tensor([2.0, 1.0]), "q_head": torch.arange(8.0).flip(0),
               "channels": torch.arange(16.0)} for _ in layers]
    windows = random_ids(3, 16, seed=4)
    fitness = MaskedFitness(model, layers, budget.kinds, scores, windows, batch_size=2)
    try:
        assert fitness([{"kv_group": 0, "q_head": 0, "channels": 0}] * 2) == pytest.approx(0.0, abs=1e-3)
        removal = [{"kv_group": 1, "q_head": 1, "channels": 3}, {"kv_group": 0, "q_head": 0, "channels": 0}]
        masks = fitness.masks(removal)
        o_mask = masks[(0, "self_attn.o_proj")]
        # KV group 1 (the lower score) goes whole: heads 4..7; in group 0 its lowest head (3) goes
        assert o_mask.reshape(8, 16)[:, 0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
        assert masks[(0, "mlp.down_proj")].reshape(16, 8)[:, 0].tolist() == [0] * 3 + [1] * 13
        assert bool(masks[(1, "self_attn.o_proj")].all())
        kl = fitness(removal)

        # the same subnet by zeroing the consumer columns in a copy
        expected_model = _gqa_llama(layers=2).model
        expected_model.load_state_dict(model.state_dict())
        with torch.no_grad():
            for (i, consumer), mask in masks.items():
                expected_model.model.layers[i].get_submodule(consumer).weight.mul_(mask)
            logp = torch.log_softmax(model(windows).logits, -1)
            logq = torch.log_softmax(expected_model(windows).logits, -1)
        expected = float((logp.exp() * (logp - logq)).sum(-1).mean())
        assert kl == pytest.approx(expected, rel=2e-2) and kl > 0
    finally:
        fitness.close()
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_search_job_writes_a_loadable_model_no_worse_than_its_seed(tmp_path):
    loaded = _gqa_llama()
    cfg = PruneConfig(structured=True, sparsity="0.3", allocation="search", search_budget=6, **CALIB)
    assert cfg.heldout_windows() == 4
    calib = random_ids(CALIB["calib_samples"] + 4, 32)
    report = prune_loaded(loaded, calib, cfg, device="cpu", progress=False)
    search = report["allocation_info"]["search"]
    assert 1 <= search["candidates_evaluated"] <= 6 and search["heldout_windows"] == 4
    assert search["best_kl"] <= search["seed_kl"] and search["best"] == report["removal_per_layer"]
    assert search["kl_history"][0] == pytest.approx(search["seed_kl"], abs=1e-6)
    params = report["decoder_params"]
    assert abs(params["after"] - 0.7 * params["before"]) <= 3 * params["unit_params"]["channels"]
    ids = random_ids(2, 16, seed=9)
    save_model(loaded, tmp_path / "out")
    with torch.no_grad():
        ours = loaded.model(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()(ids).logits
    assert float((theirs - ours).abs().max() / ours.abs().max()) <= 1e-5


def test_search_on_a_family_with_only_channels_keeps_the_seed():
    loaded = tiny_loaded("opt")
    cfg = PruneConfig(structured=True, sparsity="0.3", allocation="search", search_budget=4, **CALIB)
    report = prune_loaded(loaded, random_ids(12, 32), cfg, device="cpu", progress=False)
    assert report["allocation_info"]["search"]["candidates_evaluated"] == 1


def test_search_needs_windows_beyond_the_held_out_ones():
    cfg = PruneConfig(structured=True, sparsity="0.3", allocation="search", **CALIB)
    with pytest.raises(ConfigError, match="holds out"):
        prune_loaded(_gqa_llama(), random_ids(4, 32), cfg, device="cpu", progress=False)


@pytest.mark.parametrize("argv,match", [
    (["--structured", "--search-budget", "8"], "--search-budget has no effect"),
    (["--structured", "--allocation", "search", "--search-budget", "0"], "--search-budget must be >= 1"),
])
def test_cli_refuses_a_search_budget_it_cannot_use(tmp_path, tiny_llama_dir, capsys, argv, match):
    status = main(["prune", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "o"), "--sparsity", "0.3",
                   "--quiet", *argv])
    assert status == 2 and match in capsys.readouterr().err


def test_search_holds_out_windows_after_the_calibration_ones(tiny_llama_dir):
    from toolchain.jobs.common import calibration_for
    from toolchain.models import load_model

    loaded = load_model(str(tiny_llama_dir))
    plain, _ = calibration_for(loaded, PruneConfig(structured=True, sparsity="0.3", **CALIB))
    search, info = calibration_for(loaded, PruneConfig(structured=True, sparsity="0.3", allocation="search", **CALIB))
    assert torch.equal(search[:8], plain) and search.shape[0] == 12
    assert (info["samples"], info["heldout_samples"]) == (8, 4)
