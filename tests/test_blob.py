"""The weight blob (toolchain.export.blob): bit packing, N:M layout, model round trips, size, and a reader that
fails cleanly on every damaged file."""
from __future__ import annotations

import json
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolchain.export.blob import (Blob, BlobError, BlobFormatError, nm_compress, nm_expand, nm_select, pack_codes,
                                   read_blob, unpack_codes, write_blob)
from toolchain.export.blob import packing as blob_packing
from toolchain.export.blob import writer as blob_writer
from toolchain.export.blob.nm import NMChunk
from toolchain.numerics.nm import index_bits
from toolchain.export.source import read_compressed
from toolchain.quant import QuantizedWeight, QuantSpec, write_quant_state

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_pack(values, bits: int) -> bytes:
    """The spec, literally: field k at stream bits [k*bits, (k+1)*bits), stream bit i = bit i%8 of byte i//8."""
    out = bytearray((len(values) * bits + 7) // 8)
    for k, v in enumerate(values):
        v &= (1 << bits) - 1
        for j in range(bits):
            if (v >> j) & 1:
                i = k * bits + j
                out[i // 8] |= 1 << (i % 8)
    return bytes(out)


# --------------------------------------------------------------------------------------------------------
# bit packing

@st.composite
def codes_case(draw):
    bits = draw(st.sampled_from([2, 3, 4, 8, 1, 5, 6, 7]))
    signed = draw(st.booleans())
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    values = draw(st.lists(st.integers(lo, hi), max_size=80))
    return bits, signed, values


@FUZZ
@given(codes_case())
def test_pack_unpack_round_trip_matches_the_spec(case):
    bits, signed, values = case
    packed = pack_codes(np.array(values, np.int32), bits, signed=signed)
    assert packed.dtype == np.uint8
    assert packed.tobytes() == reference_pack(values, bits)
    back = unpack_codes(packed, bits, len(values), signed=signed)
    assert back.dtype == (np.int8 if signed else np.uint8)
    assert back.tolist() == values


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_pack_unpack_large_chunked(bits, signed, monkeypatch):
    monkeypatch.setattr(blob_packing, "CHUNK", 64)          # many chunks, a ragged last one
    rng = np.random.default_rng(bits)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    values = rng.integers(lo, hi + 1, 1001)
    packed = pack_codes(values, bits, signed=signed)
    assert packed.tobytes() == reference_pack(values.tolist(), bits)
    assert np.array_equal(unpack_codes(packed, bits, values.size, signed=signed), values)


def test_known_bytes_3bit():
    # unsigned 0..7: 000 100 010 110 001 101 011 111 (LSB first) -> 0x88 0xc6 0xfa
    assert pack_codes(np.arange(8), 3, signed=False).tobytes() == bytes([0x88, 0xC6, 0xFA])
    # signed -4..3 are the 3-bit fields 4 5 6 7 0 1 2 3 -> 0xac 0x8f 0x68; 8 codes fill exactly 3 bytes
    assert pack_codes(np.arange(-4, 4), 3, signed=True).tobytes() == bytes([0xAC, 0x8F, 0x68])
    assert unpack_codes(bytes([0xAC, 0x8F, 0x68]), 3, 8, signed=True).tolist() == list(range(-4, 4))
    # 3 codes use 9 bits: two bytes, the unused high bits zero
    assert pack_codes(np.array([7, 7, 7]), 3, signed=False).tobytes() == bytes([0xFF, 0x01])


def test_known_bytes_2of4_metadata():
    # kept columns per group: (0,1) (0,2) (0,3) (1,2) (1,3) (2,3); nibble = idx0 | idx1 << 2 = 4 8 c 9 d e
    kept = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3), (2,)]
    mask = np.ones((1, 4 * len(kept)), bool)
    for g, cols in enumerate(kept):
        for c in cols:
            mask[0, 4 * g + c] = False
    values = np.where(mask, 0, np.arange(1, mask.size + 1)).astype(np.int32)
    slots, index, pruned = nm_compress(values, mask, 2, 4)
    # the last group keeps only column 2: its lowest pruned column (0) fills the second slot
    assert index.reshape(-1, 2).tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3], [0, 2]]
    assert slots.reshape(-1).tolist() == [1, 2, 5, 7, 9, 12, 14, 15, 18, 20, 23, 24, 0, 27]
    assert pruned.tolist() == [12]
    meta = pack_codes(index, 2, signed=False)
    assert meta.tobytes() == bytes([0x84, 0x9C, 0xED, 0x08])
    # and the writer's per-group tables produce the same stream
    chunk = NMChunk(mask, 2, 4)
    assert chunk.meta_stream().tobytes() == meta.tobytes()
    assert np.array_equal(nm_expand(slots, index, 2, 4, mask.shape[1]), values)


