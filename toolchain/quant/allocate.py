"""Per-linear bit widths that meet an average budget, minimising total sensitivity-weighted error.

Each quantized linear l has n_l weights and, for every candidate width b, a cost
    Omega_l(b) = S_l * ||W_l - Q_b(W_l)||_F^2        (HAWQ-V2 style; APTQ's Hessian-trace sensitivity)
with S_l the mean diagonal of l's Hessian (trace per weight; APTQ's attention-aware Hessians for q/k/v) and
Q_b round-to-nearest on the run's group grid. The allocation solves the 0/1 multiple-choice knapsack
    min sum_l Omega_l(b_l)   s.t.   sum_l n_l b_l <= budget * sum_l n_l,   b_l in candidates
exactly by dynamic programming over the budget above the all-minimum assignment, counted in units of the
greatest common divisor of the items' extra sizes n_l (b - b_min). If that table would be too large, item
sizes are rounded up and the capacity down to a coarser unit, so the budget is still never exceeded (the
optimum is then over a slightly smaller budget). Budget proof: every DP state is a sum of item sizes no
larger than the capacity, and the capacity is at most the budget; hence the chosen average <= budget.
"""
from __future__ import annotations

import math
from functools import reduce

import numpy as np

from ..errors import ConfigError

MAX_UNITS = 200_000


def allocate_bits(sizes: list[int], costs: np.ndarray, candidates: list[int], budget: float) -> list[int]:
    """sizes[l] weights per item, costs[l, c] for candidates[c]; returns the width per item."""
    candidates = sorted(candidates)
    costs = np.asarray(costs, dtype=np.float64)
    if costs.shape != (len(sizes), len(candidates)):
        raise ValueError(f"costs must be [items, candidates] = [{len(sizes)}, {len(candidates)}], got {costs.shape}")
    if not candidates[0] <= budget <= candidates[-1]:
        raise ConfigError(f"average of {budget} bits is outside the candidate widths "
                          f"{','.join(map(str, candidates))}: it must lie in [{candidates[0]}, {candidates[-1]}]")
    if not np.isfinite(costs).all():
        raise ValueError("bit-allocation costs must be finite")
    b0, total = candidates[0], sum(sizes)
    extra = np.array([[n * (b - b0) for b in candidates] for n in sizes], dtype=np.int64)   # [items, C]
    capacity_bits = math.floor((budget - b0) * total + 1e-9)
    unit = reduce(math.gcd, [int(e) for e in extra.ravel() if e > 0], 0) or 1
    capacity = capacity_bits // unit
    if capacity > MAX_UNITS:                      # coarser unit: round sizes up, capacity down (still feasible)
        scale = math.ceil(capacity / MAX_UNITS)
        unit, capacity = unit * scale, capacity // scale
    weight = -(-extra // unit)                    # ceil division: never under-count an item's bits
    inf = np.inf
    best = np.full(capacity + 1, inf)
    best[0] = 0.0
    choice = np.zeros((len(sizes), capacity + 1), dtype=np.int8)
    for i in range(len(sizes)):
        new = np.full(capacity + 1, inf)
        for c in range(len(candidates)):
            w = int(weight[i, c])
            if w > capacity:
                continue
            cand = np.full(capacity + 1, inf)
            cand[w:] = best[:capacity + 1 - w] + costs[i, c]
            better = cand < new
            new[better], choice[i, better] = cand[better], c
        best = new
    used = int(np.argmin(best))        # lowest cost over every reachable fill (ties: the smaller fill)
    picks = []
    for i in reversed(range(len(sizes))):
        c = int(choice[i, used])
        picks.append(candidates[c])
        used -= int(weight[i, c])
    picks.reverse()
    assert sum(n * b for n, b in zip(sizes, picks)) <= budget * total + 1e-6
    return picks
