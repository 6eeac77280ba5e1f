"""The whole model under the accelerator's arithmetic (`toolchain fpga-eval`): the evaluator against the per-layer
golden model on every layer, its perplexity against the float model, and the Verilator cross-check of layers
captured inside the run (one Verilator build: the cross-checked layers share a shape)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from toolchain.fpga.config import load_config
from toolchain.fpga.layers import for_design, read_layer
from toolchain.sim.golden import layer_outputs, quantize_activations

SAME_SHAPE = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj"]


@pytest.fixture(scope="module")
def bundle(compressed_dir, tmp_path_factory):
    from toolchain.fpga.bundle import write_bundle

    out = tmp_path_factory.mktemp("fpga-eval") / "bundle"
    write_bundle(compressed_dir("llama", "2:4", "4"), out, synth=False)
    return out


def _contract_model(bundle, **kw):
    from toolchain.models import load_model
    from toolchain.sim.contract_model import install_contract

    report = json.loads((bundle / "report.json").read_text())
    loaded = load_model(report["source"])
    return loaded, install_contract(loaded.model, bundle, load_config(bundle / "accel.json"), **kw)


def test_evaluator_equals_the_golden_model_on_every_layer(bundle):
    """Every accelerated linear of the decoder, fed the contract model's own activations: its integer outputs
    are the per-layer golden model's (numpy, from the blob), and its float output is those times the token's
    activation scale plus the host's bias."""
    from toolchain.export.blob import read_blob

    cfg = load_config(bundle / "accel.json")
    loaded, installed = _contract_model(bundle)
    assert len(installed) == 14
    outputs = {}
    for name, module in installed.items():
        module.capture = 24
        module.register_forward_hook(lambda m, args, y, name=name: outputs.__setitem__(name, y[0].double().numpy()))
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        loaded.model(input_ids=ids)
    w = cfg.widths
    with read_blob(bundle / "model.tcblob") as blob:
        for name, module in installed.items():
            got = module.captured
            layer = for_design(read_layer(blob, name), cfg)
            acts, scale = quantize_activations(got["x"], cfg.act_bits)
            golden = layer_outputs(layer.dense_codes(), layer.scales_fixed, layer.shift, acts, layer.group_size,
                                   w.gacc, w.total, cfg.out_bits)
            assert np.array_equal(got["acts"], acts) and np.array_equal(got["out"], golden), name
            assert np.count_nonzero(golden) > golden.size // 2                  # real outputs, not zeros
            expected = golden * scale[:, None]
            assert np.allclose(outputs[name], expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max()), name
    assert sum(m.saturated for m in installed.values()) == 0


def test_wrong_model_is_refused(bundle, tiny_llama_dir):
    from toolchain.errors import ConfigError
    from toolchain.models import load_model
    from toolchain.sim.contract_model import install_contract

    dense = load_model(str(tiny_llama_dir))
    with pytest.raises(ConfigError, match="not the model the bundle was exported from"):
        install_contract(dense.model, bundle, load_config(bundle / "accel.json"))


def test_perplexity_close_to_float_and_wider_activations_closer(bundle):
    """Under the contract the perplexity moves a little from the float quantized model's, not zero; with 16-bit
    activations (the what-if) the logits are closer to the float model's than with the design's 8 bits."""
    from toolchain.data import eval_windows, get_corpus, tokenize
    from toolchain.evaluate import perplexity
    from toolchain.models import load_model

    report = json.loads((bundle / "report.json").read_text())
    float_model = load_model(report["source"])
    windows = eval_windows(tokenize(float_model.tokenizer, get_corpus("pydoc").eval_text), 64, 8)
    base = perplexity(float_model.model, windows, progress=False)
    with torch.no_grad():
        ref = float_model.model(windows[:2]).logits
    errors = []
    for overrides in (None, {"all": 16}):
        loaded, _ = _contract_model(bundle, act_bits=overrides)
        ppl = perplexity(loaded.model, windows, progress=False)
        assert ppl != base and abs(ppl / base - 1) < 0.05, (ppl, base)
        with torch.no_grad():
            errors.append(float((loaded.model(windows[:2]).logits - ref).abs().mean()))
    assert errors[1] < errors[0] / 4, errors


