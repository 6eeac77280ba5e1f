"""An offline packer into the CUTLASS values + metadata layout that PyTorch's semi-structured (2:4) sparse
tensors use, its inverse, and the same metadata built from a weight blob's 2:4 index. CPU only (numpy).

`pack_cutlass` turns a dense matrix that is 2:4 along its last dimension (K) into the compressed values
[m, k/2] and the reordered metadata PyTorch's CUTLASS backend consumes
(`torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass` is the reference; this is
an independent numpy implementation, checked against it bit for bit in tests/test_semi_structured.py).
`unpack_cutlass` is the inverse. `meta_from_blob_positions` / `meta_from_blob_nm_index` / `cutlass_from_blob`
build the same metadata from a weight blob's 2:4 index (docs/blob-format.md), whose per-group nibble
`idx0 | idx1 << 2` is the CUTLASS one.

docs/gpu-semi-structured.md describes the layout and its shape rules.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError

# ----------------------------------------------------------------------------------------------------------
# Element kinds the CUTLASS 2:4 layout holds (float32 uses a 1:2 pair layout in PyTorch and is not handled).

_KINDS = {
    # kind: (metadata dtype, 4-bit groups per metadata element, row multiple, column multiple, element bits)
    "float16": (np.int16, 4, 32, 32, np.int16),
    "bfloat16": (np.int16, 4, 32, 32, np.int16),
    "int8": (np.int32, 8, 16, 64, np.int8),
}
_TORCH_KIND = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int8: "int8"}
_KIND_TORCH = {v: k for k, v in _TORCH_KIND.items()}
_EMPTY_NIBBLE = 0xE        # PyTorch's encoding of a group with no non-zero: positions (2, 3)


def _kind_of(dtype) -> str:
    """'float16' | 'bfloat16' | 'int8' from a torch dtype, a numpy dtype or a name."""
    if isinstance(dtype, torch.dtype):
        kind = _TORCH_KIND.get(dtype)
    else:
        try:
            kind = str(dtype) if isinstance(dtype, str) else np.dtype(dtype).name
        except TypeError:
            kind = None
    if kind not in _KINDS:
        extra = ("; float32 uses PyTorch's 1:2 pair layout (TF32), cast to float16/bfloat16 first"
                 if kind in ("float32", "torch.float32") or dtype is torch.float32 else "")
        raise ConfigError(f"the CUTLASS 2:4 layout holds float16, bfloat16 or int8 elements, got {dtype}{extra}")
    return kind


def layout_requirements(dtype) -> dict:
    """Shape rules of the CUTLASS compressed layout for an element dtype: rows a multiple of `row_multiple`,
    columns (K) a multiple of `col_multiple`, metadata dtype and 4-bit groups per metadata element."""
    kind = _kind_of(dtype)
    meta, per, rows, cols, _ = _KINDS[kind]
    return {"dtype": kind, "meta_dtype": np.dtype(meta).name, "groups_per_meta": per,
            "row_multiple": rows, "col_multiple": cols}


def _check_layout_shape(m: int, k: int, kind: str, what: str = "matrix") -> None:
    meta, per, rm, cm, _ = _KINDS[kind]
    if m < 1 or k < 1 or m % rm or k % cm:
        raise ConfigError(
            f"the CUTLASS 2:4 layout for {kind} needs rows a multiple of {rm} and columns (K) a multiple of {cm}, "
            f"got a {what} of shape [{m}, {k}]: metadata rows are interleaved in blocks of {rm}, and one "
            f"{np.dtype(meta).name} metadata element holds {per} groups of 4 columns with metadata columns "
            f"swizzled in pairs; pad with zero rows/columns (pad_dense) first")


# ----------------------------------------------------------------------------------------------------------
# Element bits: every comparison and copy is on the integer bit pattern, so -0.0 and NaN payloads survive.

def _to_bits(dense) -> tuple[np.ndarray, str, bool]:
    """(integer view [m, k], kind, came_from_torch) of a float16/bfloat16/int8 matrix."""
    if isinstance(dense, torch.Tensor):
        kind = _kind_of(dense.dtype)
        t = dense.detach().cpu().contiguous()
        bits = t.numpy() if kind == "int8" else t.view(torch.int16).numpy()
        return bits, kind, True
    arr = np.asarray(dense)
    kind = _kind_of(arr.dtype)
    if kind == "bfloat16":      # only reachable with a numpy bfloat16 extension type
        raise ConfigError("pass bfloat16 matrices as torch tensors (numpy has no native bfloat16)")
    return np.ascontiguousarray(arr).view(_KINDS[kind][4]), kind, False


def _from_bits(bits: np.ndarray, kind: str, as_torch: bool):
    if as_torch:
        t = torch.from_numpy(np.ascontiguousarray(bits))
        return t if kind == "int8" else t.view(_KIND_TORCH[kind])
    return bits if kind == "int8" else bits.view(np.float16)


def _nonzero(bits: np.ndarray, kind: str) -> np.ndarray:
    """dense != 0 on the bit pattern: +0.0 and -0.0 are zero (as in PyTorch's `dense != 0`)."""
    if kind == "int8":
        return bits != 0
    return (bits & 0x7FFF) != 0


# ----------------------------------------------------------------------------------------------------------
# Per-group nibbles: positions idx0 < idx1 of the two stored elements of a group of 4, as idx0 | idx1 << 2.

@lru_cache(maxsize=None)
def _nibble_table() -> np.ndarray:
    """[16] int16: the nibble of each keep pattern (column j of the group at bit j); -1 for > 2 kept.

    Two kept: their positions. Fewer: PyTorch's padding convention (sparse_semi_structured_from_dense_cutlass):
    none, only column 2 or only column 3 -> (2, 3); only column 0 -> (0, 2); only column 1 -> (1, 2)."""
    patterns = np.arange(16)
    bits = (patterns[:, None] >> np.arange(4)) & 1
    count = bits.sum(axis=1)
    lo = np.argmax(bits, axis=1)
    hi = 3 - np.argmax(bits[:, ::-1], axis=1)
    table = np.where(count == 2, lo | (hi << 2), -1)
    short = {0b0000: (2, 3), 0b0001: (0, 2), 0b0010: (1, 2), 0b0100: (2, 3), 0b1000: (2, 3)}
    for pattern, (i0, i1) in short.items():
        table[pattern] = i0 | (i1 << 2)
    table = table.astype(np.int16)
    table.setflags(write=False)
    return table


def _keep_patterns(keep: np.ndarray) -> np.ndarray:
    """[m, k] bool -> [m, k/4] uint8 pattern (column j of each group at bit j)."""
    m, k = keep.shape
    return np.packbits(keep.reshape(m, k // 4, 4), axis=-1, bitorder="little")[..., 0]


def _first_bad_group(bad: np.ndarray) -> str:
    r, g = np.argwhere(bad)[0]
    return f"row {r}, columns {4 * g}..{4 * g + 3}"


def nibbles_from_keep(keep) -> np.ndarray:
    """[m, k/4] uint8 per-group nibbles of a [m, k] keep mask (True = stored), with PyTorch's convention for
    groups keeping fewer than 2. Raises ConfigError when a group keeps more than 2 or k % 4 != 0."""
    keep = np.asarray(keep, dtype=bool)
    if keep.ndim != 2 or keep.shape[1] % 4:
        raise ConfigError(f"2:4 along K needs a 2-D matrix with K a multiple of 4, got shape {list(keep.shape)}")
    nib = _nibble_table()[_keep_patterns(keep)]
    bad = nib < 0
    if bad.any():
        raise ConfigError(f"matrix is not 2:4 along K: {int(bad.sum())} of {bad.size} groups of 4 consecutive "
                          f"columns hold more than 2 non-zeros (first at {_first_bad_group(bad)})")
    return nib.astype(np.uint8)


def nibbles_from_positions(positions) -> np.ndarray:
    """[m, k/4] uint8 nibbles `idx0 | idx1 << 2` from 2:4 slot positions [m, k/2] as the weight blob stores
    them (`Blob.nm_slots`: per group two column indices 0..3, strictly ascending)."""
    pos = np.asarray(positions)
    if pos.ndim != 2 or pos.shape[1] % 2:
        raise ConfigError(f"2:4 positions must be [rows, 2 per group], got shape {list(pos.shape)}")
    if pos.size and (int(pos.min()) < 0 or int(pos.max()) > 3):
        raise ConfigError(f"2:4 positions must be in 0..3, got values in [{int(pos.min())}, {int(pos.max())}]")
    pairs = pos.reshape(pos.shape[0], -1, 2).astype(np.uint8)
    bad = pairs[..., 0] >= pairs[..., 1]
    if bad.any():
        raise ConfigError(f"2:4 positions must strictly ascend within a group; {int(bad.sum())} groups do not "
                          f"(first at {_first_bad_group(bad)})")
    return pairs[..., 0] | (pairs[..., 1] << 2)


# ----------------------------------------------------------------------------------------------------------
# Metadata words and CUTLASS's reordering.

@lru_cache(maxsize=64)
def meta_scatter_offsets(m: int, meta_ncols: int, meta_itemsize: int) -> np.ndarray:
    """Flat offsets: metadata element (r, c) of the plain [m, meta_ncols] matrix goes to reordered.flat[off].

    As CUTLASS's host reorder_meta() and ColumnMajorInterleaved<2> (re-derived in PyTorch's
    _calculate_meta_reordering_scatter_offsets): within each block of 32 rows (16 for int32 metadata) row r
    moves to 4*(r%8) + (r%32)//8 (2*(r%8) + (r%16)//8); then in every 2x2 block the top-right and bottom-left
    elements swap; then the matrix is stored column-major interleaved by 2 (pairs of columns, row-major within
    a pair)."""
    group, interweave = (32, 4) if meta_itemsize == 2 else (16, 2)
    r = np.arange(m, dtype=np.int64)[:, None]
    c = np.arange(meta_ncols, dtype=np.int64)[None, :]
    dst_r = np.broadcast_to(r // group * group + (r % 8) * interweave + (r % group) // 8, (m, meta_ncols))
    dst_c = np.broadcast_to(c, (m, meta_ncols))
    swap = ((dst_r % 2 == 0) & (dst_c % 2 == 1)).astype(np.int64) - ((dst_r % 2 == 1) & (dst_c % 2 == 0))
    dst_r = dst_r + swap
    dst_c = dst_c - swap
    off = ((dst_c // 2) * m * 2 + dst_r * 2 + dst_c % 2).reshape(-1)
    off.setflags(write=False)
    return off


def _pack_words(nibbles: np.ndarray, kind: str) -> np.ndarray:
    """[m, k/4] nibbles -> plain (not yet reordered) metadata [m, k/(4*per)]: group j of a word at bits 4j."""
    meta_dtype, per = _KINDS[kind][0], _KINDS[kind][1]
    m, g = nibbles.shape
    shifts = (np.arange(per, dtype=np.uint32) * 4)
    words = (nibbles.reshape(m, g // per, per).astype(np.uint32) << shifts).sum(axis=-1, dtype=np.uint32)
    unsigned = np.uint16 if meta_dtype == np.int16 else np.uint32
    return words.astype(unsigned).view(meta_dtype)


def reorder_meta(plain: np.ndarray) -> np.ndarray:
    """Plain metadata [m, ncols] (int16 or int32) -> the reordered tensor CUTLASS reads, same shape."""
    m, ncols = plain.shape
    out = np.empty(m * ncols, plain.dtype)
    out[meta_scatter_offsets(m, ncols, plain.dtype.itemsize)] = plain.reshape(-1)
    return out.reshape(m, ncols)


def unreorder_meta(reordered: np.ndarray) -> np.ndarray:
    """Inverse of reorder_meta."""
    m, ncols = reordered.shape
    return reordered.reshape(-1)[meta_scatter_offsets(m, ncols, reordered.dtype.itemsize)].reshape(m, ncols)


def meta_from_nibbles(nibbles, dtype) -> np.ndarray:
    """CUTLASS metadata (reordered; int16 for float16/bfloat16, int32 for int8) from per-group nibbles
    [m, k/4] of an [m, k] matrix of element `dtype`."""
    kind = _kind_of(dtype)
    nib = np.asarray(nibbles)
    if nib.ndim != 2:
        raise ConfigError(f"nibbles must be 2-D [rows, groups], got shape {list(nib.shape)}")
    _check_layout_shape(nib.shape[0], nib.shape[1] * 4, kind)
    if nib.size and (int(nib.min()) < 0 or int(nib.max()) > 15):
        raise ConfigError("nibbles must be in 0..15")
    return reorder_meta(_pack_words(nib, kind))


# ----------------------------------------------------------------------------------------------------------
# Packer and unpacker.

def pad_dense(dense, rows: int, cols: int):
    """Zero-pad a [m, k] matrix (numpy or torch) to [rows, cols] (rows >= m, cols >= k), bottom and right."""
    m, k = dense.shape
    if rows < m or cols < k:
        raise ConfigError(f"cannot pad a [{m}, {k}] matrix to the smaller shape [{rows}, {cols}]")
    if isinstance(dense, torch.Tensor):
        return F.pad(dense, (0, cols - k, 0, rows - m))
    return np.pad(np.asarray(dense), ((0, rows - m), (0, cols - k)))


def pack_cutlass(dense, keep=None):
    """Compress a [m, k] matrix that is 2:4 along K into PyTorch's CUTLASS layout: (values [m, k/2], meta).

    `dense`: float16/bfloat16/int8, numpy or torch (bfloat16 only as torch); results come back in the same
    kind (torch tensors for a torch input). meta is int16 [m, k/16] for float16/bfloat16 and int32 [m, k/32]
    for int8, already reordered as the CUTLASS kernels read it. `keep` (bool [m, k], optional) names the stored
    positions (e.g. a prune mask's complement), so a kept weight that happens to be zero keeps its slot;
    by default the non-zeros are kept, as PyTorch does. Groups keeping fewer than 2 follow PyTorch's padding
    convention. Raises ConfigError for a matrix that is not 2:4 along K, a value outside `keep`, or a shape the
    layout cannot hold (rows % 32 and K % 32 for float16/bfloat16; rows % 16 and K % 64 for int8)."""
    bits, kind, as_torch = _to_bits(dense)
    if bits.ndim != 2:
        raise ConfigError(f"pack_cutlass needs a 2-D [rows, K] matrix, got shape {list(bits.shape)}")
    m, k = bits.shape
    if k % 4:
        raise ConfigError(f"matrix is not 2:4 along K: K = {k} is not a multiple of 4")
    _check_layout_shape(m, k, kind)
    nonzero = _nonzero(bits, kind)
    if keep is None:
        keep = nonzero
    else:
        keep = np.asarray(keep.cpu() if isinstance(keep, torch.Tensor) else keep, dtype=bool)
        if keep.shape != (m, k):
            raise ConfigError(f"keep mask has shape {list(keep.shape)}, the matrix [{m}, {k}]")
        lost = nonzero & ~keep
        if lost.any():
            r, c = np.argwhere(lost)[0]
            raise ConfigError(f"{int(lost.sum())} non-zero values lie outside the keep mask (first at row {r}, "
                              f"column {c}); the layout would lose them")
    nib = nibbles_from_keep(keep)
    pos = np.stack([nib & 3, nib >> 2], axis=-1).astype(np.intp)          # [m, k/4, 2]
    values = np.take_along_axis(bits.reshape(m, k // 4, 4), pos, axis=-1).reshape(m, k // 2)
    meta = reorder_meta(_pack_words(nib, kind))
    if as_torch:
        return _from_bits(values, kind, True), torch.from_numpy(meta)
    return _from_bits(values, kind, False), meta


def unpack_cutlass(values, meta):
    """Dense [m, 2 * values.shape[1]] from CUTLASS (values, reordered meta); the inverse of pack_cutlass."""
    bits, kind, as_torch = _to_bits(values)
    meta_np = np.asarray(meta.cpu() if isinstance(meta, torch.Tensor) else meta)
    meta_dtype, per = _KINDS[kind][0], _KINDS[kind][1]
    if bits.ndim != 2 or meta_np.ndim != 2:
        raise ConfigError(f"values and meta must be 2-D, got shapes {list(bits.shape)} and {list(meta_np.shape)}")
    m, half = bits.shape
    k = 2 * half
    if meta_np.dtype != meta_dtype or meta_np.shape != (m, k // (4 * per)):
        raise ConfigError(f"{kind} values [{m}, {half}] need {np.dtype(meta_dtype).name} metadata of shape "
                          f"[{m}, {k // (4 * per)}], got {meta_np.dtype} {list(meta_np.shape)}")
    _check_layout_shape(m, k, kind)
    plain = unreorder_meta(meta_np).view(np.uint16 if meta_dtype == np.int16 else np.uint32)
    nib = ((plain[..., None] >> (np.arange(per, dtype=plain.dtype) * 4)) & 0xF).reshape(m, k // 4)
    pos = np.stack([nib & 3, nib >> 2], axis=-1).astype(np.intp)
    bad = pos[..., 0] >= pos[..., 1]
    if bad.any():
        raise ConfigError(f"metadata holds {int(bad.sum())} groups whose two positions do not ascend "
                          f"(first at {_first_bad_group(bad)}): not a CUTLASS 2:4 encoding")
    dense = np.zeros((m, k // 4, 4), bits.dtype)
    np.put_along_axis(dense, pos, bits.reshape(m, k // 4, 2), axis=-1)
    return _from_bits(dense.reshape(m, k), kind, as_torch)


# ----------------------------------------------------------------------------------------------------------
# From the weight blob (toolchain.export.blob): 2:4 positions idx0 < idx1 per group, packed idx0 | idx1 << 2.

def _blob_nibbles(positions, pruned_slots, shape) -> np.ndarray:
    nib = nibbles_from_positions(positions)
    m, groups = nib.shape
    if pruned_slots is not None:
        pruned = np.asarray(pruned_slots, dtype=np.int64).reshape(-1)
        if pruned.size:
            if int(pruned.min()) < 0 or int(pruned.max()) >= m * groups * 2:
                raise ConfigError(f"pruned slot numbers must be below {m * groups * 2}, got up to {int(pruned.max())}")
            # re-encode the topped-up groups with PyTorch's convention: keep = slots minus the pruned ones
            slot_kept = np.ones(m * groups * 2, bool)
            slot_kept[pruned] = False
            slot_pos = np.stack([nib & 3, nib >> 2], axis=-1).reshape(-1)      # slot s -> its column in group
            slot_group = np.arange(m * groups * 2) // 2
            keep = np.zeros((m * groups, 4), bool)
            keep[slot_group[slot_kept], slot_pos[slot_kept]] = True
            nib = _nibble_table()[_keep_patterns(keep.reshape(m, groups * 4))].astype(np.uint8)
    if shape is not None:
        rows, cols = (int(x) for x in shape)
        if rows < m or cols < groups * 4 or cols % 4:
            raise ConfigError(f"cannot pad a [{m}, {groups * 4}] 2:4 layer to [{rows}, {cols}]")
        nib = np.pad(nib, ((0, rows - m), (0, cols // 4 - groups)), constant_values=_EMPTY_NIBBLE)
    return nib


def meta_from_blob_positions(positions, dtype, pruned_slots=None, shape=None) -> np.ndarray:
    """CUTLASS metadata from a 2:4 layer's slot positions as the weight blob stores them ([rows, cols/2],
    `Blob.nm_slots(name)[1]`).

    The blob's nibble per group is the CUTLASS nibble, so for groups with two kept weights this equals
    pack_cutlass(dense, keep)[1]. A group keeping fewer than two is topped up in the blob with its lowest pruned
    columns, in PyTorch with its own choice (see _nibble_table); both decode to the same dense matrix. Pass the
    blob's `pruned_slots` section to re-encode those groups PyTorch's way (then the metadata equals
    pack_cutlass's exactly). `shape` = (rows, cols) pads with empty groups, as pad_dense pads the matrix."""
    kind = _kind_of(dtype)
    nib = _blob_nibbles(positions, pruned_slots, shape)
    _check_layout_shape(nib.shape[0], nib.shape[1] * 4, kind, "2:4 layer")
    return reorder_meta(_pack_words(nib, kind))


def meta_from_blob_nm_index(raw, rows: int, cols: int, dtype) -> np.ndarray:
    """CUTLASS metadata straight from the raw bytes of a 2:4 layer's `nm_index` blob section.

    The section is the stream of 2-bit positions LSB first, so its bytes are the group nibbles low nibble
    first, and its little-endian 16-bit (32-bit) words are the plain int16 (int32) metadata words row by row:
    only CUTLASS's reordering remains. Groups topped up in the blob keep the blob's choice."""
    kind = _kind_of(dtype)
    _check_layout_shape(rows, cols, kind, "2:4 layer")
    data = np.ascontiguousarray(np.asarray(raw, dtype=np.uint8).reshape(-1))
    if data.size != rows * cols // 8:
        raise ConfigError(f"a 2:4 nm_index section of a [{rows}, {cols}] layer has {rows * cols // 8} bytes, "
                          f"got {data.size}")
    meta_dtype = _KINDS[kind][0]
    plain = data.view(np.dtype(meta_dtype).newbyteorder("<")).astype(meta_dtype).reshape(rows, -1)
    return reorder_meta(plain)


def cutlass_from_blob(blob, name: str, dtype=torch.float16, pad_to=None):
    """(values, meta) torch tensors in PyTorch's CUTLASS layout for a 2:4 quantized linear of a weight blob.

    `dtype` int8: the values are the stored codes themselves (the blob's slot order [row][group][ascending
    position] is CUTLASS's value order). float16/bfloat16: the dequantized slot values. `pad_to` = (rows, cols)
    zero-pads (e.g. to a plan's `padded_shape`)."""
    kind = _kind_of(dtype)
    codes, positions, nm = blob.nm_slots(name)
    rows, cols = blob.entry(name)["shape"]
    if nm is None or tuple(nm) != (2, 4):
        raise ConfigError(f"{name} is stored {'dense' if nm is None else f'{nm[0]}:{nm[1]}'} in the blob, not 2:4")
    if kind == "int8":
        vals = np.asarray(codes)
        if vals.size and (int(vals.min()) < -128 or int(vals.max()) > 127):
            raise ConfigError(f"{name}: codes span [{int(vals.min())}, {int(vals.max())}], not int8")
        vals = torch.from_numpy(vals.astype(np.int8))
    else:
        deq = blob.dequantized(name).reshape(rows, cols // 4, 4)
        slot = np.take_along_axis(deq, positions.reshape(rows, cols // 4, 2).astype(np.intp), axis=-1)
        vals = torch.from_numpy(np.ascontiguousarray(slot.reshape(rows, cols // 2))).to(_KIND_TORCH[kind])
    pruned = None
    if blob.entry(name).get("pruned_slots"):
        pruned = blob.section(name, "pruned_slots").view("<u4")
    shape = None
    if pad_to is not None:
        shape = (int(pad_to[0]), int(pad_to[1]))
        vals = pad_dense(vals, shape[0], shape[1] // 2)
    meta = meta_from_blob_positions(positions, kind, pruned_slots=pruned, shape=shape)
    return vals.contiguous(), torch.from_numpy(meta)