@FUZZ
@given(st.sampled_from([(2, 4), (4, 8), (1, 4), (3, 8), (2, 3), (1, 2), (2, 16)]), st.integers(1, 4),
       st.integers(1, 4), st.integers(0, 2 ** 32 - 1))
def test_nm_compress_expand_round_trip(nm, rows, groups, seed):
    n, m = nm
    rng = np.random.default_rng(seed)
    keep = np.zeros((rows * groups, m), bool)
    for g in range(keep.shape[0]):                   # up to N kept per group, sometimes fewer
        keep[g, rng.choice(m, rng.integers(0, n + 1), replace=False)] = True
    mask = ~keep.reshape(rows, groups * m)
    values = np.where(mask, 0, rng.integers(1, 100, mask.shape))
    slots, index, pruned = nm_compress(values, mask, n, m)
    assert slots.shape == (rows, groups * n)
    assert np.all(np.diff(index.reshape(-1, n).astype(int), axis=1) > 0)
    assert np.array_equal(nm_expand(slots, index, n, m, groups * m), values)
    slot_mask, _ = nm_select(mask, n, m)
    recovered = ~slot_mask
    recovered.reshape(-1)[np.flatnonzero(slot_mask)[pruned]] = True
    assert np.array_equal(recovered, mask)
    meta = pack_codes(index, index_bits(m), signed=False)
    assert NMChunk(mask, n, m).meta_stream().tobytes() == meta.tobytes()


def test_nm_refuses_non_nm_and_lossy():
    mask = np.array([[False, False, False, True]])
    assert nm_select(mask, 2, 4) is None
    with pytest.raises(BlobError, match="not 2:4"):
        nm_compress(np.ones((1, 4), int), mask, 2, 4)
    with pytest.raises(BlobError, match="fill value"):
        nm_compress(np.array([[1, 0, 0, 3]]), np.array([[False, True, True, True]]), 2, 4)
    with pytest.raises(BlobError, match="range"):
        pack_codes(np.array([8]), 4, signed=True)
    with pytest.raises(BlobError, match="1 to 8"):
        pack_codes(np.array([1]), 9)


# --------------------------------------------------------------------------------------------------------
# model round trips

def assert_round_trip(model_dir: Path, path: Path, summary: dict) -> Blob:
    model = read_compressed(model_dir)
    blob = read_blob(path, verify=True)
    floats = model.float_tensors()
    quant_names = {f"{m}.weight": m for m in model.quant}
    assert set(blob.names()) == set(floats) | set(quant_names)
    assert summary["file_size"] == path.stat().st_size
    for module, qw in model.quant.items():
        got = blob.quantized(module)
        assert got.spec == qw.spec
        assert got.codes.dtype == torch.int32 and torch.equal(got.codes, qw.codes)
        assert torch.equal(got.scales, qw.scales)
        assert torch.equal(got.zeros, qw.zeros)
        entry = blob.entry(module)
        if entry["nm"] is not None:
            assert torch.equal(got.prune_mask, qw.prune_mask)
        else:
            assert got.prune_mask is None
        mant, frac = blob.scales_fixed(module)
        scales = qw.scales.double().numpy()
        assert frac == entry["scale_frac_bits"] and 0 <= frac <= 31
        assert int(mant.max()) <= 65535 and (frac == 31 or np.rint(scales.max() * 2.0 ** (frac + 1)) > 65535)
        assert np.array_equal(mant, np.rint(scales * 2.0 ** frac).astype(np.uint16))
        err = np.abs(mant / 2.0 ** frac - scales) / scales
        assert err.max() == pytest.approx(entry["scale_fixed_max_rel_error"])
        assert torch.allclose(torch.from_numpy(blob.dequantized(module)), qw.dequantize())
    for name, tensor in floats.items():
        if name in quant_names:
            continue
        got = blob.tensor(name)
        assert got.dtype == np.float16
        assert np.array_equal(got.view(np.uint16), tensor.half().numpy().view(np.uint16)), name
    return blob


