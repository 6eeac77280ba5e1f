"""Depth pruning (`prune --structured --method depth`): whole decoder layers go, ranked by Block Influence; the
output is the same model with fewer layers, which stock transformers loads, and quantize and ONNX take it."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import VOCAB, random_ids, tiny_loaded
from toolchain.cli import main
from toolchain.engine import LayerEngine
from toolchain.errors import ConfigError
from toolchain.jobs.config import PruneConfig, QuantConfig
from toolchain.jobs.prune import prune_loaded, run_prune
from toolchain.jobs.quantize import run_quantize
from toolchain.models import adapter_for, save_model
from toolchain.models.loading import LoadedModel
from toolchain.prune.structured.depth import block_influence, layers_to_remove
from toolchain.quant.state import read_quant_state

CALIB = dict(calib_samples=8, seqlen=32, seed=0)


def _gqa_llama(layers: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                         head_dim=16, num_attention_heads=8, num_key_value_heads=2,
                                         vocab_size=VOCAB, max_position_embeddings=256)).eval()
    return LoadedModel(model=model, tokenizer=None, adapter=adapter_for(model), source={})


def _sliding_qwen2(layers: int = 4):
    """Qwen2 whose layers from max_window_layers (2) on attend within a window of 4 tokens."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                         max_position_embeddings=256, use_sliding_window=True, sliding_window=4,
                                         max_window_layers=2)).eval()
    return LoadedModel(model=model, tokenizer=None, adapter=adapter_for(model), source={})


def _loaded(family: str, layers: int = 4) -> LoadedModel:
    if family == "llama":
        return _gqa_llama(layers)
    if family == "qwen2-sliding":
        return _sliding_qwen2(layers)
    return tiny_loaded(family, layers=layers)


@torch.no_grad()
def _make_identity(loaded: LoadedModel, index: int) -> None:
    """Zero the layer's attention output and MLP output projections (weights and biases): both branches add
    nothing to the residual stream, so the (pre-norm) layer is the identity."""
    layer = loaded.adapter.decoder_layers(loaded.model)[index]
    out_proj, down = loaded.adapter.layout.qkvo[3], loaded.adapter.layout.mlp[-1]
    for name in (out_proj, down):
        linear = layer.get_submodule(name)
        linear.weight.zero_()
        if linear.bias is not None:
            linear.bias.zero_()


def _depth(loaded, sparsity, rescore=False, calib=None):
    cfg = PruneConfig(method="depth", structured=True, sparsity=sparsity, rescore=rescore, **CALIB)
    return prune_loaded(loaded, random_ids(8, 32) if calib is None else calib, cfg, device="cpu", progress=False)


