"""Barber's scores and its mask rebuild rule: which pruned and kept weights swap.

Scores, per weight of a sub-block's linears (higher = more worth keeping):
- `grad_rms_score` (the reference's): |W_dense| * RMS over windows of dL_n/dW, the per-window gradient of the
  block loss at the dense weights.
- `taylor_score` (ours, `taylor-exit`): for the block's last linear, the exact block-loss change of toggling
  each weight, from the gradient at the sparse weights.
`rebuild_mask` pairs the best pruned weights with the worst kept ones per output row and swaps a fraction of the
pairs the pruned one wins; `rebuild_masks` widens the comparison group to a matrix or a whole sub-block.
"""
from __future__ import annotations

import math

import torch

from ...errors import ConfigError
from ..masks import SparsityTarget

GRANULARITIES = ("row", "layer", "block")
SCORES = ("grad-rms", "taylor-exit")


def check_score(score: str, granularity: str = "row") -> None:
    if score not in SCORES:
        raise ConfigError(f"--rebuild-score {score!r}: choose one of {', '.join(SCORES)}")
    if score == "taylor-exit" and granularity == "block":
        # `block` ranks every matrix of a block in one list, and taylor-exit's loss changes are not in the same
        # units as |W| RMS(grad) on the other matrices.
        raise ConfigError("--rebuild-granularity block ranks all of a block's matrices together, which needs one "
                          "score for all of them: add --rebuild-score grad-rms")


def check_granularity(granularity: str, target: SparsityTarget | None = None) -> None:
    if granularity not in GRANULARITIES:
        raise ConfigError(f"--rebuild-granularity {granularity!r}: choose one of {', '.join(GRANULARITIES)}")
    if target is not None and target.is_nm and granularity != "row":
        # A swap must stay inside its N:M group, so only a row's own pairs can be ranked together.
        raise ConfigError(f"--rebuild-granularity {granularity} does not apply to N:M sparsity; N:M uses row")


def grad_rms_score(dense_weight: torch.Tensor, grad_sq_mean: torch.Tensor) -> torch.Tensor:
    """The reference's score |W_dense| * sqrt(mean_n (dL_n/dW)^2): a weight that is large and whose per-window
    gradients are large matters most to the block loss."""
    return dense_weight.abs() * grad_sq_mean.sqrt()


def taylor_score(weight: torch.Tensor, grad: torch.Tensor, in_sq: torch.Tensor, prune_mask: torch.Tensor,
                 curvature: float) -> torch.Tensor:
    """The exact block-loss change of toggling each weight of a block's LAST linear (ours).

    The block output is linear in that weight, so the block loss L (a mean over T tokens and d_out outputs)
    is quadratic in it with curvature k = 1/(T d_out) times the input energy n_j = sum_t x_tj^2. With
    `grad` = -dL/dW_sparse at the current mask, toggling w = weight_rj changes L by exactly
        revive (pruned -> w):  -grad_rj w + k n_j w^2     (the score is minus this: the benefit)
        prune  (kept -> 0):     grad_rj w + k n_j w^2     (the score is this: the cost)
    so `rebuild_mask`, which pairs the best pruned with the worst kept weights, swaps a pair when the two
    single changes together lower the loss (their cross term, -2k w_ri w_rj H_ij, is left out). The
    reference's |W| RMS(grad) has no curvature term and takes the gradient at the dense weights: it can cut a
    strong kept weight whose error correlation happens to be small."""
    second = curvature * in_sq * weight.square()
    return grad * weight + torch.where(prune_mask, -second, second)


def _ranks(x: torch.Tensor, descending: bool) -> torch.Tensor:
    """Rank of each element along the last dimension (0 = first in the sort order; ties by position)."""
    order = torch.argsort(x, dim=-1, descending=descending, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(x.shape[-1], device=x.device).expand_as(order))
    return ranks


def rebuild_mask(prune_mask: torch.Tensor, score: torch.Tensor, ratio: float, target: SparsityTarget
                 ) -> torch.Tensor:
    """Swap pruned<->kept weights per output row by score; the count per row (and N:M) is unchanged.

    The reference pairs the k-th best pruned weight with the k-th worst kept one and counts the pairs R in which
    the pruned one scores higher; it swaps floor(ratio * R) of them, best pairs first. One sort of each row
    (descending) gives it all: cutting the sorted row where the score strictly drops, with A pruned weights above
    the cut and B kept ones below it, the first min(A, B) pairs all win; and R is the largest such min(A, B).
    (Any win has its pruned weight above and its kept weight below the cut under the k-th pruned score, and
    vice versa.) Ties: pruned weights of equal score revive in position order, kept ones go in reverse order."""
    rows, cols = score.shape
    ordered, order = torch.sort(score, dim=1, descending=True, stable=True)
    pruned = prune_mask.gather(1, order)
    pruned_above = pruned.cumsum(1)                                   # pruned at sorted positions <= i
    kept_below = (~prune_mask).sum(1, keepdim=True) - (~pruned).cumsum(1)   # kept at positions > i
    strict_drop = torch.ones_like(pruned)
    strict_drop[:, :-1] = ordered[:, :-1] > ordered[:, 1:]
    wins = torch.where(strict_drop, torch.minimum(pruned_above, kept_below), 0).amax(dim=1)
    swaps = torch.floor(ratio * wins.double()).long()[:, None]
    grow = torch.zeros_like(prune_mask).scatter_(1, order, pruned & (pruned_above <= swaps))
    if not target.is_nm:
        cut = torch.zeros_like(prune_mask).scatter_(1, order, ~pruned & (kept_below < swaps))
        return (prune_mask & ~grow) | cut
    n, m = target.n, target.m
    shape = (rows, cols // m, m)
    s_g, grow_g, kept_g = score.reshape(shape), grow.reshape(shape), (~prune_mask).reshape(shape)
    # A group can give up at most its n kept weights: keep only its n best revivals; then every group prunes
    # as many of its weakest kept weights as it revived, so N:M holds.
    grow_g = grow_g & (_ranks(s_g.masked_fill(~grow_g, -math.inf), descending=True) < n)
    revived = grow_g.sum(-1, keepdim=True)
    cut_g = kept_g & (_ranks(s_g.masked_fill(~kept_g, math.inf), descending=False) < revived)
    return (prune_mask & ~grow_g.reshape(rows, cols)) | cut_g.reshape(rows, cols)


def rebuild_masks(masks: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], ratio: float,
                  target: SparsityTarget, granularity: str = "row") -> dict[str, torch.Tensor]:
    """`rebuild_mask` over the comparison group the granularity names (the reference's output1/layer/block):
    `row` ranks each output row on its own (exact per-row sparsity, N:M kept); `layer` ranks a whole matrix
    as one group (its total is exact, rows drift); `block` pools every matrix of the sub-block (only the
    sub-block's total is exact)."""
    if granularity == "row":
        return {n: rebuild_mask(masks[n], scores[n], ratio, target) for n in masks}
    check_granularity(granularity, target)
    if granularity == "layer":
        return {n: rebuild_mask(masks[n].reshape(1, -1), scores[n].reshape(1, -1), ratio, target
                                ).reshape(masks[n].shape) for n in masks}
    flat = rebuild_mask(torch.cat([m.reshape(-1) for m in masks.values()])[None],
                        torch.cat([scores[n].reshape(-1) for n in masks])[None], ratio, target)[0]
    out, start = {}, 0
    for n, m in masks.items():
        out[n] = flat[start:start + m.numel()].reshape(m.shape)
        start += m.numel()
    return out