SPARSITY = [None, "2:4", "4:8", "0.5"]


@pytest.mark.parametrize("sparsity", SPARSITY)
@pytest.mark.parametrize("bits", ["2", "3", "4", "8"])
def test_model_round_trip(compressed_dir, tmp_path, bits, sparsity):
    src = compressed_dir("llama", sparsity, bits)
    out = tmp_path / "model.blob"
    summary = write_blob(src, out)
    blob = assert_round_trip(src, out, summary)
    quant = [blob.entry(n) for n in blob.names() if blob.entry(n)["kind"] == "quant"]
    assert quant and all(e["bits"] == int(bits) for e in quant)
    if sparsity in ("2:4", "4:8"):
        n, m = map(int, sparsity.split(":"))
        assert all(e["nm"] == [n, m] for e in quant)        # every linear really uses the N:M layout
        # size: payload within 2% of kept x bits + metadata + scales; the tiny model's manifest is reported
        assert summary["payload_ratio"] <= 1.02
        assert summary["payload_bytes"] * 8 >= summary["theoretical_min_bits"]
        per_weight = [summary["tensors"][e["name"]]["bytes"] * 8 / (e["shape"][0] * e["shape"][1]) for e in quant]
        assert max(per_weight) < int(bits) * n / m + index_bits(m) * n / m + 1.0 + 0.1
    else:
        assert all(e["nm"] is None and "nm_fallback" not in e for e in quant)


@pytest.mark.parametrize("case", [
    dict(family="llama", sparsity="2:4", bits="4", asym=True),
    dict(family="opt", sparsity=None, bits="8", asym=True, group_size=-1),
    dict(family="llama", sparsity="2:4", bits="3.0", method="aptq"),
    dict(family="opt", sparsity="2:4", bits="4"),
])
def test_model_round_trip_more(compressed_dir, tmp_path, case):
    src = compressed_dir(**case)
    out = tmp_path / "model.blob"
    summary = write_blob(src, out)
    blob = assert_round_trip(src, out, summary)
    quant = [blob.entry(n) for n in blob.names() if blob.entry(n)["kind"] == "quant"]
    assert all((e["nm"] is not None) == (case["sparsity"] is not None) for e in quant)
    if case.get("asym"):
        assert all(not e["symmetric"] and "zeros" in e["sections"] for e in quant)
    if case["bits"] == "3.0":
        assert len({e["bits"] for e in quant}) > 1            # mixed precision really happened


def test_prune_only_model(compressed_dir, tmp_path):
    src = compressed_dir("llama", "2:4", None)
    out = tmp_path / "model.blob"
    summary = write_blob(src, out)
    blob = assert_round_trip(src, out, summary)
    kinds = {n: blob.entry(n)["kind"] for n in blob.names()}
    assert "quant" not in kinds.values()
    assert kinds["model.layers.0.mlp.down_proj.weight"] == "fp16_nm"
    assert kinds["model.embed_tokens.weight"] == "fp16"
    with pytest.raises(BlobError, match="not quantized"):
        blob.quantized("model.layers.0.mlp.down_proj.weight")


# --------------------------------------------------------------------------------------------------------
# a small hand-made model: every section kind, a group with fewer than N kept, a shorter last quant group

