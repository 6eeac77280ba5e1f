"""Structured pruning: whole KV groups and MLP channel blocks go, the output is a smaller dense model that stock
transformers loads, and the budget, the refit and the refusals do what they say."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import VOCAB, random_ids, tiny_loaded
from toolchain.cli import main
from toolchain.errors import ConfigError
from toolchain.jobs.config import PruneConfig, QuantConfig
from toolchain.jobs.prune import prune_loaded, run_prune
from toolchain.jobs.quantize import run_quantize
from toolchain.models import adapter_for, save_model
from toolchain.prune.structured.obs_refit import ObsRefit, least_squares_refit, obs_saliency
from toolchain.prune.structured.widths import native_per_layer_widths
from toolchain.input_stats import InputStats
from toolchain.quant.state import read_quant_state

CALIB = dict(calib_samples=8, seqlen=32, seed=0)


def _prune(family, method="obs-refit", sparsity="0.3", allocation="uniform", layers=2):
    loaded = tiny_loaded(family, layers=layers)
    cfg = PruneConfig(method=method, structured=True, sparsity=sparsity, allocation=allocation, **CALIB)
    report = prune_loaded(loaded, random_ids(8, 32), cfg, device="cpu", progress=False)
    return loaded, report


def _rel_diff(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family,method", [("llama", "obs-refit"), ("llama", "flap"), ("opt", "obs-refit"),
                                           ("llama", "taylor"), ("opt", "taylor")])
def test_smaller_model_loads_with_equal_logits_and_meets_budget(tmp_path, family, method):
    dense = tiny_loaded(family)
    before = sum(p.numel() for p in adapter_for(dense.model).decoder_layers(dense.model).parameters())
    loaded, report = _prune(family, method)
    ids = random_ids(2, 24, seed=5)
    with torch.no_grad():
        ours = loaded.model(ids).logits
    save_model(loaded, tmp_path / "out", extra_json={"compression.json": report})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reloaded(ids).logits
    assert _rel_diff(theirs, ours) <= 1e-5

    layers = adapter_for(reloaded).decoder_layers(reloaded)
    after = sum(p.numel() for p in layers.parameters())
    params = report["decoder_params"]
    assert (params["before"], params["after"]) == (before, after)
    # one MLP unit per layer is the granularity of widths that are the same in every layer
    assert abs(after - (1 - 0.3) * before) <= len(layers) * params["unit_params"]["channels"]
    assert after < before
    recorded = json.loads((tmp_path / "out" / "compression.json").read_text())
    for layer, entry in zip(layers, recorded["layers"]):
        assert entry["params_after"] == sum(p.numel() for p in layer.parameters())
        assert entry["channels"]["kept"] * 8 == (layer.mlp.down_proj if family == "llama" else layer.fc2).in_features


def _gqa_llama(heads: int = 8, kv: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM
    from toolchain.models.loading import LoadedModel

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16,
                                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=VOCAB)).eval()
    return LoadedModel(model=model, tokenizer=None, adapter=adapter_for(model), source={})


@pytest.mark.parametrize("dense,sparsity,kv_heads,heads", [((8, 2), "0.3", 2, 4), ((4, 2), "0.5", 1, 2)])
def test_gqa_ratio_stays_legal(tmp_path, dense, sparsity, kv_heads, heads):
    """Query heads go in equal numbers from every KV group (8 on 2 -> 4 on 2), or whole groups go (4 on 2 -> 2 on
    1); the reloaded model computes what the pipeline's did."""
    loaded = _gqa_llama(*dense)
    report = prune_loaded(loaded, random_ids(8, 32), PruneConfig(structured=True, sparsity=sparsity, **CALIB),
                          device="cpu", progress=False)
    config = loaded.model.config
    assert (config.num_key_value_heads, config.num_attention_heads) == (kv_heads, heads)
    assert report["widths"]["attention_heads"] == heads
    for layer in loaded.model.model.layers:
        attn = layer.self_attn
        assert attn.q_proj.out_features == heads * 16 and attn.k_proj.out_features == kv_heads * 16
        assert attn.num_key_value_groups == heads // kv_heads
    ids = random_ids(2, 16, seed=3)
    save_model(loaded, tmp_path / "out")
    with torch.no_grad():
        ours = loaded.model(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()(ids).logits
    assert _rel_diff(theirs, ours) <= 1e-5


def _down_proj_inputs(loaded, ids):
    """The inputs of layer 0's down_proj on `ids`, [tokens, channels]."""
    seen = []
    layer = loaded.model.model.layers[0]
    handle = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, m.in_features)))
    with torch.no_grad():
        loaded.model(ids)
    handle.remove()
    return torch.cat(seen).double()


