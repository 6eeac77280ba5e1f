"""`inverse_hessian_cholesky`: the factor the OBS sweeps read, bit-identical whether it may overwrite the caller's
copy (`restore`) or not, on the first try and through every retry path; `symmetric_permutation` equals
two-step indexing."""
from __future__ import annotations

import pytest
import torch

from toolchain.errors import ToolchainError
from toolchain.input_stats import InputStats
from toolchain.numerics import hessian as hmod
from toolchain.numerics.hessian import hessian_damping, inverse_hessian_cholesky, symmetric_permutation


def gram(n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(seed))
    return 2 * x.T @ x / tokens


def textbook(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The reference code's recipe, one try: chol((H + damp I)^-1) upper."""
    damped = H + hessian_damping(H, percdamp) * torch.eye(H.shape[0])
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)


def both_modes(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    kept = inverse_hessian_cholesky(H, percdamp)
    assert torch.equal(H, H.clone())
    consumed = inverse_hessian_cholesky(H.clone(), percdamp, restore=H.clone)
    return kept, consumed


def test_the_factor_inverts_the_damped_hessian_in_both_modes():
    H = gram(48, 200)
    kept, consumed = both_modes(H, 0.01)
    assert torch.equal(kept, consumed)
    assert torch.allclose(kept, textbook(H, 0.01), rtol=1e-4, atol=1e-5)
    damped = H + hessian_damping(H, 0.01) * torch.eye(48)
    assert torch.allclose(kept.T @ kept @ damped, torch.eye(48), atol=1e-3)


def test_the_caller_copy_is_left_untouched_without_restore():
    H = gram(32, 100)
    before = H.clone()
    inverse_hessian_cholesky(H, 0.01)
    assert torch.equal(H, before)


def test_a_failed_first_factor_retries_with_more_damping_identically():
    # rank-deficient (16 tokens for 32 inputs) and shifted down: indefinite by 5% of the mean diagonal, so the
    # first damping (1%) fails and the second (10%) succeeds
    H = gram(32, 16)
    H.diagonal().sub_(H.diagonal().mean() * 0.05)
    assert torch.linalg.cholesky_ex(H + hessian_damping(H, 0.01) * torch.eye(32))[1] != 0
    kept, consumed = both_modes(H, 0.01)
    assert torch.equal(kept, consumed)
    assert torch.allclose(kept, textbook(H, 0.1), rtol=1e-3, atol=1e-4)


def test_a_failed_factor_of_the_inverse_restores_h_and_retries_identically(monkeypatch):
    H = gram(40, 120)
    real = torch.linalg.cholesky_ex
    calls = {"upper": 0}

    def flaky(A, upper=False, **kwargs):       # the first factor of an inverse reports failure once per run
        L, info = real(A, upper=upper, **kwargs)
        if upper:
            calls["upper"] += 1
            if calls["upper"] == 1:
                return L, torch.ones_like(info)
        return L, info

    monkeypatch.setattr(hmod.torch.linalg, "cholesky_ex", flaky)
    kept = inverse_hessian_cholesky(H, 0.01)
    calls["upper"] = 0
    restored = []
    consumed = inverse_hessian_cholesky(H.clone(), 0.01, restore=lambda: restored.append(1) or H.clone())
    assert restored == [1]
    assert torch.equal(kept, consumed)
    monkeypatch.setattr(hmod.torch.linalg, "cholesky_ex", real)
    assert torch.allclose(kept, textbook(H, 0.1), rtol=1e-4, atol=1e-5)   # the retry used ten times the damping


def test_no_positive_definite_damping_is_an_error():
    H = -torch.eye(8)
    with pytest.raises(ToolchainError, match="not positive definite"):
        inverse_hessian_cholesky(H, 0.01, retries=1, restore=H.clone)


@pytest.mark.parametrize("step", [1, 5, 64])
def test_symmetric_permutation_equals_two_step_indexing(step):
    M = torch.randn(37, 37)
    perm = torch.randperm(37, generator=torch.Generator().manual_seed(1))
    assert torch.equal(symmetric_permutation(M, perm, rows_per_step=step), M[perm][:, perm])


def test_input_stats_scale_their_sum_into_the_hessian_in_place_once():
    x = torch.randn(2, 10, 6, generator=torch.Generator().manual_seed(2))
    stats = InputStats(6, hessian=True)
    stats.add_batch(x[0])
    stats.add_batch(x[1])
    flat = x.reshape(-1, 6)
    expected = (flat.T @ flat) * (2.0 / 20)
    first = stats.hessian
    assert torch.allclose(first, expected, rtol=1e-5, atol=1e-6)
    assert stats.hessian is first and torch.equal(stats.hessian, first)   # read again: not scaled twice
    with pytest.raises(RuntimeError, match="no more batches"):
        stats.add_batch(x[0])
