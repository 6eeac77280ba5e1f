"""Pruning: mask rules, methods, Barber, allocation, determinism and bad input, on tiny random models."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import random_ids as calib, tiny_loaded as loaded
from toolchain.engine import LayerEngine
from toolchain.errors import ConfigError
from toolchain.jobs.config import PruneConfig
from toolchain.jobs.prune import prune_loaded
from toolchain.prune import SparseGPT, SparsityTarget, Wanda, Magnitude, check_nm, rebuild_mask
from toolchain.prune.barber import Barber, block_loss, rebuild_masks
from toolchain.input_stats import InputStats

def all_linears(lm):
    for i, layer in enumerate(lm.adapter.decoder_layers(lm.model)):
        for name, lin in lm.adapter.linears(layer).items():
            yield f"{i}.{name}", lin.weight.detach()


METHOD_CASES = [("magnitude", None), ("wanda", None), ("sparsegpt", None), ("barber", "wanda"),
                ("barber", "sparsegpt"), ("barber", "magnitude")]


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("method,init", METHOD_CASES)
@pytest.mark.parametrize("sparsity", ["0.5", "0.3", "2:4", "4:8", "1:4"])
def test_pattern_exact(family, method, init, sparsity):
    lm = loaded(family)
    cfg = PruneConfig(method=method, init=init, sparsity=sparsity, rebuild_ratio=0.5, batch_size=4)
    report = prune_loaded(lm, calib(), cfg, device="cpu", progress=False)
    target = SparsityTarget.parse(sparsity)
    for name, w in all_linears(lm):
        pruned = w == 0
        if target.is_nm:
            assert check_nm(pruned, target.n, target.m), name
        else:
            per_row = pruned.sum(dim=1)
            assert (per_row == round(target.sparsity * w.shape[1])).all(), (name, per_row.tolist())
    assert report["global_sparsity"] == pytest.approx(target.sparsity, abs=1.0 / 64)



@pytest.mark.parametrize("granularity", ["layer", "block"])
@pytest.mark.parametrize("init", ["wanda", "sparsegpt"])
def test_barber_wider_granularity_keeps_each_group_total(granularity, init):
    lm = loaded("llama")
    cfg = PruneConfig(method="barber", init=init, sparsity="0.5", rebuild_ratio=0.5, rebuild_granularity=granularity,
                      rebuild_score="taylor-exit" if granularity == "layer" else "grad-rms",
                      loss_guard=False, batch_size=4)
    report = prune_loaded(lm, calib(), cfg, device="cpu", progress=False)
    pruned = {name: w == 0 for name, w in all_linears(lm)}
    for name, m in pruned.items():
        if granularity == "layer":
            assert int(m.sum()) == m.numel() // 2, name
    attn = [n for n in pruned if n.startswith("0.") and "attn" in n]
    assert sum(int(pruned[n].sum()) for n in attn) == sum(pruned[n].numel() for n in attn) // 2
    assert report["global_sparsity"] == pytest.approx(0.5, abs=1e-6)
    # Wider groups let rows drift: some row is no longer at exactly half.
    assert any(not (m.sum(1) == m.shape[1] // 2).all() for m in pruned.values())

def _correlated_inputs(cols=64, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) * torch.logspace(0, -2, cols)[None, :]
    x = torch.randn(tokens, cols, generator=g) @ mix.T
    x[:, :4] *= 10  # a few outlier features, as in LLM activations
    return x


@pytest.mark.parametrize("sparsity", ["0.5", "2:4", "0.7"])
def test_sparsegpt_beats_magnitude_and_wanda_on_layer_error(sparsity):
    x = _correlated_inputs()
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    stats = InputStats(64, hessian=True)
    stats.add_batch(x)
    target = SparsityTarget.parse(sparsity)

    def err(method):
        w_new, _ = method.prune(w, stats, target)
        return float(((w - w_new) @ x.T).square().sum())

    e_mag, e_wanda, e_sgpt = err(Magnitude()), err(Wanda()), err(SparseGPT())
    assert e_sgpt < e_wanda < e_mag


def test_rebuild_mask_swaps_floor_ratio_of_beneficial_pairs():
    # One row, 8 weights, 4 pruned. Pruned scores 9, 8, 1, 0; kept scores 5, 4, 3, 2.
    score = torch.tensor([[9.0, 8.0, 1.0, 0.0, 5.0, 4.0, 3.0, 2.0]])
    pruned = torch.tensor([[True, True, True, True, False, False, False, False]])
    target = SparsityTarget.parse("0.5")
    # Beneficial pairs: (9 vs 2), (8 vs 3): R = 2.
    assert rebuild_mask(pruned, score, 0.4, target).equal(pruned)          # floor(0.8) = 0 swaps
    one = rebuild_mask(pruned, score, 0.5, target)                           # 1 swap: revive 9, prune 2
    assert one.tolist() == [[False, True, True, True, False, False, False, True]]
    two = rebuild_mask(pruned, score, 1.0, target)
    assert two.tolist() == [[False, False, True, True, False, False, True, True]]


@pytest.mark.parametrize("levels", [None, 4])
def test_rebuild_mask_matches_the_pairwise_rule_row_by_row(levels):
    """Against the reference rule written out per row with Python lists (sorted pruned scores descending, kept
    ascending, R = winning pairs): every row swaps floor(ratio * R) pairs, reviving its best pruned and pruning
    its worst kept weights; with tied scores (`levels` distinct values) the swapped scores are the same."""
    g = torch.Generator().manual_seed(1)
    score = torch.rand(200, 24, generator=g)
    if levels:
        score = (score * levels).floor()
    pruned = torch.rand(200, 24, generator=g) < torch.rand(200, 1, generator=g)
    ratio = 0.6
    new = rebuild_mask(pruned, score, ratio, SparsityTarget.parse("0.5"))
    for row in range(200):
        s, p = score[row].tolist(), pruned[row].tolist()
        grow_scores = sorted((v for v, q in zip(s, p) if q), reverse=True)
        cut_scores = sorted(v for v, q in zip(s, p) if not q)
        wins = sum(a > b for a, b in zip(grow_scores, cut_scores))
        swaps = int(ratio * wins)
        revived = [v for v, q, n in zip(s, p, new[row].tolist()) if q and not n]
        cut = [v for v, q, n in zip(s, p, new[row].tolist()) if not q and n]
        assert sorted(revived, reverse=True) == grow_scores[:swaps], row
        assert sorted(cut) == cut_scores[:swaps], row


@pytest.mark.parametrize("nm", ["2:4", "1:4", "4:8"])
def test_rebuild_mask_preserves_nm(nm):
    target = SparsityTarget.parse(nm)
    g = torch.Generator().manual_seed(0)
    from toolchain.prune.masks import nm_prune_mask
    pruned = nm_prune_mask(torch.rand(32, 64, generator=g), target.n, target.m)
    score = torch.rand(32, 64, generator=g)
    new = rebuild_mask(pruned, score, 1.0, target)
    assert check_nm(new, target.n, target.m)
    assert not new.equal(pruned)  # random scores leave plenty of beneficial swaps



def test_rebuild_granularity_ranks_over_the_named_group():
    # Row 0: pruned 9, 8 against kept 7, 6 (R = 2); row 1: pruned 0, 0 against kept 1, 2 (R = 0).
    pruned = torch.tensor([[True, True, False, False], [True, True, False, False]])
    score = torch.tensor([[9.0, 8.0, 7.0, 6.0], [0.0, 0.0, 1.0, 2.0]])
    target = SparsityTarget.parse("0.5")
    rows = rebuild_masks({"a": pruned}, {"a": score}, 0.5, target, "row")["a"]
    assert rows.tolist() == [[False, True, False, True], [True, True, False, False]]   # 9 in, 6 out
    # As one group the pairs are (9 vs 1), (8 vs 2), (0 vs 6), (0 vs 7): R = 2, one swap: revive 9 and prune
    # row 1's 1, so row 0 keeps 3 and row 1 keeps 1; only the matrix total holds.
    layer = rebuild_masks({"a": pruned}, {"a": score}, 0.5, target, "layer")["a"]
    assert layer.tolist() == [[False, True, False, False], [True, True, True, False]]
    # Pooled over a block, one matrix can give up a weight to another; only the block total is exact.
    g = torch.Generator().manual_seed(0)
    masks = {"a": torch.rand(8, 16, generator=g) < 0.5, "b": torch.rand(4, 16, generator=g) < 0.5}
    scores = {"a": torch.rand(8, 16, generator=g) * 3, "b": torch.rand(4, 16, generator=g)}
    block = rebuild_masks(masks, scores, 1.0, target, "block")
    assert sum(int(m.sum()) for m in block.values()) == sum(int(m.sum()) for m in masks.values())
    assert int(block["a"].sum()) < int(masks["a"].sum())   # the high-scoring matrix won weights
    with pytest.raises(ConfigError, match="N:M"):
        rebuild_masks(masks, scores, 1.0, SparsityTarget.parse("2:4"), "layer")

def _plant_outliers(model, adapter):
    """Large gains on a few norm channels: magnitude ignores them, the block loss does not."""
    for layer in adapter.decoder_layers(model):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            weight = layer.get_submodule(norm).weight
            weight.data[:3] = 25.0


def _one_pruned_layer(method, hessian=False):
    """A one-layer LLaMA with planted outliers, its captured inputs, a dense copy, and `method`'s 50% masks."""
    lm = loaded("llama", layers=1)
    _plant_outliers(lm.model, lm.adapter)
    engine = LayerEngine(lm.model, lm.adapter, calib(16, 32), batch_size=4, device="cpu")
    hidden = engine.capture_inputs()
    layer = engine.layers[0]
    dense = copy.deepcopy(layer)
    target = SparsityTarget.parse("0.5")
    stats = engine.collect_stats(layer, hidden, hessian=True) if hessian else {}
    masks, targets, init = {}, {}, {}
    for name, lin in lm.adapter.linears(layer).items():
        w, m = method.prune(lin.weight, stats.get(name), target)
        lin.weight.data, masks[name], targets[name], init[name] = w, m, target, w.clone()
    return lm, engine, hidden, layer, dense, stats, masks, targets, init