def make_synthetic(path: Path, tie: bool = True) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    rows, cols = 12, 16
    # asymmetric 3-bit 2:4, group size 6 (groups 6, 6, 4), one group with a single kept weight
    mask = torch.ones(rows, cols, dtype=torch.bool)
    for r in range(rows):
        for grp in range(cols // 4):
            keep = torch.randperm(4, generator=g)[:2]
            mask[r, 4 * grp + keep] = False
    mask[3, 4:8] = torch.tensor([True, True, False, True])     # one kept: column 4 fills the second slot
    spec = QuantSpec(3, 6, False)
    zeros = torch.randint(0, 8, (rows, 3), generator=g, dtype=torch.int32)
    zcols = torch.repeat_interleave(zeros, torch.tensor([6, 6, 4]), dim=1)
    codes = torch.where(mask, zcols, torch.randint(0, 8, (rows, cols), generator=g, dtype=torch.int32))
    scales = (torch.rand(rows, 3, generator=g) * 0.1 + 1e-3).half().float()
    down = QuantizedWeight(codes, scales, zeros, spec, mask)
    # symmetric 4-bit, dense, one group per row
    spec2 = QuantSpec(4, -1, True)
    up = QuantizedWeight(torch.randint(-8, 8, (cols, 8), generator=g, dtype=torch.int32),
                         (torch.rand(cols, 1, generator=g) + 0.5).half().float(),
                         torch.zeros(cols, 1, dtype=torch.int32), spec2, None)
    # symmetric 2-bit, pruned but not 2:4 (a group keeps three): stored dense
    gate_mask = torch.zeros(8, 16, dtype=torch.bool)
    gate_mask[:, 1::2] = True
    gate_mask[0, 1] = False
    gate = QuantizedWeight(torch.randint(-2, 2, (8, 16), generator=g, dtype=torch.int32).masked_fill(gate_mask, 0),
                           (torch.rand(8, 2, generator=g) + 0.5).half().float(), torch.zeros(8, 2, dtype=torch.int32),
                           QuantSpec(2, 8, True), gate_mask)
    write_quant_state(path / "quant_state.safetensors", {"model.layers.0.mlp.down_proj": down,
                                                         "model.layers.0.mlp.up_proj": up,
                                                         "model.layers.0.mlp.gate_proj": gate})
    tensors = {"model.embed_tokens.weight": torch.randn(20, 8, generator=g),
               "model.norm.weight": torch.ones(8),
               "model.layers.0.mlp.down_proj.weight": down.dequantize(),
               "model.layers.0.mlp.down_proj.bias": torch.randn(rows, generator=g),
               "model.layers.0.mlp.up_proj.weight": up.dequantize(),
               "model.layers.0.mlp.gate_proj.weight": gate.dequantize()}
    if not tie:
        tensors["lm_head.weight"] = torch.randn(20, 8, generator=g)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": tie}))
    (path / "compression.json").write_text(json.dumps({"format": "toolchain.compression/1",
                                                       "prune": {"nm": [2, 4]}}))
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    src = make_synthetic(tmp_path_factory.mktemp("synthetic") / "model")
    out = src.parent / "model.blob"
    summary = write_blob(src, out)
    return src, out, summary


def test_synthetic_round_trip_and_layout(synthetic):
    src, out, summary = synthetic
    blob = assert_round_trip(src, out, summary)
    assert "lm_head.weight" not in blob.names()        # tied: nothing invented
    e = blob.entry("model.layers.0.mlp.down_proj")
    assert e["nm"] == [2, 4] and e["meta_bits"] == 2 and e["slots"] == 12 * 8 and e["pruned_slots"] == 1
    assert set(e["sections"]) == {"codes", "nm_index", "pruned_slots", "scales_fp16", "scales_fixed", "zeros"}
    assert blob.entry("model.layers.0.mlp.up_proj")["nm_fallback"] == "layer has no pruned weights"
    gate = blob.entry("model.layers.0.mlp.gate_proj")
    assert gate["nm"] is None and gate["nm_fallback"].startswith("mask is not 2:4")
    raw = out.read_bytes()
    for t in blob.manifest["tensors"]:
        for s in t["sections"].values():
            assert s["offset"] % 64 == 0
            assert zlib.crc32(raw[s["offset"]:s["offset"] + s["length"]]) == s["crc32"]
    # the codes section is exactly the packed kept codes
    qw = read_compressed(src).quant["model.layers.0.mlp.down_proj"]
    slots, index, _ = nm_compress(qw.codes.numpy(), qw.prune_mask.numpy(), 2, 4,
                                  fill=np.repeat(qw.zeros.numpy(), [6, 6, 4], axis=1))
    assert blob.section(e["name"], "codes").tobytes() == pack_codes(slots, 3, signed=False).tobytes()
    assert blob.section(e["name"], "nm_index").tobytes() == pack_codes(index, 2, signed=False).tobytes()
    with pytest.raises(BlobError, match="is quantized"):
        blob.tensor("model.layers.0.mlp.up_proj.weight")
    with read_blob(out) as again:
        assert "model.norm.weight" in again and len(again) == 6
        assert "model.layers.0.mlp.up_proj" in again                     # module names work too
    with pytest.raises(BlobError, match="closed"):
        again.tensor("model.norm.weight")


def test_untied_head_is_kept(tmp_path):
    src = make_synthetic(tmp_path / "m", tie=False)
    summary = write_blob(src, tmp_path / "m.blob")
    blob = assert_round_trip(src, tmp_path / "m.blob", summary)
    assert blob.entry("lm_head.weight")["kind"] == "fp16"


# --------------------------------------------------------------------------------------------------------
# damaged files

def read_everything(path: Path) -> dict:
    blob = read_blob(path)
    out = {}
    for name in blob.names():
        if blob.entry(name)["kind"] == "quant":
            qw = blob.quantized(name)
            out[name] = (qw.codes.numpy().copy(), qw.scales.numpy().copy(), qw.zeros.numpy().copy(),
                         None if qw.prune_mask is None else qw.prune_mask.numpy().copy(), qw.spec,
                         *[a.copy() if isinstance(a, np.ndarray) else a for a in blob.scales_fixed(name)])
        else:
            out[name] = (np.array(blob.tensor(name)),)
    return out


def same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        for x, y in zip(a[k], b[k], strict=True):
            if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
                if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.dtype == y.dtype
                        and np.array_equal(x.view(np.uint8), y.view(np.uint8))):
                    return False
            elif x != y:
                return False
    return True