def test_fpga_eval_command_cross_checks_the_rtl_and_writes_the_report(bundle, capsys):
    from toolchain.cli import main

    args = ["fpga-eval", str(bundle), "--datasets", "pydoc,wiki", "--seqlen", "64", "--max-windows", "2",
            "--new-tokens", "4", "--rtl-tokens", "3", "--quiet"]
    assert main([*args, *(f"--rtl-layer={n}" for n in SAME_SHAPE)]) == 0
    text = capsys.readouterr().out
    assert f"RTL cross-check {SAME_SHAPE[0]} (3 tokens x 64 rows): bit-exact" in text
    result = json.loads((bundle / "model_eval.json").read_text())
    assert set(result["runs"]) == {"float", "contract", "dense"} and set(result["perplexity"]) == {"pydoc", "wiki"}
    assert result["runs"]["contract"]["tokens"]["pydoc"] == 128
    for check in result["rtl_cross_check"]["layers"]:
        assert check["bit_exact"] and check["rtl_outputs"] == 3 * 64 and check["evaluator_vs_golden_mismatches"] == 0
    assert len(result["runs"]["contract"]["generation"]["tokens"]) == 4
    report = json.loads((bundle / "report.json").read_text())
    assert report["model_eval"]["perplexity"] == result["perplexity"]
    md = (bundle / "report.md").read_text()
    assert "## The whole model under the contract" in md and "| pydoc | 128 |" in md
    assert main(["fpga-eval", str(bundle), "--rtl-layer", "nope", "--no-dense"]) == 2
    assert "--rtl-layer nope" in capsys.readouterr().err


def test_a_wrong_rounding_in_the_evaluator_is_caught_by_the_cross_check(bundle):
    """An evaluator that truncates instead of rounding half up: its outputs differ from the golden model's (the
    RTL still agrees with the golden model), so the run is not bit-exact, and its perplexity moves."""
    from toolchain.sim.model_eval import model_eval

    kw = dict(datasets=("pydoc",), seqlen=64, max_windows=2, new_tokens=0, rtl_layers=SAME_SHAPE[:1], rtl_tokens=3,
              skip_dense=True, write=False, progress=False)
    wrong = model_eval(bundle, rounding="truncate", **kw)
    check = wrong["rtl_cross_check"]["layers"][0]
    assert check["evaluator_vs_golden_mismatches"] > 0 and check["rtl_vs_golden_mismatches"] == 0
    assert wrong["rtl_cross_check"]["bit_exact"] is False
    right = model_eval(bundle, rtl=False, **kw)
    assert right["perplexity"]["pydoc"]["contract"] != wrong["perplexity"]["pydoc"]["contract"]


def test_rtl_sample_and_act_bits_parsing(bundle):
    from toolchain.errors import ConfigError
    from toolchain.jobs.inspect import parse_act_bits
    from toolchain.sim.contract_model import act_bits_for
    from toolchain.sim.model_eval import rtl_sample

    picked = rtl_sample(bundle, 0)
    assert len(picked) == 2 and "self_attn" in picked[0] and ".mlp." in picked[1]
    assert {tuple(rtl_sample(bundle, s)) for s in range(6)} != {tuple(picked)}       # the seed draws
    assert parse_act_bits("down_proj=16, o_proj=12") == {"down_proj": 16, "o_proj": 12}
    assert act_bits_for("model.layers.3.mlp.down_proj", {"down_proj": 16}) == 16
    assert act_bits_for("model.layers.3.mlp.up_proj", {"down_proj": 16}) is None
    with pytest.raises(ConfigError, match="NAME=BITS"):
        parse_act_bits("down_proj")


def test_a_wider_activation_what_if_widens_the_output_instead_of_saturating(bundle):
    """With 16-bit activations the integer outputs are 2^8 times larger; the what-if widens the output with them,
    so an input whose 16-bit outputs pass the design's out_bits still gives the float product."""
    from toolchain.export.blob import read_blob
    from toolchain.sim.contract_model import ContractLinear

    from dataclasses import replace

    cfg = replace(load_config(bundle / "accel.json"), out_bits=12)   # a narrow output the tiny weights can pass
    with read_blob(bundle / "model.tcblob") as blob:
        layer = for_design(read_layer(blob, SAME_SHAPE[0]), cfg)
        weight = torch.from_numpy(blob.dequantized(SAME_SHAPE[0]).astype(np.float64))
    wide = ContractLinear(layer, cfg, act_bits=16)
    assert wide.out_bits == cfg.out_bits + 16 - cfg.act_bits
    x = torch.sign(weight[0]).unsqueeze(0) * 4   # row 0's output as large as this input range makes it
    reference = float(weight[0] @ x[0])
    _, scale, out = wide.integer_outputs(x.numpy())
    assert abs(out[0, 0]) > 2 ** (cfg.out_bits - 1)            # past the design's own output range
    assert abs(out[0, 0] * scale[0] - reference) < 1e-3 * abs(reference)
    _, _, narrow = ContractLinear(layer, cfg).integer_outputs(x.numpy())
    assert abs(narrow[0, 0]) < 2 ** (cfg.out_bits - 1)          # the design's own 8-bit outputs fit