def _magnitude_pruned_layer(family: str, windows: int, tokens: int):
    """A one-layer tiny model pruned 50% by magnitude, its engine and inputs, and a dense copy with gradients."""
    lm = loaded(family, layers=1)
    engine = LayerEngine(lm.model, lm.adapter, calib(windows, tokens), batch_size=4, device="cpu")
    hidden = engine.capture_inputs()
    layer = engine.layers[0]
    dense = copy.deepcopy(layer).requires_grad_(True)
    for lin in lm.adapter.linears(layer).values():
        lin.weight.data, _ = Magnitude().prune(lin.weight, None, SparsityTarget.parse("0.5"))
    return lm, engine, hidden, layer, dense


def test_barber_keeps_counts_and_lowers_block_loss():
    lm, engine, hidden, layer, dense, _, masks, targets, _ = _one_pruned_layer(Magnitude())
    blocks = lm.adapter.subblocks(layer)
    before_attn = block_loss(engine, layer, dense, hidden, blocks[0])
    counts = {name: m.sum(dim=1).clone() for name, m in masks.items()}
    report, outputs = Barber(ratio=0.5, score="grad-rms").rebuild_layer(engine, layer, dense, hidden, masks, targets)
    # The returned outputs (recorded output + change of the MLP output) are the rebuilt layer's outputs.
    torch.testing.assert_close(outputs, engine.forward_layer(layer, hidden), rtol=1e-5, atol=1e-5)
    after_attn = block_loss(engine, layer, dense, hidden, blocks[0])
    after_mlp = block_loss(engine, layer, dense, hidden, blocks[1])
    assert report["attn_loss_before"] == pytest.approx(before_attn, rel=1e-4)
    assert report["attn_loss_after"] == pytest.approx(after_attn, rel=1e-4)
    assert report["reverted"] == []
    assert after_attn < 0.9 * before_attn
    assert after_mlp < 0.9 * report["mlp_loss_before"]
    assert sum(report["swaps"].values()) > 0
    for name, lin in lm.adapter.linears(layer).items():
        assert ((lin.weight == 0).sum(dim=1) == counts[name]).all(), name
        assert lin.weight[~masks[name]].equal(dense.get_submodule(name).weight[~masks[name]])