def outcome(data: bytes) -> dict | BlobFormatError:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.blob"
        path.write_bytes(data)
        try:
            return read_everything(path)
        except BlobFormatError as exc:
            return exc


def file_regions(path: Path) -> list[tuple[int, int]]:
    """[start, end) of the header, the manifest, every section and every padding gap of a blob."""
    blob = read_blob(path)
    mlen = struct.unpack_from("<Q", path.read_bytes(), 16)[0]
    spans = sorted((s["offset"], s["offset"] + s["length"]) for t in blob.manifest["tensors"]
                   for s in t["sections"].values() if s["length"])
    regions, pos = [(0, 32), (32, 64), (64, 64 + mlen)], 64 + mlen
    for start, end in spans:
        if start > pos:
            regions.append((pos, start))
        regions.append((start, end))
        pos = end
    return regions


@FUZZ
@given(st.data())
def test_fuzz_truncation(synthetic, data):
    _, out, _ = synthetic
    raw = out.read_bytes()
    start, end = data.draw(st.sampled_from(file_regions(out)))
    cut = data.draw(st.integers(start, end - 1))
    result = outcome(raw[:cut])
    assert isinstance(result, BlobFormatError)
    assert str(result).startswith("truncated")


@FUZZ
@given(st.data())
def test_fuzz_corruption(synthetic, data):
    _, out, _ = synthetic
    raw = bytearray(out.read_bytes())
    original = read_everything(out)
    regions = file_regions(out)
    for _ in range(data.draw(st.integers(1, 4))):
        start, end = data.draw(st.sampled_from(regions))       # every region gets hit, not just the header
        at = data.draw(st.integers(start, end - 1))
        if data.draw(st.booleans()):
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        else:
            raw[at] = data.draw(st.integers(0, 255))
    extra = data.draw(st.binary(max_size=3))
    result = outcome(bytes(raw) + extra)
    if bytes(raw) == out.read_bytes() and not extra:
        assert same(result, original)
    else:
        # every byte is covered by a checksum or must be zero: any change is caught
        assert isinstance(result, BlobFormatError), "a damaged blob read without error"


