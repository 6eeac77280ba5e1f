"""Hutchinson estimates of the trace of the full-model loss Hessian, per decoder linear.

tr(H_l) = E_v[v^T H_l v] for Rademacher v, with H_l the Hessian of the model's cross-entropy on calibration
windows with respect to linear l's weights. Each probe costs one forward, one backward with graph and one
Hessian-vector product through the whole model; one window per probe. Used by the pruning allocation
(`--allocation hessian`, summed per decoder layer) and by APTQ's bit allocation (`--sensitivity model`),
where the layer-local Hessians would not see how an early layer's error grows through the rest of the model.
"""
from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm


def _fold_into(totals: torch.Tensor, k: int, probe: torch.Tensor):
    def hook(param: torch.Tensor) -> None:
        totals[k] += float((param.grad * probe).sum())
        param.grad = None
    return hook


def linear_hessian_traces(model, adapter, calib_ids: torch.Tensor, samples: int = 4, seed: int = 0,
                          device: torch.device | str = "cpu", progress: bool = True) -> list[dict[str, float]]:
    """Per decoder layer, {linear name: estimated tr(H_l) / n_l} (the mean Hessian diagonal, per weight)."""
    layers = adapter.decoder_layers(model)
    named = [list(adapter.linears(layer).items()) for layer in layers]
    flat = [lin.weight for group in named for _, lin in group]
    gen = torch.Generator().manual_seed(seed)
    totals = torch.zeros(len(flat), dtype=torch.float64)
    requires = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in flat:
        p.requires_grad_(True)
        p.grad = None   # the Hessian-vector products accumulate into .grad
    # Double backward is not implemented for the fused attention kernels; eager attention is exact.
    attn_impl = getattr(model.config, "_attn_implementation", None)
    with contextlib.suppress(Exception):
        model.set_attn_implementation("eager")
    model.to(device)
    n = min(samples, calib_ids.shape[0])
    try:
        for i in tqdm(range(n), desc="hessian trace (Hutchinson)", disable=not progress, leave=False):
            ids = calib_ids[i:i + 1].to(device)
            loss = model(ids, labels=ids, use_cache=False).loss
            grads = torch.autograd.grad(loss, flat, create_graph=True)
            # Rademacher probes are +-1: int8 holds them exactly at a quarter of float32's memory.
            probes = [(torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int8) * 2 - 1).to(device) for p in flat]
            # (H v)_l arrives in each weight's .grad; a hook folds it into v_l . (H v)_l at once and frees it, so
            # the Hessian-vector product is never held for every linear at the same time.
            hooks = [p.register_post_accumulate_grad_hook(_fold_into(totals, k, probes[k])) for k, p in enumerate(flat)]
            try:
                torch.autograd.backward(sum((g * v).sum() for g, v in zip(grads, probes)), inputs=flat)
            finally:
                for h in hooks:
                    h.remove()
            del loss, grads, probes
    finally:
        for p, r in requires.items():
            p.requires_grad_(r)
        if attn_impl:
            with contextlib.suppress(Exception):
                model.set_attn_implementation(attn_impl)
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
