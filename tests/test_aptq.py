"""APTQ: attention-aware Hessians against autograd, the bit allocation, and mixed precision end to end."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from conftest import random_ids, tiny_loaded
from toolchain.engine import LayerEngine
from toolchain.errors import ConfigError
from toolchain.prune.masks import check_nm
from toolchain.quant import QuantSpec, gptq_quantize
from toolchain.quant.allocate import allocate_bits
from toolchain.quant.aptq import attention_token_weights, collect_aptq_stats
from toolchain.jobs.config import QuantConfig
from toolchain.jobs.quantize import quantize_loaded



def _loaded(family="llama", layers=1):
    return tiny_loaded(family, layers=layers)


def _calib():
    return random_ids(4, 24)


def _attention_output_fn(lm, engine, hidden, which):
    """o(W): the attention's output before the output projection, as a function of the q/k/v weight `which`."""
    layer = engine.layers[0]
    attn = layer.self_attn
    out_name = "o_proj" if hasattr(attn, "o_proj") else "out_proj"
    out_proj = getattr(attn, out_name)
    args, kwargs, _ = engine.capture_block(layer, hidden, lm.adapter.subblocks(layer)[0])
    lin = getattr(attn, f"{which}_proj")

    def output(weight):
        setattr(attn, out_name, torch.nn.Identity())
        try:
            return _call(attn, lin, weight, args, kwargs)
        finally:
            setattr(attn, out_name, out_proj)

    return output, lin.weight.detach().clone()


