"""`inverse_hessian_cholesky`: the factor the OBS sweeps read, from the reversed Hessian's Cholesky factor on the
CPU and the reference's way elsewhere, the two equal to rounding; bit-identical whether it may overwrite the
caller's copy (`restore`) or not, on the first try and through every retry path; `symmetric_permutation` and
`reverse_in_place` equal plain indexing."""
from __future__ import annotations

import pytest
import torch

from toolchain.errors import ToolchainError
from toolchain.input_stats import InputStats
from toolchain.numerics import hessian as hmod
from toolchain.numerics.hessian import (hessian_damping, inverse_hessian_cholesky, reverse_in_place,
                                        symmetric_permutation)


def gram(n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(seed))
    return 2 * x.T @ x / tokens


def textbook(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The reference code's recipe, one try, in float64: chol((H + damp I)^-1) upper."""
    H = H.double()
    damped = H + hessian_damping(H, percdamp) * torch.eye(H.shape[0], dtype=torch.float64)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True).float()


def both_modes(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    kept, damp = inverse_hessian_cholesky(H, percdamp)
    consumed, damp_consumed = inverse_hessian_cholesky(H.clone(), percdamp, restore=H.clone)
    assert torch.equal(damp, damp_consumed)
    return kept, consumed


@pytest.mark.parametrize("n", [48, 301])
def test_the_factor_inverts_the_damped_hessian_in_both_modes(n):
    H = gram(n, 4 * n)
    kept, consumed = both_modes(H, 0.01)
    assert torch.equal(kept, consumed)
    assert torch.equal(kept, kept.triu())
    assert torch.allclose(kept, textbook(H, 0.01), rtol=1e-3, atol=1e-4)
    damped = H + hessian_damping(H, 0.01) * torch.eye(n)
    assert torch.allclose(kept.T @ kept @ damped, torch.eye(n), atol=1e-3)


def test_the_reversed_factor_agrees_with_the_reference_recipe_and_reuses_the_callers_memory():
    H = gram(200, 600)
    damped = H + hessian_damping(H, 0.01) * torch.eye(200)
    reference = hmod._factor_of_inverse(damped.clone())
    mine = damped.clone()
    upper = hmod._factor_reversed(mine)
    assert upper.data_ptr() == mine.data_ptr()          # computed where the caller's copy was: no third matrix
    assert torch.allclose(upper, reference, rtol=1e-3, atol=1e-4)
    assert torch.allclose(upper, textbook(H, 0.01), rtol=1e-3, atol=1e-4)


def test_the_damping_used_is_returned():
    H = gram(32, 100)
    _, damp = inverse_hessian_cholesky(H, 0.05)
    assert torch.allclose(damp, 0.05 * H.diagonal().mean())


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
    assert torch.allclose(inverse_hessian_cholesky(H, 0.01)[1], 0.1 * H.diagonal().mean())


def test_a_failed_triangular_inverse_restores_h_and_retries_identically(monkeypatch):
    H = gram(40, 120)
    real = hmod._factor_reversed
    calls = {"n": 0}

    def flaky(damped):       # the first triangular inverse of a run fails (after overwriting the caller's copy)
        calls["n"] += 1
        upper = real(damped)
        return None if calls["n"] == 1 else upper

    monkeypatch.setattr(hmod, "_factor_reversed", flaky)
    kept, _ = inverse_hessian_cholesky(H, 0.01)
    calls["n"] = 0
    restored = []
    consumed, damp = inverse_hessian_cholesky(H.clone(), 0.01, restore=lambda: restored.append(1) or H.clone())
    assert restored == [1]
    assert torch.equal(kept, consumed)
    assert torch.allclose(damp, 0.1 * H.diagonal().mean())
    assert torch.allclose(kept, textbook(H, 0.1), rtol=1e-3, atol=1e-4)   # the retry used ten times the damping


@pytest.mark.parametrize("n, step", [(1, 4), (6, 1), (7, 2), (37, 5), (64, 256)])
def test_reverse_in_place_equals_flipping_both_axes(n, step):
    M = torch.randn(n, n)
    expected = M.flip((0, 1))
    assert torch.equal(reverse_in_place(M, rows_per_step=step), expected)


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
