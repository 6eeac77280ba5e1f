"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning with the layer Hessian and weight updates.

Follows the reference code: H = 2XX^T/n, dead inputs zeroed, damping `percdamp` * mean(diag H), U = upper
Cholesky factor of H^-1, 128-column blocks with lazy updates of the columns to the right. Saliency is
w^2 / U_cc^2 (the squared Cholesky diagonal is [H^-1]_cc of the remaining columns). One deliberate change:
the unstructured mask of a block is chosen per output row (each row prunes its exact share of the block)
instead of over the whole block, so every row ends at exactly the requested sparsity, like Wanda.

`solve_with_mask` runs the same sweep with a given mask: the OBS reconstruction of the kept weights under
that mask. Rows are independent given H, so it can re-solve just the rows whose mask changed.
"""
from __future__ import annotations

import torch

from ..numerics.hessian import inverse_hessian_cholesky, neutralise_dead_inputs
from .base import PruneMethod
from .masks import SparsityTarget, nm_prune_mask, row_prune_mask


class SparseGPT(PruneMethod):
    name = "sparsegpt"
    needs_hessian = True

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01):
        self.blocksize = blocksize
        self.percdamp = percdamp

    def _prepare(self, weight, stats):
        W = weight.detach().float().clone()

        def private_hessian():   # H with its dead inputs neutralised, a copy the inverse may overwrite
            H = stats.hessian.to(W.device, copy=True)
            return H, neutralise_dead_inputs(H)

        H, dead = private_hessian()
        W[:, dead] = 0.0
        return W, inverse_hessian_cholesky(H, self.percdamp, restore=lambda: private_hessian()[0])[0]

    def prune(self, weight, stats, target: SparsityTarget):
        W, U = self._prepare(weight, stats)
        return self._sweep(W, U, target, None)

    def solve_with_mask(self, weight, stats, prune_mask: torch.Tensor, start: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """OBS reconstruction of `weight` ([rows, in], dense values) with the pruned set fixed to `prune_mask`.
        `start` is ignored (the sweep always starts from the dense weights); it is there so this fits Barber's
        `solver` slot like `lstsq_rows`."""
        W, U = self._prepare(weight, stats)
        return self._sweep(W, U, None, prune_mask)[0]

    def _sweep(self, W, U, target: SparsityTarget | None, fixed_mask: torch.Tensor | None):
        rows, cols = W.shape
        nm = target is not None and target.is_nm
        # Blocks must not split an N:M group.
        block = self.blocksize if not nm else max(target.m, self.blocksize // target.m * target.m)
        mask = torch.zeros_like(W, dtype=torch.bool) if fixed_mask is None else fixed_mask
        for i1 in range(0, cols, block):
            i2 = min(i1 + block, cols)
            W1 = W[:, i1:i2].clone()
            U1 = U[i1:i2, i1:i2]
            d = torch.diag(U1)
            err = torch.zeros_like(W1)
            if fixed_mask is not None:
                mask1 = fixed_mask[:, i1:i2]
            elif nm:
                mask1 = torch.zeros_like(W1, dtype=torch.bool)
            else:
                # Cumulative rounding: the per-block counts of a row add up to exactly round(s * cols).
                k = round(target.sparsity * i2) - round(target.sparsity * i1)
                mask1 = row_prune_mask(W1.square() / d.square()[None, :], k)
            for c in range(i2 - i1):
                if nm and c % target.m == 0:
                    sal = W1[:, c:c + target.m].square() / d[c:c + target.m].square()[None, :]
                    mask1[:, c:c + target.m] = nm_prune_mask(sal, target.n, target.m)
                w = W1[:, c]
                q = w.masked_fill(mask1[:, c], 0.0)
                e = (w - q) / U1[c, c]
                W1[:, c:] -= e[:, None] * U1[c, c:][None, :]
                err[:, c] = e
            W1.masked_fill_(mask1, 0.0)  # exact zeros (the update leaves them at rounding noise)
            W[:, i1:i2] = W1
            if fixed_mask is None:
                mask[:, i1:i2] = mask1
            W[:, i2:] -= err @ U[i1:i2, i2:]
        return W, mask