def _call(attn, lin, weight, args, kwargs):
    """The attention with `lin`'s weight replaced by `weight` (a tensor autograd can differentiate through)."""
    original = lin.weight
    del lin.weight
    lin.weight = weight
    try:
        out = attn(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out
    finally:
        del lin.weight
        lin.weight = original


def _one_layer_attention(family, which):
    """A one-layer model's APTQ attention statistics, o(W) for the projection `which`, and the GN matrix."""
    lm = _loaded(family)
    calib = _calib()
    engine = LayerEngine(lm.model, lm.adapter, calib, batch_size=2, device="cpu")
    hidden = engine.capture_inputs()
    _, attention = collect_aptq_stats(engine, engine.layers[0], hidden)
    output, w = _attention_output_fn(lm, engine, hidden, which)
    return attention, w, _gauss_newton(output, w, calib.numel())


def _gauss_newton(output, weight, tokens):
    """2/n J^T J of the attention output with respect to the weight, [out*in, out*in]."""
    jac = torch.autograd.functional.jacobian(output, weight)       # [B, T, Hq*dh, rows, cols]
    jac = jac.reshape(-1, weight.numel()).double()
    return 2.0 / tokens * jac.T @ jac


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_v_hessian_equals_autograd_gauss_newton(family):
    """H_v per KV head is exact: the Gauss-Newton matrix of the attention output w.r.t. W_v is block diagonal
    over rows, and row r's block is H_v of r's KV head (GQA: summed over the query heads that read it)."""
    attention, w, gn = _one_layer_attention(family, "v")
    rows, cols = w.shape
    h_v = attention.hessian("v").double()
    head_rows = rows // h_v.shape[0]
    expected = torch.zeros_like(gn)
    for r in range(rows):
        expected[r * cols:(r + 1) * cols, r * cols:(r + 1) * cols] = h_v[r // head_rows]
    torch.testing.assert_close(gn, expected, rtol=1e-4, atol=1e-6 * float(gn.abs().max()))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_q_hessian_keeps_the_exact_gauss_newton_trace(family):
    """The token-weighted H_q replaces each head's G_i^T G_i by its mean eigenvalue: it keeps the trace of the
    exact Gauss-Newton matrix (through softmax, RoPE and the model's own q scaling)."""
    attention, w, gn = _one_layer_attention(family, "q")
    ours = attention.mean_diagonal("q") * w.numel()
    assert ours == pytest.approx(float(torch.trace(gn)), rel=1e-4)
    h_q = attention.hessian("q")
    head_rows = w.shape[0] // h_q.shape[0]
    assert float(sum(torch.trace(h) for h in h_q)) * head_rows == pytest.approx(ours, rel=1e-5)


def _brute_force_weights(q, k, v, p, fq, fk):
    t, d_h = q.shape
    o, kbar = p @ v, p @ k
    w_q, w_k = torch.zeros(t, dtype=torch.float64), torch.zeros(t, dtype=torch.float64)
    for i in range(t):
        g = sum(p[i, j] * torch.outer(v[j] - o[i], k[j] - kbar[i]) for j in range(t))
        w_q[i] = fq ** 2 * (g ** 2).sum() / d_h
    for j in range(t):
        w_k[j] = fk ** 2 / d_h * sum(p[i, j] ** 2 * (q[i] ** 2).sum() * ((v[j] - o[i]) ** 2).sum() for i in range(t))
    return w_q, w_k


def test_token_weights_match_their_definition():
    g = torch.Generator().manual_seed(1)
    t, d_h = 7, 5
    q, k, v = (torch.randn(t, d_h, generator=g, dtype=torch.float64) for _ in range(3))
    scores = torch.randn(t, t, generator=g, dtype=torch.float64).masked_fill(
        ~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    p = torch.softmax(scores, dim=-1)
    w_q, w_k = attention_token_weights(q[None], k[None], v[None], p[None], 0.3, 0.45)
    ref_q, ref_k = _brute_force_weights(q, k, v, p, 0.3, 0.45)
    torch.testing.assert_close(w_q[0], ref_q)
    torch.testing.assert_close(w_k[0], ref_k)
    assert w_q[0, 0] == pytest.approx(0.0, abs=1e-12)   # the first token attends to itself only: no Q gradient


@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act-order"])
def test_stacked_hessian_gptq_equals_one_run_per_row_block(act_order):
    g = torch.Generator().manual_seed(0)
    rows, cols, k = 24, 40, 3
    w = torch.randn(rows, cols, generator=g)
    hs = []
    for j in range(k):
        x = torch.randn(256, cols, generator=g) * torch.logspace(0, -1, cols)
        # With activation order the blocks share one column order (by the summed diagonal), so one run per
        # block gives the same codes only where every block's own order is that order: scaled copies of one H.
        hs.append(2 * x.T @ x / 256 if not act_order or j == 0 else (j + 1) * hs[0])
    stack = torch.stack(hs)
    spec = QuantSpec(3, 16)
    both = gptq_quantize(w, stack, spec, act_order=act_order)
    r = rows // k
    for j in range(k):
        one = gptq_quantize(w[j * r:(j + 1) * r], hs[j], spec, act_order=act_order)
        assert torch.equal(both.codes[j * r:(j + 1) * r], one.codes)
        assert torch.equal(both.scales[j * r:(j + 1) * r], one.scales)


# ------------------------------------------------------------------------------------------------ allocation
def test_allocation_is_the_exact_optimum_and_never_exceeds_the_budget():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(2, 7))
        sizes = [int(s) for s in rng.choice([64, 128, 192, 384], size=n)]
        candidates = [2, 3, 4, 8][: int(rng.integers(2, 5))]
        costs = np.sort(rng.random((n, len(candidates))), axis=1)[:, ::-1] * rng.random((n, 1)) * 10
        budget = float(rng.uniform(candidates[0], candidates[-1]))
        picks = allocate_bits(sizes, costs, candidates, budget)
        total = sum(sizes)
        assert sum(s * b for s, b in zip(sizes, picks)) <= budget * total + 1e-9
        best = min((sum(costs[i, candidates.index(b)] for i, b in enumerate(combo)), combo)
                   for combo in itertools.product(candidates, repeat=n)
                   if sum(s * b for s, b in zip(sizes, combo)) <= budget * total + 1e-9)
        got = sum(costs[i, candidates.index(b)] for i, b in enumerate(picks))
        assert got == pytest.approx(best[0], rel=1e-12), (trial, picks, best)


def test_allocation_gives_the_wider_codes_to_the_sensitive_layers_and_hits_the_budget():
    sizes = [1000] * 8
    sensitivity = np.array([1, 50, 2, 40, 3, 30, 4, 20], dtype=float)
    costs = np.outer(sensitivity, [16.0, 1.0])           # error at 2 bits vs 4 bits, times sensitivity
    picks = allocate_bits(sizes, costs, [2, 4], 3.0)
    assert sum(picks) / len(picks) == 3.0                   # exactly the budget
    assert [i for i, b in enumerate(picks) if b == 4] == [1, 3, 5, 7]


@pytest.mark.parametrize("budget", [1.5, 4.5])
def test_allocation_rejects_a_budget_outside_the_candidates(budget):
    with pytest.raises(ConfigError, match="outside the candidate widths"):
        allocate_bits([10, 10], np.ones((2, 2)), [2, 4], budget)


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("family,sensitivity", [("llama", "model"), ("llama", "local"), ("opt", "model"),
                                                ("opt", "local")])
def test_aptq_mixed_precision_meets_the_budget_exactly(family, sensitivity):
    lm = _loaded(family, layers=2)
    cfg = QuantConfig(method="aptq", bits="3.5", candidates="2,4", group_size=32, calib_samples=4, seqlen=24,
                      batch_size=2, sensitivity=sensitivity, hutchinson_samples=2)
    report, state = quantize_loaded(lm, _calib(), cfg, device="cpu", progress=False)
    assert report["avg_bits"] == 3.5
    widths = {qw.spec.bits for qw in state.values()}
    assert widths == {2, 4}
    alloc = report["allocation"]
    assert alloc["budget"] == 3.5 and alloc["candidates"] == [2, 4] and alloc["sensitivity"] == sensitivity
    for entry in report["layers"]:
        for name, info in entry["linears"].items():
            assert info["hessian"] == ("attention" if name in lm.adapter.attention_qkv else "layer")
            assert info["rel_error"] < 1.0 and info["sensitivity"] > 0


def test_aptq_gives_more_bits_to_a_planted_sensitive_layer():
    """Scale one layer's MLP input norm up: its local Hessian trace grows by the square, so it keeps 4 bits.
    (The full-model trace has no such simple plant: a larger MLP input also changes the rest of the model.)"""
    lm = _loaded("llama", layers=2)
    for layer in lm.adapter.decoder_layers(lm.model):
        layer.post_attention_layernorm.weight.data.fill_(0.2)
    lm.adapter.decoder_layers(lm.model)[1].post_attention_layernorm.weight.data.fill_(5.0)
    cfg = QuantConfig(method="aptq", bits="2.5", group_size=32, calib_samples=4, seqlen=24, batch_size=2,
                      sensitivity="local")
    report, state = quantize_loaded(lm, _calib(), cfg, device="cpu", progress=False)
    bits = {name: qw.spec.bits for name, qw in state.items()}
    assert bits["model.layers.1.mlp.gate_proj"] == bits["model.layers.1.mlp.up_proj"] == 4
    assert bits["model.layers.0.mlp.gate_proj"] == bits["model.layers.0.mlp.up_proj"] == 2
    assert report["avg_bits"] <= 2.5


def test_aptq_keeps_a_pruning_mask_and_nm():
    lm = _loaded("llama", layers=2)
    from toolchain.jobs.config import PruneConfig
    from toolchain.jobs.prune import prune_loaded

    prune_loaded(lm, _calib(), PruneConfig(method="sparsegpt", sparsity="2:4", batch_size=2), device="cpu",
                 progress=False)
    masks = {n: lin.weight == 0 for i, layer in enumerate(lm.adapter.decoder_layers(lm.model))
             for n, lin in ((f"model.layers.{i}.{k}", v) for k, v in lm.adapter.linears(layer).items())}
    cfg = QuantConfig(method="aptq", bits="3.0", group_size=32, calib_samples=4, seqlen=24, batch_size=2)
    _, state = quantize_loaded(lm, _calib(), cfg, device="cpu", progress=False)
    for name, qw in state.items():
        assert torch.equal(qw.prune_mask, masks[name]), name
        assert check_nm(qw.prune_mask, 2, 4)
        assert (qw.dequantize()[masks[name]] == 0).all()


@pytest.mark.parametrize("cfg,message", [
    (QuantConfig(method="gptq", bits="3.5"), "needs --method aptq"),
    (QuantConfig(method="rtn", bits="4", candidates="2,4"), "needs --method aptq"),
    (QuantConfig(method="aptq", bits="4.5"), "outside the candidate widths"),
    (QuantConfig(method="aptq", bits="3.5", candidates="2,5"), "unsupported width"),
    (QuantConfig(method="aptq", bits="3.5", candidates="two"), "comma-separated"),
    (QuantConfig(method="aptq", bits="x"), "not a number"),
    (QuantConfig(method="awq", bits="4"), "unknown quantization method"),
    (QuantConfig(method="aptq", bits="3.5", sensitivity="fisher"), "--sensitivity"),
    (QuantConfig(method="aptq", bits="3.5", hutchinson_samples=0), "--hutchinson-samples"),
])
def test_bad_quant_configs_fail_clearly(cfg, message):
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_an_average_without_candidates_chooses_among_2_3_and_4_bits():
    """The default widths of a mixed-precision run: three, not the paper's two (docs/aptq.md, section 7)."""
    plan = QuantConfig(method="aptq", bits="3.5").validate()
    assert plan.budget == 3.5 and plan.candidates == (2, 3, 4)
    assert QuantConfig(method="aptq", bits="3.5", candidates="4,2").validate().candidates == (2, 4)


def test_group_size_larger_than_the_input_is_refused():
    lm = _loaded("llama")
    with pytest.raises(ConfigError, match="exceeds the input dimension"):
        quantize_loaded(lm, None, QuantConfig(method="rtn", bits=4, group_size=256), device="cpu", progress=False)


def test_compress_cli_prunes_then_quantizes_with_aptq(tiny_dir, tmp_path):
    from toolchain.cli import main
    from toolchain.quant import read_quant_state

    out = tmp_path / "c"
    assert main(["compress", "--model", str(tiny_dir), "--prune", "barber", "--init", "wanda", "--sparsity", "2:4",
                 "--quant", "aptq", "--bits", "3.5", "--group-size", "32", "--calib-samples", "4", "--seqlen", "32",
                 "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "compression.json").read_text())
    assert report["prune"]["method"] == "barber" and report["prune"]["nm"] == [2, 4]
    assert report["quantization"]["method"] == "aptq" and report["quantization"]["avg_bits"] <= 3.5
    state = read_quant_state(out / "quant_state.safetensors")
    assert all(check_nm(qw.prune_mask, 2, 4) for qw in state.values())


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_hutchinson_traces_equal_a_plain_double_backward_with_the_same_probes(family):
    """`linear_hessian_traces` takes each Hessian-vector product as a central difference of two gradients
    (folded into v.(Hv) as each weight's gradient arrives, under activation checkpointing); in float64 that
    must equal the textbook double backward, autograd.grad(grads, W, grad_outputs=v), with the same
    Rademacher probes (to 1e-3: LLaMA's RMSNorm computes in float32 even in a float64 model), and leave the
    model as it was."""
    from toolchain.sensitivity import linear_hessian_traces

    lm = tiny_loaded(family, layers=2)
    if family == "opt":
        # OPT's ReLU has kinks: a difference step that crosses one sees curvature a double backward counts as
        # zero (see toolchain.sensitivity). A smooth activation makes the two estimate the same thing.
        for layer in lm.adapter.decoder_layers(lm.model):
            layer.activation_fn = torch.nn.GELU()
    lm.model.double()
    ids = random_ids(2, 16)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    lm.model.lm_head.weight.requires_grad_(False)     # a mix, to check each flag comes back as it was
    requires = [p.requires_grad for p in lm.model.parameters()]
    got = linear_hessian_traces(lm.model, lm.adapter, ids, samples=2, seed=3, progress=False)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert [p.requires_grad for p in lm.model.parameters()] == requires and False in requires
    assert all(p.grad is None for p in lm.model.parameters())
    assert all("forward" not in vars(layer) for layer in lm.adapter.decoder_layers(lm.model))
    named = [(i, n, lin.weight) for i, layer in enumerate(lm.adapter.decoder_layers(lm.model))
             for n, lin in lm.adapter.linears(layer).items()]
    flat = [w for _, _, w in named]
    for w in flat:
        w.requires_grad_(True)
    lm.model.set_attn_implementation("eager")
    gen, totals = torch.Generator().manual_seed(3), torch.zeros(len(flat), dtype=torch.float64)
    for i in range(2):
        loss = lm.model(ids[i:i + 1], labels=ids[i:i + 1], use_cache=False).loss
        grads = torch.autograd.grad(loss, flat, create_graph=True)
        probes = [(torch.randint(0, 2, w.shape, generator=gen) * 2 - 1).double() for w in flat]
        hv = torch.autograd.grad(grads, flat, grad_outputs=probes)
        totals += torch.tensor([float((h * v).sum()) for h, v in zip(hv, probes)], dtype=torch.float64)
    exact = [abs(float(totals[k])) / 2 / w.numel() for k, (_, _, w) in enumerate(named)]
    for k, (i, n, w) in enumerate(named):
        assert got[i][n] == pytest.approx(exact[k], rel=1e-3, abs=1e-6 * max(exact)), (i, n)
    assert len({round(v, 12) for layer in got for v in layer.values()}) > 1


def test_hutchinson_traces_in_float32_track_the_double_backward():
    """In float32 the difference step trades truncation against rounding; the estimate must still follow the
    exact traces closely (same probes, same windows)."""
    from toolchain.sensitivity import linear_hessian_traces

    lm = tiny_loaded("llama", layers=2)
    ids = random_ids(2, 16)
    fd = linear_hessian_traces(lm.model, lm.adapter, ids, samples=2, seed=3, progress=False)
    lm.model.double()
    exact = linear_hessian_traces(lm.model, lm.adapter, ids, samples=2, seed=3, progress=False)
    a = torch.tensor([v for layer in fd for v in layer.values()], dtype=torch.float64)
    b = torch.tensor([v for layer in exact for v in layer.values()], dtype=torch.float64)
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.999
    assert ((a - b).abs() / b.abs()).median() < 0.01