@pytest.mark.parametrize("grad_dtype,tol", [(None, 1e-4), (torch.bfloat16, 2e-2)])
def test_barber_per_window_gradients_match_autograd(grad_dtype, tol):
    """The batched per-window gradient (g_n^T x_n) equals one backward per window, as in the reference
    (to float32 precision, or to bfloat16's when the dense block and the product run in bfloat16)."""
    from toolchain.prune.barber import PassOptions, gradient_pass

    lm, engine, hidden, layer, dense = _magnitude_pruned_layer("llama", 4, 16)
    blocks = lm.adapter.subblocks(layer)
    records, outputs = gradient_pass(engine, layer, dense, hidden, blocks, PassOptions(grad_dtype=grad_dtype))
    torch.testing.assert_close(outputs, engine.forward_layer(layer, hidden))
    block = blocks[1]
    g2 = records[block.name].g2
    expected = {n: torch.zeros_like(g) for n, g in g2.items()}
    for i in range(4):
        one = LayerEngine(lm.model, lm.adapter, calib(4, 16), batch_size=1, device="cpu")
        one.layer_kwargs = engine.layer_kwargs
        args, kwargs, y_s = one.capture_block(layer, hidden[i:i + 1], block)
        loss = (block.run(dense, args, kwargs) - y_s).square().mean()
        grads = torch.autograd.grad(loss, [dense.get_submodule(n).weight for n in block.linears])
        for n, g in zip(block.linears, grads):
            expected[n] += g.square() / 4
    for n in block.linears:
        torch.testing.assert_close(g2[n], expected[n], rtol=tol, atol=tol * float(expected[n].max()))


@pytest.mark.parametrize("hardware", [torch.bfloat16, None])
def test_barber_gradient_dtype_follows_the_hardware(monkeypatch, hardware):
    """Barber computes its dense-block gradients in bfloat16 only where the hardware multiplies it natively
    (emulated bfloat16 on an AVX2 CPU is 80-120x slower than float32), and says which it used."""
    import toolchain.prune.barber.gradients as gradients_mod
    import toolchain.prune.barber.rebuild as rebuild_mod

    used = []
    real_pass = rebuild_mod.gradient_pass

    def spy(engine, layer, dense_layer, hidden, blocks, options):
        used.append(options.grad_dtype)
        return real_pass(engine, layer, dense_layer, hidden, blocks, options)

    monkeypatch.setattr(gradients_mod, "reduced_precision", lambda device: hardware)
    monkeypatch.setattr(rebuild_mod, "gradient_pass", spy)
    lm, engine, hidden, layer, dense = _magnitude_pruned_layer("llama", 4, 16)
    masks = {n: lin.weight == 0 for n, lin in lm.adapter.linears(layer).items()}
    targets = {n: SparsityTarget.parse("0.5") for n in masks}
    report, _ = Barber(ratio=0.5, score="grad-rms").rebuild_layer(engine, layer, dense, hidden, masks, targets)
    assert used and all(d is hardware for d in used)
    assert report["gradient_dtype"] == dict.fromkeys(["attn", "mlp"], "bfloat16" if hardware is torch.bfloat16
                                                     else "float32")


