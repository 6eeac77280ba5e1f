"""The layer Hessian H = 2 X X^T / n of a linear layer's inputs, as the OBS-family methods use it.

SparseGPT and least-squares reconstruction (prune) and GPTQ (quant) all solve with H, and all prepare it the
same way; the preparation lives here once so the three agree to the bit:

- Dead inputs: an input that was zero on every calibration token has a zero row and column in H, which makes H
  singular. Its diagonal entry is set to 1 (the input is decoupled from the others, which is exact: it never
  contributes to the output on the calibration data) and the callers zero the weights that read it.
- Damping: percdamp * mean(diag H) is added to the diagonal. H of a few calibration windows is ill-conditioned;
  damping relative to its own scale keeps the solve stable whatever the layer's activation magnitude.
- The inverse as an upper Cholesky factor U of (H + damp I)^-1, the form the OBS sweeps read column by column.
- A conjugate-gradient solve of the masked least-squares problem, for all rows of a weight at once.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..errors import ToolchainError


def neutralise_dead_inputs(hessian: torch.Tensor) -> torch.Tensor:
    """Set the zero diagonal entries of `hessian` ([in, in], or a stack [k, in, in]) to 1, in place; returns the
    dead inputs ([in] or [k, in], True = dead) so the caller can zero the weights that read them.

    A dead input's row and column are zero apart from that entry, so the 1 decouples it from every other input
    and makes H invertible without changing the solution on the live inputs."""
    diagonal = hessian.diagonal(dim1=-2, dim2=-1)
    dead = diagonal == 0
    diagonal.masked_fill_(dead, 1.0)
    return dead


def hessian_damping(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The damping added to H's diagonal: `percdamp` times the mean diagonal entry, so it scales with H."""
    return percdamp * torch.mean(torch.diag(hessian))


def damped_hessian(hessian: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 copy H + damp * I of `hessian` with its dead inputs neutralised (before the damping, so their 1s
    count in the mean diagonal); returns (H, dead)."""
    H = hessian.float().clone()
    dead = neutralise_dead_inputs(H)
    H.diagonal().add_(hessian_damping(H, percdamp))
    return H, dead


def reverse_in_place(matrix: torch.Tensor, rows_per_step: int = 256) -> torch.Tensor:
    """Overwrite the square matrix `matrix` with matrix[::-1, ::-1], a block of rows at a time, so that besides
    it only two [rows_per_step, n] blocks exist (torch.flip makes a whole copy)."""
    n = matrix.shape[0]
    for a in range(0, n // 2, rows_per_step):
        b = min(a + rows_per_step, n // 2)
        top = matrix[a:b].flip((0, 1))
        matrix[a:b] = matrix[n - b:n - a].flip((0, 1))
        matrix[n - b:n - a] = top
    if n % 2:
        matrix[n // 2] = matrix[n // 2].flip(0)
    return matrix


def _factor_reversed(damped: torch.Tensor) -> torch.Tensor | None:
    """U of H^-1 from one Cholesky factor of the reversed H, computed in `damped`'s own memory (CPU float32,
    contiguous); None when H is not positive definite in floating point.

    With P the reversal permutation, P H P = L L^T gives H^-1 = P L^-T L^-1 P = U^T U with U = P L^-1 P, which
    is upper triangular: one Cholesky and one triangular inverse (LAPACK potrf and trtri, 2n^3/3 flops), where
    inverting H and then factoring the inverse costs 4n^3/3; at an 8B model's MLP width it is the largest cost
    of a GPTQ or SparseGPT layer. torch exposes no triangular inverse, so this is scipy's LAPACK, run on as many
    threads as torch."""
    from scipy.linalg import lapack
    from threadpoolctl import threadpool_limits

    reverse_in_place(damped)
    # Row-major P H P read column-major is its transpose, the same matrix. LAPACK's upper factor R (R^T R =
    # P H P) then reads row-major as R^T = L, and its inverse R^-1 as L^-1; `clean` zeroes the other triangle.
    column_major = damped.numpy().T
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        factor, info = lapack.spotrf(column_major, lower=0, clean=1, overwrite_a=1)
        if info != 0:
            return None
        inverse, info = lapack.strtri(factor, lower=0, overwrite_c=1)
    if info != 0:
        return None
    if not np.shares_memory(inverse, column_major):   # scipy copied after all: the result still belongs here
        column_major[...] = inverse
    upper = reverse_in_place(damped)
    return upper if bool(torch.isfinite(upper.diagonal()).all()) else None


def _factor_of_inverse(damped: torch.Tensor) -> torch.Tensor | None:
    """U of H^-1 the reference's way (Cholesky of H, its inverse, the upper Cholesky factor of that): any
    device and dtype. `damped` is overwritten by the inverse. None when a factorisation fails."""
    lower, info = torch.linalg.cholesky_ex(damped)
    if info != 0:
        return None
    # LAPACK inverts in place in column-major storage: `out` must be column-major (the transposed view; the
    # inverse is symmetric) or torch inverts in a temporary and copies it over.
    inv = torch.cholesky_inverse(lower, out=damped.T)
    del lower
    upper, info = torch.linalg.cholesky_ex(inv, upper=True)
    return upper if info == 0 else None


def inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float, name: str = "layer",
                             retries: int = 4, restore: Callable[[], torch.Tensor] | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, damp): U the upper Cholesky factor of (H + damp * I)^-1, H with its dead inputs already neutralised,
    and the damping that made it.

    U[c, c]^2 is [H^-1]_cc of the columns from c on, and row c of U carries a column's error onto the columns
    after it: what the OBS sweeps of SparseGPT and GPTQ need. When H + damp * I is not positive definite in
    floating point, the damping grows tenfold per retry (from 1e-6 if H's diagonal mean is 0). On the CPU in
    float32, U comes from the reversed H's Cholesky factor (`_factor_reversed`, half the flops); elsewhere the
    reference's way. The two agree to rounding.

    `restore`: `hessian` is then the caller's own copy, which is overwritten (the factor is computed in its
    memory), so that at most two [in, in] matrices exist at once instead of three (on an 8B model's MLP input,
    in = 14336, each is 0.8 GB); `restore()` returns a fresh copy, needed only for a retry."""
    damp = hessian_damping(hessian, percdamp)
    reversed_path = hessian.device.type == "cpu" and hessian.dtype == torch.float32
    for _ in range(retries + 1):
        damped = hessian.clone() if restore is None else hessian.contiguous()
        damped.diagonal().add_(damp)
        upper = _factor_reversed(damped) if reversed_path else _factor_of_inverse(damped)
        del damped
        if upper is not None:
            return upper, damp
        if restore is not None:   # its memory held the failed factor
            hessian = None
            hessian = restore()
        damp = damp * 10 if damp > 0 else torch.tensor(1e-6, device=hessian.device)
    raise ToolchainError(f"{name}: the layer Hessian is not positive definite even with damping {float(damp):.3g}; "
                         f"use more calibration samples or a larger damping")


