"""Exact least-squares re-solve under a fixed mask (--resolve lstsq)."""
from __future__ import annotations

import pytest
import torch

from conftest import random_ids as calib, tiny_loaded as loaded
from toolchain.jobs.config import PruneConfig
from toolchain.jobs.prune import prune_loaded
from toolchain.prune import SparseGPT, SparsityTarget, check_nm
from toolchain.input_stats import InputStats
from toolchain.numerics.hessian import damped_hessian
from toolchain.prune.lstsq import layer_error, lstsq_with_mask


def _layer(rows=12, cols=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) * torch.logspace(0, -2, cols)[None, :]
    x = torch.randn(2048, cols, generator=g) @ mix.T
    x[:, :3] *= 10   # outlier features, as in LLM activations
    stats = InputStats(cols, hessian=True)
    stats.add_batch(x)
    return torch.randn(rows, cols, generator=g), stats


def _direct(w, H, mask_row):
    """v_K = w_K + H_KK^-1 H_KP w_P for one row, by a dense solve."""
    K, P = (~mask_row).nonzero()[:, 0], mask_row.nonzero()[:, 0]
    return K, w[K] + torch.linalg.solve(H[K][:, K], H[K][:, P] @ w[P])


def test_matches_a_direct_solve_per_row_with_any_kept_counts():
    w, stats = _layer()
    H, _ = damped_hessian(stats.hessian)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(w.shape, generator=g) < torch.linspace(0.2, 0.8, w.shape[0])[:, None]   # uneven rows
    new = lstsq_with_mask(w, stats.hessian, mask, tol=1e-7, max_iters=500)
    assert bool((new[mask] == 0).all())
    for r in range(w.shape[0]):
        K, v = _direct(w[r].double(), H.double(), mask[r])
        torch.testing.assert_close(new[r, K].double(), v, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_never_worse_than_sparsegpt_from_its_weights_and_keeps_the_mask(sparsity):
    w, stats = _layer()
    w_sgpt, mask = SparseGPT().prune(w, stats, SparsityTarget.parse(sparsity))
    H, _ = damped_hessian(stats.hessian)
    for iters in (1, 3, 200):   # CG from a start point only lowers the error, at every iteration count
        new = lstsq_with_mask(w, stats.hessian, mask, start=w_sgpt, max_iters=iters)
        assert float(layer_error(w, new, H).sum()) <= float(layer_error(w, w_sgpt, H).sum()) * (1 + 1e-6)
        assert bool((new[mask] == 0).all())   # the mask is kept: every pruned weight stays exactly zero
    assert float(layer_error(w, new, H).sum()) < 0.99 * float(layer_error(w, w_sgpt, H).sum())


@pytest.mark.parametrize("method,init,sparsity", [("wanda", None, "2:4"), ("barber", "sparsegpt", "0.5"),
                                                  ("magnitude", None, "0.5")])
def test_resolve_pass_keeps_masks_and_lowers_each_layer_error(method, init, sparsity):
    plain, resolved = loaded("llama"), loaded("llama")
    base = dict(method=method, init=init, sparsity=sparsity, rebuild_ratio=0.5, batch_size=4)
    prune_loaded(plain, calib(), PruneConfig(**base), device="cpu", progress=False)
    report = prune_loaded(resolved, calib(), PruneConfig(**base, resolve_mode="lstsq"), device="cpu", progress=False)
    target = SparsityTarget.parse(sparsity)
    first = plain.adapter.decoder_layers(plain.model)[0]
    for name, lin in resolved.adapter.linears(resolved.adapter.decoder_layers(resolved.model)[0]).items():
        # Layer 0 sees the same inputs in both runs, so its masks must be identical.
        assert torch.equal(lin.weight == 0, first.get_submodule(name).weight == 0), name
        if target.is_nm:
            assert check_nm(lin.weight == 0, target.n, target.m)
    for layer in report["layers"]:
        for name, err in layer["resolve"].items():
            assert err["error_after"] <= err["error_before"], (layer["layer"], name)
    assert sum(e["error_before"] - e["error_after"] for e in report["layers"][0]["resolve"].values()) > 0
