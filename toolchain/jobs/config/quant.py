"""`toolchain quantize` (RTN, GPTQ, APTQ) and `compress`, which runs a prune and a quantize on one calibration
set."""
from __future__ import annotations

from dataclasses import dataclass, fields

from ...errors import ConfigError
from ...numerics.widths import SUPPORTED_BITS
from ...quant import QuantSpec
from ..options import flag_of, option, refuse_inapplicable
from .calibration import CALIB_FIELDS, CalibConfig
from .prune import PruneConfig

QUANT_METHODS = ("rtn", "gptq", "aptq")
SENSITIVITIES = ("model", "local")
# Three widths, not the APTQ paper's 2 and 4: a 2/4 mix at 3.5 bits loses to uniform 3 bits out of the
# calibration domain and on zero-shot accuracy (docs/aptq.md, section 7).
DEFAULT_CANDIDATES = (2, 3, 4)


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
