"""Block-level reconstruction: after a decoder layer is pruned, tune its kept weights, one sub-block at a
time (attention, then MLP on the tuned attention's output), so that each sparse block reproduces the dense
block's output on the pruned model's own inputs. The mask never changes: pruned positions get no update and
stay exactly zero, so N:M stays valid. A block whose calibration loss would rise keeps its weights.
"""
from __future__ import annotations

import torch

from ..models.base import SubBlock


def _block_inputs(engine, layer, dense_layer, hidden: torch.Tensor, block: SubBlock, size: int):
    """Per mini-batch: the block's entry call in the (current) sparse layer and the dense block's output on it."""
    calls, targets = [], []
    with torch.no_grad():
        for s in engine.batches(size=size):
            args, kwargs, _ = engine.capture_block(layer, hidden[s], block)
            calls.append((args, kwargs))
            targets.append(block.run(dense_layer, args, kwargs))
    return calls, targets


@torch.no_grad()
def _block_loss(layer, block: SubBlock, calls, targets) -> float:
    total = sum(float((block.run(layer, a, k) - t).square().mean()) * t.shape[0] for (a, k), t in zip(calls, targets))
    return total / max(sum(t.shape[0] for t in targets), 1)


def reconstruct_layer(engine, layer, dense_layer, hidden: torch.Tensor, masks: dict[str, torch.Tensor],
                      epochs: int = 1, lr: float = 5e-4, seed: int = 0, batch: int = 4) -> dict:
    """Adam on the kept weights of each sub-block for `epochs` passes over the calibration windows in
    mini-batches of `batch`, minimising mean((sparse block(u) - dense block(u))^2). Returns per-block losses."""
    gen = torch.Generator().manual_seed(seed)
    report = {}
    for block in engine.adapter.subblocks(layer):
        calls, targets = _block_inputs(engine, layer, dense_layer, hidden, block, batch)
        params = [layer.get_submodule(n).weight for n in block.linears]
        keep = [(~masks[n]).to(p.dtype) for n, p in zip(block.linears, params)]
        saved = [p.detach().clone() for p in params]
        before = _block_loss(layer, block, calls, targets)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        try:
            for _ in range(epochs):
                for i in torch.randperm(len(calls), generator=gen).tolist():
                    args, kwargs = calls[i]
                    with torch.enable_grad():
                        loss = (block.run(layer, args, kwargs) - targets[i]).square().mean()
                        opt.zero_grad(set_to_none=False)
                        loss.backward()
                    with torch.no_grad():
                        for p, k in zip(params, keep):
                            p.grad.mul_(k)          # pruned positions get no gradient, hence no Adam step
                    opt.step()
                    with torch.no_grad():
                        for p, k in zip(params, keep):
                            p.mul_(k)               # and stay exactly zero
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        after = _block_loss(layer, block, calls, targets)
        if after > before:
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)
            after = before
        report[block.name] = {"loss_before": before, "loss_after": after}
    return report