def test_taylor_score_is_the_exact_loss_change_of_each_toggle_on_a_last_linear():
    """The block loss is quadratic in the block's last linear, so with k = 1/(T d_out) the score is exactly the
    loss change of reviving a pruned weight (minus it) or pruning a kept one."""
    from toolchain.prune.barber import taylor_score

    torch.manual_seed(0)
    windows, tokens, d_out, d_in = 3, 7, 5, 12
    x = torch.randn(windows, tokens, d_in, dtype=torch.float64) * torch.linspace(0.2, 3, d_in, dtype=torch.float64)
    dense_w = torch.randn(d_out, d_in, dtype=torch.float64)
    prune_mask = torch.rand(d_out, d_in) < 0.5

    def loss(w):   # mean over windows of the per-window mean squared error, as the gradient pass measures it
        return ((x @ dense_w.T - x @ w.T) ** 2).reshape(windows, -1).mean(1).mean()

    sparse_w = dense_w.masked_fill(prune_mask, 0).requires_grad_(True)
    grad = -torch.autograd.grad(loss(sparse_w), sparse_w)[0]
    score = taylor_score(dense_w, grad, x.square().sum(1).mean(0), prune_mask, 1.0 / (tokens * d_out))
    base = float(loss(sparse_w.detach()))
    for r in range(d_out):
        for j in range(d_in):
            toggled = sparse_w.detach().clone()
            toggled[r, j] = dense_w[r, j] if prune_mask[r, j] else 0.0
            expected = -float(score[r, j]) if prune_mask[r, j] else float(score[r, j])
            assert float(loss(toggled)) - base == pytest.approx(expected, rel=1e-9, abs=1e-12), (r, j)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_barber_exit_terms_are_the_sparse_gradient_of_the_last_linear(family):
    """`exit_terms`: minus the gradient of the block loss with respect to the SPARSE last linear, and that
    linear's input energy (the dense output runs in bfloat16, hence the tolerance)."""
    from toolchain.prune.barber import PassOptions, gradient_pass

    lm, engine, hidden, layer, dense = _magnitude_pruned_layer(family, 4, 16)
    for block in lm.adapter.subblocks(layer):
        rec = gradient_pass(engine, layer, dense, hidden, [block], PassOptions(exit_terms=True))[0][block.name]
        exit_lin = layer.get_submodule(block.linears[-1])
        args, kwargs, _ = engine.capture_block(layer, hidden, block)
        inputs = []
        hook = exit_lin.register_forward_hook(lambda m, a, o: inputs.append(a[0].detach()))
        exit_lin.weight.requires_grad_(True)
        with torch.no_grad():
            y_dense = block.run(dense, args, kwargs)
        loss = (y_dense - block.run(layer, args, kwargs)).reshape(4, -1).square().mean(1).mean()
        hook.remove()
        grad = torch.autograd.grad(loss, exit_lin.weight)[0]
        exit_lin.weight.requires_grad_(False)
        torch.testing.assert_close(rec.exit_grad, -grad, rtol=3e-2, atol=3e-2 * float(grad.abs().max()))
        torch.testing.assert_close(rec.exit_in_sq, inputs[0].reshape(-1, grad.shape[1]).square().sum(0) / 4)
        assert rec.tokens == 16


def test_barber_taylor_exit_lowers_the_mlp_block_loss():
    lm, engine, hidden, layer, dense, _, masks, targets, _ = _one_pruned_layer(Magnitude())
    counts = {name: m.sum(dim=1).clone() for name, m in masks.items()}
    report, outputs = Barber(ratio=0.05, score="taylor-exit", loss_guard=False).rebuild_layer(
        engine, layer, dense, hidden, masks, targets)
    torch.testing.assert_close(outputs, engine.forward_layer(layer, hidden), rtol=1e-5, atol=1e-5)
    assert report["swaps"]["mlp.down_proj"] > 0
    assert report["mlp_loss_after"] < 0.7 * report["mlp_loss_before"]
    assert report["mlp_loss_after"] == pytest.approx(block_loss(engine, layer, dense, hidden,
                                                                lm.adapter.subblocks(layer)[1]), rel=1e-4)
    for name, lin in lm.adapter.linears(layer).items():
        assert ((lin.weight == 0).sum(dim=1) == counts[name]).all(), name


def test_unknown_rebuild_score_is_refused():
    with pytest.raises(ConfigError, match="rebuild-score"):
        Barber(score="fisher")
    with pytest.raises(ConfigError, match="rebuild-score"):
        PruneConfig(method="barber", sparsity="0.5", rebuild_score="fisher").validate()


