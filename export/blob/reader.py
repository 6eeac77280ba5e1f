"""Reading a blob: `read_blob` memory-maps the file and validates its whole structure at once (header,
manifest, every tensor entry against its shape, section offsets and padding); each section's CRC-32 is checked
on its first use. `Blob` hands out sections as read-only views of the mapping and decodes tensors from them."""
from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path

import numpy as np

from ...errors import ToolchainError
from ...numerics.geometry import group_count
from ...numerics.nm import fits_groups, index_bits, is_pattern
from ...numerics.widths import SUPPORTED_BITS
from .format import (ALIGN, FORMAT, HEADER, HEADER_CRC_SPAN, HEADER_SIZE, MAGIC, MAX_DIM, MAX_NUMEL, VERSION,
                     BlobError, BlobFormatError, column_zeros, group_lengths)
from .nm import nm_expand, nm_slot_mask
from .packing import packed_size, unpack_codes


def _fail(msg: str):
    raise BlobFormatError(msg)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int_eq(x, value: int) -> bool:
    return _is_int(x) and x == value


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
            if not (isinstance(nm, list) and len(nm) == 2 and all(_is_int(x) for x in nm) and is_pattern(*nm)):
                _fail(f"{where}: bad N:M {nm!r}")
            if not fits_groups(shape[1], nm[1]):
                _fail(f"{where}: shape {shape} has {shape[1]} columns, not a multiple of M={nm[1]}")
            if not _int_eq(e.get("meta_bits"), index_bits(nm[1])):
                _fail(f"{where}: meta_bits {e.get('meta_bits')!r}, N:M {nm[0]}:{nm[1]} needs {index_bits(nm[1])}")
        elif kind == "fp16_nm" or "meta_bits" in e:
            _fail(f"{where}: {'fp16_nm tensor' if kind == 'fp16_nm' else 'dense tensor'} with meta_bits but no N:M")
        expect_slots = shape[0] * shape[1] if nm is None else shape[0] * (shape[1] // nm[1]) * nm[0]
        if not _int_eq(e.get("slots"), expect_slots):
            _fail(f"{where}: manifest says shape {shape}{f' N:M {nm[0]}:{nm[1]}' if nm else ''} "
                  f"({expect_slots} slots) but slots is {e.get('slots')!r}")
    if kind == "quant":
        if e.get("bits") not in SUPPORTED_BITS or not _is_int(e.get("bits")):
            _fail(f"{where}: unsupported code width {e.get('bits')!r} (supported: {SUPPORTED_BITS})")
        gs = e.get("group_size")
        if not _is_int(gs) or not (gs == -1 or 1 <= gs):
            _fail(f"{where}: bad group_size {gs!r}")
        if not _int_eq(e.get("n_groups"), group_count(shape[1], gs)):
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
        magic, version, flags, mlen, mcrc, hcrc = HEADER.unpack_from(head)
        if magic != MAGIC:
            _fail(f"bad magic {magic!r} (expected {MAGIC!r}): not a toolchain blob")
        if version != VERSION:
            _fail(f"unsupported format version {version} (this reader supports {VERSION})")
        if zlib.crc32(head[:HEADER_CRC_SPAN]) != hcrc:
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

        from ...quant import QuantizedWeight, QuantSpec

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
            codes[...] = 0 if sym else column_zeros(zeros, group_lengths(cols, e["group_size"]))
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