def _rel_diff(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family", ["llama", "opt", "qwen2"])
def test_block_influence_is_one_minus_the_mean_token_cosine_of_each_layers_input_and_output(family):
    loaded = _loaded(family)
    ids = random_ids(6, 16, seed=2)
    scores = block_influence(LayerEngine(loaded.model, loaded.adapter, ids, 4, "cpu"), progress=False)
    states = []
    layers = loaded.adapter.decoder_layers(loaded.model)
    hooks = [layer.register_forward_hook(lambda m, a, out: states.append(out[0] if isinstance(out, tuple) else out))
             for layer in layers]
    hooks.append(layers[0].register_forward_pre_hook(lambda m, a, kw: states.insert(0, kw.get("hidden_states",
                                                                                               a[0] if a else None)),
                                                     with_kwargs=True))
    with torch.no_grad():
        loaded.model(ids)
    for h in hooks:
        h.remove()
    assert len(states) == len(layers) + 1
    for i, score in enumerate(scores):
        cos = torch.nn.functional.cosine_similarity(states[i].double(), states[i + 1].double(), dim=-1)
        assert score == pytest.approx(float(1 - cos.mean()), rel=1e-6, abs=1e-9)
    assert all(0 < s < 2 for s in scores)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_an_identity_layer_is_removed_first_and_the_logits_do_not_change(family):
    loaded = _loaded(family)
    _make_identity(loaded, 2)
    ids = random_ids(2, 24, seed=5)
    with torch.no_grad():
        dense = loaded.model(ids).logits
    report = _depth(loaded, "0.25")
    depth = report["depth"]
    assert depth["removed_layers"] == [2] and depth["kept_layers"] == [0, 1, 3]
    assert depth["block_influence"][2] == pytest.approx(0.0, abs=1e-9)
    assert min(s for i, s in enumerate(depth["block_influence"]) if i != 2) > 1e-3
    assert loaded.model.config.num_hidden_layers == 3 and len(loaded.adapter.decoder_layers(loaded.model)) == 3
    with torch.no_grad():
        pruned = loaded.model(ids).logits
    assert _rel_diff(pruned, dense) <= 1e-5


@pytest.mark.parametrize("family", ["llama", "opt", "qwen2-sliding"])
def test_depth_pruned_model_loads_with_equal_logits_and_a_working_cache(tmp_path, family):
    loaded = _loaded(family)
    _make_identity(loaded, 1)
    report = _depth(loaded, "0.25")
    assert report["depth"]["removed_layers"] == [1]
    ids = random_ids(2, 20, seed=7)
    model = loaded.model
    for index, layer in enumerate(loaded.adapter.decoder_layers(model)):
        assert all(m.layer_idx == index for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int))
    with torch.no_grad():
        ours = model(ids).logits
        # the KV cache is indexed by the renumbered layers: decoding token by token gives the full pass's logits
        cache, steps = model(ids[:, :12], use_cache=True).cache, []
        for t in range(12, 20):
            step = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = step.cache
            steps.append(step.logits)
    assert _rel_diff(torch.cat(steps, dim=1), ours[:, 12:]) <= 1e-4
    save_model(loaded, tmp_path / "out", extra_json={"compression.json": report})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 3
    with torch.no_grad():
        theirs = reloaded(ids).logits
    assert _rel_diff(theirs, ours) <= 1e-5
    recorded = json.loads((tmp_path / "out" / "compression.json").read_text())
    params = recorded["decoder_params"]
    assert params["after"] == sum(p.numel() for p in adapter_for(reloaded).decoder_layers(reloaded).parameters())
    assert params["before"] == sum(params["layer_params"]) and params["after"] == 3 * params["layer_params"][0]
    assert [e["removed"] for e in recorded["layers"]] == [False, True, False, False]


def test_qwen2_sliding_window_layers_keep_their_type():
    """Layers 2 and 3 slide (max_window_layers 2); removing layer 1 leaves full, sliding, sliding, which the
    cut layer_types and the moved threshold (1) both say."""
    loaded = _sliding_qwen2()
    assert loaded.model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    _make_identity(loaded, 1)
    _depth(loaded, "0.25")
    config = loaded.model.config
    assert config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert config.max_window_layers == 1
    rebuilt = type(config).from_dict({**config.to_dict(), "layer_types": None})
    assert rebuilt.layer_types == config.layer_types


@pytest.mark.parametrize("layers,sparsity,removed", [(5, "0.2", 1), (5, "0.45", 2), (5, "0.55", 3), (4, "0.3", 1),
                                                     (4, "0.4", 2), (2, "0.5", 1)])
@pytest.mark.parametrize("rescore", [False, True])
def test_budget_is_met_to_within_one_layer(layers, sparsity, removed, rescore):
    loaded = _loaded("llama", layers)
    report = _depth(loaded, sparsity, rescore=rescore)
    params = report["decoder_params"]
    layer = params["layer_params"][0]
    assert len(report["depth"]["removed_layers"]) == removed
    assert abs(params["removed_fraction"] - float(sparsity)) * params["before"] <= layer / 2 + 1e-6
    assert params["before"] - params["after"] == removed * layer
    assert loaded.model.config.num_hidden_layers == layers - removed
    assert len(report["depth"].get("rescored", [])) == (removed - 1 if rescore else 0)
    if not rescore:   # one-shot: the lowest dense scores go
        scores = report["depth"]["block_influence"]
        assert max(scores[i] for i in report["depth"]["removed_layers"]) <= \
            min(scores[i] for i in report["depth"]["kept_layers"])


def test_layers_to_remove_takes_the_lowest_scores():
    assert layers_to_remove([0.3, 0.1, 0.5, 0.2, 0.4], [10] * 5, 0.4) == [1, 3]


@pytest.mark.parametrize("sparsity,match", [("0.9", "every decoder layer"), ("0.2", "below half a decoder layer"),
                                            ("1.5", r"\(0, 1\)"), ("0", r"\(0, 1\)"),
                                            ("2:4", "fraction of decoder parameters")])
def test_impossible_budgets_are_refused(sparsity, match):
    with pytest.raises(ConfigError, match=match):
        _depth(_loaded("llama", 2), sparsity)


