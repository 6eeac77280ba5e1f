"""LLM-Barber (Su et al., 2024): block-aware mask rebuilding on top of an initial pruning.

Per decoder layer, attention sub-block first, then MLP (which sees the rebuilt attention):
1. Run the pruned layer on the calibration windows; at the sub-block boundary capture its input u (the
   pruned model's own normed hidden state) and its sparse output y_s.
2. Run the DENSE copy of the sub-block on the same u; loss per window n: L_n = mean((y_d - y_s)^2).
3. Per-window gradients with respect to the dense weights, G2 = mean_n (dL_n/dW)^2. For a linear layer the
   per-window gradient is g_n^T x_n (output gradient times input), so all windows of a batch come from one
   backward pass and a batched matmul instead of one backward per window.
4. Score S = |W_dense| * sqrt(G2). Per output row: R = number of pruned/kept pairs (best pruned against
   worst kept, and so on) in which the pruned weight scores higher; swap floor(ratio * R) of them.
   With N:M, every group prunes as many of its weakest kept weights as it revived, so N:M holds.
Weights after the rebuild (`keep_updates`, our default): for magnitude and Wanda init, dense values on the
new mask; for SparseGPT init, every row whose mask changed is re-solved by SparseGPT's OBS sweep with the
new mask fixed, so its kept weights carry OBS updates consistent with the final mask (unchanged rows keep
SparseGPT's weights). `keep_updates=False` resets every kept weight to its dense value, as the reference
code does by default.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..models.base import SubBlock
from .masks import SparsityTarget


def _ranks(x: torch.Tensor, descending: bool) -> torch.Tensor:
    """Rank of each element along the last dimension (0 = first in the sort order; ties by position)."""
    order = torch.argsort(x, dim=-1, descending=descending, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(x.shape[-1], device=x.device).expand_as(order))
    return ranks


def rebuild_mask(prune_mask: torch.Tensor, score: torch.Tensor, ratio: float, target: SparsityTarget
                 ) -> torch.Tensor:
    """Swap pruned<->kept weights per output row by score; the count per row (and N:M) is unchanged."""
    rows, cols = score.shape
    grow_rank = _ranks(score.masked_fill(~prune_mask, -math.inf), descending=True)   # pruned, best first
    cut_rank = _ranks(score.masked_fill(prune_mask, math.inf), descending=False)     # kept, worst first
    # R: pairs (k-th best pruned, k-th worst kept) where the pruned one wins. Both sequences are monotone,
    # so the winning pairs form a prefix and R is simply their count.
    pairs = torch.minimum(prune_mask.sum(1), (~prune_mask).sum(1))
    g = torch.full_like(score, -math.inf).scatter_(1, grow_rank, score.masked_fill(~prune_mask, -math.inf))
    p = torch.full_like(score, math.inf).scatter_(1, cut_rank, score.masked_fill(prune_mask, math.inf))
    idx = torch.arange(cols, device=score.device)[None, :]
    wins = ((g > p) & (idx < pairs[:, None])).sum(1)
    swaps = torch.floor(ratio * wins.double()).long()[:, None]
    grow = prune_mask & (grow_rank < swaps)
    if not target.is_nm:
        cut = ~prune_mask & (cut_rank < swaps)
    else:
        n, m = target.n, target.m
        shape = (rows, cols // m, m)
        s_g, grow_g, kept_g = score.reshape(shape), grow.reshape(shape), (~prune_mask).reshape(shape)
        # A group can give up at most its n kept weights: keep only its n best revivals.
        grow_g = grow_g & (_ranks(s_g.masked_fill(~grow_g, -math.inf), descending=True) < n)
        revived = grow_g.sum(-1, keepdim=True)
        cut_g = kept_g & (_ranks(s_g.masked_fill(~kept_g, math.inf), descending=False) < revived)
        grow, cut = grow_g.reshape(rows, cols), cut_g.reshape(rows, cols)
    return (prune_mask & ~grow) | cut


def block_grad_sq(engine, layer, dense_layer, hidden: torch.Tensor, block: SubBlock
                  ) -> tuple[dict[str, torch.Tensor], float]:
    """G2 = mean over windows of the squared per-window gradient of the block loss, per linear of `block`.

    Returns (G2 per linear name, mean block loss before rebuilding).
    """
    linears = {name: dense_layer.get_submodule(name) for name in block.linears}
    g2 = {name: torch.zeros_like(lin.weight, dtype=torch.float32) for name, lin in linears.items()}
    records: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [lin.register_forward_hook(lambda m, a, o, name=name: records.__setitem__(name, (a[0], o)))
             for name, lin in linears.items()]
    loss_total, windows = 0.0, 0
    try:
        # Half batches: a backward pass keeps every activation of the block (attention probabilities
        # included), so this bounds the transient memory near that of a plain forward at full batch.
        for s in engine.batches(size=engine.batch_size // 2):
            batch = s.stop - s.start
            args, kwargs, y_sparse = engine.capture_block(layer, hidden[s], block)
            with torch.enable_grad():
                y_dense = block.run(dense_layer, args, kwargs)
                per_window = (y_dense - y_sparse).reshape(batch, -1).square().mean(dim=1)
                names = list(linears)
                grads = torch.autograd.grad(per_window.sum(), [records[n][1] for n in names])
            for name, grad_out in zip(names, grads):
                x = records[name][0].detach()
                x = x.reshape(batch, -1, x.shape[-1]).float()
                grad_out = grad_out.reshape(batch, -1, grad_out.shape[-1]).float()
                g2[name] += torch.bmm(grad_out.transpose(1, 2), x).square().sum(dim=0)
            records.clear()
            loss_total += float(per_window.detach().sum())
            windows += batch
    finally:
        for h in hooks:
            h.remove()
    return {name: g / max(windows, 1) for name, g in g2.items()}, loss_total / max(windows, 1)


@torch.no_grad()
def block_loss(engine, layer, dense_layer, hidden: torch.Tensor, block: SubBlock) -> float:
    """Mean over windows of mean((dense block(u) - sparse block(u))^2), u = the pruned layer's block input."""
    total, windows = 0.0, 0
    for s in engine.batches():
        args, kwargs, y_sparse = engine.capture_block(layer, hidden[s], block)
        y_dense = block.run(dense_layer, args, kwargs)
        total += float((y_dense - y_sparse).reshape(s.stop - s.start, -1).square().mean(dim=1).sum())
        windows += s.stop - s.start
    return total / max(windows, 1)


