"""`toolchain prune`: unstructured, N:M and structured pruning options and their checks."""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError
from ...prune import INIT_METHODS, METHODS, SparsityTarget
from ...prune.allocation import ALLOCATIONS, check_allocation
from ...prune.structured import (DEFAULT_DEPTH_SHARE, DEFAULT_STRUCTURED, DEPTH_METHOD, SEARCH_WINDOWS,
                                 STRUCTURED_ALLOCATIONS, STRUCTURED_METHODS)
from ...prune.barber import GRANULARITIES, SCORES, check_granularity, check_score
from ..options import option, refuse_inapplicable
from .calibration import CalibConfig

REBUILD_SOLVERS = ("lstsq", "obs")     # how Barber re-solves the rows it changed (SparseGPT init)
RESOLVE_MODES = ("none", "lstsq")
RECONSTRUCT_MODES = ("none", "block")


def _barber(cfg) -> bool:
    return cfg.method == "barber"


def _barber_on_sparsegpt(cfg) -> bool:
    return cfg.method == "barber" and cfg.init == "sparsegpt"


def _block_reconstruction(cfg) -> bool:
    return cfg.reconstruct == "block"


def _structured(cfg) -> bool:
    return cfg.structured


def _structured_search(cfg) -> bool:
    return cfg.structured and cfg.allocation == "search"


def _structured_width(cfg) -> bool:
    return cfg.structured and cfg.structured_method() != DEPTH_METHOD


def _depth(cfg) -> bool:
    return cfg.structured and cfg.structured_method() == DEPTH_METHOD


