"""Bit packing: integer fields of 1 to 32 bits as one LSB-first byte stream.

Field k of a stream of `bits`-bit fields occupies stream bits [k*bits, (k+1)*bits); stream bit i is bit
(i % 8) of byte i // 8. Eight fields always fill exactly `bits` bytes, which is what every path uses. Work
goes in steps of CHUNK fields so that no temporary grows with the tensor."""
from __future__ import annotations

import numpy as np

from .format import BlobError

CHUNK = 1 << 22            # codes per packing step: bounds every temporary (a multiple of 8)


def packed_size(count: int, bits: int) -> int:
    """Bytes of `count` fields of `bits` bits packed densely."""
    return (count * bits + 7) // 8


def _check_width(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= int(bits) <= 8:
        raise BlobError(f"packed field width must be an integer from 1 to 8 bits, got {bits!r}")
    return int(bits)


def uint_for(nbits: int):
    """The narrowest unsigned numpy dtype with at least `nbits` bits."""
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
        dt = uint_for(2 * w)
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
    dt = uint_for(8 * bits)
    size = np.dtype(dt).itemsize
    wide = np.zeros((b.size // bits, size), np.uint8)
    wide[:, :bits] = b.reshape(-1, bits)
    v, w = wide.view(np.dtype(dt).newbyteorder("<")).reshape(-1), 8 * bits
    for _ in range(3):
        h = w // 2
        dt = uint_for(h)
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
        dt = uint_for(2 * f)
        v = v[0::2].astype(dt) | (v[1::2].astype(dt) << f)
        f *= 2
    v = v.astype(v.dtype.newbyteorder("<"), copy=False)
    return v.view(np.uint8).reshape(-1, v.dtype.itemsize)[:, :w // 8].reshape(-1)


def pack_stream(a: np.ndarray, width: int) -> np.ndarray:
    """Pack flat non-negative integers < 2^width (width 1..32; unchecked) into an LSB-first byte stream."""
    n = a.size
    out = np.empty(packed_size(n, width), np.uint8)
    dt = uint_for(width)
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
    return pack_stream(a, bits)


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