def test_rescoring_scores_the_model_as_it_is_after_each_removal():
    """Removing an identity layer changes no residual stream, so the re-scored layers keep their dense scores;
    the next removal is the lowest of those."""
    loaded = _loaded("llama", 5)
    _make_identity(loaded, 3)
    report = _depth(loaded, "0.4", rescore=True)
    depth = report["depth"]
    dense = depth["block_influence"]
    assert depth["removed_layers"][0] == 3 and len(depth["removed_layers"]) == 2
    (rescored,) = depth["rescored"]
    assert set(rescored) == {"0", "1", "2", "4"}
    for layer, score in rescored.items():
        assert score == pytest.approx(dense[int(layer)], abs=2e-6)
    assert depth["removed_layers"][1] == min((s, int(i)) for i, s in rescored.items())[1]
    assert loaded.model.config.num_hidden_layers == 3


@pytest.mark.parametrize("argv,match", [
    (["--structured", "--method", "depth", "--allocation", "global"], "takes no --allocation"),
    (["--structured", "--method", "depth", "--channel-multiple", "16"], "--channel-multiple has no effect"),
    (["--structured", "--rescore"], "--rescore has no effect"),
    (["--method", "depth"], "add --structured"),
])
def test_cli_refuses_what_depth_pruning_cannot_do(tmp_path, tiny_llama_dir, capsys, argv, match):
    status = main(["prune", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "o"), "--sparsity", "0.5",
                   "--quiet", *argv])
    assert status == 2 and match in capsys.readouterr().err


@pytest.fixture(scope="module")
def depth_dir(tmp_path_factory, tokenizer):
    """A 4-layer GQA Llama, depth-pruned by the CLI to 3 layers."""
    root = tmp_path_factory.mktemp("depth")
    _gqa_llama(4).model.save_pretrained(root / "src")
    tokenizer.save_pretrained(root / "src")
    status = main(["prune", "--model", str(root / "src"), "--out", str(root / "pruned"), "--structured",
                   "--method", "depth", "--sparsity", "0.25", "--calib-samples", "8", "--seqlen", "32", "--quiet"])
    assert status == 0
    return root / "pruned"


