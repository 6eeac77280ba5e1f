"""Hutchinson estimates of the trace of the full-model loss Hessian, per decoder linear.

tr(H_l) = E_v[v_l^T (H v)_l] for Rademacher v over every decoder linear at once, with H the Hessian of the
model's cross-entropy on calibration windows with respect to the linears' weights (only the diagonal blocks
survive the expectation). One window per probe.

The Hessian-vector product is a central difference of two ordinary gradients,
H v = (grad L(W + eps v) - grad L(W - eps v)) / (2 eps) + O(eps^2), not a double backward: a double backward
keeps the whole backward graph alive (many times the float32 model), two plain backward passes keep one
layer's gradient at a time. The weights are never touched: each linear adds
eps * v x to its output through `_ProbeShift`, so the forward is that of W + eps v. The step is
`FD_STEP` times the RMS of the probed weights: between the truncation error of larger steps and the float32
rounding of smaller ones (tests/test_aptq.py checks the traces against the exact double backward). For a ReLU model (OPT) the difference also counts the
kinks that the step crosses, which a double backward treats as zero curvature.

Used by the pruning allocation (`--allocation hessian`, summed per decoder layer) and by APTQ's bit allocation
(`--sensitivity model`), where the layer-local Hessians would not see how an early layer's error grows through
the rest of the model.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

FD_STEP = 5e-4   # the difference step, relative to the RMS of the probed weights


class _ProbeShift(torch.autograd.Function):
    """eps * x v^T for an int8 probe v: the output change of moving W by eps v. The backward recasts v
    rather than saving a float copy, so the probes stay at a quarter of float32's memory."""

    @staticmethod
    def forward(ctx, x, probe, eps):
        ctx.save_for_backward(probe)
        ctx.eps = eps
        return eps * F.linear(x, probe.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        (probe,) = ctx.saved_tensors
        return ctx.eps * grad @ probe.to(grad.dtype), None, None


def _shift_hook(probe: torch.Tensor, eps: float):
    def hook(module, inputs, output):
        return output + _ProbeShift.apply(inputs[0], probe, eps)
    return hook


def _fold_into(totals: torch.Tensor, k: int, probe: torch.Tensor, scale: float):
    def hook(param: torch.Tensor) -> None:
        totals[k] += scale * float((param.grad * probe).sum(dtype=torch.float64))
        param.grad = None
    return hook


@contextlib.contextmanager
def _recomputed(layers):
    """Run each decoder layer under activation checkpointing: its backward recomputes its forward, so only the
    layers' inputs are kept between the forward and the backward, not every layer's internals."""
    def wrap(forward):
        return lambda *args, **kwargs: checkpoint(forward, *args, use_reentrant=False, **kwargs)

    for layer in layers:
        layer.forward = wrap(layer.forward)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _fold_gradient(model, ids, linears, probes, eps: float, totals: torch.Tensor) -> None:
    """totals[k] += v_k . grad_k L(W + eps v) / (2 eps), for the model's loss on one window."""
    flat = [lin.weight for lin in linears]
    shifts = [lin.register_forward_hook(_shift_hook(v, eps)) for lin, v in zip(linears, probes)]
    # Each weight's gradient is folded into v . grad as it arrives and freed at once, so the gradients of all
    # linears are never held together.
    folds = [p.register_post_accumulate_grad_hook(_fold_into(totals, k, probes[k], 0.5 / eps))
             for k, p in enumerate(flat)]
    try:
        loss = model(ids, labels=ids, use_cache=False).loss
        torch.autograd.backward(loss, inputs=flat)
    finally:
        for h in shifts + folds:
            h.remove()


def linear_hessian_traces(model, adapter, calib_ids: torch.Tensor, samples: int = 4, seed: int = 0,
                          device: torch.device | str = "cpu", progress: bool = True) -> list[dict[str, float]]:
    """Per decoder layer, {linear name: estimated tr(H_l) / n_l} (the mean Hessian diagonal, per weight)."""
    layers = adapter.decoder_layers(model)
    named = [list(adapter.linears(layer).items()) for layer in layers]
    linears = [lin for group in named for _, lin in group]
    flat = [lin.weight for lin in linears]
    with torch.no_grad():
        rms = (sum(float(w.double().pow(2).sum()) for w in flat) / sum(w.numel() for w in flat)) ** 0.5
    eps = FD_STEP * rms
    gen = torch.Generator().manual_seed(seed)
    totals = torch.zeros(len(flat), dtype=torch.float64)
    requires = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in flat:
        p.requires_grad_(True)
        p.grad = None
    model.to(device)
    n = min(samples, calib_ids.shape[0])
    try:
        with _recomputed(layers):
            for i in tqdm(range(n), desc="hessian trace (Hutchinson)", disable=not progress, leave=False):
                ids = calib_ids[i:i + 1].to(device)
                # Rademacher probes are +-1: int8 holds them exactly at a quarter of float32's memory.
                probes = [(torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int8) * 2 - 1).to(device)
                          for p in flat]
                for sign in (1.0, -1.0):
                    _fold_gradient(model, ids, linears, probes, sign * eps, totals)
                del probes
    finally:
        for p, r in requires.items():
            p.requires_grad_(r)
            p.grad = None
        model.to("cpu")
    out, k = [], 0
    for group in named:
        entry = {}
        for name, lin in group:
            entry[name] = abs(float(totals[k])) / max(n, 1) / lin.weight.numel()
            k += 1
        out.append(entry)
    return out


def layer_hessian_traces(model, adapter, calib_ids: torch.Tensor, samples: int = 4, seed: int = 0,
                         device: torch.device | str = "cpu", progress: bool = True) -> list[float]:
    """Per decoder layer, the estimated trace per weight over all its linears."""
    per_linear = linear_hessian_traces(model, adapter, calib_ids, samples, seed, device, progress)
    layers = adapter.decoder_layers(model)
    out = []
    for layer, traces in zip(layers, per_linear):
        sizes = {name: lin.weight.numel() for name, lin in adapter.linears(layer).items()}
        out.append(sum(traces[n] * sizes[n] for n in traces) / sum(sizes.values()))
    return out
