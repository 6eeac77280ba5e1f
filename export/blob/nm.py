"""N:M layout: for every group of M consecutive input columns, N slots in ascending column order.

Slots are the kept (unpruned) columns; a group with fewer than N kept ones is topped up with its lowest pruned
columns (their value is the zero/fill value, and their slot numbers go to the `pruned_slots` list). Each
slot's position in its group is stored in `toolchain.numerics.nm.index_bits(M)` bits. For M <= 8 a group's
kept columns form one byte, and lookup tables indexed by that byte give its slots without sorting."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ...numerics.nm import MAX_M, fits_groups, groups_breaking, index_bits, is_pattern
from .format import BlobError, BlobFormatError
from .packing import pack_stream, uint_for, unpack_codes


def check_pattern(n, m) -> tuple[int, int]:
    """(N, M) as ints, or BlobError when they are not a storable N:M pattern."""
    if not is_pattern(n, m):
        raise BlobError(f"N:M must be integers with 1 <= N < M <= {MAX_M}, got {n}:{m}")
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
    meta = index_bits(m)
    group_meta = (index.astype(np.uint64) << (np.arange(n, dtype=np.uint64) * np.uint64(meta))).sum(axis=1)
    return kept.sum(axis=1).astype(np.uint8), slot_mask, index, group_meta.astype(uint_for(n * meta))


class NMChunk:
    """The N:M slots of a [rows, cols] prune mask: slot_flat (bool per position), counts (kept per group).
    `ok` is False, and the slots are not computed, when some group keeps more than N (the mask is not N:M)."""

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
            if groups_breaking(self.counts, n):
                self.ok = False
                return
            if groups == 0 or int(self.counts.min()) == n:
                self.slot_flat = np.unpackbits(stream, count=groups * m, bitorder="little").view(bool)
            else:
                self.slot_flat = np.unpackbits(pack_stream(slot_lut[self.kb], m), count=groups * m,
                                               bitorder="little").view(bool)
        else:
            keep = ~pm.reshape(-1, m)
            self.counts = keep.sum(axis=1)
            if groups_breaking(self.counts, n):
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
        meta = index_bits(self.m)
        if self.m <= 8:
            return pack_stream(_nm_tables(self.n, self.m)[3][self.kb], self.n * meta)
        return pack_stream(self._index.reshape(-1), meta)

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
    n, m = check_pattern(n, m)
    pm = np.asarray(prune_mask, bool)
    if pm.ndim != 2 or not fits_groups(pm.shape[1], m):
        raise BlobError(f"N:M needs a 2-D mask whose column count is a multiple of M={m}, got shape {pm.shape}")
    chunk = NMChunk(pm, n, m)
    if not chunk.ok:
        return None
    return chunk.slot_flat.reshape(pm.shape), chunk.index()


def nm_compress(values: np.ndarray, prune_mask: np.ndarray, n: int, m: int, fill=0):
    """Compress [rows, cols] `values` to N:M slots.

    Returns (slot values [rows, cols*N/M], index [rows, cols*N/M] uint8, pruned_slots uint32: slot numbers
    (row-major) of slots that are pruned in `prune_mask`). Raises BlobError when the mask is not N:M or a
    value outside the slots differs from `fill` (scalar or an array shaped like `values`)."""
    n, m = check_pattern(n, m)
    values = np.asarray(values)
    pm = np.asarray(prune_mask, bool)
    if pm.shape != values.shape or pm.ndim != 2 or not fits_groups(pm.shape[1], m):
        raise BlobError(f"N:M needs 2-D values and mask of one shape with columns a multiple of M={m}, got "
                        f"{values.shape} and {pm.shape}")
    chunk = NMChunk(pm, n, m)
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
    stream = pack_stream(bitmask, m)
    return np.unpackbits(stream, count=bitmask.size * m, bitorder="little").view(bool).reshape(-1, m)


def nm_slot_mask(index: np.ndarray, n: int, m: int, rows: int, cols: int) -> np.ndarray:
    """[rows, cols] bool of the slot positions given by `index` (N per group); validates the indices."""
    n, m = check_pattern(n, m)
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
