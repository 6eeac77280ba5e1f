"""LLM-Pruner's first-order Taylor importance (Ma et al., 2023), block-wise and GQA-aware, training-free.

The importance of a weight is the first-order Taylor estimate of the loss change when it is set to zero,
|w * dL/dw|, with L the language-model loss on the calibration windows, one backward pass through the dense
model (LLM-Pruner's `--pruner_type taylor --taylor param_first`). A unit's importance is the sum over every
weight it owns: its producers' rows (q/k/v or gate/up, fc1) and its consumer's columns (o_proj, down_proj, fc2),
the dependency group of LLM-Pruner's graph. GQA-aware: a KV group owns its key/value rows *and* the rows of
every query head that reads it, and query heads inside a group are units of their own that go in equal numbers
from every group (LLM-Pruner's graph couples q/k/v head counts and breaks on GQA). Block-wise: the attention
and MLP sub-blocks of every layer lose units, nothing is re-fitted (LLM-Pruner follows with LoRA training,
which this baseline leaves out). The scores come from the dense model's gradients; as LLM-Pruner, the
scores of the units that stay are not recomputed after earlier layers shrink.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Removal, StructuredMethod, unit_sum


class TaylorSP(StructuredMethod):
    name = "taylor"
    needs_stats = False
    needs_gradients = True

    def __init__(self):
        # per decoder layer (by identity) and linear name: |W * dL/dW|, sliced as the layer shrinks
        self._salience: dict[int, dict[str, torch.Tensor]] = {}

    def prepare(self, model: nn.Module, layers: nn.ModuleList, calib: torch.Tensor, batch_size: int) -> None:
        """One backward pass of the mean next-token loss over the calibration windows; keep |W * grad| of every
        linear inside the decoder layers."""
        linears = {(id(layer), name): module for layer in layers for name, module in layer.named_modules()
                   if isinstance(module, nn.Linear)}
        params = list(model.parameters())
        was_grad = [p.requires_grad for p in params]
        targets = {id(m.weight) for m in linears.values()}
        for p in params:
            p.requires_grad_(id(p) in targets)
            p.grad = None
        device = next(iter(linears.values())).weight.device
        try:
            with torch.enable_grad():
                n = calib.shape[0]
                for start in range(0, n, batch_size):
                    ids = calib[start:start + batch_size].to(device)
                    # labels = inputs: the model shifts them; weighting by windows gives the mean over all windows
                    loss = model(ids, labels=ids, use_cache=False).loss * (ids.shape[0] / n)
                    loss.backward()
            for (key, name), module in linears.items():
                grad = module.weight.grad
                score = torch.zeros_like(module.weight) if grad is None else (module.weight.detach() * grad).abs()
                self._salience.setdefault(key, {})[name] = score.float()
        finally:
            for p, flag in zip(params, was_grad):
                p.grad = None
                p.requires_grad_(flag)

    def _scores(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        if id(layer) not in self._salience:
            raise RuntimeError("taylor: prepare() must compute the gradients before importance() is asked")
        return self._salience[id(layer)]

    def importance(self, kind, layer, stats):
        scores = self._scores(layer)
        device = layer.get_submodule(kind.consumer).weight.device
        total = unit_sum(scores[kind.consumer].to(device).sum(dim=0), kind)
        for name, rows in kind.producers:
            total = total + scores[name].to(device).sum(dim=1).reshape(kind.count, rows).sum(dim=1)
        return total

    @torch.no_grad()
    def remove(self, kind, layer, stats, n) -> Removal:
        removal = super().remove(kind, layer, stats, n)
        # the next kind of this layer indexes the narrower linears: slice the scores the same way
        scores = self._scores(layer)
        keep = removal.keep.to(scores[kind.consumer].device)
        for name, _ in kind.producers:
            scores[name] = scores[name][kind.rows(name, keep)]
        scores[kind.consumer] = scores[kind.consumer][:, kind.rows(kind.consumer, keep)]
        return removal
