"""Block-level reconstruction: after a decoder layer is pruned, tune its kept weights, one sub-block at a
time (attention, then MLP on the tuned attention's output), so that each sparse block reproduces the dense
block's output on the pruned model's own inputs. The mask never changes: pruned positions get no update and
stay exactly zero, so N:M stays valid. A block whose calibration loss would rise keeps its weights.
"""
from __future__ import annotations

import torch

from ..models.base import SubBlock, first_tensor


def _block_inputs(engine, layer, dense_layer, hidden: torch.Tensor, block: SubBlock, size: int,
                  layer_out: torch.Tensor | None = None):
    """Per mini-batch of `size` windows: the block's entry call in the (current) sparse layer, the dense block's
    output on it (the target) and the sparse block's output. With `layer_out`, the whole layer runs and its
    outputs are written there (for the last block of a pre-norm layer, whose change then shifts them)."""
    calls, targets, sparse = [], [], []
    seen: dict = {}
    hooks = []
    if layer_out is not None:
        hooks = [layer.get_submodule(block.entry).register_forward_pre_hook(
                     lambda m, a, k: seen.update(call=(a, k)), with_kwargs=True),
                 layer.get_submodule(block.exit).register_forward_hook(
                     lambda m, a, o: seen.update(out=first_tensor(o)))]
    try:
        with torch.no_grad():
            for s in engine.batches(size=size):
                if layer_out is None:
                    args, kwargs, y = engine.capture_block(layer, hidden[s], block)
                else:
                    layer_out[s] = engine.call_layer(layer, hidden[s])
                    (args, kwargs), y = seen["call"], seen["out"]
                calls.append((args, kwargs))
                targets.append(block.run(dense_layer, args, kwargs))
                sparse.append(y)
    finally:
        for h in hooks:
            h.remove()
    return calls, targets, sparse


def _mean_loss(outputs, targets) -> float:
    """Mean of (y - t)^2 over every element of every mini-batch."""
    total = sum(float((y - t).square().sum()) for y, t in zip(outputs, targets))
    return total / max(sum(t.numel() for t in targets), 1)


def reconstruct_layer(engine, layer, dense_layer, hidden: torch.Tensor, masks: dict[str, torch.Tensor],
                      epochs: int = 1, lr: float = 5e-4, seed: int = 0, batch: int = 4
                      ) -> tuple[dict, torch.Tensor | None]:
    """Adam on the kept weights of each sub-block for `epochs` passes over the calibration windows in
    mini-batches of `batch`, minimising mean((sparse block(u) - dense block(u))^2). Returns per-block losses
    and, for a pre-norm layer, its outputs for every window (the next layer's input; else None)."""
    gen = torch.Generator().manual_seed(seed)
    report = {}
    blocks = list(engine.adapter.subblocks(layer))
    layer_out = torch.empty_like(hidden) if engine.adapter.output_adds_last_block(layer) else None
    for block in blocks:
        last = block is blocks[-1]
        calls, targets, sparse = _block_inputs(engine, layer, dense_layer, hidden, block, batch,
                                               layer_out if last else None)
        params = [layer.get_submodule(n).weight for n in block.linears]
        keep = [(~masks[n]).to(p.dtype) for n, p in zip(block.linears, params)]
        saved = [p.detach().clone() for p in params]
        before = _mean_loss(sparse, targets)
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
        with torch.no_grad():
            tuned = [block.run(layer, a, k) for a, k in calls]
        after = _mean_loss(tuned, targets)
        if after > before:
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)
            after, tuned = before, sparse
        if last and layer_out is not None:
            # Pre-norm: the layer's output is the last block's residual plus its output.
            start = 0
            for y_new, y_old in zip(tuned, sparse):
                n = y_new.numel() // layer_out[0].numel()   # windows (OPT's MLP sees tokens flattened)
                layer_out[start:start + n] += (y_new - y_old).reshape(n, *layer_out.shape[1:])
                start += n
        report[block.name] = {"loss_before": before, "loss_after": after}
    return report, layer_out