def test_taylor_exit_refuses_block_granularity():
    """`block` pools every matrix of a block into one ranking; taylor-exit's scores are loss changes on the last
    linear and |W| RMS(grad) on the others, so they cannot be ranked together."""
    with pytest.raises(ConfigError, match="--rebuild-score grad-rms"):
        PruneConfig(method="barber", sparsity="0.5", rebuild_granularity="block").validate()
    PruneConfig(method="barber", sparsity="0.5", rebuild_granularity="block", rebuild_score="grad-rms").validate()
    PruneConfig(method="barber", sparsity="0.5", rebuild_granularity="layer").validate()


def test_same_seed_same_masks_and_different_seed_differs(tiny_llama_dir):
    from toolchain.models import load_model
    from toolchain.jobs.common import calibration_for as calibration_data

    def run(seed):
        lm = load_model(tiny_llama_dir)
        cfg = PruneConfig(method="barber", init="wanda", sparsity="0.5", calib_samples=4, seqlen=32, seed=seed,
                          rebuild_ratio=0.2)
        ids, _ = calibration_data(lm, cfg)
        prune_loaded(lm, ids, cfg, device="cpu", progress=False)
        return ids, [w.clone() for _, w in all_linears(lm)]

    ids_a, a = run(0)
    ids_b, b = run(0)
    ids_c, c = run(1)
    assert ids_a.equal(ids_b) and not ids_a.equal(ids_c)
    assert all(x.equal(y) for x, y in zip(a, b))
    assert not all((x == 0).equal(y == 0) for x, y in zip(a, c))


@pytest.mark.parametrize("allocation", ["owl", "hessian"])
def test_allocation_varies_layers_and_keeps_global_ratio(allocation):
    lm = loaded("llama", layers=4)
    _plant_outliers(lm.model, lm.adapter)
    lm.model.model.layers[0].input_layernorm.weight.data[:8] = 60.0  # layer 0 stands out
    cfg = PruneConfig(method="wanda", sparsity="0.6", allocation=allocation, batch_size=4, hessian_samples=2)
    report = prune_loaded(lm, calib(), cfg, device="cpu", progress=False)
    per_layer = report["layer_sparsity"]
    assert max(per_layer) - min(per_layer) > 0.05
    assert sum(per_layer) / len(per_layer) == pytest.approx(0.6, abs=1e-9)
    assert report["global_sparsity"] == pytest.approx(0.6, abs=1.0 / 64)
    for entry in report["layers"]:
        got = sum(v["sparsity"] for v in entry["linears"].values()) / len(entry["linears"])
        assert got == pytest.approx(per_layer[entry["layer"]], abs=1.0 / 64)


@pytest.mark.parametrize("text", ["0", "1", "1.5", "-0.1", "abc", "4:4", "5:4", "0:4", "2:1"])
def test_bad_sparsity_is_rejected(text):
    with pytest.raises(ConfigError, match="sparsity|N:M"):
        SparsityTarget.parse(text)


def test_input_dim_not_divisible_by_m():
    lm = loaded("llama")  # in-dims 64 and 128
    with pytest.raises(ConfigError, match="not divisible by M=5"):
        prune_loaded(lm, calib(), PruneConfig(method="wanda", sparsity="3:5"), device="cpu", progress=False)


@pytest.mark.parametrize("cfg,match", [
    (PruneConfig(method="obs"), "unknown --method"),
    (PruneConfig(method="barber", init="barber"), "unknown --init"),
    (PruneConfig(method="wanda", init="magnitude"), "--init only applies"),
    (PruneConfig(method="wanda", sparsity="2:4", allocation="owl"), "N:M"),
    (PruneConfig(method="wanda", allocation="random"), "--allocation"),
    (PruneConfig(method="barber", rebuild_ratio=1.5), "--rebuild-ratio"),
    (PruneConfig(method="barber", sparsity="2:4", rebuild_granularity="layer"), "does not apply to N:M"),
    (PruneConfig(method="barber", rebuild_granularity="column"), "--rebuild-granularity"),
    (PruneConfig(method="wanda", calib_samples=0), "--calib-samples"),
])
def test_bad_config_is_rejected(cfg, match):
    with pytest.raises(ConfigError, match=match):
        cfg.validate()


def test_cli_rejects_unknown_method(capsys):
    from toolchain.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["prune", "--model", "smollm2", "--method", "obs", "--sparsity", "0.5", "--out", "x"])
    assert exc.value.code == 2
    assert "invalid choice: 'obs'" in capsys.readouterr().err