@dataclass
class PruneConfig(CalibConfig):
    method: str | None = option(
        None, "--method", f"pruning method; with --structured one of {', '.join(STRUCTURED_METHODS)} (default "
        f"{DEFAULT_STRUCTURED}, ours: OBS saliency with an exact least-squares refit), or {DEPTH_METHOD} (whole "
        f"decoder layers, ranked by Block Influence), otherwise required",
        choices=tuple(dict.fromkeys((*METHODS, *STRUCTURED_METHODS, DEPTH_METHOD))))
    structured: bool = option(
        False, "--structured", "remove whole KV groups (a key/value head and the query heads reading it) and blocks "
        "of MLP channels (or, with --method depth, whole decoder layers) instead of single weights: the output is a "
        "smaller dense model with a plain config; --sparsity is then the fraction of decoder-layer parameters "
        "removed")
    channel_multiple: int = option(8, "--channel-multiple", "structured: MLP channels per unit, so every kept "
                                   "width is a multiple of it (64 or 128 for GPU-friendly widths)", type=int,
                                   applies=_structured_width, applies_to="with --structured and a method that "
                                   "removes channels (not --method depth) only")
    rescore: bool = option(False, "--rescore", "--method depth: re-score the remaining layers' Block Influence on "
                           "the model as it is after each removal, one walk per removed layer (default: one-shot, "
                           "every layer scored once on the dense model, as ShortGPT does)",
                           applies=_depth, applies_to="with --structured --method depth only")
    depth_share: float | None = option(None, "--depth-share", "structured width methods: the share of --sparsity "
                                "taken first by removing whole decoder layers (lowest Block Influence, as --method "
                                "depth); the method then narrows the remaining layers, calibrated on the shortened "
                                "model, to the rest of the budget. 0: widths only; default: "
                                f"{DEFAULT_DEPTH_SHARE} for {DEFAULT_STRUCTURED} (ours; widths only where that share "
                                "is less than half a layer), 0 for the published baselines", type=float,
                                applies=_structured_width, applies_to="with --structured and a method that removes "
                                "channels (not --method depth) only")
    init: str | None = option(None, "--init", "Barber's initial pruner (default wanda)",
                              choices=tuple(INIT_METHODS), applies=_barber, applies_to="to --method barber only")
    sparsity: str = option("0.5", "--sparsity", "fraction in (0,1) such as 0.5, or N:M such as 2:4 / 4:8 "
                           "(N kept of every M along the reduction dimension)", required=True)
    allocation: str = option("uniform", "--allocation", "per-layer sparsity: uniform, OWL outlier-weighted, or "
                             "Hessian-trace sensitivity (unstructured only; the global ratio is kept); with "
                             "--structured uniform, global (units ranked across the decoder by standardised "
                             "score, FLAP-style; sets the attention/MLP split) or search (evolutionary search "
                             "from the global ranking, fitness KL to the dense model on held-out calibration "
                             "windows; see --search-budget); --method depth ranks layers itself and takes none",
                             choices=(*ALLOCATIONS, *(a for a in STRUCTURED_ALLOCATIONS if a not in ALLOCATIONS)))
    search_budget: int = option(32, "--search-budget", "--allocation search: candidates evaluated at most (the "
                                "seed included; one forward pass on the held-out windows each)", type=int,
                                applies=_structured_search, applies_to="with --structured --allocation search only")
    rebuild_ratio: float = option(0.01, "--rebuild-ratio", "Barber's alpha: the fraction of each row's beneficial "
                                  "pruned<->kept swaps that are made", type=float,
                                  applies=_barber, applies_to="to --method barber only")
    rebuild_granularity: str = option(
        "row", "--rebuild-granularity", "Barber's comparison group for ranking swaps: row (each output row, exact "
        "per-row sparsity; the only choice for N:M), layer (a whole matrix), or block (all matrices of the attention "
        "or MLP block pooled); the reference's output1/layer/block", choices=GRANULARITIES,
        applies=_barber, applies_to="to --method barber only")
    rebuild_score: str = option(
        "taylor-exit", "--rebuild-score", "Barber's weight score. taylor-exit (ours): the reference's score for "
        "every linear except each block's last one (o_proj, down_proj / fc2), which gets the exact block-loss change "
        "of reviving or pruning each weight (gradient at the sparse weights plus the curvature term); grad-rms: the "
        "reference's |W| * RMS(block-loss gradient) everywhere", choices=SCORES,
        applies=_barber, applies_to="to --method barber only")
    keep_updates: bool = option(
        True, "--keep-updates", "Barber with --init sparsegpt: rows whose mask changed are re-solved under the new "
        "mask (see --rebuild-solver), other rows keep SparseGPT's weights. --no-keep-updates resets every kept weight "
        "to its dense value, as the reference code does by default (default: keep)", negatable=True,
        applies=_barber_on_sparsegpt, applies_to="to --method barber --init sparsegpt only (magnitude and Wanda "
                                                  "do not update weights)")
    rebuild_solver: str = option(
        "lstsq", "--rebuild-solver", "Barber with --init sparsegpt: how rows whose mask changed are re-solved under "
        "the new mask: lstsq (the exact least-squares fit on the layer Hessian, conjugate gradients from SparseGPT's "
        "weights) or obs (SparseGPT's own OBS sweep)", choices=REBUILD_SOLVERS,
        applies=_barber_on_sparsegpt, applies_to="to --method barber --init sparsegpt only (only SparseGPT's rows "
                                                  "are re-solved)")
    loss_guard: bool = option(
        True, "--loss-guard", "Barber: keep a sub-block's rebuilt masks only if its block loss on the calibration "
        "windows does not rise, else keep the init's (ours; the reference keeps every rebuild; default: on)",
        negatable=True, applies=_barber, applies_to="to --method barber only")
    hessian_samples: int = 4         # windows for the Hutchinson trace (--allocation hessian)
    resolve_mode: str = option(
        "none", "--resolve", "lstsq: once each layer's masks are final (after Barber's rebuild), re-solve every kept "
        "weight of every linear as the exact least-squares fit to the dense layer's output on the calibration inputs "
        "(conjugate gradients on the layer Hessian, started from the current weights, so the layer error only "
        "falls); SparseGPT's OBS sweep only approximates this", choices=RESOLVE_MODES)
    reconstruct: str = option(
        "none", "--reconstruct", "block: after each layer is pruned, tune its kept weights (Adam, mask fixed) so the "
        "attention and MLP blocks reproduce the dense blocks' outputs on the calibration windows; a block whose loss "
        "would rise keeps its weights", choices=RECONSTRUCT_MODES)
    reconstruct_epochs: int = option(1, "--reconstruct-epochs", "passes over the windows (docs/pruning.md has the "
                                     "measured settings)", type=int, applies=_block_reconstruction,
                                     applies_to="with --reconstruct block only")
    reconstruct_lr: float = option(5e-4, "--reconstruct-lr", "Adam learning rate", type=float,
                                   applies=_block_reconstruction, applies_to="with --reconstruct block only")
    reconstruct_batch: int = option(4, "--reconstruct-batch", "windows per Adam step", type=int,
                                    applies=_block_reconstruction, applies_to="with --reconstruct block only")

    def streaming_refusals(self) -> list[str]:
        refused = []
        if self.structured:
            refused.append("--structured (it rewrites the widths in the config)")
        if self.allocation == "hessian":
            refused.append("--allocation hessian (its Hutchinson traces back-propagate through the whole model)")
        return refused

    def calibrates(self) -> bool:
        """Magnitude pruning with nothing else asked needs no calibration text."""
        if self.structured:
            return self.structured_method() != "magnitude" or self.allocation == "search" or self.layer_share() > 0
        return (self.method != "magnitude" or self.allocation != "uniform" or self.resolve_mode != "none"
                or self.reconstruct != "none")

    def validate(self, given: set[str] | None = None) -> tuple[SparsityTarget, str]:
        """Check every setting; return the sparsity target and the method that makes the first mask.
        `given`: fields set on the command line, each refused where it would have no effect."""
        if self.structured:
            return self._validate_structured(given)
        if self.method is None:
            raise ConfigError(f"--method is required: choose one of {', '.join(METHODS)} (or --structured)")
        if self.method in (*STRUCTURED_METHODS, DEPTH_METHOD) and self.method not in METHODS:
            raise ConfigError(f"--method {self.method} removes whole structures: add --structured")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"--allocation {self.allocation} is for --structured; unstructured pruning takes "
                              f"{', '.join(ALLOCATIONS)}")
        if self.method not in METHODS:
            raise ConfigError(f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method != "barber" and self.init is not None:
            raise ConfigError("--init only applies to --method barber")
        init = (self.init or "wanda") if self.method == "barber" else self.method
        if init not in INIT_METHODS:
            raise ConfigError(f"unknown --init {init!r}; choose one of {', '.join(INIT_METHODS)}")
        if not 0.0 <= self.rebuild_ratio <= 1.0:
            raise ConfigError(f"--rebuild-ratio must be in [0, 1], got {self.rebuild_ratio}")
        self.check_calibration()
        if self.resolve_mode not in RESOLVE_MODES:
            raise ConfigError(f"--resolve {self.resolve_mode!r}: choose one of {', '.join(RESOLVE_MODES)}")
        if self.reconstruct not in RECONSTRUCT_MODES:
            raise ConfigError(f"--reconstruct {self.reconstruct!r}: choose one of {', '.join(RECONSTRUCT_MODES)}")
        if self.reconstruct_epochs < 1 or not self.reconstruct_lr > 0 or self.reconstruct_batch < 1:
            raise ConfigError(f"--reconstruct-epochs and --reconstruct-batch must be >= 1 and --reconstruct-lr > 0 "
                              f"(got {self.reconstruct_epochs}, {self.reconstruct_batch}, {self.reconstruct_lr})")
        target = SparsityTarget.parse(self.sparsity)
        check_allocation(self.allocation, target)
        check_granularity(self.rebuild_granularity, target)
        check_score(self.rebuild_score, self.rebuild_granularity)
        if self.rebuild_solver not in REBUILD_SOLVERS:
            raise ConfigError(f"--rebuild-solver {self.rebuild_solver!r}: choose one of {', '.join(REBUILD_SOLVERS)}")
        refuse_inapplicable(self, given, {"method": "--method"})
        return target, init

    def heldout_windows(self) -> int:
        return SEARCH_WINDOWS if self.structured and self.allocation == "search" else 0

    def structured_method(self) -> str:
        return self.method or DEFAULT_STRUCTURED

    def layer_share(self) -> float:
        """--depth-share as given, or the method's default: ours takes part of the budget as whole layers, the
        published baselines run as published."""
        if self.depth_share is not None:
            return self.depth_share
        return DEFAULT_DEPTH_SHARE if self.structured_method() == DEFAULT_STRUCTURED else 0.0

    def _validate_structured(self, given: set[str] | None) -> tuple[SparsityTarget, str]:
        method = self.structured_method()
        if method not in STRUCTURED_METHODS and method != DEPTH_METHOD:
            raise ConfigError(f"--method {method} prunes single weights; with --structured choose one of "
                              f"{', '.join((*STRUCTURED_METHODS, DEPTH_METHOD))}")
        target = SparsityTarget.parse(self.sparsity)
        if target.is_nm:
            raise ConfigError(f"--structured removes whole units; --sparsity {self.sparsity} must be the fraction "
                              f"of decoder parameters to remove, in (0, 1)")
        if self.allocation not in STRUCTURED_ALLOCATIONS:
            raise ConfigError(f"--allocation {self.allocation} is for unstructured pruning; with --structured "
                              f"choose {' or '.join(STRUCTURED_ALLOCATIONS)}")
        if method == DEPTH_METHOD and self.allocation != "uniform":
            raise ConfigError(f"--allocation {self.allocation} sets the widths of the units inside every layer; "
                              f"--method depth removes whole layers, ranked by their Block Influence, and takes no "
                              f"--allocation. To remove layers and channels, run --method depth, then another "
                              f"--structured method on its output")
        if self.channel_multiple < 1:
            raise ConfigError(f"--channel-multiple must be >= 1, got {self.channel_multiple}")
        if not 0 <= self.layer_share() < 1:
            raise ConfigError(f"--depth-share is the share of --sparsity removed as whole layers, in [0, 1); got "
                              f"{self.layer_share():g} (for layers only use --method depth)")
        if self.search_budget < 1:
            raise ConfigError(f"--search-budget must be >= 1 (candidates evaluated, the seed included), got "
                              f"{self.search_budget}")
        for name, value, default in (("--init", self.init, None), ("--resolve", self.resolve_mode, "none"),
                                     ("--reconstruct", self.reconstruct, "none")):
            if value != default:
                raise ConfigError(f"{name} applies to unstructured pruning only; --structured refits the "
                                  f"consumer linears itself")
        self.check_calibration()
        refuse_inapplicable(self, given, {"method": "--method"})
        return target, method