def test_obs_saliency_is_the_refit_error_and_refit_lowers_layer_error():
    loaded = tiny_loaded("llama")
    kind = adapter_for(loaded.model).structured_units(loaded.model.model.layers[0], loaded.model.config, 8)[-1]
    x = _down_proj_inputs(loaded, random_ids(8, 32))
    stats = InputStats(x.shape[1], hessian=True)
    stats.add_batch(x.float())
    layer = loaded.model.model.layers[0]
    method = ObsRefit()
    weight, hessian, h_inv = method._prepare(kind, layer, stats)

    # The saliency of a unit is exactly the (damped) error of the best refit without it.
    unit = 3
    keep = torch.tensor([u for u in range(kind.count) if u != unit])
    cols = kind.rows(kind.consumer, keep)
    refit = least_squares_refit(weight, hessian, cols)
    full = torch.zeros_like(weight)
    full[:, cols] = refit
    error = 0.5 * torch.trace((weight - full) @ hessian @ (weight - full).T)
    saliency = obs_saliency(weight, h_inv, kind.rows(kind.consumer, torch.arange(kind.count)).reshape(kind.count, -1))
    assert float(saliency[unit]) == pytest.approx(float(error), rel=1e-8)

    # On the calibration inputs, the refit consumer reproduces the dense output far better than the same kept
    # columns left as they were.
    removal = method.remove(kind, layer, stats, 6)
    kept_cols = kind.rows(kind.consumer, removal.keep)
    target = x @ weight.T
    err_refit = (x[:, kept_cols] @ removal.consumer_weight.double().T - target).square().sum()
    err_plain = (x[:, kept_cols] @ weight[:, kept_cols].T - target).square().sum()
    assert err_refit < 0.7 * err_plain


def test_taylor_importance_is_the_first_order_loss_change_of_each_dependency_group():
    """A KV group's score is sum |w * dL/dw| over its key/value rows, the rows of every query head reading it and
    those heads' o_proj columns (GQA: 8 query heads on 2 KV heads, 4 per group), with dL/dw the gradient of the
    mean next-token loss over the windows; the scores follow the layer as it shrinks."""
    from toolchain.prune.structured.taylor import TaylorSP

    loaded = _gqa_llama()
    model, ids = loaded.model, random_ids(6, 16)
    layer = model.model.layers[1]
    attn = layer.self_attn
    model.zero_grad()
    with torch.enable_grad():
        model(ids, labels=ids).loss.backward()
    expected = []
    for g in range(2):
        q_rows = slice(g * 4 * 16, (g + 1) * 4 * 16)
        kv_rows = slice(g * 16, (g + 1) * 16)
        total = sum(float((lin.weight.detach() * lin.weight.grad).abs()[rows].sum())
                    for lin, rows in ((attn.q_proj, q_rows), (attn.k_proj, kv_rows), (attn.v_proj, kv_rows)))
        expected.append(total + float((attn.o_proj.weight.detach() * attn.o_proj.weight.grad).abs()[:, q_rows].sum()))
    model.zero_grad(set_to_none=True)

    method = TaylorSP()
    method.prepare(model, loaded.adapter.decoder_layers(model), ids, batch_size=4)   # two batches: mean of both
    assert all(p.grad is None for p in model.parameters())
    kinds = {k.name: k for k in loaded.adapter.structured_units(layer, model.config, 8)}
    scores = method.importance(kinds["kv_group"], layer, None)
    assert scores.tolist() == pytest.approx(expected, rel=1e-4)
    channels = method.importance(kinds["channels"], layer, None)
    mlp = {name: s for name, s in method._salience[id(layer)].items() if name.startswith("mlp.")}
    assert sorted(mlp) == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]
    assert float(channels.sum()) == pytest.approx(sum(float(s.sum()) for s in mlp.values()), rel=1e-5)

    removal = method.remove(kinds["kv_group"], layer, None, 1)
    assert removal.removed.tolist() == [int(torch.tensor(expected).argmin())]
    salience = method._salience[id(layer)]
    assert salience["self_attn.q_proj"].shape == (4 * 16, 64) and salience["self_attn.o_proj"].shape == (64, 4 * 16)


def test_global_allocation_records_ranking_and_meets_budget():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded, report = _prune("llama", method="flap", allocation="global", layers=3)
    ranked = report["allocation_info"]["global_ranking"]
    assert len(ranked) == 3 and all(set(r) == {"kv_group", "channels"} for r in ranked)   # query heads: not ranked
    if any(r != ranked[0] for r in ranked):     # different per-layer widths: collapsed, with a warning
        assert report["allocation_info"]["native_per_layer_widths"] is False
        assert any("per_layer_config" in str(w.message) for w in caught)
    params = report["decoder_params"]
    assert abs(params["removed_fraction"] - 0.3) * params["before"] <= 3 * params["unit_params"]["channels"]


def test_llama_family_has_no_native_per_layer_widths_in_installed_transformers():
    loaded = tiny_loaded("llama")
    assert native_per_layer_widths(loaded.model, {"intermediate_size": 64}) is False


