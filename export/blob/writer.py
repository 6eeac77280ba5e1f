"""Writing a blob: each tensor of a compressed model encoded into its sections, then header, manifest and
sections written as one file, atomically.

A quantized linear of an N:M model is stored in the N:M layout when its mask allows it; otherwise it is stored
dense and its manifest entry says why (`nm_fallback`). Float tensors whose +0.0 entries make an N:M mask are
stored as fp16 slots (`fp16_nm`), the rest as plain fp16."""
from __future__ import annotations

import json
import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np

from ...atomic import atomic_file
from ...numerics.geometry import group_count
from ...numerics.nm import fits_groups, index_bits
from .format import (ALIGN, FIXED_BITS, FORMAT, HEADER, HEADER_CRC_SPAN, HEADER_SIZE, MAGIC, VERSION, BlobError,
                     align, column_zeros, group_lengths)
from .nm import NMChunk, check_pattern
from .packing import CHUNK, pack_stream, packed_size


class _NotNM(Exception):
    """This layer cannot be stored in the N:M layout (the reason is the message)."""


class _Body:
    """Sections written one after another to a file, at 64-byte aligned offsets relative to its start."""

    def __init__(self, handle):
        self.handle = handle
        self.pos = 0

    def add(self, data: np.ndarray) -> dict:
        start = align(self.pos)
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
        chunk = NMChunk(pm, n, m)
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
    ng = group_count(cols, gs)
    lengths = group_lengths(cols, gs)
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
        elif not fits_groups(cols, m):
            reason = f"input dimension {cols} is not a multiple of M={m}"
        if reason is None:
            meta = index_bits(m)
            total = rows * (cols // m) * n
            packed = np.empty(packed_size(total, bits), np.uint8)
            packed_idx = np.empty(packed_size(total, meta), np.uint8)

            def emit(start, vals, meta_bytes):
                p = pack_stream(vals, bits)              # range checked above
                packed[start * bits // 8:start * bits // 8 + p.size] = p
                packed_idx[start * meta // 8:start * meta // 8 + meta_bytes.size] = meta_bytes

            def fill_rows(r0, r1):
                return 0 if sym else column_zeros(zeros[r0:r1], lengths)

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
        sections["codes"] = pack_stream(codes.reshape(-1), bits)
        code_bits = rows * cols * bits
    mant, frac, err = _fixed_scales(scales16)
    entry.update(scale_encoding="fp16+fixed16", scale_frac_bits=frac, scale_fixed_max_rel_error=err)
    sections["scales_fp16"] = scales16.astype("<f2")
    sections["scales_fixed"] = mant.astype("<u2")
    if not sym:
        sections["zeros"] = pack_stream(zeros.reshape(-1), bits)
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
    if nm is not None and t16.ndim == 2 and fits_groups(t16.shape[1], nm[1]) and t16.size:
        n, m = nm
        bits16 = t16.view(np.uint16)                        # +0.0 only: -0.0 is kept as a value, bit-exact
        zero_mask = bits16 == 0
        if zero_mask.any():
            meta = index_bits(m)
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
    head = HEADER.pack(MAGIC, VERSION, 0, len(manifest), zlib.crc32(manifest), 0)[:HEADER_CRC_SPAN]
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
        need = align(HEADER_SIZE + len(raw))
        if need <= base:
            return raw, base
        base = max(base, need)
    raise BlobError("manifest layout did not converge")  # offsets only grow, so this is unreachable


def write_blob(model_dir: str | os.PathLike, out_path: str | os.PathLike, streaming: bool = False) -> dict:
    """Write the blob of a compressed model directory to `out_path` (atomically); returns a summary:
    file size, theoretical minimum size and their ratio, and per-tensor layout and sizes.

    Tensors are encoded one at a time, in name order, each float tensor read from its shard when its turn
    comes. `streaming`: the quantization state too is read one linear at a time (`QuantStateFile`) instead of
    whole (read whole, its codes are int32 in memory, 4 bytes a weight: twice a bf16 checkpoint); the bytes
    written are the same."""
    from safetensors import safe_open

    from ..source import read_compressed

    t0 = time.perf_counter()
    model = read_compressed(model_dir, lazy=streaming)
    nm = model.nm
    if nm is not None:
        nm = check_pattern(*nm)
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