def rewrite_manifest(raw: bytes, edit, shift: int = 4096) -> bytes:
    """Apply `edit` to the manifest and re-seal it (valid CRCs). Every section moves `shift` bytes later first,
    so that the edited manifest has room before them."""
    mlen = struct.unpack_from("<Q", raw, 16)[0]
    manifest = json.loads(raw[64:64 + mlen])
    first = min(s["offset"] for t in manifest["tensors"] for s in t["sections"].values())
    for t in manifest["tensors"]:
        for s in t["sections"].values():
            s["offset"] += shift
    manifest["file_size"] += shift
    edit(manifest)
    text = json.dumps(manifest, separators=(",", ":")).encode()
    assert 64 + len(text) <= first + shift, "edited manifest does not fit before the first section"
    head = struct.pack("<8sIIQI", raw[:8], 1, 0, len(text), zlib.crc32(text))
    head += struct.pack("<I", zlib.crc32(head)) + bytes(32)
    return head + text + bytes(first + shift - 64 - len(text)) + raw[first:]


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 70000), st.sampled_from([2 ** 40, 2 ** 64, -1, 0, 64]),
                   st.text(max_size=3), st.lists(st.integers(-1, 20), max_size=3), st.floats(allow_nan=False))


@FUZZ
@given(st.data())
def test_fuzz_manifest_fields(synthetic, data):
    """A re-sealed manifest with any field of any tensor or section set to anything: a clean error or a read,
    never another exception."""
    _, out, _ = synthetic
    raw = out.read_bytes()
    mlen = struct.unpack_from("<Q", raw, 16)[0]
    manifest = json.loads(raw[64:64 + mlen])
    t = data.draw(st.integers(0, len(manifest["tensors"]) - 1))
    entry = manifest["tensors"][t]
    target = entry
    if data.draw(st.booleans()):
        target = entry["sections"][data.draw(st.sampled_from(sorted(entry["sections"])))]
    key = data.draw(st.sampled_from(sorted(target) + ["extra"]))
    value = data.draw(VALUES)

    def edit(m):
        tgt = m["tensors"][t]
        if target is not entry:
            tgt = tgt["sections"][next(k for k, v in entry["sections"].items() if v is target)]
        tgt[key] = value

    result = outcome(rewrite_manifest(raw, edit))
    assert isinstance(result, (dict, BlobFormatError))


