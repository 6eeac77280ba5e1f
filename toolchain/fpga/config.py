"""The accelerator configuration: every number the templates render is computed here.

An N:M sparse MAC array of P processing elements (PEs). Each cycle the array takes one *beat*: G groups of M
consecutive activations along K (G*M activations, broadcast to every PE), and each PE takes the N kept
weights of each group from its own weight stream with their in-group positions. A PE therefore has G*N
multipliers and does G*M dense-equivalent MACs per beat; one PE computes one output row at a time.

Accumulator widths are not chosen by hand: they are derived from the largest K and proven not to overflow
(`AccelConfig.widths`), and a config that fixes them narrower than the proof needs is rejected.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import ConfigError
from ..numerics.geometry import group_count, row_passes
from ..numerics.nm import index_bits
from ..numerics.widths import SUPPORTED_BITS

MAX_TOTAL_BITS = 62   # the golden model and the round-half-up add stay inside int64


@dataclass(frozen=True)
class Widths:
    """Derived datapath widths, each with the bound that proves it."""

    idx: int        # ceil(log2 M) bits per slot index (1 when M = 1)
    product: int    # WB + AB: a signed WB-bit weight times a signed AB-bit activation
    psum: int       # one beat's adder tree over G*N products
    gacc: int       # one quantization group's integer sum
    scaled: int     # group sum times an unsigned SCW-bit scale
    total: int      # a row's sum of scaled group sums (+1 bit of headroom for the rounding add)
    shift: int      # bits of the output shift (scale fraction bits)
    bounds: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AccelConfig:
    """One accelerator design. Saved beside the generated RTL as `accel.json`."""

    n: int = 2                  # kept weights per group (N of N:M); N = M is the dense design
    m: int = 4                  # group length along K (M of N:M)
    groups_per_beat: int = 4    # G: groups of M activations per beat
    pes: int = 8                # P: output rows computed in parallel
    weight_bits: int = 4        # WB: signed weight code width (narrower codes are sign-extended)
    act_bits: int = 8           # AB: signed activation width (symmetric: +-(2^(AB-1) - 1))
    group_size: int = 64        # quantization group along K (one scale per group); a multiple of G*M
    k_max: int = 2048           # the largest K any layer of this design may have
    scale_bits: int = 16        # SCW: unsigned fixed-point scale mantissa
    out_bits: int = 16          # OUTW: signed saturated output
    max_shift: int = 31         # the largest per-layer scale fraction width (output shift)
    clock_mhz: float = 200.0    # target clock, for the report
    mem_gbps: float = 19.2      # weight memory bandwidth (GB/s), for the report
    gacc_bits: int | None = None   # fix the accumulator widths (checked against the proof), or derive them
    total_bits: int | None = None

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ConfigError(f"accelerator config: {msg}")

        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("clock_mhz", "mem_gbps"):
                need(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                     f"{f.name} must be a positive number, got {v!r}")
            elif f.name in ("gacc_bits", "total_bits"):
                need(v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0),
                     f"{f.name} must be a positive integer or null, got {v!r}")
            else:
                need(isinstance(v, int) and not isinstance(v, bool), f"{f.name} must be an integer, got {v!r}")
        need(1 <= self.m <= 16, f"M must be in 1..16, got {self.m}")
        need(1 <= self.n <= self.m, f"N must be in 1..M={self.m}, got {self.n}")
        need(1 <= self.groups_per_beat <= 64, f"groups_per_beat must be in 1..64, got {self.groups_per_beat}")
        need(1 <= self.pes <= 256, f"pes must be in 1..256, got {self.pes}")
        need(self.weight_bits in SUPPORTED_BITS, f"weight_bits must be one of {SUPPORTED_BITS}, got {self.weight_bits}")
        need(2 <= self.act_bits <= 16, f"act_bits must be in 2..16, got {self.act_bits}")
        need(self.group_size >= 1 and self.group_size % self.beat_k == 0,
             f"group_size {self.group_size} must be a positive multiple of the beat's K = groups_per_beat*M = "
             f"{self.beat_k}")
        need(self.k_max >= self.group_size, f"k_max {self.k_max} is smaller than group_size {self.group_size}")
        need(2 <= self.scale_bits <= 24, f"scale_bits must be in 2..24, got {self.scale_bits}")
        need(2 <= self.out_bits <= 32, f"out_bits must be in 2..32, got {self.out_bits}")
        need(1 <= self.max_shift <= 40, f"max_shift must be in 1..40, got {self.max_shift}")
        self.widths  # derive now: an overflowing config fails at construction

    # ------------------------------------------------------------------ derived quantities
    @property
    def beat_k(self) -> int:
        """Dense activations per beat (G*M): the dense-equivalent MACs per PE per cycle."""
        return self.groups_per_beat * self.m

    @property
    def slots_per_beat(self) -> int:
        """Kept weights per beat per PE (G*N): the physical multipliers per PE."""
        return self.groups_per_beat * self.n

    @property
    def multipliers(self) -> int:
        return self.pes * self.slots_per_beat

    @property
    def dense_macs_per_cycle(self) -> int:
        return self.pes * self.beat_k

    @property
    def widths(self) -> Widths:
        wb, ab = self.weight_bits, self.act_bits
        idx = index_bits(self.m)
        # |w| <= 2^(WB-1) (the code -2^(WB-1) is allowed), |a| <= 2^(AB-1) - 1 (symmetric activations)
        max_product = (1 << (wb - 1)) * ((1 << (ab - 1)) - 1)
        psum_bound = self.slots_per_beat * max_product
        group_kept = self.group_size // self.m * self.n
        gacc_bound = group_kept * max_product
        scaled_bound = gacc_bound * ((1 << self.scale_bits) - 1)
        n_groups = group_count(self.k_max, self.group_size)
        total_bound = n_groups * scaled_bound + (1 << (self.max_shift - 1))   # + the rounding half

        def bits_for(bound: int) -> int:       # signed width holding [-bound, bound]
            return bound.bit_length() + 1

        gacc, total = bits_for(gacc_bound), bits_for(total_bound)
        if self.gacc_bits is not None:
            if self.gacc_bits < gacc:
                raise ConfigError(f"accelerator config: gacc_bits {self.gacc_bits} overflows: a group of "
                                  f"{self.group_size} inputs ({group_kept} kept) of {wb}-bit weights times "
                                  f"{ab}-bit activations sums to +-{gacc_bound}, which needs {gacc} bits")
            gacc = self.gacc_bits
        if self.total_bits is not None:
            if self.total_bits < total:
                raise ConfigError(f"accelerator config: total_bits {self.total_bits} overflows: {n_groups} groups "
                                  f"(k_max {self.k_max}) of scaled sums up to +-{scaled_bound} need {total} bits")
            total = self.total_bits
        if total > MAX_TOTAL_BITS:
            raise ConfigError(f"accelerator config: the row accumulator would need {total} bits (> "
                              f"{MAX_TOTAL_BITS}); lower k_max, scale_bits, weight_bits or act_bits")
        return Widths(idx=idx, product=wb + ab, psum=bits_for(psum_bound), gacc=gacc,
                      scaled=bits_for(scaled_bound), total=total,
                      shift=max(1, self.max_shift.bit_length()),
                      bounds={"product": max_product, "psum": psum_bound, "group": gacc_bound,
                              "scaled": scaled_bound, "total": total_bound})

    # ------------------------------------------------------------------ layers and throughput
    def check_layer(self, name: str, k: int, rows: int, bits: int, nm: tuple[int, int] | None, group_size: int
                    ) -> None:
        """Refuse a layer this design cannot run, saying why."""
        def need(cond, msg):
            if not cond:
                raise ConfigError(f"{name}: {msg}")

        need(bits <= self.weight_bits, f"{bits}-bit codes do not fit the design's {self.weight_bits}-bit weights")
        need(k % self.beat_k == 0, f"K = {k} is not a multiple of the beat's {self.beat_k} inputs")
        need(k <= self.k_max, f"K = {k} exceeds the design's k_max {self.k_max} (its accumulators are sized for it)")
        need(group_size == self.group_size,
             f"quantization group {group_size} differs from the design's group_size {self.group_size}")
        need(k % group_size == 0,
             f"K = {k} is not a multiple of the quantization group {group_size} (its last group is shorter); the "
             f"accelerator needs whole groups: quantize with a group size that divides K (e.g. 64)")
        if self.n < self.m:
            need(nm is not None and nm[1] == self.m and nm[0] <= self.n,
                 f"the design is {self.n}:{self.m} sparse but the layer is "
                 f"{'dense' if nm is None else f'{nm[0]}:{nm[1]}'}")
        need(rows >= 1, "no output rows")

    def layer_cycles(self, k: int, rows: int) -> int:
        """Ideal cycles for one token through a K x rows layer: every PE busy every cycle."""
        return row_passes(rows, self.pes) * (k // self.beat_k)

    def to_json(self) -> dict:
        return {**asdict(self), "derived": {**asdict(self.widths), "beat_k": self.beat_k,
                                            "slots_per_beat": self.slots_per_beat, "multipliers": self.multipliers,
                                            "dense_macs_per_cycle": self.dense_macs_per_cycle}}

    def dense_twin(self) -> "AccelConfig":
        """The dense design from the same templates with the same multiplier count per PE (N = M = the sparse
        design's N), for comparison."""
        return AccelConfig(**{**asdict(self), "m": self.n, "n": self.n, "gacc_bits": None, "total_bits": None,
                              "group_size": self.group_size})


def load_config(path: str | os.PathLike | None, **overrides) -> AccelConfig:
    """Read `accel.json` (keys of AccelConfig; a "derived" block is ignored), apply overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {p} does not exist")
        try:
            data = json.loads(p.read_text())
        except ValueError as exc:
            raise ConfigError(f"--config {p} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config {p} must hold a JSON object")
        data.pop("derived", None)
    data.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(AccelConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"accelerator config: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return AccelConfig(**data)
