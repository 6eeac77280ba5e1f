"""Per-decoder-layer sparsity allocation that keeps the global ratio.

Every decoder layer of a family has the same weight count, so a list of per-layer sparsities whose mean is
the target keeps the global sparsity exact (up to rounding each row to whole weights).

- uniform: every layer at the target.
- owl (Yin et al., 2024): layer outlier ratio D_l = fraction of Wanda scores |W|*||X|| above M * their
  layer mean, on the dense model. More outliers -> lower sparsity, spread over target +- lambda.
- hessian (after Shao et al., 2024): sensitivity = Hutchinson estimate of the trace of the full-model
  loss Hessian per parameter of each layer (`toolchain.sensitivity`); layers are ranked and given linearly spaced sparsities over
  target +- alpha, the most sensitive layer the lowest.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError

ALLOCATIONS = ("uniform", "owl", "hessian")
OWL_LAMBDA, OWL_M = 0.08, 5.0      # OWL README settings for LLaMA (code default M is 3)
HESSIAN_ALPHA = 0.1                # Shao et al., Algorithm 1


def _clip(sparsities: list[float], target: float) -> list[float]:
    """Keep every layer inside (0, 1) and the mean at `target` after clipping."""
    s = torch.tensor(sparsities, dtype=torch.float64)
    for _ in range(10):
        s = s.clamp(0.01, 0.99)
        s += target - s.mean()
    return [float(v) for v in s.clamp(0.01, 0.99)]


def owl_from_outlier_ratios(ratios: list[float], target: float, lam: float = OWL_LAMBDA) -> list[float]:
    d = torch.tensor(ratios, dtype=torch.float64)
    span = d.max() - d.min()
    d = (d - d.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(d)
    keep = d - d.mean() + (1 - target)
    return _clip([float(1 - k) for k in keep], target)


def rank_linear(sensitivity: list[float], target: float, alpha: float = HESSIAN_ALPHA) -> list[float]:
    """Most sensitive layer gets target - alpha, the least sensitive target + alpha, linear in rank."""
    n = len(sensitivity)
    if n == 1:
        return [target]
    order = sorted(range(n), key=lambda i: sensitivity[i])  # ascending sensitivity
    out = [0.0] * n
    for rank, i in enumerate(order):
        out[i] = target + alpha - rank * (2 * alpha) / (n - 1)
    return _clip(out, target)


@torch.no_grad()
def owl_outlier_ratios(engine, m: float = OWL_M, progress: bool = True) -> list[float]:
    """One dense pass: per layer, the fraction of Wanda scores above m times the layer's mean score."""

    def outlier_ratio(i, layer, hidden):
        stats = engine.collect_stats(layer, hidden, hessian=False)
        scores = torch.cat([(lin.weight.detach().float().abs() * stats[name].col_norms[None, :]).flatten()
                            for name, lin in engine.adapter.linears(layer).items()])
        return {"ratio": float((scores > m * scores.mean()).float().mean())}

    return [e["ratio"] for e in engine.walk(outlier_ratio, desc="owl: outlier ratios", progress=progress)]


def check_allocation(kind: str, target) -> None:
    if kind not in ALLOCATIONS:
        raise ConfigError(f"--allocation {kind!r}: choose one of {', '.join(ALLOCATIONS)}")
    if kind != "uniform" and target.is_nm:
        raise ConfigError(f"--allocation {kind} varies sparsity per layer, which N:M ({target.label}) cannot "
                          f"express; use it with unstructured sparsity such as 0.5")