def test_specific_errors(synthetic, tmp_path):
    _, out, _ = synthetic
    raw = out.read_bytes()
    bad = tmp_path / "bad.blob"

    def error_of(data: bytes) -> str:
        bad.write_bytes(data)
        with pytest.raises(BlobFormatError) as info:
            read_everything(bad)
        return str(info.value)

    assert "bad magic" in error_of(b"GGUF" + raw[4:])
    version2 = raw[:8] + struct.pack("<I", 2) + raw[12:]
    assert "unsupported format version 2 (this reader supports 1)" in error_of(version2)
    assert f"truncated: file is {len(raw) - 10} bytes, manifest says {len(raw)}" in error_of(raw[:-10])
    assert "truncated: file is 10 bytes" in error_of(raw[:10])
    assert "trailing bytes" in error_of(raw + b"\0")
    assert "checksum mismatch in the manifest" in error_of(raw[:100] + bytes([raw[100] ^ 1]) + raw[101:])
    blob = read_blob(out)
    e = blob.entry("model.layers.0.mlp.down_proj")
    at = e["sections"]["codes"]["offset"]
    assert (f"checksum mismatch in section codes of tensor {e['name']}"
            in error_of(raw[:at] + bytes([raw[at] ^ 0x10]) + raw[at + 1:]))
    # the manifest disagrees with the data (checksums all valid)

    def set_shape(m):
        next(t for t in m["tensors"] if t["name"] == e["name"])["shape"] = [12, 32]
    msg = error_of(rewrite_manifest(raw, set_shape))
    assert "manifest says shape [12, 32]" in msg and "slots" in msg

    def set_shape_and_slots(m):
        t = next(t for t in m["tensors"] if t["name"] == e["name"])
        t.update(shape=[24, 16], slots=24 * 8)
    msg = error_of(rewrite_manifest(raw, set_shape_and_slots))
    assert "manifest says shape [24, 16]" in msg and "section codes should have 72 bytes, but it has 36 bytes" in msg

    def set_bits(m):
        next(t for t in m["tensors"] if t["name"] == e["name"])["bits"] = 4
    assert "section codes should have 48 bytes, but it has 36 bytes" in error_of(rewrite_manifest(raw, set_bits))

    def move(m):
        next(t for t in m["tensors"] if t["name"] == e["name"])["sections"]["codes"]["offset"] -= 64
    assert "overlaps" in error_of(rewrite_manifest(raw, move))

    def bad_index(m):    # a pruned_slots count the data does not have
        next(t for t in m["tensors"] if t["name"] == e["name"])["pruned_slots"] = 2
    assert "section pruned_slots should have 8 bytes, but it has 4 bytes" in error_of(rewrite_manifest(raw, bad_index))
    with pytest.raises(BlobError, match="cannot open"):
        read_blob(tmp_path / "missing.blob")


def test_nm_index_must_ascend(synthetic, tmp_path):
    """A well-sealed file whose N:M indices repeat a column is refused (it would silently drop a weight)."""
    _, out, _ = synthetic
    raw = bytearray(out.read_bytes())
    blob = read_blob(out)
    e = blob.entry("model.layers.0.mlp.down_proj")
    s = e["sections"]["nm_index"]
    raw[s["offset"]] = (raw[s["offset"]] & 0xF0) | 0x5                   # group 0: indices (1, 1)
    new_crc = zlib.crc32(bytes(raw[s["offset"]:s["offset"] + s["length"]]))

    def reseal(m):
        next(t for t in m["tensors"] if t["name"] == e["name"])["sections"]["nm_index"]["crc32"] = new_crc
    bad = tmp_path / "bad.blob"
    bad.write_bytes(rewrite_manifest(bytes(raw), reseal))
    with pytest.raises(BlobFormatError, match="not strictly ascending"):
        read_blob(bad).quantized(e["name"])


# --------------------------------------------------------------------------------------------------------
# atomic writes

def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    src = make_synthetic(tmp_path / "m")
    target = tmp_path / "out" / "m.blob"
    target.parent.mkdir()
    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise BlobError("injected failure")
        return real(*args, **kwargs)

    real = blob_writer._encode_float
    monkeypatch.setattr(blob_writer, "_encode_float", boom)
    with pytest.raises(BlobError, match="injected"):
        write_blob(src, target)
    assert list(target.parent.iterdir()) == []
    # an existing blob survives a failed rewrite untouched
    monkeypatch.setattr(blob_writer, "_encode_float", real)
    write_blob(src, target)
    before = target.read_bytes()
    calls.clear()
    monkeypatch.setattr(blob_writer, "_encode_float", boom)
    with pytest.raises(BlobError, match="injected"):
        write_blob(src, target)
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["m.blob"]


def test_fp16_overflow_is_refused_atomically(tmp_path):
    from safetensors.torch import load_file, save_file

    src = make_synthetic(tmp_path / "m")
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.norm.weight"][0] = 1e6
    save_file(tensors, str(src / "model.safetensors"))
    out = tmp_path / "out"
    with pytest.raises(BlobError, match="model.norm.weight: values do not fit fp16"):
        write_blob(src, out / "m.blob")
    assert list(out.iterdir()) == []
