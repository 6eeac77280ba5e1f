"""A layer as the accelerator consumes it: its slots, positions and fixed-point scales read from the blob,
and the `$readmemh` images of the array's weight and scale memories."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..numerics.geometry import row_passes
from .config import AccelConfig


@dataclass
class LayerData:
    name: str                    # module name, e.g. model.layers.0.mlp.down_proj
    rows: int
    k: int
    bits: int
    nm: tuple[int, int] | None
    group_size: int
    slots: np.ndarray            # int8 [rows, K*N/M] kept codes, in [group, ascending position] order
    index: np.ndarray            # uint8 [rows, K*N/M] position of each slot in its group of M
    scales_fixed: np.ndarray     # uint16 [rows, n_groups]
    shift: int                   # fraction bits of the fixed-point scales

    def dense_codes(self) -> np.ndarray:
        """[rows, K] int64 codes with zeros at pruned positions (what the golden model multiplies)."""
        if self.nm is None:
            return self.slots.astype(np.int64)
        n, m = self.nm
        out = np.zeros((self.rows, self.k), np.int64)
        groups = np.repeat(np.arange(self.k // m), n)[None, :] * m
        np.put_along_axis(out, groups + self.index.astype(np.int64), self.slots.astype(np.int64), axis=1)
        return out

    def first_rows(self, count: int) -> "LayerData":
        count = max(1, min(count, self.rows))
        return LayerData(self.name, count, self.k, self.bits, self.nm, self.group_size, self.slots[:count],
                         self.index[:count], self.scales_fixed[:count], self.shift)


def read_layer(blob, name: str) -> LayerData:
    """One quantized linear from an open blob (`toolchain.export.blob.read_blob`)."""
    e = blob.entry(name)
    if e["kind"] != "quant":
        raise ConfigError(f"{name}: not a quantized linear in the blob (it is {e['kind']}); the accelerator "
                          f"runs quantized layers only")
    if not e["symmetric"]:
        raise ConfigError(f"{name}: asymmetric codes; the accelerator's contract is symmetric weights "
                          f"(re-quantize without --asym)")
    rows, k = e["shape"]
    slots, index, nm = blob.nm_slots(name)
    if nm is None:   # dense: every column is a slot; positions are set per design in `for_design`
        index = np.zeros(slots.shape, np.uint8)
    fixed, shift = blob.scales_fixed(name)
    return LayerData(e["module"], rows, k, e["bits"], nm, e["group_size"], slots.astype(np.int8),
                     np.asarray(index, np.uint8), np.asarray(fixed, np.uint16), int(shift))


def for_design(layer: LayerData, cfg: AccelConfig) -> LayerData:
    """Check `layer` against the design and return it in the design's slot layout: an N:M layer as stored
    (a layer with fewer kept weights per group than the design's N is padded with zero-weight slots); on a
    dense design (N = M) every weight, with positions j % M."""
    cfg.check_layer(layer.name, layer.k, layer.rows, layer.bits, layer.nm, layer.group_size)
    if layer.shift > cfg.max_shift:
        raise ConfigError(f"{layer.name}: scale fraction width {layer.shift} exceeds the design's max_shift "
                          f"{cfg.max_shift}")
    if cfg.n == cfg.m:   # a dense design streams every weight, pruned ones as zeros, at positions j % M
        index = np.broadcast_to(np.tile(np.arange(cfg.m, dtype=np.uint8), layer.k // cfg.m), (layer.rows, layer.k))
        return LayerData(layer.name, layer.rows, layer.k, layer.bits, (cfg.m, cfg.m), layer.group_size,
                         layer.dense_codes().astype(np.int8), np.ascontiguousarray(index), layer.scales_fixed,
                         layer.shift)
    n, m = layer.nm
    if n == cfg.n:
        return layer
    # fewer kept per group than the design's N: add zero-weight slots at the lowest unused positions
    groups = layer.k // m
    have = layer.index.reshape(layer.rows, groups, n).astype(np.int64)
    used = np.zeros((layer.rows, groups, m), bool)
    np.put_along_axis(used, have, True, axis=2)
    free = np.argsort(used, axis=2, kind="stable")[:, :, : cfg.n - n]
    positions = np.concatenate([have, free], axis=2)
    order = np.argsort(positions, axis=2, kind="stable")                  # slots ascend by position
    index = np.take_along_axis(positions, order, axis=2)
    values = np.concatenate([layer.slots.reshape(layer.rows, groups, n).astype(np.int8),
                             np.zeros((layer.rows, groups, cfg.n - n), np.int8)], axis=2)
    slots = np.take_along_axis(values, order, axis=2)
    return LayerData(layer.name, layer.rows, layer.k, layer.bits, (cfg.n, cfg.m), layer.group_size,
                     slots.reshape(layer.rows, -1), index.reshape(layer.rows, -1).astype(np.uint8),
                     layer.scales_fixed, layer.shift)


def memory_images(cfg: AccelConfig, layer: LayerData) -> tuple[list[str], list[str]]:
    """The weight and scale memory contents of `layer` on `cfg` (lines for $readmemh).

    Weight word (pass q, beat b): for PE p (row q*P + p) the G*N slot codes (WB bits each), then their G*N
    positions (IDXW bits each), at bit p*SLOTW. Scale word (pass q, group j): PE p's SCW-bit mantissa at
    bit p*SCW. Rows past the layer's end (the last pass) hold zero weights."""
    w = cfg.widths
    p, passes = cfg.pes, row_passes(layer.rows, cfg.pes)
    bpr, spb = layer.k // cfg.beat_k, cfg.slots_per_beat
    padded = passes * p

    def pad_rows(a):
        return np.concatenate([a, np.zeros((padded - a.shape[0], *a.shape[1:]), a.dtype)])

    slots = pad_rows(layer.slots).reshape(passes, p, bpr, spb).transpose(0, 2, 1, 3)   # [q, b, p, s]
    index = pad_rows(layer.index).reshape(passes, p, bpr, spb).transpose(0, 2, 1, 3)
    words = passes * bpr
    per_pe = np.concatenate([slots, index], axis=3).astype(np.int64)                     # [q, b, p, 2*s]
    widths = np.array([cfg.weight_bits] * spb + [w.idx] * spb)
    weight_lines = _hex_lines(per_pe.reshape(words, p * 2 * spb), np.tile(widths, p))
    n_groups = layer.k // layer.group_size
    scales = pad_rows(layer.scales_fixed).reshape(passes, p, n_groups).transpose(0, 2, 1)   # [q, j, p]
    scale_lines = _hex_lines(scales.reshape(passes * n_groups, p).astype(np.int64), np.full(p, cfg.scale_bits))
    return weight_lines, scale_lines


def _hex_lines(values: np.ndarray, widths: np.ndarray) -> list[str]:
    """One $readmemh line per word: the columns of `values` [words, fields] (two's complement, masked to
    their widths) concatenated from bit 0 up, written most significant digit first."""
    words = values.shape[0]
    total = int(widths.sum())
    offsets = np.concatenate([[0], np.cumsum(widths)[:-1]])
    bit_field = np.repeat(np.arange(widths.size), widths)                # which field each bit belongs to
    bit_pos = np.arange(total) - offsets[bit_field]                      # bit within that field
    bits = ((values[:, bit_field] >> bit_pos) & 1).astype(np.uint8)     # >> of negatives sign-extends
    pad = (-total) % 8
    if pad:
        bits = np.concatenate([bits, np.zeros((words, pad), np.uint8)], axis=1)
    packed = np.packbits(bits, axis=1, bitorder="little")[:, ::-1]
    digits = -(-total // 4)
    return [row.tobytes().hex()[-digits:] for row in packed]


def write_images(directory: Path, stem: str, cfg: AccelConfig, layer: LayerData) -> tuple[Path, Path]:
    weight_lines, scale_lines = memory_images(cfg, layer)
    wpath, spath = directory / f"{stem}.weights.mem", directory / f"{stem}.scales.mem"
    wpath.write_text("\n".join(weight_lines) + "\n")
    spath.write_text("\n".join(scale_lines) + "\n")
    return wpath, spath
