"""Deployment-safe recovery: tune only what a quantized model's deployment format carries.

A quantized linear is `W = scale[group] * (code - zero)`. Every exporter (blob, ONNX MatMulNBits/QDQ,
compressed-tensors, the FPGA images) stores the integer codes, the per-group fp16 scales and, as floats, the
norm weights and the linear biases. Recovery trains exactly those floats with Adam, end to end on the model's
loss, and leaves the codes, the zeros and the prune masks bit-identical, so the tuned model is still the same
integer network and every exporter's input stays valid. This is the scale-only end-to-end step of
EfficientQAT (E2E-QP) and PEQA, used as the "silver bullet" papers use their small fine-tune (a few hundred
curated reasoning examples, a few minutes; Li et al. 2025, arXiv 2501.03035 and 2505.11574): supervised
next-token loss on correct solutions, or, given the dense model, the KL divergence to its next-token
distribution.

A scale is trained as a relative factor (`scale = scale0 * (1 + delta)`, delta from 0), so one learning rate
moves every layer's scales by the same relative amount whatever their magnitude; at the end the scales are
rounded to fp16, as the format stores them, and the float weights are re-derived from the codes.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from .quantizer import FP16_TINY, QuantizedWeight


@dataclass
class Examples:
    """Training sequences, right-padded: token ids [n, t], the attention mask [n, t], and which positions are
    scored (`targets`[i, j] = 1 when token j of sequence i is predicted and trained on)."""

    ids: torch.Tensor
    attention: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    def batch(self, rows) -> "Examples":
        rows = torch.as_tensor(rows, dtype=torch.long)
        width = int(self.attention[rows].sum(1).max())   # trim the shared padding
        return Examples(self.ids[rows, :width], self.attention[rows, :width], self.targets[rows, :width])


def pad_examples(sequences: list[tuple[list[int], list[int]]], pad_id: int = 0) -> Examples:
    """Examples from (ids, targets) pairs of equal length, where targets marks the positions trained on."""
    if not sequences:
        raise ConfigError("recovery needs at least one training example")
    width = max(len(ids) for ids, _ in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    targets = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (seq, tgt) in enumerate(sequences):
        ids[i, :len(seq)] = torch.tensor(seq)
        attention[i, :len(seq)] = 1
        targets[i, :len(seq)] = torch.tensor(tgt)
    return Examples(ids, attention, targets)


class ScaledCodes(nn.Module):
    """A weight parametrization `scale0 * (1 + delta)[group] * (code - zero)`: only `delta` is trained."""

    def __init__(self, qw: QuantizedWeight, device):
        super().__init__()
        cols = qw.codes.shape[1]
        group_of = torch.empty(cols, dtype=torch.long)
        for gi, (a, b) in enumerate(qw.spec.groups(cols)):
            group_of[a:b] = gi
        self.register_buffer("group_of", group_of.to(device), persistent=False)
        self.register_buffer("scale0", qw.scales.float().to(device), persistent=False)
        zeros = qw.zeros.to(torch.int32)[:, group_of]
        self.register_buffer("levels", (qw.codes.to(torch.int32) - zeros).float().to(device), persistent=False)
        self.delta = nn.Parameter(torch.zeros_like(self.scale0))

    def scales(self) -> torch.Tensor:
        return self.scale0 * (1 + self.delta)

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return self.scales()[:, self.group_of] * self.levels


def trainable_floats(model: nn.Module, linears: dict[str, nn.Linear]) -> dict[str, nn.Parameter]:
    """The float parameters a deployment format carries besides the scales: every norm's weight and bias (by
    the class name: RMSNorm, LayerNorm) and the biases of the quantized linears."""
    out: dict[str, nn.Parameter] = {}
    for name, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            for pname, param in module.named_parameters(recurse=False):
                out[f"{name}.{pname}"] = param
    for name, lin in linears.items():
        if lin.bias is not None:
            out[f"{name}.bias"] = lin.bias
    return out


def sequence_loss(model: nn.Module, batch: Examples, teacher: nn.Module | None = None) -> torch.Tensor:
    """Mean over the scored tokens of the next-token cross-entropy, or with `teacher` of KL(teacher || model)."""
    logits = model(input_ids=batch.ids, attention_mask=batch.attention).logits[:, :-1].float()
    scored = batch.targets[:, 1:].bool()
    logits = logits[scored]
    if teacher is None:
        return nn.functional.cross_entropy(logits, batch.ids[:, 1:][scored])
    with torch.no_grad():
        target = teacher(input_ids=batch.ids, attention_mask=batch.attention).logits[:, :-1].float()[scored]
    return nn.functional.kl_div(torch.log_softmax(logits, -1), torch.log_softmax(target, -1), log_target=True,
                                reduction="batchmean")


def mean_loss(model: nn.Module, examples: Examples, batch_size: int, teacher: nn.Module | None = None) -> float:
    """The token-weighted mean loss over all of `examples`, without gradients."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = examples.batch(range(start, min(start + batch_size, len(examples))))
            n = int(batch.targets[:, 1:].sum())
            if n:
                total += float(sequence_loss(model, batch, teacher)) * n
                tokens += n
    return total / max(tokens, 1)