def test_gptq_on_a_depth_pruned_model(tmp_path, depth_dir):
    report = run_quantize(str(depth_dir), tmp_path / "q", QuantConfig(method="gptq", bits=4, group_size=16, **CALIB),
                          progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 3
    state = read_quant_state(tmp_path / "q" / "quant_state.safetensors")
    assert {name.split(".")[2] for name in state} == {"0", "1", "2"}
    for name in ("model.layers.2.mlp.down_proj", "model.layers.2.self_attn.o_proj"):
        assert torch.equal(state[name].dequantize(), model.get_submodule(name).weight)
    assert report["quantization"]["avg_bits"] == pytest.approx(4.0)


def test_onnx_of_a_depth_pruned_model_matches_pytorch(tmp_path, depth_dir):
    from toolchain.jobs.config import ExportConfig
    from toolchain.jobs.export import run_export
    from toolchain.jobs.inspect import run_onnx_check

    run_export(str(depth_dir), tmp_path / "x", ExportConfig(target="onnx"))
    result = run_onnx_check(str(depth_dir), str(next((tmp_path / "x" / "onnx").glob("*.onnx"))), tokens=16,
                            new_tokens=4)
    assert result["ok"] and result["relative_diff"] < 1e-5


def test_channels_can_be_removed_from_a_depth_pruned_model(tmp_path, depth_dir):
    """Depth and width compose as two runs: the layers left have one shape, so a width method takes them."""
    report = run_prune(str(depth_dir), tmp_path / "w", PruneConfig(structured=True, sparsity="0.3", **CALIB),
                       progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "w", dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 3 and len(report["layers"]) == 3
    assert model.config.intermediate_size == report["widths"]["mlp_channels"] < 128
    with torch.no_grad():
        assert torch.isfinite(model(random_ids(1, 16)).logits).all()


def test_structured_bench_runs_and_measures_depth_rows(depth_dir):
    from toolchain.bench.structured import decoder_cycles, decoder_params, structured_runs

    assert [(r[1], r[2], r[3]) for r in structured_runs(["depth@0.2", "depth rescore@0.3"])] == \
        [("depth", [], "0.2"), ("depth", ["--rescore"], "0.3")]
    src = depth_dir.parent / "src"
    report = json.loads((depth_dir / "compression.json").read_text())
    assert decoder_params(depth_dir) == report["decoder_params"]["after"] == 3 * decoder_params(src) // 4
    assert 4 * decoder_cycles(depth_dir) == 3 * decoder_cycles(src)   # one of four equal layers is gone


# --- --depth-share: layers first, then a width method on the shortened model ------------------------------------


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_depth_share_removes_the_lowest_influence_layer_then_narrows_the_rest_to_the_budget(family):
    """With one layer made the identity, a depth share removes exactly that layer; the width method then
    removes the rest of the budget from the kept layers, and the total meets --sparsity to within one unit."""
    loaded = _loaded(family, layers=4)
    _make_identity(loaded, 2)
    before = sum(p.numel() for layer in loaded.adapter.decoder_layers(loaded.model) for p in layer.parameters())
    cfg = PruneConfig(structured=True, sparsity="0.4", depth_share=0.5, **CALIB)
    report = prune_loaded(loaded, random_ids(8, 32), cfg, device="cpu", progress=False)
    assert report["depth"]["removed_layers"] == [2] and report["depth_share"] == 0.5
    assert loaded.model.config.num_hidden_layers == 3 == report["widths"]["num_hidden_layers"]
    after = sum(p.numel() for layer in loaded.adapter.decoder_layers(loaded.model) for p in layer.parameters())
    assert report["decoder_params"]["before"] == before and report["decoder_params"]["after"] == after
    # a quarter of the decoder went with the layer; the width method took the rest of the 40% from the others
    assert report["depth"]["removed_fraction"] == pytest.approx(0.25)
    assert report["depth"]["width_sparsity_of_kept_layers"] == pytest.approx((0.4 - 0.25) / 0.75)
    unit = max(report["decoder_params"]["unit_params"].values()) * 3
    assert abs((before - after) - 0.4 * before) <= unit
    assert report["decoder_params"]["removed_fraction"] == pytest.approx(1 - after / before)


def test_depth_share_output_loads_and_matches_the_pipeline(tmp_path):
    loaded = _gqa_llama(layers=4)
    cfg = PruneConfig(structured=True, sparsity="0.35", depth_share=0.5, **CALIB)
    prune_loaded(loaded, random_ids(8, 32), cfg, device="cpu", progress=False)
    save_model(loaded, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = random_ids(2, 16)
    with torch.no_grad():
        assert _rel_diff(reloaded(ids).logits, loaded.model(ids).logits) <= 1e-5
    assert reloaded.config.num_hidden_layers == 3


@pytest.mark.parametrize("sparsity, share, match", [
    ("0.3", 1.0, "in \\[0, 1\\)"), ("0.3", -0.1, "in \\[0, 1\\)"), ("0.3", 0.05, "no layer would go"),
    ("0.25", 0.99, "leaving the width method nothing")])   # 4 layers: one layer is 25%
def test_depth_share_refusals_name_the_problem(sparsity, share, match):
    loaded = _gqa_llama(layers=4)
    cfg = PruneConfig(structured=True, sparsity=sparsity, depth_share=share, **CALIB)
    with pytest.raises(ConfigError, match=match):
        prune_loaded(loaded, random_ids(8, 32), cfg, device="cpu", progress=False)


def test_depth_share_is_refused_with_method_depth(tmp_path, tiny_llama_dir, capsys):
    assert main(["prune", "--model", str(tiny_llama_dir), "--structured", "--method", "depth", "--sparsity", "0.3",
                 "--depth-share", "0.5", "--out", str(tmp_path / "o")]) != 0
    assert "--depth-share" in capsys.readouterr().err


def test_ours_takes_half_the_budget_as_layers_by_default_and_the_baselines_none():
    loaded = _gqa_llama(layers=4)
    report = prune_loaded(loaded, random_ids(8, 32), PruneConfig(structured=True, sparsity="0.4", **CALIB),
                          device="cpu", progress=False)
    assert report["method"] == "obs-refit" and report["depth_share"] == 0.5 and len(report["depth"]["removed_layers"]) == 1
    flap = prune_loaded(_gqa_llama(layers=4), random_ids(8, 32),
                        PruneConfig(structured=True, method="flap", sparsity="0.4", **CALIB), device="cpu", progress=False)
    assert flap["depth_share"] == 0.0 and "depth" not in flap and flap["widths"].get("num_hidden_layers") is None
    # half of 20% of two layers is less than half a layer: the default narrows only, and says why
    small = prune_loaded(_loaded("llama", layers=2), random_ids(8, 32), PruneConfig(structured=True, sparsity="0.2", **CALIB),
                         device="cpu", progress=False)
    assert small["depth_share"] == 0.0 and "no layer would go" in small["depth_share_skipped"]
    assert small["decoder_params"]["removed_fraction"] == pytest.approx(0.2, abs=0.05)