def test_cli_rejects_bad_sparsity_without_traceback(capsys, tiny_llama_dir, tmp_path):
    from toolchain.cli import main

    code = main(["prune", "--model", str(tiny_llama_dir), "--method", "wanda", "--sparsity", "1.5",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "sparsity must be in (0, 1)" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_sparsegpt_solve_with_mask_reproduces_prune_and_beats_plain_masking():
    x = _correlated_inputs()
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(2))
    stats = InputStats(64, hessian=True)
    stats.add_batch(x)
    sgpt = SparseGPT()
    pruned, mask = sgpt.prune(w, stats, SparsityTarget.parse("0.5"))
    torch.testing.assert_close(sgpt.solve_with_mask(w, stats, mask), pruned, rtol=0, atol=1e-6)
    # Any other mask: the OBS re-solve keeps the mask and has a lower layer error than masking alone.
    other = Wanda().prune(w, stats, SparsityTarget.parse("2:4"))[1]
    solved = sgpt.solve_with_mask(w, stats, other)
    assert ((solved == 0) == other).all()
    err = lambda v: float(((w - v) @ x.T).square().sum())  # noqa: E731
    assert err(solved) < err(w.masked_fill(other, 0.0))


def test_barber_on_sparsegpt_resolves_changed_rows_only():
    sgpt = SparseGPT()
    lm, engine, hidden, layer, dense, stats, masks, targets, init = _one_pruned_layer(sgpt, hessian=True)
    old = {n: m.clone() for n, m in masks.items()}
    barber = Barber(ratio=0.5, loss_guard=False, score="grad-rms")
    report, _ = barber.rebuild_layer(engine, layer, dense, hidden, masks, targets, stats, sgpt.solve_with_mask)
    assert sum(report["resolved_rows"].values()) > 0
    for name, lin in lm.adapter.linears(layer).items():
        changed = (masks[name] != old[name]).any(dim=1)
        w = lin.weight.detach()
        assert ((w == 0) == masks[name]).all(), name
        assert torch.equal(w[~changed], init[name][~changed])   # untouched rows keep SparseGPT's weights
        if changed.any():
            expected = sgpt.solve_with_mask(dense.get_submodule(name).weight, stats[name], masks[name])
            torch.testing.assert_close(w[changed], expected[changed], rtol=0, atol=1e-5)


def test_barber_loss_guard_reverts_a_rebuild_that_raises_the_block_loss():
    """On this planted layer, SparseGPT's reconstruction beats the rebuilt masks at ratio 0.5 in both blocks:
    without the guard the block losses rise; with it each block keeps SparseGPT's masks and weights."""
    sgpt = SparseGPT()
    lm, engine, hidden, layer, dense, stats, masks, targets, init = _one_pruned_layer(sgpt, hessian=True)
    blocks = lm.adapter.subblocks(layer)
    before = [block_loss(engine, layer, dense, hidden, b) for b in blocks]
    old = {n: m.clone() for n, m in masks.items()}
    unguarded = copy.deepcopy(layer)
    masks_u = dict(masks)
    Barber(ratio=0.5, loss_guard=False, score="grad-rms").rebuild_layer(engine, unguarded, dense, hidden, masks_u,
                                                                        targets, stats, sgpt.solve_with_mask)
    assert block_loss(engine, unguarded, dense, hidden, blocks[0]) > before[0]

    report, outputs = Barber(ratio=0.5, score="grad-rms").rebuild_layer(engine, layer, dense, hidden, masks, targets,
                                                                        stats, sgpt.solve_with_mask)
    assert report["reverted"] == ["attn", "mlp"]
    assert sum(report["swaps"].values()) == 0
    for name, lin in lm.adapter.linears(layer).items():
        assert masks[name].equal(old[name]) and lin.weight.equal(init[name]), name
    assert [block_loss(engine, layer, dense, hidden, b) for b in blocks] == pytest.approx(before, rel=1e-6)
    torch.testing.assert_close(outputs, engine.forward_layer(layer, hidden))


@pytest.mark.parametrize("family,pre_norm", [("llama", True), ("opt", True), ("opt", False)])
def test_barber_layer_outputs_match_a_forward_of_the_rebuilt_layer(family, pre_norm):
    """Barber hands the next layer the recorded output plus the change of the MLP output (pre-norm), or a
    fresh forward (post-norm OPT, e.g. OPT-350m); either way it is the rebuilt layer's output."""
    lm = loaded(family, layers=1)
    layer = lm.adapter.decoder_layers(lm.model)[0]
    if family == "opt":
        layer.do_layer_norm_before = pre_norm
    assert lm.adapter.output_adds_last_block(layer) == pre_norm
    engine = LayerEngine(lm.model, lm.adapter, calib(8, 32), batch_size=4, device="cpu")
    hidden = engine.capture_inputs()
    dense = copy.deepcopy(layer)
    masks, targets = {}, {}
    for name, lin in lm.adapter.linears(layer).items():
        w, masks[name] = Magnitude().prune(lin.weight, None, SparsityTarget.parse("0.5"))
        lin.weight.data, targets[name] = w, SparsityTarget.parse("0.5")
    barber = Barber(ratio=1.0, loss_guard=False, score="grad-rms")
    report, outputs = barber.rebuild_layer(engine, layer, dense, hidden, masks, targets)
    assert report["swaps"]["fc2" if family == "opt" else "mlp.down_proj"] > 0
    torch.testing.assert_close(outputs, engine.forward_layer(layer, hidden), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_barber_rerun_of_a_changed_exit_linear_uses_its_recorded_input(family):
    """With the exit terms recorded, a rebuild that changed only the last linear costs one product with its
    recorded input (no block runs, not even the first linears); outputs and loss equal a full rerun."""
    import dataclasses

    from toolchain.prune.barber import PassOptions, gradient_pass, rerun_block

    lm, engine, hidden, layer, dense = _magnitude_pruned_layer(family, 8, 16)
    mlp = lm.adapter.subblocks(layer)[1]
    rec = gradient_pass(engine, layer, dense, hidden, [mlp], PassOptions(exit_terms=True))[0][mlp.name]
    assert len(rec.exit_in) == len(rec.sparse_out)
    old = {n: layer.get_submodule(n).weight.detach().clone() for n in mlp.linears}
    exit_ = layer.get_submodule(mlp.linears[-1]).weight
    exit_.data[:, 5] = 0.0
    exit_.data[2, 11] += 1.0

    def no_run(*_):
        raise AssertionError("the block ran")

    outs, loss = rerun_block(layer, dataclasses.replace(mlp, run=no_run), rec, old)
    full, full_loss = rerun_block(layer, mlp, rec)
    for y, y_full in zip(outs, full):
        torch.testing.assert_close(y, y_full, rtol=1e-5, atol=1e-5)
    assert loss == pytest.approx(full_loss, rel=1e-5) and loss != pytest.approx(rec.loss, rel=1e-3)


@pytest.mark.parametrize("per_row", [1, 3, 40, 200])
def test_weight_change_product_equals_the_dense_product(per_row):
    """h @ delta^T over the touched columns, for a weight change with a few nonzeros per row (a Wanda rebuild) or
    many (a re-solved row), equals the plain product."""
    from toolchain.prune.barber import weight_change_product

    g = torch.Generator().manual_seed(per_row)
    delta = torch.zeros(48, 200)
    cols = torch.rand(48, 200, generator=g).argsort(dim=1)[:, :per_row]
    delta.scatter_(1, cols, torch.randn(48, per_row, generator=g))
    delta[7] = 0.0                                   # an unchanged row
    h = torch.randn(300, 200, generator=g)
    torch.testing.assert_close(weight_change_product(delta)(h), h @ delta.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_barber_mlp_pass_replays_the_attention_instead_of_running_it(family, monkeypatch):
    """The MLP's pass gets the attention's outputs from the caller: the attention module never runs, and the
    MLP's records and the layer's outputs equal those of a pass that ran it."""
    from toolchain.prune.barber import PassOptions, Replay, gradient_pass

    lm, engine, hidden, layer, dense = _magnitude_pruned_layer(family, 8, 16)
    attn, mlp = lm.adapter.subblocks(layer)
    attn_rec = gradient_pass(engine, layer, dense, hidden, [attn], PassOptions(to_end=False))[0][attn.name]
    expected, expected_out = gradient_pass(engine, layer, dense, hidden, [mlp])
    attn_module = layer.get_submodule(attn.exit)
    monkeypatch.setattr(type(attn_module), "forward", lambda *a, **k: pytest.fail("the attention ran"))
    records, out = gradient_pass(engine, layer, dense, hidden, [mlp], PassOptions(
        replay=Replay(attn, torch.cat(attn_rec.sparse_out), attn_rec.out_tail)))
    assert "forward" not in vars(attn_module)   # the module's own forward is back
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    assert records[mlp.name].loss == expected[mlp.name].loss
    for n in mlp.linears:
        torch.testing.assert_close(records[mlp.name].g2[n], expected[mlp.name].g2[n], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("exit_terms", [False, True])
def test_barber_attention_pass_reuses_the_statistics_pass_forward(family, exit_terms, monkeypatch):
    """The dense attention's forward recorded (with its graph) during the statistics pass on the dense copy
    stands in for Barber's own: the dense attention does not run again, and the block's records (gradients,
    loss, exit terms, outputs) equal those of the pass that recomputes it. The statistics are unchanged."""
    from toolchain.prune.barber import PassOptions, gradient_pass, record_dense_block

    lm, engine, hidden, layer, dense = _magnitude_pruned_layer(family, 8, 16)
    dense.requires_grad_(False)
    attn = lm.adapter.subblocks(layer)[0]
    # The recorded forward runs in float32, so the pass it is compared with does too (on any hardware).
    expected = gradient_pass(engine, layer, dense, hidden, [attn],
                             PassOptions(None, exit_terms=exit_terms, to_end=False))[0][attn.name]
    plain_stats = engine.collect_stats(copy.deepcopy(dense), hidden, hessian=True)
    with record_dense_block(dense, attn, exit_terms) as recorded:
        stats = engine.collect_stats(dense, hidden, hessian=True)
    assert len(recorded.batches) == 2 and recorded.batches[0][0].requires_grad
    # q, k and v read the block input, which Barber's pass has too: it is not kept twice.
    from toolchain.prune.barber import ENTRY_INPUT
    kept_inputs = recorded.batches[0][1]
    assert [kept_inputs[n] is ENTRY_INPUT for n in kept_inputs] == [True] * 3 + [False] * (not exit_terms)
    for name in plain_stats:
        torch.testing.assert_close(stats[name].xtx, plain_stats[name].xtx)
    # A recording offered to a pass it does not belong to is refused by name, not silently ignored or misread.
    mlp = lm.adapter.subblocks(layer)[1]
    with pytest.raises(ValueError, match="does not belong to this pass"):
        gradient_pass(engine, layer, dense, hidden, [mlp], PassOptions(recorded=recorded))
    half = LayerEngine(lm.model, lm.adapter, calib(8, 16), batch_size=2, device="cpu")
    half.layer_kwargs = engine.layer_kwargs
    with pytest.raises(ValueError, match="2 batches"):
        gradient_pass(half, layer, dense, hidden, [attn], PassOptions(recorded=recorded, to_end=False))
    dense_attn = dense.get_submodule(attn.exit)
    monkeypatch.setattr(dense_attn, "forward", lambda *a, **k: pytest.fail("the dense attention ran"))
    got = gradient_pass(engine, layer, dense, hidden, [attn],
                        PassOptions(None, exit_terms=exit_terms, to_end=False, recorded=recorded))[0][attn.name]
    assert recorded.batches == [None, None]   # each batch's graph is let go after its backward
    assert got.loss == pytest.approx(expected.loss, rel=1e-5)
    assert set(got.g2) == set(expected.g2)
    graded = attn.linears[:-1] if exit_terms else attn.linears
    for n in graded:
        assert float(expected.g2[n].abs().max()) > 0, n
        torch.testing.assert_close(got.g2[n], expected.g2[n], rtol=1e-4, atol=1e-4 * float(expected.g2[n].max()))
    if exit_terms:
        torch.testing.assert_close(got.exit_grad, expected.exit_grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got.exit_in_sq, expected.exit_in_sq)
    torch.testing.assert_close(torch.cat(got.dense_out), torch.cat(expected.dense_out), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat(got.sparse_out), torch.cat(expected.sparse_out), rtol=0, atol=0)


@pytest.mark.parametrize("family,init", [("llama", "wanda"), ("opt", "sparsegpt")])
def test_barber_that_swaps_nothing_gives_exactly_the_init_model(family, init, monkeypatch):
    """Barber's pass runs the pruned layer on the walk's own batches (the dense blocks on half batches), so with
    no swaps (ratio 0) every weight of every layer is bit-identical to the init method's alone."""
    batch_sizes = []
    call_layer = LayerEngine.call_layer
    def recording(self, layer, hidden):
        batch_sizes.append(hidden.shape[0])
        return call_layer(self, layer, hidden)
    monkeypatch.setattr(LayerEngine, "call_layer", recording)

    def run(method, **extra):
        lm = loaded(family, layers=2)
        cfg = PruneConfig(method=method, sparsity="0.5", batch_size=4, **extra)
        prune_loaded(lm, calib(8, 32), cfg, device="cpu", progress=False)
        return [lin.weight.detach().clone() for layer in lm.adapter.decoder_layers(lm.model)
                for lin in lm.adapter.linears(layer).values()]

    plain = run(init)
    batch_sizes.clear()
    rebuilt = run("barber", init=init, rebuild_ratio=0.0)
    assert all(a.equal(b) for a, b in zip(plain, rebuilt))
    # Tiny matmuls round alike at any batch size, so check the batches themselves: the walk's 4 windows each.
    assert batch_sizes and set(batch_sizes) == {4}
    moved = run("barber", init=init, rebuild_ratio=1.0, loss_guard=False)   # the test can tell a change
    assert not all(a.equal(b) for a, b in zip(plain, moved))


def test_barber_on_sparsegpt_resolves_changed_rows_by_least_squares():
    """The default re-solve (`lstsq_rows`): each changed row gets the exact least-squares weights under its new
    mask (a direct solve per row agrees), unchanged rows keep SparseGPT's weights."""
    from toolchain.numerics.hessian import damped_hessian
    from toolchain.prune.lstsq import lstsq_rows

    lm, engine, hidden, layer, dense, stats, masks, targets, init = _one_pruned_layer(SparseGPT(), hessian=True)
    old = {n: m.clone() for n, m in masks.items()}
    barber = Barber(ratio=0.5, loss_guard=False, score="grad-rms")
    report, _ = barber.rebuild_layer(engine, layer, dense, hidden, masks, targets, stats, lstsq_rows)
    assert sum(report["resolved_rows"].values()) > 0
    for name, lin in lm.adapter.linears(layer).items():
        changed = (masks[name] != old[name]).any(dim=1)
        w, d = lin.weight.detach(), dense.get_submodule(name).weight.detach()
        assert ((w == 0) == masks[name]).all() and torch.equal(w[~changed], init[name][~changed]), name
        H, _ = damped_hessian(stats[name].hessian)
        for r in changed.nonzero().flatten()[:4].tolist():
            keep, cut = ~masks[name][r], masks[name][r]
            best = torch.zeros_like(d[r])
            best[keep] = d[r, keep] + torch.linalg.solve(H[keep][:, keep], H[keep][:, cut] @ d[r, cut])
            err = lambda v: float((d[r] - v) @ H @ (d[r] - v))  # noqa: E731
            # CG's 30 iterations land within 1% of the optimum's error (well under the plain-mask error)
            assert err(w[r]) <= 1.01 * err(best) < err(d[r].masked_fill(cut, 0.0)), (name, r)


def test_unknown_rebuild_solver_is_refused():
    with pytest.raises(ConfigError, match="--rebuild-solver"):
        PruneConfig(method="barber", init="sparsegpt", sparsity="0.5", rebuild_solver="cholesky").validate()