class Barber:
    def __init__(self, ratio: float = 0.01, keep_updates: bool = True):
        self.ratio = ratio
        self.keep_updates = keep_updates

    def rebuild_layer(self, engine, layer, dense_layer, hidden, masks: dict[str, torch.Tensor],
                      targets: dict[str, SparsityTarget], stats: dict | None = None,
                      solver: Callable | None = None) -> dict:
        """Rebuild the masks of every linear in `layer` in place; `masks` is updated. Returns a report.

        With `keep_updates` and a `solver` (the init method's reconstruction, e.g. SparseGPT's OBS sweep with
        a fixed mask, given the init pass's `stats`), every row whose mask changed is re-solved from its dense
        values under the new mask, so the kept weights stay consistent with it; unchanged rows keep the init
        method's weights, which that solve would reproduce exactly.
        """
        for p in dense_layer.parameters():
            p.requires_grad_(True)
        report: dict = {"swaps": {}, "resolved_rows": {}}
        for block in engine.adapter.subblocks(layer):
            g2, loss_before = block_grad_sq(engine, layer, dense_layer, hidden, block)
            report[f"{block.name}_loss_before"] = loss_before
            for name in block.linears:
                lin = layer.get_submodule(name)
                dense_w = dense_layer.get_submodule(name).weight.detach().float()
                current = lin.weight.detach().float()
                score = dense_w.abs() * g2[name].sqrt()
                old = masks[name]
                new = rebuild_mask(old, score, self.ratio, targets[name])
                if not self.keep_updates:
                    base = dense_w
                elif solver is not None and stats is not None:
                    base = current.clone()
                    rows = (new != old).any(dim=1)
                    if bool(rows.any()):
                        base[rows] = solver(dense_w[rows], stats[name], new[rows])
                    report["resolved_rows"][name] = int(rows.sum())
                else:
                    base = torch.where(old, dense_w, current)
                lin.weight.data = base.masked_fill(new, 0.0).to(lin.weight.dtype)
                masks[name] = new
                report["swaps"][name] = int((new & ~old).sum())
        for p in dense_layer.parameters():
            p.requires_grad_(False)
        return report
