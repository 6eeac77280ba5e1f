"""Quantizer core, RTN and GPTQ on synthetic layers; the quant_state file."""
from __future__ import annotations

import pytest
import torch

from toolchain.errors import ConfigError, ToolchainError
from toolchain.prune.masks import check_nm, nm_prune_mask
from toolchain.input_stats import InputStats
from toolchain.quant import QuantSpec, gptq_quantize, read_quant_state, rtn_quantize, write_quant_state


def _layer(rows=48, cols=96, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) * torch.logspace(0, -1.5, cols)[None, :]
    x = torch.randn(tokens, cols, generator=g) @ mix.T
    x[:, :3] *= 8
    stats = InputStats(cols, hessian=True)
    stats.add_batch(x)
    return torch.randn(rows, cols, generator=g), x, stats


SPECS = [QuantSpec(b, gs, sym) for b in (2, 3, 4, 8) for gs in (32, 40, -1) for sym in (True, False)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_codes_in_range_and_dequant_is_scale_times_code_minus_zero(spec, method):
    w, _, stats = _layer()
    qw = rtn_quantize(w, spec) if method == "rtn" else gptq_quantize(w, stats.hessian, spec)
    assert qw.codes.min() >= spec.qmin and qw.codes.max() <= spec.qmax
    groups = spec.groups(w.shape[1])
    assert qw.scales.shape == (w.shape[0], len(groups))
    if spec.group_size == 40:
        assert groups[-1] == (80, 96)  # a shorter last group, as 576 = 4 x 128 + 64 needs
    assert torch.equal(qw.scales, qw.scales.half().float())  # fp16-exact scales
    deq = qw.dequantize()
    for gi, (a, b) in enumerate(groups):
        expected = qw.scales[:, gi:gi + 1] * (qw.codes[:, a:b] - qw.zeros[:, gi:gi + 1]).float()
        assert torch.equal(deq[:, a:b], expected)
    if spec.symmetric:
        assert (qw.zeros == 0).all()
    if method == "rtn":
        # Round to nearest: half a step inside the grid; up to one step where the range end clips (the
        # symmetric grid stops one level short of +absmax, the asymmetric one has a rounded zero point).
        step = qw.scales.repeat_interleave(torch.tensor([b - a for a, b in groups]), dim=1)
        inside = (qw.codes > spec.qmin) & (qw.codes < spec.qmax)
        assert ((deq - w).abs()[inside] <= 0.5 * step[inside] + 1e-6).all()
        assert ((deq - w).abs() <= step + 1e-6).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_layer_error_below_rtn(bits, sym):
    w, x, stats = _layer()
    spec = QuantSpec(bits, 32, sym)

    def err(qw):
        return float(((w - qw.dequantize()) @ x.T).square().sum())

    assert err(gptq_quantize(w, stats.hessian, spec)) < 0.9 * err(rtn_quantize(w, spec))


def test_gptq_act_order_static_groups_natural_order():
    w, x, stats = _layer()
    spec = QuantSpec(3, 32, True)
    plain = gptq_quantize(w, stats.hessian, spec, act_order=False)
    ordered = gptq_quantize(w, stats.hessian, spec, act_order=True)
    # Static groups: the scales are those of the original weights' groups, in natural column order.
    rtn = rtn_quantize(w, spec)
    assert torch.equal(ordered.scales, rtn.scales)
    e = lambda qw: float(((w - qw.dequantize()) @ x.T).square().sum())  # noqa: E731
    assert e(ordered) < e(rtn) and e(plain) < e(rtn)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("sym", [True, False])
def test_mask_preserved(method, sym):
    w, _, stats = _layer()
    mask = nm_prune_mask(w.abs(), 2, 4)
    w = w.masked_fill(mask, 0.0)
    spec = QuantSpec(4, 32, sym)
    qw = rtn_quantize(w, spec, mask) if method == "rtn" else gptq_quantize(w, stats.hessian, spec, mask)
    deq = qw.dequantize()
    assert (deq[mask] == 0).all()
    assert check_nm(deq == 0, 2, 4) or check_nm(mask, 2, 4)
    assert ((deq == 0) | ~mask).all()


@pytest.mark.parametrize("bits", [1, 5, 16, 0])
def test_unsupported_bits(bits):
    with pytest.raises(ConfigError, match="unsupported bit width"):
        QuantSpec(bits)


def test_bad_group_size_and_non_finite_weights():
    with pytest.raises(ConfigError, match="group-size"):
        QuantSpec(4, 0)
    w = torch.randn(4, 8)
    w[1, 2] = float("nan")
    with pytest.raises(ConfigError, match="non-finite"):
        QuantSpec(4, 8).check_weight("layer 0 q_proj", w)


@pytest.mark.parametrize("sym", [True, False])
def test_quant_state_round_trip(tmp_path, sym):
    w, _, stats = _layer()
    mask = nm_prune_mask(w.abs(), 2, 4)
    weights = {"model.layers.0.mlp.up_proj": gptq_quantize(w.masked_fill(mask, 0), stats.hessian,
                                                           QuantSpec(3, 40, sym), mask),
               "model.layers.0.mlp.down_proj": rtn_quantize(w, QuantSpec(8, -1, sym))}
    path = tmp_path / "quant_state.safetensors"
    write_quant_state(path, weights)
    back = read_quant_state(path)
    assert set(back) == set(weights)
    for name, qw in weights.items():
        r = back[name]
        assert r.spec == qw.spec
        assert torch.equal(r.codes, qw.codes) and torch.equal(r.scales, qw.scales) and torch.equal(r.zeros, qw.zeros)
        assert torch.equal(r.dequantize(), qw.dequantize())
        assert (r.prune_mask is None) == (qw.prune_mask is None or not qw.prune_mask.any())
        if r.prune_mask is not None:
            assert torch.equal(r.prune_mask, qw.prune_mask)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ToolchainError, match="cannot read quant state"):
        read_quant_state(tmp_path / "bad.safetensors")