@dataclass
class RecoverSettings:
    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 4
    seed: int = 0


def recover_scales(model: nn.Module, state: dict[str, QuantizedWeight], examples: Examples,
                   settings: RecoverSettings, teacher: nn.Module | None = None, device=None,
                   progress: bool = True) -> tuple[dict, dict[str, QuantizedWeight]]:
    """Tune the scales of every linear in `state` (full module names of `model`), every norm and the linears'
    biases with Adam on `examples`; everything else is frozen. `model` is changed in place: its quantized
    weights become exactly `fp16 scale * (code - zero)` of the returned state, whose codes, zeros and masks are
    the input's own tensors. Returns the report and the new state."""
    import torch.nn.utils.parametrize as parametrize

    if settings.steps < 1 or settings.batch_size < 1 or not settings.lr > 0:
        raise ConfigError(f"recovery needs --steps >= 1, --batch-size >= 1 and --lr > 0 (got {settings.steps}, "
                          f"{settings.batch_size}, {settings.lr})")
    device = torch.device(device or "cpu")
    modules = dict(model.named_modules())
    missing = sorted(set(state) - set(modules))
    if missing:
        raise ConfigError(f"quant_state names linears the model does not have: {', '.join(missing[:3])}")
    linears = {name: modules[name] for name in state}
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    was_training = model.training
    model.eval()   # no dropout: the deployed model's own forward
    for p in model.parameters():
        p.requires_grad_(False)
    floats = trainable_floats(model, linears)
    originals = {name: p.detach().clone() for name, p in floats.items()}
    for p in floats.values():
        p.requires_grad_(True)
    scaled: dict[str, ScaledCodes] = {}
    for name, lin in linears.items():
        scaled[name] = ScaledCodes(state[name], device)
        parametrize.register_parametrization(lin, "weight", scaled[name], unsafe=True)
    params = [s.delta for s in scaled.values()] + list(floats.values())
    t0 = time.perf_counter()
    try:
        loss_before = mean_loss(model, examples, settings.batch_size, teacher)
        optimizer = torch.optim.Adam(params, lr=settings.lr)
        order = _batches(len(examples), settings.batch_size, settings.steps, settings.seed)
        losses = []
        bar = tqdm(order, desc=f"recover {len(params)} tensors", disable=not progress)
        for rows in bar:
            loss = sequence_loss(model, examples.batch(rows), teacher)
            if not torch.isfinite(loss):
                raise ConfigError(f"recovery diverged at step {len(losses) + 1} (loss {float(loss)}): lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        new_scales = {name: _fp16_scales(s.scales().detach()) for name, s in scaled.items()}
    finally:
        for name, lin in linears.items():
            parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
        for p in model.parameters():
            p.requires_grad_(False)
        model.train(was_training)
    new_state = {}
    with torch.no_grad():
        for name, lin in linears.items():
            qw = state[name]
            new_state[name] = QuantizedWeight(qw.codes, new_scales[name].cpu(), qw.zeros, qw.spec, qw.prune_mask)
            lin.weight.data.copy_(new_state[name].dequantize().to(device, lin.weight.dtype))
    loss_after = mean_loss(model, examples, settings.batch_size, teacher)
    report = {
        "objective": "kl-to-teacher" if teacher is not None else "next-token",
        "steps": settings.steps, "lr": settings.lr, "batch_size": settings.batch_size, "seed": settings.seed,
        "trained": {"scales": sum(s.delta.numel() for s in scaled.values()),
                    "scale_tensors": len(scaled),
                    "norm_and_bias": sum(p.numel() for p in floats.values()), "norm_and_bias_tensors": len(floats)},
        "loss": {"before": loss_before, "after": loss_after, "first_steps": _mean(losses[:10]),
                 "last_steps": _mean(losses[-10:])},
        "loss_curve": [round(v, 5) for v in _every(losses, 50)],
        "change": {"scales_rel_mean": _mean([float(((new_scales[n] - state[n].scales.to(device)).abs()
                                                    / state[n].scales.to(device)).mean()) for n in scaled]),
                   "floats_rel_mean": _mean([float(((p.detach() - originals[n]).norm()
                                                    / originals[n].norm().clamp(min=1e-12))) for n, p in floats.items()])},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return report, new_state


def _fp16_scales(scales: torch.Tensor) -> torch.Tensor:
    """The scales as the format stores them: positive (a sign flip would be a different grid) and fp16-exact."""
    return scales.float().clamp(min=FP16_TINY).half().float()


def _batches(n: int, size: int, steps: int, seed: int) -> list[list[int]]:
    """`steps` batches of `size` example indices: seeded shuffled passes over all n, so each example is seen
    once per epoch."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * size:
        epoch = list(range(n))
        rng.shuffle(epoch)
        order += epoch
    return [order[i * size:(i + 1) * size] for i in range(steps)]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _every(values: list[float], points: int) -> list[float]:
    """`values` averaged in about `points` consecutive chunks (the loss curve compressed for the record)."""
    if not values:
        return []
    chunk = max(1, len(values) // points)
    return [_mean(values[i:i + chunk]) for i in range(0, len(values), chunk)]
