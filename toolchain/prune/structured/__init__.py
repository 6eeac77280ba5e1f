"""Structured pruning: remove whole KV groups and MLP channel blocks, so the model becomes a smaller dense one.

One module per method over the layer engine (the pipeline in `toolchain.jobs.structured` owns the walk):
`magnitude.py`, `wanda_sp.py`, `flap.py`, `taylor.py` (LLM-Pruner's first-order Taylor), and ours, `obs_refit.py` (OBS saliency, exact least-squares refit).
`budget.py` turns the parameter budget into per-layer unit counts; `surgery.py` rebuilds the narrower linears.
Depth (`depth.py`, `--method depth`) removes whole decoder layers instead, ranked by Block Influence.
"""
from __future__ import annotations

from ...errors import ConfigError
from .base import Removal, StructuredMethod
from .budget import Budget, global_removal, uniform_removal
from .flap import Flap
from .magnitude import MagnitudeSP
from .obs_refit import ObsRefit
from .taylor import TaylorSP
from .wanda_sp import WandaSP

#: ours first: the default of `toolchain prune --structured`
STRUCTURED_METHODS: dict[str, type[StructuredMethod]] = {"obs-refit": ObsRefit, "flap": Flap, "wanda-sp": WandaSP,
                                                         "taylor": TaylorSP, "magnitude": MagnitudeSP}
DEFAULT_STRUCTURED = "obs-refit"
#: removes whole decoder layers (prune/structured/depth.py) rather than units inside every layer
DEPTH_METHOD = "depth"
#: the share of the budget ours takes first as whole layers (`--depth-share`): layers cost little out of the
#: calibration domain, the refit narrowing costs little in it (chosen on out-of-domain perplexity; zero-shot
#: accuracy could not separate the candidates; docs/results.md)
DEFAULT_DEPTH_SHARE = 0.5
STRUCTURED_ALLOCATIONS = ("uniform", "global", "search")
#: calibration windows `--allocation search` draws beyond --calib-samples and holds out for its KL fitness
SEARCH_WINDOWS = 4


def make_structured(name: str) -> StructuredMethod:
    if name not in STRUCTURED_METHODS:
        raise ConfigError(f"unknown structured method {name!r}; choose one of {', '.join(STRUCTURED_METHODS)}")
    return STRUCTURED_METHODS[name]()


__all__ = ["Budget", "Removal", "StructuredMethod", "STRUCTURED_METHODS", "STRUCTURED_ALLOCATIONS",
           "DEFAULT_DEPTH_SHARE", "DEFAULT_STRUCTURED", "DEPTH_METHOD", "SEARCH_WINDOWS", "global_removal", "make_structured", "uniform_removal"]