def test_quant_state_packs_masks_eight_to_a_byte_and_reads_format_1(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    w = torch.randn(5, 13)                       # 13 columns: the last byte of each row is partly padding
    mask = torch.rand(5, 13) < 0.4
    qw = rtn_quantize(w.masked_fill(mask, 0), QuantSpec(4, -1, True), mask)
    path = tmp_path / "quant_state.safetensors"
    write_quant_state(path, {"layer": qw})
    stored = load_file(str(path))["layer.prune_mask"]
    assert stored.dtype == torch.uint8 and list(stored.shape) == [5, 2]
    assert int(stored[0, 0]) == sum(int(mask[0, j]) << j for j in range(8))     # least significant bit first
    assert torch.equal(read_quant_state(path)["layer"].prune_mask, mask)
    # a format-1 file (one byte per position) still reads, and a mask of the wrong shape is refused by name
    tensors = {"layer.codes": qw.codes.to(torch.int8), "layer.scales": qw.scales.half(),
               "layer.prune_mask": mask.to(torch.uint8)}
    meta = {"bits": 4, "group_size": -1, "symmetric": True, "shape": [5, 13], "groups": [[0, 13]]}
    save_file(tensors, str(tmp_path / "v1.safetensors"),
              metadata={"toolchain": json.dumps({"format": "toolchain.quant_state/1", "layers": {"layer": meta}})})
    assert torch.equal(read_quant_state(tmp_path / "v1.safetensors")["layer"].prune_mask, mask)
    save_file({**tensors, "layer.prune_mask": mask.to(torch.uint8)}, str(tmp_path / "bad.safetensors"),
              metadata={"toolchain": json.dumps({"format": "toolchain.quant_state/2", "layers": {"layer": meta}})})
    with pytest.raises(ToolchainError, match=r"layer.prune_mask has shape \[5, 13\], expected \[5, 2\]"):
        read_quant_state(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_cli_on_pruned_model_keeps_mask_and_state_matches_weights(tiny_dir, tmp_path, method):
    import json

    from transformers import AutoModelForCausalLM

    from toolchain.cli import main

    pruned, quant = tmp_path / "pruned", tmp_path / "quant"
    assert main(["prune", "--model", str(tiny_dir), "--method", "sparsegpt", "--sparsity", "2:4",
                 "--calib-samples", "4", "--seqlen", "64", "--out", str(pruned), "--quiet"]) == 0
    calib = ["--calib-samples", "4", "--seqlen", "64"] if method != "rtn" else []   # RTN reads no activations
    assert main(["quantize", "--model", str(pruned), "--method", method, "--bits", "3", "--group-size", "32",
                 *calib, "--out", str(quant), "--quiet"]) == 0
    model = AutoModelForCausalLM.from_pretrained(quant)
    params = dict(model.named_parameters())
    state = read_quant_state(quant / "quant_state.safetensors")
    assert state and all(qw.spec.bits == 3 for qw in state.values())
    for name, qw in state.items():
        w = params[f"{name}.weight"].detach()
        assert torch.equal(w, qw.dequantize()), name                     # weights == scale * (code - zero)
        # 2:4 survived: the recorded mask is 2:4 and every masked weight is exactly zero (a kept weight may
        # also round to zero; its slot stays a kept slot).
        assert qw.prune_mask is not None and check_nm(qw.prune_mask, 2, 4), name
        assert (w[qw.prune_mask] == 0).all(), name
    report = json.loads((quant / "compression.json").read_text())
    assert report["quantization"]["avg_bits"] == 3.0
    assert report["quantization"]["avg_bits_with_params"] > 3.0
    assert report["prune"]["method"] == "sparsegpt"


def test_quantize_rejects_fractional_bits_without_aptq(tiny_llama_dir, tmp_path, capsys):
    from toolchain.cli import main

    code = main(["quantize", "--model", str(tiny_llama_dir), "--method", "gptq", "--bits", "3.5",
                 "--out", str(tmp_path / "q"), "--quiet"])
    assert code == 2 and "needs --method aptq" in capsys.readouterr().err


def test_one_gptq_sweep_for_linears_sharing_a_hessian_equals_one_call_each():
    from toolchain.quant.gptq import gptq_quantize_many

    w, _, stats = _layer()
    H = stats.hessian
    a, b = w[:20], w[20:] * 3
    mask = nm_prune_mask(b.abs(), 2, 4)
    spec = QuantSpec(4, 40)
    joint = gptq_quantize_many([a, b.masked_fill(mask, 0)], [H, H], spec, [None, mask])
    for got, (x, m) in zip(joint, [(a, None), (b.masked_fill(mask, 0), mask)]):
        one = gptq_quantize(x, H, spec, m)
        assert torch.equal(got.codes, one.codes) and torch.equal(got.scales, one.scales)
        assert (got.prune_mask is None) == (m is None)


def test_hessian_mean_diagonal_is_the_trace_per_column():
    _, _, stats = _layer()
    assert stats.hessian_mean_diagonal == pytest.approx(float(torch.trace(stats.hessian)) / stats.cols, rel=1e-5)


def test_damp_reaches_gptq_is_recorded_and_is_refused_for_rtn(tiny_llama_dir, tmp_path, capsys):
    import json

    from safetensors.torch import load_file

    from toolchain.cli import main

    common = ["--bits", "3", "--group-size", "32", "--calib-samples", "4", "--seqlen", "32", "--quiet"]
    codes = {}
    for damp in ("0.01", "0.5"):
        out = tmp_path / f"damp{damp}"
        assert main(["quantize", "--model", str(tiny_llama_dir), "--method", "gptq", "--damp", damp,
                     *common, "--out", str(out)]) == 0
        assert json.loads((out / "compression.json").read_text())["quantization"]["damp"] == float(damp)
        codes[damp] = load_file(str(out / "quant_state.safetensors"))
    changed = [k for k in codes["0.01"] if k.endswith("codes") and not torch.equal(codes["0.01"][k], codes["0.5"][k])]
    assert changed   # the damping is what the sweep used
    capsys.readouterr()
    assert main(["quantize", "--model", str(tiny_llama_dir), "--method", "rtn", "--damp", "0.1", "--bits", "3",
                 "--out", str(tmp_path / "rtn"), "--quiet"]) == 2
    assert "--damp has no effect here" in capsys.readouterr().err and not (tmp_path / "rtn").exists()
    assert main(["quantize", "--model", str(tiny_llama_dir), "--method", "gptq", "--damp", "1.5", *common,
                 "--out", str(tmp_path / "bad")]) == 2
    assert "--damp must be in (0, 1), got 1.5" in capsys.readouterr().err


@pytest.mark.parametrize("blocks, act_order, symmetric, pruned",
                         [(1, True, True, False), (1, False, False, True), (4, True, True, True),
                          (4, False, True, False)])
def test_gptq_row_error_is_its_objective_under_the_callers_hessian(blocks, act_order, symmetric, pruned):
    """The sweep's own errors give each row's (w - deq) H (w - deq)^T, and the factor of H^-1 each row's
    w H w^T (the quantize job reports their ratio without a product with H), with dead inputs, per-block
    Hessians, masks and either column order."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(blocks, 160, 300, generator=g) * torch.rand(160, generator=g)[None, :, None]
    x[:, 7] = 0                                             # a dead input
    x[blocks - 1, 11] = 0                                   # dead in one block only
    H = 2 * x @ x.transpose(1, 2) / 300
    H = H[0] if blocks == 1 else H
    w = torch.randn(48, 160, generator=g)
    mask = torch.rand(48, 160, generator=g) < 0.3 if pruned else None
    w = w.masked_fill(mask, 0) if pruned else w
    qw = gptq_quantize(w, H, QuantSpec(3, 32, symmetric), mask, act_order=act_order)
    d = (qw.dequantize() - w).reshape(blocks, -1, 160)
    exact = (torch.bmm(d, H.reshape(blocks, 160, 160)) * d).sum(2).reshape(-1)
    assert qw.row_error.shape == (48,)
    assert torch.allclose(qw.row_error, exact, rtol=1e-4, atol=1e-4 * float(exact.mean()))
    w_ = w.reshape(blocks, -1, 160)
    energy = (torch.bmm(w_, H.reshape(blocks, 160, 160)) * w_).sum(2).reshape(-1)
    assert torch.allclose(qw.row_energy, energy, rtol=1e-4)


def test_a_job_whose_output_cannot_fit_is_refused_before_any_work(tiny_llama_dir, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from transformers import AutoModelForCausalLM

    from toolchain.jobs import common
    from toolchain.jobs.config import QuantConfig
    from toolchain.jobs.quantize import run_quantize

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    params = sum(p.numel() for p in model.parameters())
    decoder_linears = sum(m.weight.numel() for n, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and n.startswith("model.layers."))
    assert common.output_bytes_at_least(model, torch.float32, codes=False) == 4 * params
    assert common.output_bytes_at_least(model, torch.bfloat16, codes=True) == 2 * params + decoder_linears

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    started = []
    monkeypatch.setattr(common, "calibration_for", lambda *a: started.append(1))
    out = tmp_path / "deep" / "q"                                    # its parent does not exist yet
    with pytest.raises(ConfigError, match=r"--out .*q: its file system has 0.0 GiB free and the output needs"):
        run_quantize(str(tiny_llama_dir), out, QuantConfig(method="gptq", bits=4, group_size=8, calib_samples=2,
                                                               seqlen=16))
    assert not started and not out.exists() and not out.parent.exists()