def symmetric_permutation(matrix: torch.Tensor, perm: torch.Tensor, rows_per_step: int = 2048) -> torch.Tensor:
    """matrix[perm][:, perm] ([n, n]) built a block of rows at a time, so that besides the input and the result
    only a [rows_per_step, n] block exists (the two-step indexing holds a second [n, n] matrix)."""
    out = torch.empty_like(matrix)
    for a in range(0, matrix.shape[0], rows_per_step):
        out[a:a + rows_per_step] = matrix[perm[a:a + rows_per_step]][:, perm]
    return out


def masked_conjugate_gradient(H: torch.Tensor, target: torch.Tensor, start: torch.Tensor, keep: torch.Tensor,
                              max_iters: int, tol: float) -> tuple[torch.Tensor, int]:
    """Per row of `target` ([rows, in]), the v that minimises (target - v)^T H (target - v) with v zero outside
    `keep` ([rows, in], 1.0 = free); returns (v, iterations used).

    Equivalently it minimises 1/2 v^T H v - v^T H target over the kept set K, whose gradient gives the residual
    r = keep * ((target - v) H). Conjugate gradients on all rows at once, Jacobi-preconditioned (1 / diag H):
    each iteration is one [rows, in] x [in, in] product, where a direct solve would need one factorisation per
    row (each row keeps a different set). Every iteration lowers each row's error, so the result is never
    worse than `start`. It stops when every row's residual norm has fallen to `tol` times its initial one, or
    after `max_iters` iterations."""
    V = start * keep
    inv_diag = 1.0 / torch.diag(H)
    r = ((target - V) @ H) * keep
    z = r * inv_diag
    p = z.clone()
    rz = (r * z).sum(1)
    r0 = r.norm(dim=1).clamp_min(1e-30)
    iterations = 0
    for iterations in range(max_iters + 1):
        if iterations == max_iters or bool((r.norm(dim=1) <= tol * r0).all()):
            break
        Ap = (p @ H) * keep
        alpha = rz / (p * Ap).sum(1).clamp_min(1e-30)
        V += alpha[:, None] * p
        r -= alpha[:, None] * Ap
        z = r * inv_diag
        rz_new = (r * z).sum(1)
        p = z + (rz_new / rz.clamp_min(1e-30))[:, None] * p
        rz = rz_new
    return V * keep, iterations
