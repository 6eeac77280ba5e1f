"""The weight blob: a packed, versioned, checksummed file of a compressed model's sparse low-bit weights.

Written for the FPGA target and any C/C++ runtime; docs/blob-format.md specifies every byte. In short:

- a 64-byte header (magic, format version, manifest length and CRC-32, header CRC-32), then a UTF-8 JSON
  manifest, then sections, each at a 64-byte aligned file offset with zero bytes between them;
- a quantized linear stores its codes packed LSB-first at the code width (2/3/4/8 bits, 3-bit dense), and,
  when the model is N:M and the layer's mask is N:M, only the N slots of every group of M input columns,
  with each slot's column index in the group as ceil(log2 M) bits; scales as fp16 and as 16-bit fixed point
  with one per-tensor fraction width; zero points (asymmetric only) packed at the code width;
- every other tensor (embeddings, norms, biases, unquantized linears) as fp16.

`write_blob` reads a compressed model directory (`toolchain.export.source`) and writes atomically;
`read_blob` memory-maps a blob, validates its structure at once and each section's CRC-32 on first use.
Round trips are bit-exact to quant_state.safetensors.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..atomic import atomic_file
from ..errors import ToolchainError

MAGIC = b"TCBLOB\0\0"
VERSION = 1
FORMAT = "toolchain.blob"
ALIGN = 64
HEADER_SIZE = 64
# magic, version, flags, manifest length, manifest CRC-32, header CRC-32 (of the 28 bytes before it)
_HEADER = struct.Struct("<8sIIQII")
_HEADER_CRC_SPAN = 28
CHUNK = 1 << 22            # codes per packing step: bounds every temporary (a multiple of 8)
QUANT_BITS = (2, 3, 4, 8)  # code widths a "quant" tensor may have (toolchain.quant.SUPPORTED_BITS)
MAX_DIM = 1 << 32
MAX_NUMEL = 1 << 48
FIXED_BITS = 16


class BlobError(ToolchainError):
    """A blob cannot be written (the model's state does not fit the format) or a helper got bad input."""


class BlobFormatError(BlobError):
    """A file is not a valid blob: truncated, corrupted, of another version, or self-inconsistent."""


class _NotNM(Exception):
    """Internal: this layer cannot be stored in the N:M layout (the reason is the message)."""


# ----------------------------------------------------------------------------------------------------------
# Bit packing: field k of a stream of `bits`-bit fields occupies stream bits [k*bits, (k+1)*bits), stream bit i
# is bit (i % 8) of byte i // 8. Eight fields always fill exactly `bits` bytes, which is what every path uses.

def packed_size(count: int, bits: int) -> int:
    """Bytes of `count` fields of `bits` bits packed densely."""
    return (count * bits + 7) // 8


def _check_width(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= int(bits) <= 8:
        raise BlobError(f"packed field width must be an integer from 1 to 8 bits, got {bits!r}")
    return int(bits)


def _uint_for(nbits: int):
    return np.uint8 if nbits <= 8 else np.uint16 if nbits <= 16 else np.uint32 if nbits <= 32 else np.uint64


def _pack8(u: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 fields (already masked to `bits`; length a multiple of 8) into bytes."""
    if bits == 8:
        return u
    if 8 % bits == 0:                       # 1, 2, 4: fields merge pairwise inside a byte
        w = bits
        while w < 8:
            u = u[0::2] | (u[1::2] << w)
            w *= 2
        return u
    v, w = u, bits                          # 3, 5, 6, 7: 8 fields -> one (8*bits)-bit integer -> `bits` bytes
    for _ in range(3):
        dt = _uint_for(2 * w)
        v = v[0::2].astype(dt) | (v[1::2].astype(dt) << w)
        w *= 2
    v = v.astype(v.dtype.newbyteorder("<"), copy=False)
    return v.view(np.uint8).reshape(-1, v.dtype.itemsize)[:, :bits].reshape(-1)


def _unpack8(b: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of _pack8: bytes (length a multiple of `bits`) -> uint8 fields (8 per `bits` bytes)."""
    if bits == 8:
        return b
    if 8 % bits == 0:
        v, w = b, 8
        while w > bits:
            h = w // 2
            out = np.empty(v.size * 2, np.uint8)
            out[0::2] = v & ((1 << h) - 1)
            out[1::2] = v >> h
            v, w = out, h
        return v
    dt = _uint_for(8 * bits)
    size = np.dtype(dt).itemsize
    wide = np.zeros((b.size // bits, size), np.uint8)
    wide[:, :bits] = b.reshape(-1, bits)
    v, w = wide.view(np.dtype(dt).newbyteorder("<")).reshape(-1), 8 * bits
    for _ in range(3):
        h = w // 2
        dt = _uint_for(h)
        out = np.empty(v.size * 2, dt)
        out[0::2] = v & ((1 << h) - 1)
        out[1::2] = v >> h
        v, w = out, h
    return v


def _pack_wide(v: np.ndarray, width: int) -> np.ndarray:
    """Pack unsigned fields of 9..32 bits (length a multiple of 8) into bytes."""
    w = width
    while w % 8 and w <= 32:
        w *= 2
    if w % 8:                                # no power-of-two run of fields fills whole bytes within 64 bits
        bits = (v.astype(np.uint64)[:, None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)
        return np.packbits(bits.astype(np.uint8).reshape(-1), bitorder="little")
    f = width
    while f < w:
        dt = _uint_for(2 * f)
        v = v[0::2].astype(dt) | (v[1::2].astype(dt) << f)
        f *= 2
    v = v.astype(v.dtype.newbyteorder("<"), copy=False)
    return v.view(np.uint8).reshape(-1, v.dtype.itemsize)[:, :w // 8].reshape(-1)


def _pack_stream(a: np.ndarray, width: int) -> np.ndarray:
    """Pack flat non-negative integers < 2^width (width 1..32; unchecked) into an LSB-first byte stream."""
    n = a.size
    out = np.empty(packed_size(n, width), np.uint8)
    dt = _uint_for(width)
    mask = (1 << width) - 1
    for start in range(0, n, CHUNK):
        c = a[start:start + CHUNK].astype(dt)             # a copy: wraps negatives to two's complement
        if width < 8:
            c &= np.uint8(mask)
        if c.size % 8:
            c = np.concatenate([c, np.zeros(8 - c.size % 8, dt)])
        packed = _pack8(c, width) if width <= 8 else _pack_wide(c, width)
        at = start * width // 8
        out[at:at + packed.size] = packed[:out.size - at]
    return out


def pack_codes(codes, bits: int, signed: bool | None = None) -> np.ndarray:
    """Pack integer `codes` (any shape, row-major) as `bits`-bit fields, LSB-first; returns uint8 bytes.

    Signed values are stored as `bits`-bit two's complement. `signed` True/False checks the values against
    [-2^(b-1), 2^(b-1)-1] / [0, 2^b-1]; None accepts either range. Out-of-range values raise BlobError.
    Bits of the last byte past the last field are zero."""
    bits = _check_width(bits)
    a = np.asarray(codes)
    if a.dtype.kind not in "iub":
        raise BlobError(f"pack_codes needs integer codes, got dtype {a.dtype}")
    a = a.reshape(-1)
    if a.size:
        lo = -(1 << (bits - 1)) if signed in (True, None) else 0
        hi = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
        mn, mx = int(a.min()), int(a.max())
        if mn < lo or mx > hi:
            kind = {True: "signed", False: "unsigned", None: "signed or unsigned"}[signed]
            raise BlobError(f"codes span [{mn}, {mx}], outside the {kind} {bits}-bit range [{lo}, {hi}]")
    return _pack_stream(a, bits)


def unpack_codes(buf, bits: int, count: int, signed: bool = False) -> np.ndarray:
    """The first `count` `bits`-bit fields of packed bytes `buf`: int8 sign-extended when `signed`, else uint8."""
    bits = _check_width(bits)
    b = np.frombuffer(buf, np.uint8) if not isinstance(buf, np.ndarray) else buf.reshape(-1).view(np.uint8)
    count = int(count)
    if count < 0 or b.size < packed_size(count, bits):
        raise BlobError(f"{b.size} packed bytes hold fewer than {count} fields of {bits} bits")
    out = np.empty(count, np.int8 if signed else np.uint8)
    shift = 8 - bits
    for start in range(0, count, CHUNK):
        end = min(count, start + CHUNK)
        at = start * bits // 8
        nb = packed_size(end - start, bits)
        chunk = b[at:at + nb]
        if nb % bits:
            chunk = np.concatenate([chunk, np.zeros(bits - nb % bits, np.uint8)])
        u = _unpack8(chunk, bits)[:end - start]
        if signed and bits < 8:
            u = (u << shift).view(np.int8) >> shift
        out[start:end] = u.view(out.dtype)
    return out


# ----------------------------------------------------------------------------------------------------------
# N:M layout: for every group of M consecutive input columns, N slots in ascending column order. Slots are the
# kept (unpruned) columns; a group with fewer than N kept ones is topped up with its lowest pruned columns
# (their value is the zero/fill value, and their slot numbers go to the `pruned_slots` list).

def nm_meta_bits(m: int) -> int:
    """Bits of one N:M index: ceil(log2 M)."""
    return max(1, math.ceil(math.log2(m)))


def _check_nm(n, m) -> tuple[int, int]:
    ok = all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in (n, m))
    if not ok or not 1 <= n < m <= 256:
        raise BlobError(f"N:M must be integers with 1 <= N < M <= 256, got {n}:{m}")
    return int(n), int(m)


@lru_cache(maxsize=None)
def _nm_tables(n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per kept-bitmask of a group (M <= 8, column j at bit j): kept count, slot bitmask, slot indices
    [2^M, N] ascending, and those N indices as one integer of N*meta bits (index k at bit k*meta)."""
    masks = np.arange(1 << m)
    cols = np.arange(m)
    kept = ((masks[:, None] >> cols) & 1).astype(bool)
    key = np.where(kept, cols, m + cols)                     # kept columns first, then pruned ones, each ascending
    index = np.sort(np.sort(key, axis=1)[:, :n] % m, axis=1).astype(np.uint8)
    slot_mask = np.left_shift(1, index.astype(np.int64)).sum(axis=1).astype(np.uint8)
    meta = nm_meta_bits(m)
    group_meta = (index.astype(np.uint64) << (np.arange(n, dtype=np.uint64) * np.uint64(meta))).sum(axis=1)
    return kept.sum(axis=1).astype(np.uint8), slot_mask, index, group_meta.astype(_uint_for(n * meta))


class _NMChunk:
    """The N:M slots of a [rows, cols] prune mask: slot_flat (bool per position), counts (kept per group)."""

    def __init__(self, pm: np.ndarray, n: int, m: int):
        self.n, self.m = n, m
        groups = pm.size // m
        self.ok = True
        if m <= 8:
            counts_lut, slot_lut, _, _ = _nm_tables(n, m)
            stream = np.packbits(pm.reshape(-1), bitorder="little")
            np.invert(stream, out=stream)                     # kept bits, column j of group g at bit g*m + j
            self.kb = unpack_codes(stream, m, groups)
            self.counts = counts_lut[self.kb]
            if groups and int(self.counts.max()) > n:
                self.ok = False
                return
            if groups == 0 or int(self.counts.min()) == n:
                self.slot_flat = np.unpackbits(stream, count=groups * m, bitorder="little").view(bool)
            else:
                self.slot_flat = np.unpackbits(_pack_stream(slot_lut[self.kb], m), count=groups * m,
                                               bitorder="little").view(bool)
        else:
            keep = ~pm.reshape(-1, m)
            self.counts = keep.sum(axis=1)
            if groups and int(self.counts.max()) > n:
                self.ok = False
                return
            self._index = np.sort(np.argsort(~keep, axis=1, kind="stable")[:, :n], axis=1).astype(np.uint8)
            slots = np.zeros(keep.shape, bool)
            np.put_along_axis(slots, self._index.astype(np.intp), True, axis=1)
            self.slot_flat = slots.reshape(-1)

    def index(self, groups=slice(None)) -> np.ndarray:
        """Slot indices [G, N] (of the selected groups)."""
        if self.m <= 8:
            return _nm_tables(self.n, self.m)[2][self.kb[groups]]
        return self._index[groups]

    def meta_stream(self) -> np.ndarray:
        """The packed nm_index stream of this chunk."""
        meta = nm_meta_bits(self.m)
        if self.m <= 8:
            return _pack_stream(_nm_tables(self.n, self.m)[3][self.kb], self.n * meta)
        return _pack_stream(self._index.reshape(-1), meta)

    def pruned_slots(self, pm: np.ndarray) -> np.ndarray:
        """Slot numbers (within this chunk) of slots that are pruned: only in groups keeping fewer than N."""
        short = np.flatnonzero(self.counts < self.n)
        if not short.size:
            return np.zeros(0, np.int64)
        flags = np.take_along_axis(pm.reshape(-1, self.m)[short], self.index(short).astype(np.intp), axis=1)
        return (short[:, None] * self.n + np.arange(self.n))[flags]


def nm_select(prune_mask: np.ndarray, n: int, m: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Choose the N:M slots of a [rows, cols] prune mask (True = pruned; cols % M == 0).

    Returns (slot_mask [rows, cols] bool, index [rows * cols // M, N] uint8 ascending), or None when some
    group keeps more than N columns (the mask is not N:M)."""
    n, m = _check_nm(n, m)
    pm = np.asarray(prune_mask, bool)
    if pm.ndim != 2 or pm.shape[1] % m:
        raise BlobError(f"N:M needs a 2-D mask whose column count is a multiple of M={m}, got shape {pm.shape}")
    chunk = _NMChunk(pm, n, m)
    if not chunk.ok:
        return None
    return chunk.slot_flat.reshape(pm.shape), chunk.index()


def nm_compress(values: np.ndarray, prune_mask: np.ndarray, n: int, m: int, fill=0):
    """Compress [rows, cols] `values` to N:M slots.

    Returns (slot values [rows, cols*N/M], index [rows, cols*N/M] uint8, pruned_slots uint32: slot numbers
    (row-major) of slots that are pruned in `prune_mask`). Raises BlobError when the mask is not N:M or a
    value outside the slots differs from `fill` (scalar or an array shaped like `values`)."""
    n, m = _check_nm(n, m)
    values = np.asarray(values)
    pm = np.asarray(prune_mask, bool)
    if pm.shape != values.shape or pm.ndim != 2 or pm.shape[1] % m:
        raise BlobError(f"N:M needs 2-D values and mask of one shape with columns a multiple of M={m}, got "
                        f"{values.shape} and {pm.shape}")
    chunk = _NMChunk(pm, n, m)
    if not chunk.ok:
        raise BlobError(f"prune mask is not {n}:{m}: some group of {m} columns keeps more than {n}")
    rest = values.reshape(-1)[~chunk.slot_flat]
    expect = np.broadcast_to(fill, values.shape).reshape(-1)[~chunk.slot_flat] if np.ndim(fill) else fill
    if rest.size and bool((rest != expect).any()):
        raise BlobError("a value outside the N:M slots is not the fill value; the layout would lose it")
    kept = np.compress(chunk.slot_flat, values.reshape(-1)).reshape(values.shape[0], -1)
    return kept, chunk.index().reshape(values.shape[0], -1), chunk.pruned_slots(pm).astype(np.uint32)


def _groups_of_bits(bitmask: np.ndarray, m: int) -> np.ndarray:
    """[G] uint8 bitmask (column j at bit j) -> [G, M] bool (M <= 8)."""
    stream = _pack_stream(bitmask, m)
    return np.unpackbits(stream, count=bitmask.size * m, bitorder="little").view(bool).reshape(-1, m)


def nm_slot_mask(index: np.ndarray, n: int, m: int, rows: int, cols: int) -> np.ndarray:
    """[rows, cols] bool of the slot positions given by `index` (N per group); validates the indices."""
    n, m = _check_nm(n, m)
    idx = np.asarray(index).reshape(-1, n)
    if idx.shape[0] * m != rows * cols:
        raise BlobFormatError(f"N:M index has {idx.shape[0]} groups, shape [{rows}, {cols}] needs {rows * cols // m}")
    if idx.size and int(idx.max()) >= m:
        raise BlobFormatError(f"N:M index {int(idx.max())} is out of range for M={m}")
    if n > 1 and idx.size and not bool((idx[:, 1:] > idx[:, :-1]).all()):
        raise BlobFormatError("N:M indices are not strictly ascending within a group")
    if m <= 8:
        bitmask = np.left_shift(np.uint8(1), idx[:, 0].astype(np.uint8))
        for k in range(1, n):
            bitmask |= np.left_shift(np.uint8(1), idx[:, k].astype(np.uint8))
        return _groups_of_bits(bitmask, m).reshape(rows, cols)
    slots = np.zeros((idx.shape[0], m), bool)
    np.put_along_axis(slots, idx.astype(np.intp), True, axis=1)
    return slots.reshape(rows, cols)


def nm_expand(values: np.ndarray, index: np.ndarray, n: int, m: int, cols: int, fill=0) -> np.ndarray:
    """Dense [rows, cols] from N:M slot `values` ([rows, cols*N/M] or flat) and their `index`; the other
    positions get `fill` (scalar or an array shaped [rows, cols])."""
    values = np.asarray(values).reshape(-1)
    rows = values.size * m // (n * cols) if cols else 0
    slots = nm_slot_mask(index, n, m, rows, cols)
    out = np.empty((rows, cols), values.dtype)
    out[...] = fill
    out.reshape(-1)[slots.reshape(-1)] = values
    return out


# ----------------------------------------------------------------------------------------------------------
# Layout helpers shared by writer and reader

def _align(x: int) -> int:
    return (x + ALIGN - 1) // ALIGN * ALIGN


def _n_groups(cols: int, group_size: int) -> int:
    if cols == 0:
        return 0
    return 1 if group_size == -1 else -(-cols // group_size)


def _group_lengths(cols: int, group_size: int) -> np.ndarray:
    size = cols if group_size == -1 else group_size
    ng = _n_groups(cols, group_size)
    lengths = np.full(ng, size, np.int64)
    if ng:
        lengths[-1] = cols - size * (ng - 1)
    return lengths


def _column_zeros(zeros: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per-group zero points [rows, n_groups] -> per-column [rows, cols]."""
    return np.repeat(zeros, lengths, axis=1)


def _fixed_scales(scales16: np.ndarray) -> tuple[np.ndarray, int, float]:
    """fp16 scales -> (uint16 mantissas, frac_bits s, max relative error); value = mantissa / 2^s, s the
    largest integer in [0, 31] with round(max scale * 2^s) <= 65535."""
    s32 = scales16.astype(np.float64)
    top = float(s32.max()) if s32.size else 0.0
    frac = 0
    for s in range(31, -1, -1):
        if np.rint(top * 2.0 ** s) <= 65535:
            frac = s
            break
    mant = np.rint(s32 * 2.0 ** frac)
    err = float((np.abs(mant / 2.0 ** frac - s32) / s32).max()) if s32.size else 0.0
    return mant.astype(np.uint16), frac, err


def _expected_sections(e: dict) -> dict[str, int]:
    """Section name -> byte length, from a (validated) manifest tensor entry."""
    kind = e["kind"]
    if kind == "fp16":
        return {"data": 2 * math.prod(e["shape"])}
    if kind == "fp16_nm":
        return {"values": 2 * e["slots"], "nm_index": packed_size(e["slots"], e["meta_bits"])}
    rows = e["shape"][0]
    out = {"codes": packed_size(e["slots"], e["bits"])}
    if e["nm"] is not None:
        out["nm_index"] = packed_size(e["slots"], e["meta_bits"])
        if e["pruned_slots"]:
            out["pruned_slots"] = 4 * e["pruned_slots"]
    out["scales_fp16"] = 2 * rows * e["n_groups"]
    out["scales_fixed"] = 2 * rows * e["n_groups"]
    if not e["symmetric"]:
        out["zeros"] = packed_size(rows * e["n_groups"], e["bits"])
    return out


# ----------------------------------------------------------------------------------------------------------
# Writer

class _Body:
    """Sections written one after another to a file, at 64-byte aligned offsets relative to its start."""

    def __init__(self, handle):
        self.handle = handle
        self.pos = 0

    def add(self, data: np.ndarray) -> dict:
        start = _align(self.pos)
        if start > self.pos:
            self.handle.write(bytes(start - self.pos))
        buf = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        crc = 0
        for i in range(0, buf.size, 1 << 24):
            part = buf[i:i + (1 << 24)]
            crc = zlib.crc32(part, crc)
            self.handle.write(memoryview(part))
        self.pos = start + buf.size
        return {"offset": start, "length": int(buf.size), "crc32": crc}


def _nm_encode(values: np.ndarray, prune_mask: np.ndarray, n: int, m: int, fill_rows, emit) -> np.ndarray:
    """Chunked N:M encoding over rows: `emit(slot_start, slot_values, nm_index_bytes)` gets each chunk (slot
    counts of every chunk but the last are multiples of 8, so packed chunks start on byte boundaries);
    `fill_rows(r0, r1)` is the value pruned positions of rows r0:r1 hold (scalar, or an array).
    Returns the pruned-slot list (uint32); raises _NotNM(reason) when the layer cannot use the layout."""
    rows, cols = values.shape
    per_row = cols // m * n
    if rows * per_row > 0xFFFFFFFF:
        raise _NotNM("more than 2^32 slots")
    step = max(8, (CHUNK // max(cols, 1)) // 8 * 8)
    pruned = []
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        pm = prune_mask[r0:r1]
        chunk = _NMChunk(pm, n, m)
        if not chunk.ok:
            raise _NotNM(f"mask is not {n}:{m} (a group of {m} input columns keeps more than {n})")
        v = values[r0:r1].reshape(-1)
        fill = fill_rows(r0, r1)
        if np.ndim(fill) or fill != 0:
            v = v - np.asarray(fill).reshape(-1) if np.ndim(fill) else v - fill
        kept = np.compress(chunk.slot_flat, v)
        if np.count_nonzero(v) != np.count_nonzero(kept):
            raise _NotNM("a pruned weight outside the N:M slots does not hold the zero code")
        if np.ndim(fill) or fill != 0:
            kept = np.compress(chunk.slot_flat, values[r0:r1].reshape(-1))
        emit(r0 * per_row, kept, chunk.meta_stream())
        local = chunk.pruned_slots(pm)
        if local.size:
            pruned.append(local + r0 * per_row)
    return np.concatenate(pruned).astype(np.uint32) if pruned else np.zeros(0, np.uint32)


def _encode_quant(name: str, module: str, qw, nm, body: _Body) -> dict:
    spec = qw.spec
    bits, sym, gs = int(spec.bits), bool(spec.symmetric), int(spec.group_size)
    codes = qw.codes.detach().cpu().numpy()
    if codes.ndim != 2:
        raise BlobError(f"{module}: quantized codes must be 2-D, got shape {list(codes.shape)}")
    rows, cols = codes.shape
    ng = _n_groups(cols, gs)
    lengths = _group_lengths(cols, gs)
    scales = qw.scales.detach().cpu().float().numpy()
    zeros = qw.zeros.detach().cpu().numpy().astype(np.int64)
    if scales.shape != (rows, ng) or zeros.shape != (rows, ng):
        raise BlobError(f"{module}: scales {list(scales.shape)} / zeros {list(zeros.shape)} do not match "
                        f"{rows} rows x {ng} groups of {gs} columns")
    scales16 = scales.astype(np.float16)
    if not np.array_equal(scales16.astype(np.float32), scales):
        raise BlobError(f"{module}: scales are not exactly representable in fp16")
    if scales16.size and not (np.isfinite(scales16).all() and (scales16 > 0).all()):
        raise BlobError(f"{module}: scales must be positive and finite")
    if codes.size:
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if sym else (0, (1 << bits) - 1)
        if int(codes.min()) < lo or int(codes.max()) > hi:
            raise BlobError(f"{module}: codes span [{codes.min()}, {codes.max()}], outside the "
                            f"{'signed' if sym else 'unsigned'} {bits}-bit range [{lo}, {hi}]")
    if sym and zeros.size and zeros.any():
        raise BlobError(f"{module}: symmetric quantization must have zero points 0")
    if not sym and zeros.size and (zeros.min() < 0 or zeros.max() > (1 << bits) - 1):
        raise BlobError(f"{module}: zero points outside [0, {(1 << bits) - 1}]")

    entry = {"name": name, "module": module, "kind": "quant", "shape": [rows, cols], "bits": bits,
             "group_size": gs, "n_groups": ng, "symmetric": sym, "nm": None}
    sections: dict[str, np.ndarray] = {}
    layout = None
    if nm is not None:
        n, m = nm
        mask = qw.prune_mask.detach().cpu().numpy().astype(bool) if qw.prune_mask is not None else None
        reason = None
        if mask is None:
            reason = "layer has no pruned weights"
        elif mask.shape != codes.shape:
            reason = f"prune mask shape {list(mask.shape)} differs from the codes"
        elif cols % m:
            reason = f"input dimension {cols} is not a multiple of M={m}"
        if reason is None:
            meta = nm_meta_bits(m)
            total = rows * (cols // m) * n
            packed = np.empty(packed_size(total, bits), np.uint8)
            packed_idx = np.empty(packed_size(total, meta), np.uint8)

            def emit(start, vals, meta_bytes):
                p = _pack_stream(vals, bits)              # range checked above
                packed[start * bits // 8:start * bits // 8 + p.size] = p
                packed_idx[start * meta // 8:start * meta // 8 + meta_bytes.size] = meta_bytes

            def fill_rows(r0, r1):
                return 0 if sym else _column_zeros(zeros[r0:r1], lengths)

            try:
                pruned = _nm_encode(codes, mask, n, m, fill_rows, emit)
                layout = (packed, packed_idx, pruned, meta, total)
            except _NotNM as exc:
                reason = str(exc)
        if layout is None:
            entry["nm_fallback"] = reason
    if layout is not None:
        packed, packed_idx, pruned, meta, total = layout
        entry.update(nm=[n, m], meta_bits=meta, slots=total, pruned_slots=int(pruned.size))
        sections["codes"] = packed
        sections["nm_index"] = packed_idx
        if pruned.size:
            sections["pruned_slots"] = pruned.astype("<u4")
        code_bits = total * (bits + meta)
    else:
        entry["slots"] = rows * cols
        sections["codes"] = _pack_stream(codes.reshape(-1), bits)
        code_bits = rows * cols * bits
    mant, frac, err = _fixed_scales(scales16)
    entry.update(scale_encoding="fp16+fixed16", scale_frac_bits=frac, scale_fixed_max_rel_error=err)
    sections["scales_fp16"] = scales16.astype("<f2")
    sections["scales_fixed"] = mant.astype("<u2")
    if not sym:
        sections["zeros"] = _pack_stream(zeros.reshape(-1), bits)
    entry["min_bits"] = code_bits + rows * ng * (16 + FIXED_BITS + (0 if sym else bits))
    entry["sections"] = {k: body.add(v) for k, v in sections.items()}
    return entry


def _encode_float(name: str, tensor, nm, body: _Body) -> dict:
    import torch

    if not (tensor.is_floating_point()):
        raise BlobError(f"{name}: dtype {tensor.dtype} is not floating point; the blob stores other tensors as fp16")
    t16 = tensor.detach().cpu().to(torch.float16).numpy()
    if t16.size and not np.isfinite(t16).all():
        peak = float(tensor.detach().abs().max())
        raise BlobError(f"{name}: values do not fit fp16 (max |x| = {peak:g}, fp16 max 65504) or are not finite")
    shape = list(t16.shape)
    entry = {"name": name, "kind": "fp16", "shape": shape}
    if nm is not None and t16.ndim == 2 and t16.shape[1] % nm[1] == 0 and t16.size:
        n, m = nm
        bits16 = t16.view(np.uint16)                        # +0.0 only: -0.0 is kept as a value, bit-exact
        zero_mask = bits16 == 0
        if zero_mask.any():
            meta = nm_meta_bits(m)
            rows, cols = t16.shape
            total = rows * (cols // m) * n
            vals = np.empty(total, np.float16)
            packed_idx = np.empty(packed_size(total, meta), np.uint8)

            def emit(start, v, meta_bytes):
                vals[start:start + v.size] = v.view(np.float16)
                packed_idx[start * meta // 8:start * meta // 8 + meta_bytes.size] = meta_bytes

            try:
                _nm_encode(bits16, zero_mask, n, m, lambda r0, r1: 0, emit)
            except _NotNM:
                pass
            else:
                entry.update(kind="fp16_nm", nm=[n, m], meta_bits=meta, slots=total, min_bits=total * (16 + meta))
                entry["sections"] = {"values": body.add(vals.astype("<f2")), "nm_index": body.add(packed_idx)}
                return entry
    entry["min_bits"] = 16 * t16.size
    entry["sections"] = {"data": body.add(t16.astype("<f2"))}
    return entry


def _header(manifest: bytes) -> bytes:
    head = _HEADER.pack(MAGIC, VERSION, 0, len(manifest), zlib.crc32(manifest), 0)[:_HEADER_CRC_SPAN]
    head += struct.pack("<I", zlib.crc32(head))
    return head + bytes(HEADER_SIZE - len(head))


def _manifest_bytes(meta: dict, entries: list[dict], body_len: int) -> tuple[bytes, int]:
    """Serialise the manifest with absolute section offsets; returns (bytes, first section offset)."""
    base = 0
    for _ in range(16):
        tensors = []
        for e in entries:
            e = dict(e)
            e["sections"] = {k: dict(v, offset=v["offset"] + base) for k, v in e["sections"].items()}
            tensors.append(e)
        doc = dict(meta, file_size=base + body_len, tensors=tensors)
        try:
            raw = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise BlobError(f"cannot write the manifest (is config.json plain JSON without NaN?): {exc}") from None
        need = _align(HEADER_SIZE + len(raw))
        if need <= base:
            return raw, base
        base = max(base, need)
    raise BlobError("manifest layout did not converge")  # offsets only grow, so this is unreachable


def write_blob(model_dir: str | os.PathLike, out_path: str | os.PathLike) -> dict:
    """Write the blob of a compressed model directory to `out_path` (atomically); returns a summary:
    file size, theoretical minimum size and their ratio, and per-tensor layout and sizes."""
    from safetensors import safe_open

    from .source import read_compressed

    t0 = time.perf_counter()
    model = read_compressed(model_dir)
    nm = model.nm
    if nm is not None:
        nm = _check_nm(*nm)
    by_weight = {f"{module}.weight": module for module in model.quant}
    where: dict[str, Path] = {}
    for f in model.weight_files():
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    where.setdefault(key, f)
        except Exception as exc:
            raise BlobError(f"cannot read {f}: {exc}") from None
    names = sorted(set(where) | set(by_weight))
    target = Path(out_path)
    entries: list[dict] = []
    with atomic_file(target) as tmp:
        body_path = tmp.with_name(tmp.name + ".body")
        try:
            with open(body_path, "wb") as handle:
                body = _Body(handle)
                for name in names:
                    if name in by_weight:
                        module = by_weight[name]
                        entries.append(_encode_quant(name, module, model.quant[module], nm, body))
                    else:
                        with safe_open(str(where[name]), framework="pt") as src:
                            tensor = src.get_tensor(name)
                        entries.append(_encode_float(name, tensor, nm, body))
                body_len = body.pos
            meta = {"format": FORMAT, "version": VERSION, "byte_order": "little", "alignment": ALIGN,
                    "model": {"nm": list(nm) if nm else None, "config": model.config}}
            manifest, base = _manifest_bytes(meta, entries, body_len)
            with open(tmp, "wb") as out:
                out.write(_header(manifest))
                out.write(manifest)
                out.write(bytes(base - HEADER_SIZE - len(manifest)))
                with open(body_path, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 24)
                out.flush()
                os.fsync(out.fileno())
        finally:
            body_path.unlink(missing_ok=True)
    file_size = base + body_len
    min_bits = sum(e["min_bits"] for e in entries)
    payload = sum(s["length"] for e in entries for s in e["sections"].values())
    one_scale = sum(e["shape"][0] * e["n_groups"] * FIXED_BITS for e in entries if e["kind"] == "quant")
    return {
        "path": str(target), "file_size": file_size, "manifest_bytes": len(manifest), "payload_bytes": payload,
        "theoretical_min_bits": min_bits, "theoretical_min_bytes": min_bits / 8,
        "ratio": file_size * 8 / min_bits if min_bits else None,
        "payload_ratio": payload * 8 / min_bits if min_bits else None,
        "theoretical_min_bits_fp16_scales_only": min_bits - one_scale,
        "seconds": round(time.perf_counter() - t0, 3),
        "tensors": {e["name"]: {k: e.get(k) for k in ("kind", "shape", "bits", "nm", "nm_fallback", "min_bits")}
                    | {"bytes": sum(s["length"] for s in e["sections"].values())} for e in entries},
    }


# ----------------------------------------------------------------------------------------------------------
# Reader

def _fail(msg: str):
    raise BlobFormatError(msg)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int_eq(x, value: int) -> bool:
    return _is_int(x) and x == value


def _validate_entry(e, i: int) -> dict:
    if not isinstance(e, dict):
        _fail(f"manifest tensor #{i} is not an object")
    name = e.get("name")
    if not isinstance(name, str) or not name:
        _fail(f"manifest tensor #{i} has no name")
    where = f"tensor {name}"
    kind = e.get("kind")
    if kind not in ("quant", "fp16", "fp16_nm"):
        _fail(f"{where}: unknown kind {kind!r} (this reader knows quant, fp16, fp16_nm)")
    shape = e.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape) \
            or math.prod(shape) > MAX_NUMEL:
        _fail(f"{where}: bad shape {shape!r}")
    if kind in ("quant", "fp16_nm") and len(shape) != 2:
        _fail(f"{where}: a {kind} tensor must be 2-D, manifest says shape {shape}")
    nm = e.get("nm")
    if kind != "fp16":
        if nm is not None:
            if not (isinstance(nm, list) and len(nm) == 2 and all(_is_int(x) for x in nm)
                    and 1 <= nm[0] < nm[1] <= 256):
                _fail(f"{where}: bad N:M {nm!r}")
            if shape[1] % nm[1]:
                _fail(f"{where}: shape {shape} has {shape[1]} columns, not a multiple of M={nm[1]}")
            if not _int_eq(e.get("meta_bits"), nm_meta_bits(nm[1])):
                _fail(f"{where}: meta_bits {e.get('meta_bits')!r}, N:M {nm[0]}:{nm[1]} needs {nm_meta_bits(nm[1])}")
        elif kind == "fp16_nm" or "meta_bits" in e:
            _fail(f"{where}: {'fp16_nm tensor' if kind == 'fp16_nm' else 'dense tensor'} with meta_bits but no N:M")
        expect_slots = shape[0] * shape[1] if nm is None else shape[0] * (shape[1] // nm[1]) * nm[0]
        if not _int_eq(e.get("slots"), expect_slots):
            _fail(f"{where}: manifest says shape {shape}{f' N:M {nm[0]}:{nm[1]}' if nm else ''} "
                  f"({expect_slots} slots) but slots is {e.get('slots')!r}")
    if kind == "quant":
        if e.get("bits") not in QUANT_BITS or not _is_int(e.get("bits")):
            _fail(f"{where}: unsupported code width {e.get('bits')!r} (supported: {QUANT_BITS})")
        gs = e.get("group_size")
        if not _is_int(gs) or not (gs == -1 or 1 <= gs):
            _fail(f"{where}: bad group_size {gs!r}")
        if not _int_eq(e.get("n_groups"), _n_groups(shape[1], gs)):
            _fail(f"{where}: manifest says {shape[1]} columns in groups of {gs} but n_groups is {e.get('n_groups')!r}")
        if not isinstance(e.get("symmetric"), bool):
            _fail(f"{where}: symmetric must be true or false")
        if e.get("scale_encoding") != "fp16+fixed16":
            _fail(f"{where}: unknown scale_encoding {e.get('scale_encoding')!r}")
        frac = e.get("scale_frac_bits")
        if not _is_int(frac) or not 0 <= frac <= 31:
            _fail(f"{where}: bad scale_frac_bits {frac!r}")
        if nm is not None:
            ps = e.get("pruned_slots")
            if not _is_int(ps) or not 0 <= ps <= e["slots"]:
                _fail(f"{where}: bad pruned_slots count {ps!r}")
    sections = e.get("sections")
    if not isinstance(sections, dict):
        _fail(f"{where}: no sections")
    expected = _expected_sections(e)
    if set(sections) != set(expected):
        _fail(f"{where}: sections {sorted(sections)}, a {kind} tensor like this one has {sorted(expected)}")
    for sec, length in expected.items():
        s = sections[sec]
        if not (isinstance(s, dict) and all(_is_int(s.get(k)) for k in ("offset", "length", "crc32"))):
            _fail(f"{where}: section {sec} needs integer offset, length and crc32")
        if s["length"] != length:
            detail = f"{e.get('bits')}-bit " if kind == "quant" else ""
            _fail(f"{where}: manifest says shape {shape} ({detail}{kind}"
                  f"{f', N:M {nm[0]}:{nm[1]}' if nm else ''}) so section {sec} should have {length} bytes, "
                  f"but it has {s['length']} bytes")
        if not 0 <= s["crc32"] <= 0xFFFFFFFF:
            _fail(f"{where}: section {sec} has crc32 {s['crc32']} out of range")
    return e


class Blob:
    """A memory-mapped blob. Structure is validated on open; each section's CRC-32 on its first use
    (`verify()` checks them all)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = os.path.getsize(self.path)
        except OSError as exc:
            raise BlobError(f"cannot open blob {self.path}: {exc.strerror or exc}") from None
        if size < HEADER_SIZE:
            _fail(f"truncated: file is {size} bytes, shorter than the {HEADER_SIZE}-byte header")
        try:
            self._buf = np.memmap(self.path, dtype=np.uint8, mode="r").view(np.ndarray)
        except (OSError, ValueError) as exc:
            raise BlobError(f"cannot map blob {self.path}: {exc}") from None
        size = self._buf.size
        head = self._buf[:HEADER_SIZE].tobytes()
        magic, version, flags, mlen, mcrc, hcrc = _HEADER.unpack_from(head)
        if magic != MAGIC:
            _fail(f"bad magic {magic!r} (expected {MAGIC!r}): not a toolchain blob")
        if version != VERSION:
            _fail(f"unsupported format version {version} (this reader supports {VERSION})")
        if zlib.crc32(head[:_HEADER_CRC_SPAN]) != hcrc:
            _fail("checksum mismatch in the header")
        if flags != 0:
            _fail(f"unsupported header flags 0x{flags:08x} (this reader supports 0)")
        if any(head[32:]):
            _fail("header padding bytes 32..63 are not zero")
        end = HEADER_SIZE + mlen
        if end > size:
            _fail(f"truncated: file is {size} bytes, header says the manifest ends at byte {end}")
        raw = self._buf[HEADER_SIZE:end].tobytes()
        if zlib.crc32(raw) != mcrc:
            _fail("checksum mismatch in the manifest")
        try:
            manifest = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            _fail(f"manifest is not valid UTF-8 JSON: {exc}")
        self.manifest = self._validate(manifest, size, end)
        self._verified: set[tuple[str, str]] = set()

    # -- structure ---------------------------------------------------------------------------------------
    def _validate(self, man, size: int, manifest_end: int) -> dict:
        if not isinstance(man, dict):
            _fail("manifest is not a JSON object")
        if man.get("format") != FORMAT:
            _fail(f"manifest format {man.get('format')!r}, expected {FORMAT!r}")
        if not _int_eq(man.get("version"), VERSION):
            _fail(f"unsupported format version {man.get('version')!r} in the manifest (this reader supports {VERSION})")
        if man.get("byte_order") != "little" or not _int_eq(man.get("alignment"), ALIGN):
            _fail(f"manifest byte_order/alignment {man.get('byte_order')!r}/{man.get('alignment')!r}, "
                  f"expected 'little'/{ALIGN}")
        fs = man.get("file_size")
        if not _is_int(fs):
            _fail(f"manifest file_size {fs!r} is not an integer")
        if size < fs:
            _fail(f"truncated: file is {size} bytes, manifest says {fs}")
        if size > fs:
            _fail(f"file is {size} bytes, manifest says {fs}: trailing bytes")
        tensors = man.get("tensors")
        if not isinstance(tensors, list):
            _fail("manifest has no tensor list")
        try:
            entries = [_validate_entry(e, i) for i, e in enumerate(tensors)]
        except BlobFormatError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
            _fail(f"malformed manifest: {type(exc).__name__}: {exc}")
        self._entries = {}
        for e in entries:
            if e["name"] in self._entries:
                _fail(f"tensor {e['name']} appears twice in the manifest")
            self._entries[e["name"]] = e
            if e.get("module"):
                if not isinstance(e["module"], str):
                    _fail(f"tensor {e['name']}: module is not a string")
                self._entries.setdefault(e["module"], e)
        spans = sorted((s["offset"], s["length"], e["name"], k) for e in entries for k, s in e["sections"].items())
        pos = manifest_end
        for off, length, name, sec in spans:
            if off % ALIGN:
                _fail(f"section {sec} of tensor {name} starts at {off}, not a multiple of {ALIGN}")
            if off < pos:
                _fail(f"section {sec} of tensor {name} at {off} overlaps the manifest or the section before it")
            if off + length > size:
                _fail(f"truncated: section {sec} of tensor {name} ends at {off + length}, file is {size} bytes")
            if self._buf[pos:off].any():
                _fail(f"padding bytes {pos}..{off} before section {sec} of tensor {name} are not zero")
            pos = off + length
        if pos != size:
            if spans or size - pos >= ALIGN:
                _fail(f"file is {size} bytes, its last section ends at {pos}")
            if self._buf[pos:size].any():
                _fail("padding bytes after the manifest are not zero")
        self._tensor_names = [e["name"] for e in entries]
        return man

    # -- access ------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names (checkpoint names) in file order."""
        return list(self._tensor_names)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._tensor_names)

    def entry(self, name: str) -> dict:
        """The manifest entry of a tensor (by checkpoint name, or module name for a quantized linear)."""
        try:
            return self._entries[name]
        except KeyError:
            raise BlobError(f"no tensor {name!r} in {self.path}") from None

    def section(self, name: str, section: str) -> np.ndarray:
        """Raw bytes (read-only uint8 view of the mapping) of one section, its CRC-32 checked."""
        e = self.entry(name)
        if self._buf is None:
            raise BlobError(f"blob {self.path} is closed")
        s = e["sections"].get(section)
        if s is None:
            raise BlobError(f"tensor {e['name']} has no section {section!r} (it has {sorted(e['sections'])})")
        data = self._buf[s["offset"]:s["offset"] + s["length"]]
        key = (e["name"], section)
        if key not in self._verified:
            if zlib.crc32(data) != s["crc32"]:
                _fail(f"checksum mismatch in section {section} of tensor {e['name']}")
            self._verified.add(key)
        return data

    def verify(self) -> None:
        """Check every section's CRC-32 (structure and padding were checked on open)."""
        for name in self._tensor_names:
            for sec in self._entries[name]["sections"]:
                self.section(name, sec)

    def _packed(self, name, section, bits, count, signed):
        data = self.section(name, section)
        total = count * bits
        if total % 8 and int(data[-1]) >> (total % 8):
            _fail(f"unused bits at the end of section {section} of tensor {name} are not zero")
        return unpack_codes(data, bits, count, signed)

    def tensor(self, name: str) -> np.ndarray:
        """An fp16 tensor: a read-only view of the mapping (kind fp16) or the expanded N:M tensor (fp16_nm)."""
        e = self.entry(name)
        if e["kind"] == "fp16":
            return self.section(name, "data").view("<f2").reshape(e["shape"])
        if e["kind"] == "fp16_nm":
            n, m = e["nm"]
            vals = self.section(name, "values").view("<f2")
            index = self._packed(e["name"], "nm_index", e["meta_bits"], e["slots"], False)
            return nm_expand(vals, index, n, m, e["shape"][1]).astype(np.float16).reshape(e["shape"])
        raise BlobError(f"tensor {e['name']} is quantized; use Blob.quantized() or Blob.dequantized()")

    def scales_fixed(self, name: str) -> tuple[np.ndarray, int]:
        """(uint16 mantissas [out, n_groups], frac_bits s) of a quantized tensor: scale = mantissa / 2^s."""
        e = self._quant_entry(name)
        data = self.section(name, "scales_fixed").view("<u2").reshape(e["shape"][0], e["n_groups"])
        return data, e["scale_frac_bits"]

    def _quant_entry(self, name):
        e = self.entry(name)
        if e["kind"] != "quant":
            raise BlobError(f"tensor {e['name']} is {e['kind']}, not quantized; use Blob.tensor()")
        return e

    def quantized(self, name: str):
        """The QuantizedWeight of a quantized linear (by module or checkpoint name): codes int32 [out, in]
        (pruned positions hold the zero code), scales float32, zeros int32, spec, and, for N:M layers, the
        prune mask (None for layers stored dense)."""
        import torch

        from ..quant import QuantizedWeight, QuantSpec

        e = self._quant_entry(name)
        rows, cols = e["shape"]
        bits, sym, ng = e["bits"], e["symmetric"], e["n_groups"]
        key = e["name"]
        scales = self.section(key, "scales_fp16").view("<f2").reshape(rows, ng).astype(np.float32)
        if scales.size and not (np.isfinite(scales).all() and (scales > 0).all()):
            _fail(f"section scales_fp16 of tensor {key} holds a non-positive or non-finite scale")
        self.section(key, "scales_fixed")
        if sym:
            zeros = np.zeros((rows, ng), np.int32)
        else:
            zeros = self._packed(key, "zeros", bits, rows * ng, False).reshape(rows, ng).astype(np.int32)
        slots = self._packed(key, "codes", bits, e["slots"], sym)
        mask = None
        if e["nm"] is None:
            codes = slots.reshape(rows, cols).astype(np.int32)
        else:
            n, m = e["nm"]
            index = self._packed(key, "nm_index", e["meta_bits"], e["slots"], False)
            slot_mask = nm_slot_mask(index, n, m, rows, cols)
            codes = np.empty((rows, cols), np.int32)
            codes[...] = 0 if sym else _column_zeros(zeros, _group_lengths(cols, e["group_size"]))
            flat_slots = slot_mask.reshape(-1)
            codes.reshape(-1)[flat_slots] = slots
            mask = ~slot_mask
            if e["pruned_slots"]:
                pruned = self.section(key, "pruned_slots").view("<u4")
                ascending = pruned.size < 2 or bool((np.diff(pruned.astype(np.int64)) > 0).all())
                if pruned[-1] >= e["slots"] or not ascending:
                    _fail(f"section pruned_slots of tensor {key} is not strictly ascending below {e['slots']}")
                mask.reshape(-1)[np.flatnonzero(flat_slots)[pruned]] = True
        try:
            spec = QuantSpec(bits, e["group_size"], sym)
        except ToolchainError as exc:
            _fail(f"tensor {key}: {exc}")
        return QuantizedWeight(torch.from_numpy(codes), torch.from_numpy(scales), torch.from_numpy(zeros), spec,
                               None if mask is None else torch.from_numpy(mask))

    def nm_slots(self, name: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int] | None]:
        """The stored slots of a quantized linear, as hardware streams them: (codes [rows, slots per row] in
        [group, ascending position] order, positions in the group [rows, slots per row] uint8, (N, M)).
        A layer stored dense has every column as a slot, positions 0..cols-1 and N:M None."""
        e = self._quant_entry(name)
        rows, cols = e["shape"]
        key = e["name"]
        codes = self._packed(key, "codes", e["bits"], e["slots"], e["symmetric"]).reshape(rows, -1)
        if e["nm"] is None:
            return codes, np.broadcast_to(np.arange(cols, dtype=np.int64), (rows, cols)), None
        n, m = e["nm"]
        index = self._packed(key, "nm_index", e["meta_bits"], e["slots"], False).reshape(rows, -1)
        return codes, index, (n, m)

    def dequantized(self, name: str) -> np.ndarray:
        """float32 [out, in] = scale * (code - zero) of a quantized linear."""
        return self.quantized(name).dequantize().numpy()

    def close(self) -> None:
        """Drop this object's reference to the mapping (views handed out keep it alive)."""
        self._buf = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_blob(path: str | os.PathLike, verify: bool = False) -> Blob:
    """Open (memory-map) and validate a blob; `verify=True` also checks every section's CRC-32 now."""
    blob = Blob(path)
    if verify:
        blob.verify()
    return blob