@pytest.mark.parametrize("sparsity,match", [("0.99", "cannot be met"), ("1.5", r"\(0, 1\)"), ("0", r"\(0, 1\)"),
                                            ("2:4", "fraction of decoder parameters"),
                                            ("0.001", "nothing would be removed")])
def test_impossible_budgets_are_refused(sparsity, match):
    with pytest.raises(ConfigError, match=match):
        _prune("llama", sparsity=sparsity)


@pytest.mark.parametrize("argv,match", [
    (["--method", "wanda", "--structured"], "prunes single weights"),
    (["--method", "flap"], "add --structured"),
    (["--method", "wanda", "--channel-multiple", "16"], "--channel-multiple has no effect"),
    (["--structured", "--allocation", "owl"], "unstructured pruning"),
    (["--method", "wanda", "--allocation", "global"], "for --structured"),
    (["--structured", "--resolve", "lstsq"], "unstructured pruning only"),
    (["--structured", "--channel-multiple", "48"], "does not divide"),
])
def test_cli_refuses_what_structured_pruning_cannot_do(tmp_path, tiny_llama_dir, capsys, argv, match):
    status = main(["prune", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "o"), "--sparsity", "0.3",
                   "--quiet", *argv])
    assert status == 2 and match in capsys.readouterr().err


def test_flap_refuses_a_family_without_a_consumer_bias():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from toolchain.models.loading import LoadedModel

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)).eval()
    loaded = LoadedModel(model=model, tokenizer=None, adapter=adapter_for(model), source={})
    cfg = PruneConfig(method="flap", structured=True, sparsity="0.3", **CALIB)
    with pytest.raises(ConfigError, match="no config switch"):
        prune_loaded(loaded, random_ids(8, 32), cfg, device="cpu", progress=False)


def test_structured_magnitude_needs_no_calibration():
    assert not PruneConfig(method="magnitude", structured=True, sparsity="0.3").calibrates()
    assert PruneConfig(structured=True, sparsity="0.3").structured_method() == "obs-refit"


def test_gptq_on_a_structured_model(tmp_path, tiny_llama_dir):
    pruned = tmp_path / "pruned"
    run_prune(str(tiny_llama_dir), pruned, PruneConfig(structured=True, sparsity="0.3", **CALIB), progress=False)
    quant = tmp_path / "quant"
    report = run_quantize(str(pruned), quant, QuantConfig(method="gptq", bits=4, group_size=16, **CALIB),
                          progress=False)
    model = AutoModelForCausalLM.from_pretrained(quant, dtype=torch.float32).eval()
    assert model.config.intermediate_size == json.loads((pruned / "compression.json").read_text())["widths"]["mlp_channels"]
    state = read_quant_state(quant / "quant_state.safetensors")
    for name in ("model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj"):
        linear = model.get_submodule(name)
        # the codes have the smaller model's shapes, and the float model holds exactly their dequantized weights
        assert state[name].codes.shape == linear.weight.shape
        assert torch.equal(state[name].dequantize(), linear.weight)
    assert model.model.layers[0].mlp.down_proj.in_features == model.config.intermediate_size
    assert report["quantization"]["avg_bits"] == pytest.approx(4.0)
    with torch.no_grad():
        assert torch.isfinite(model(random_ids(1, 16)).logits).all()


def test_onnx_of_a_structured_model_matches_pytorch(tmp_path, tokenizer):
    """The exporter reads the smaller widths (4 query heads on 2 KV heads, FLAP's biases) from the config."""
    from toolchain.jobs.config import ExportConfig
    from toolchain.jobs.export import run_export
    from toolchain.jobs.inspect import run_onnx_check

    src = tmp_path / "src"
    _gqa_llama().model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    run_prune(str(src), tmp_path / "s", PruneConfig(method="flap", structured=True, sparsity="0.3", **CALIB),
              progress=False)
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["attention_bias"]) == (4, 2, True)
    run_export(str(tmp_path / "s"), tmp_path / "x", ExportConfig(target="onnx"))
    result = run_onnx_check(str(tmp_path / "s"), str(next((tmp_path / "x" / "onnx").glob("*.onnx"))), tokens=16,
                            new_tokens=4)
    assert result["ok"] and result["relative_diff"] < 1e-5


def test_a_family_without_structured_units_is_refused_with_a_clear_error():
    from types import SimpleNamespace

    from toolchain.errors import ConfigError
    from toolchain.models.base import ArchAdapter

    other = SimpleNamespace(family="gpt2")
    with pytest.raises(ConfigError, match="supports the llama and opt families, not gpt2"):
        ArchAdapter.structured_units(other, None, None, 8)
    with pytest.raises(ConfigError, match="not gpt2"):
        ArchAdapter.structured_config(other, None, {}, set())
