"""PyTorch semi-structured (2:4) sparsity on the CPU: our numpy packer into the CUTLASS values + metadata layout
against PyTorch's own conversion routines, the weight blob's 2:4 index as the same metadata, the layer plan,
and the swap's refusal without CUDA."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.sparse._semi_structured_conversions import (_calculate_meta_reordering_scatter_offsets,
                                                       sparse_semi_structured_from_dense_cutlass,
                                                       sparse_semi_structured_to_dense_cutlass)

from toolchain.errors import ConfigError
from toolchain.export.blob import nm_compress, pack_codes, read_blob, write_blob
from toolchain.gpu.cutlass_layout import (cutlass_from_blob, layout_requirements, meta_from_blob_nm_index,
                                          meta_from_blob_positions, meta_from_nibbles, meta_scatter_offsets,
                                          nibbles_from_keep, nibbles_from_positions, pack_cutlass, pad_dense,
                                          unpack_cutlass)
from toolchain.gpu.semi_structured import (PaddedSemiStructuredLinear, min_shape, plan_semi_structured,
                                           swap_to_semi_structured)

DTYPES = [torch.float16, torch.bfloat16, torch.int8]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer bit pattern, so comparisons are bit for bit (-0.0 != +0.0, NaN == NaN)."""
    return t if t.dtype == torch.int8 else t.view(torch.int16)


def random_24(m: int, k: int, dtype, seed: int, max_keep: int = 2) -> torch.Tensor:
    """[m, k] 2:4 along K: each group of 4 keeps a random 0..max_keep positions; every short pattern occurs.
    Float pruned positions are a mix of +0.0 and -0.0."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, max_keep + 1, (m, k // 4, 1), generator=g)
    keep = torch.rand(m, k // 4, 4, generator=g).argsort(-1) < counts
    # make sure every keep pattern with at most 2 positions is present in the first 11 groups of row 0
    patterns = [p for p in range(16) if bin(p).count("1") <= max_keep]
    for i, p in enumerate(patterns[: k // 4]):
        keep[0, i] = torch.tensor([(p >> j) & 1 for j in range(4)], dtype=torch.bool)
    keep = keep.reshape(m, k)
    if dtype == torch.int8:
        vals = torch.randint(1, 128, (m, k), generator=g) * (torch.randint(0, 2, (m, k), generator=g) * 2 - 1)
        return torch.where(keep, vals, 0).to(torch.int8)
    vals = (torch.randn(m, k, generator=g) * 3).to(dtype)
    vals = torch.where(vals == 0, torch.ones((), dtype=dtype), vals)
    neg_zero = torch.full((m, k), -0.0, dtype=dtype)
    zeros = torch.where(torch.rand(m, k, generator=g) < 0.5, neg_zero, torch.zeros((), dtype=dtype))
    return torch.where(keep, vals, zeros)


SHAPES = {torch.float16: [(32, 32), (64, 96), (96, 256)], torch.bfloat16: [(32, 64), (128, 160)],
          torch.int8: [(16, 64), (48, 192), (64, 128)]}


# ------------------------------------------------------------------------------------------------------------
# The packer against PyTorch's CUTLASS conversion routines (they run on the CPU for float16/bfloat16/int8)

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pack_matches_pytorch_bit_for_bit(dtype):
    for i, (m, k) in enumerate(SHAPES[dtype]):
        dense = random_24(m, k, dtype, seed=i)
        values, meta = pack_cutlass(dense)
        ref_values, ref_meta = sparse_semi_structured_from_dense_cutlass(dense)
        assert values.dtype == dtype and values.shape == (m, k // 2)
        assert meta.dtype == ref_meta.dtype == (torch.int32 if dtype == torch.int8 else torch.int16)
        assert meta.shape == ref_meta.shape == (m, k // (32 if dtype == torch.int8 else 16))
        assert torch.equal(bits(values), bits(ref_values)), (dtype, m, k)
        assert torch.equal(meta, ref_meta), (dtype, m, k)
        # our inverse and PyTorch's inverse both give the matrix back (non-zeros bit for bit; the positions that
        # are not stored come back as +0, so a -0.0 there cannot survive in either)
        ours, theirs = unpack_cutlass(values, meta), sparse_semi_structured_to_dense_cutlass(values, meta)
        assert torch.equal(bits(ours), bits(theirs))
        assert torch.equal(ours, dense) and torch.equal(bits(ours)[dense != 0], bits(dense)[dense != 0])


def test_pack_full_groups_only_and_numpy_input():
    dense = random_24(64, 128, torch.float16, seed=7, max_keep=2)
    dense[:, :4] = torch.tensor([1.0, 0.0, 0.0, 2.0], dtype=torch.float16)
    v_np, m_np = pack_cutlass(dense.numpy())
    v_t, m_t = pack_cutlass(dense)
    assert isinstance(v_np, np.ndarray) and v_np.dtype == np.float16 and m_np.dtype == np.int16
    assert np.array_equal(v_np.view(np.int16), bits(v_t).numpy()) and np.array_equal(m_np, m_t.numpy())
    assert np.array_equal(m_np, sparse_semi_structured_from_dense_cutlass(dense)[1].numpy())


def test_short_group_convention_is_pytorchs():
    """One row of groups keeping none / one column: PyTorch's encodings spelled out in its source comment."""
    keep = np.zeros((32, 32), bool)
    singles = {0: (0, 2), 1: (1, 2), 2: (2, 3), 3: (2, 3)}
    for g, j in enumerate(singles):
        keep[:, 4 * g + j] = True
    nib = nibbles_from_keep(keep)
    expect = [i0 | i1 << 2 for i0, i1 in singles.values()] + [0b1110] * 4        # groups 4..7 keep nothing
    assert nib[0].tolist() == expect
    dense = torch.from_numpy(np.where(keep, 1.0, 0.0).astype(np.float16))
    assert torch.equal(pack_cutlass(dense)[1], sparse_semi_structured_from_dense_cutlass(dense)[1])


@pytest.mark.parametrize("meta_dtype,rows,ncols", [(torch.int16, 32, 2), (torch.int16, 96, 6), (torch.int32, 16, 2),
                                                   (torch.int32, 48, 4)])
def test_reordering_offsets_match_pytorch(meta_dtype, rows, ncols):
    ref = _calculate_meta_reordering_scatter_offsets(rows, ncols, meta_dtype, "cpu").numpy()
    ours = meta_scatter_offsets(rows, ncols, meta_dtype.itemsize)
    assert np.array_equal(ours, ref)
    assert np.array_equal(np.sort(ours), np.arange(rows * ncols))          # a permutation


def test_keep_mask_keeps_slots_of_zero_weights():
    """A kept weight that is exactly zero (e.g. a quantization code 0) keeps its slot when `keep` says so."""
    dense = random_24(32, 64, torch.float16, seed=3)
    keep = (dense != 0).numpy()
    # group 0 of row 5: kept columns 1 and 3, but the weight at 3 is zero
    keep[5, :4] = [False, True, False, True]
    dense[5, :4] = torch.tensor([0.0, 2.5, 0.0, 0.0], dtype=torch.float16)
    values, meta = pack_cutlass(dense, keep=keep)
    stand_in = torch.where(torch.from_numpy(keep), torch.ones((), dtype=torch.float16), dense)   # non-zero at keep
    assert torch.equal(meta, sparse_semi_structured_from_dense_cutlass(stand_in)[1])
    assert nibbles_from_keep(keep)[5, 0] == 1 | 3 << 2
    assert torch.equal(unpack_cutlass(values, meta), dense)
    # without the mask, PyTorch's convention re-picks that group
    assert pack_cutlass(dense)[1].tolist() != meta.tolist()
    keep[5, 1] = False                                             # a non-zero outside the mask would be lost
    with pytest.raises(ConfigError, match=r"non-zero values lie outside the keep mask \(first at row 5, column 1\)"):
        pack_cutlass(dense, keep=keep)


def test_pack_refuses_not_24_and_bad_shapes():
    dense = random_24(32, 64, torch.float16, seed=1)
    dense[3, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(ConfigError, match=r"not 2:4 along K: 1 of 512 groups .* more than 2 non-zeros "
                                          r"\(first at row 3, columns 8\.\.11\)"):
        pack_cutlass(dense)
    with pytest.raises(ConfigError, match="K = 30 is not a multiple of 4"):
        pack_cutlass(torch.zeros(32, 30, dtype=torch.float16))
    with pytest.raises(ConfigError, match=r"float16 needs rows a multiple of 32 .* got a matrix of shape \[16, 64\]"):
        pack_cutlass(torch.zeros(16, 64, dtype=torch.float16))
    with pytest.raises(ConfigError, match=r"int8 needs rows a multiple of 16 and columns \(K\) a multiple of 64"):
        pack_cutlass(torch.zeros(16, 32, dtype=torch.int8))
    with pytest.raises(ConfigError, match="1:2 pair layout"):
        pack_cutlass(torch.zeros(32, 32))
    with pytest.raises(ConfigError, match="2-D"):
        pack_cutlass(torch.zeros(2, 32, 32, dtype=torch.float16))


def test_pytorch_itself_fails_on_an_odd_number_of_meta_columns():
    """Why K % 32 (float16) and K % 64 (int8), stricter than the K % 16 / K % 32 PyTorch's routine checks:
    the 2x2 swizzle pairs metadata columns, and an odd count scatters out of bounds."""
    dense = torch.zeros(32, 48, dtype=torch.float16)
    with pytest.raises((RuntimeError, IndexError), match="out of bounds"):
        sparse_semi_structured_from_dense_cutlass(dense)
    with pytest.raises(ConfigError, match="multiple of 32"):
        pack_cutlass(dense)
    assert layout_requirements(torch.int8) == {"dtype": "int8", "meta_dtype": "int32", "groups_per_meta": 8,
                                               "row_multiple": 16, "col_multiple": 64}


def test_unpack_refuses_bad_metadata():
    values, meta = pack_cutlass(random_24(32, 64, torch.float16, seed=2))
    with pytest.raises(ConfigError, match=r"need int16 metadata of shape \[32, 4\]"):
        unpack_cutlass(values, meta.to(torch.int32))
    broken = meta.clone()
    broken.view(-1)[0] = 0                                         # every nibble 0: positions (0, 0)
    with pytest.raises(ConfigError, match="do not ascend"):
        unpack_cutlass(values, broken)


# ------------------------------------------------------------------------------------------------------------
# The weight blob's 2:4 index is the same metadata

def test_blob_doc_example_nibbles_are_cutlass_encodings():
    """docs/blob-format.md's worked row: groups (0,1) (0,2) (0,3) (1,2) (1,3) (2,3) -> 4 8 C 9 D E, the
    encodings PyTorch's sparse_semi_structured_from_dense_cutlass lists for the same pairs."""
    pos = np.array([[0, 1, 0, 2, 0, 3, 1, 2, 1, 3, 2, 3]])
    assert nibbles_from_positions(pos).tolist() == [[0x4, 0x8, 0xC, 0x9, 0xD, 0xE]]
    assert pack_codes(pos.reshape(-1), 2).tobytes() == bytes([0x84, 0x9C, 0xED])
    with pytest.raises(ConfigError, match="strictly ascend"):
        nibbles_from_positions(np.array([[1, 0]]))
    with pytest.raises(ConfigError, match="0..3"):
        nibbles_from_positions(np.array([[0, 4]]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_blob_layout_of_a_synthetic_matrix_gives_the_metadata(dtype):
    """Positions and pruned slots as the blob writer makes them (nm_compress), short groups included."""
    m, k = SHAPES[dtype][1]
    dense = random_24(m, k, dtype, seed=11)
    if dtype != torch.int8:
        dense = torch.where(dense == 0, torch.zeros((), dtype=dtype), dense)       # the blob stores +0 fill only
    keep = bits(dense).numpy() != 0 if dtype == torch.int8 else (dense != 0).numpy()
    slot_values, index, pruned = nm_compress(bits(dense).numpy(), ~keep, 2, 4)
    assert pruned.size                                                  # some groups were topped up
    ref_values, ref_meta = sparse_semi_structured_from_dense_cutlass(dense)
    # with the blob's pruned slots: exactly PyTorch's metadata
    meta = meta_from_blob_positions(index, dtype, pruned_slots=pruned)
    assert np.array_equal(meta, ref_meta.numpy()) and np.array_equal(meta, pack_cutlass(dense)[1].numpy())
    # the blob's own choice for topped-up groups differs, but decodes to the same matrix with PyTorch's inverse
    as_stored = meta_from_blob_positions(index, dtype)
    assert not np.array_equal(as_stored, meta)
    values = torch.from_numpy(slot_values)
    values = values if dtype == torch.int8 else values.view(dtype)
    restored = sparse_semi_structured_to_dense_cutlass(values, torch.from_numpy(as_stored))
    assert torch.equal(restored != 0, dense != 0) and torch.equal(restored[dense != 0], dense[dense != 0])
    # the raw nm_index stream (2-bit fields LSB first) read as little-endian words: the same metadata
    raw = pack_codes(index.reshape(-1), 2)
    assert np.array_equal(meta_from_blob_nm_index(raw, m, k, dtype), as_stored)
    assert np.array_equal(meta_from_nibbles(nibbles_from_positions(index), dtype), as_stored)


@pytest.fixture(scope="module")
def tiny_blob(compressed_dir, tmp_path_factory):
    from toolchain.models.loading import load_model

    model_dir = compressed_dir("llama", "2:4", "4")
    path = tmp_path_factory.mktemp("semi") / "model.tcblob"
    write_blob(model_dir, path)
    return load_model(str(model_dir), with_tokenizer=False).model, read_blob(path)


def decoder_linears(model):
    return [(n, mod) for n, mod in model.named_modules() if isinstance(mod, nn.Linear) and n != "lm_head"]


def test_tiny_model_blob_metadata_equals_packer(tiny_blob):
    model, blob = tiny_blob
    layers = decoder_linears(model)
    assert len(layers) == 14
    some_kept_zero = False
    for name, module in layers:
        weight = module.weight.detach().to(torch.float16)
        rows, cols = weight.shape
        q = blob.quantized(name)
        keep = ~q.prune_mask.numpy()
        some_kept_zero |= bool(((weight == 0).numpy() & keep).any())
        assert blob.nm_slots(name)[2] == (2, 4)
        values, meta = cutlass_from_blob(blob, name, torch.float16)
        ref_values, ref_meta = pack_cutlass(weight, keep=keep)
        assert torch.equal(meta, ref_meta) and torch.equal(bits(values), bits(ref_values)), name
        raw = blob.section(name, "nm_index")
        assert np.array_equal(meta_from_blob_nm_index(raw, rows, cols, torch.float16), meta.numpy())
        # PyTorch's inverse of the blob-derived layout is the model's weight
        assert torch.equal(bits(sparse_semi_structured_to_dense_cutlass(values, meta)), bits(weight)), name
        # int8: the stored codes are the CUTLASS values as they are
        codes = q.codes.to(torch.int8)
        c_values, c_meta = cutlass_from_blob(blob, name, torch.int8)
        assert torch.equal(sparse_semi_structured_to_dense_cutlass(c_values, c_meta), codes), name
        assert torch.equal(c_meta, pack_cutlass(codes, keep=keep)[1])
    assert some_kept_zero           # the keep mask mattered: some kept weights quantized to exactly 0


def test_tiny_model_blob_padded_as_planned(tiny_blob):
    """int8 on CUTLASS needs K a multiple of 128: the 64-column layers are padded, the blob path pads alike."""
    model, blob = tiny_blob
    default = {e["name"]: e for e in plan_semi_structured(model, torch.int8, "cutlass")["layers"]}
    q_proj = default["model.layers.0.self_attn.q_proj"]
    assert q_proj["action"] == "skipped" and "makes the GEMM 2.00x larger (limit 2x)" in q_proj["reason"]
    plan = plan_semi_structured(model, torch.int8, "cutlass", max_padded_ratio=4)
    by_name = {e["name"]: e for e in plan["layers"]}
    padded = [e for e in plan["layers"] if e["action"] == "padded"]
    assert len(padded) == 12 and all(e["padded_shape"] == [e["shape"][0], 128] for e in padded)
    assert by_name["model.layers.0.mlp.down_proj"]["action"] == "sparse"
    for e in padded:
        q = blob.quantized(e["name"])
        rows, cols = e["padded_shape"]
        codes = pad_dense(q.codes.to(torch.int8), rows, cols)
        keep = pad_dense(~q.prune_mask, rows, cols)
        values, meta = cutlass_from_blob(blob, e["name"], torch.int8, pad_to=e["padded_shape"])
        assert values.shape == (rows, cols // 2) and meta.shape == (rows, cols // 32)
        assert torch.equal(meta, pack_cutlass(codes, keep=keep)[1])
        assert torch.equal(sparse_semi_structured_to_dense_cutlass(values, meta), codes)
        # padded groups carry PyTorch's empty-group encoding, so plain PyTorch agrees on those columns
        ref_meta = sparse_semi_structured_from_dense_cutlass(pad_dense(torch.ones_like(q.codes, dtype=torch.int8)
                                                                       * (~q.prune_mask), rows, cols))[1]
        assert torch.equal(meta, ref_meta)


# ------------------------------------------------------------------------------------------------------------
# Plan and swap

def test_plan_tiny_model(tiny_blob):
    model, _ = tiny_blob
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_semi_structured(model)                                   # float16, PyTorch's default backend
    assert plan["backend"] == "cusparselt" and plan["min_shape"] == [16, 16]
    assert (plan["sparse"], plan["padded"], plan["skipped"]) == (14, 0, 1)
    head = next(e for e in plan["layers"] if e["name"] == "lm_head")
    assert head["action"] == "skipped" and head["reason"].startswith("not 2:4 along K (in_features): 5120 of 5120")
    cutlass = plan_semi_structured(model, torch.bfloat16, "cutlass")
    assert cutlass["min_shape"] == [32, 64] and cutlass["sparse"] == 14
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())       # nothing touched


def test_plan_pads_and_skips_with_reasons():
    def two_four(lin):
        with torch.no_grad():
            lin.weight.view(-1, 4)[:, 2:] = 0
        return lin

    emb = nn.Embedding(10, 64)
    head = nn.Linear(64, 10, bias=False)
    head.weight = emb.weight                                             # tied
    model = nn.ModuleDict({"ok": two_four(nn.Linear(128, 64)), "pad": two_four(nn.Linear(120, 48)),
                           "waste": two_four(nn.Linear(100, 40)), "odd_k": nn.Linear(30, 32),
                           "dense": nn.Linear(64, 64), "emb": emb, "head": head})
    plan = plan_semi_structured(model, torch.float16, "cutlass")
    got = {e["name"]: e for e in plan["layers"]}
    assert got["ok"]["action"] == "sparse" and got["ok"]["reason"] is None
    assert got["pad"]["action"] == "padded" and got["pad"]["padded_shape"] == [64, 128]
    assert "not a multiple of cutlass's minimum [32, 64]: zero-padded to [64, 128]" in got["pad"]["reason"]
    assert got["waste"]["action"] == "skipped" and "makes the GEMM 2.05x larger (limit 2x)" in got["waste"]["reason"]
    assert got["odd_k"]["reason"] == "not 2:4 along K (in_features): K = 30 is not a multiple of 4"
    assert got["dense"]["action"] == "skipped" and "keep more than 2" in got["dense"]["reason"]
    assert got["head"]["reason"].startswith("weight is shared with emb.weight (tied)")
    assert min_shape(torch.int8, "cutlass") == (16, 128)
    # the shape rules are the installed PyTorch's own
    c = torch.sparse.SparseSemiStructuredTensorCUSPARSELT._DTYPE_SHAPE_CONSTRAINTS[torch.float16]
    assert min_shape(torch.float16, "cusparselt") == (c.sparse_min_rows, c.sparse_min_cols)
    with pytest.raises(ConfigError, match="backend must be one of cusparselt, cutlass"):
        plan_semi_structured(model, backend="triton")
    with pytest.raises(ConfigError, match="cusparselt semi-structured backend takes .*not torch.float64"):
        plan_semi_structured(model, torch.float64, "cusparselt")


def test_padded_linear_equals_the_original():
    """The wrapper swap installs for padded layers, run with a dense padded weight: same outputs."""
    torch.manual_seed(0)
    lin = nn.Linear(120, 48)
    wrapped = PaddedSemiStructuredLinear(pad_dense(lin.weight.detach(), 64, 128),
                                         nn.functional.pad(lin.bias.detach(), (0, 16)), 120, 48)
    x = torch.randn(2, 5, 120)
    assert torch.allclose(wrapped(x), lin(x), atol=1e-6) and wrapped(x).shape == (2, 5, 48)


def test_swap_without_cuda_refuses_before_touching_the_model(tiny_blob, monkeypatch):
    model, _ = tiny_blob
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    modules = dict(model.named_modules())
    need_cuda = r"semi-structured sparse kernels need a CUDA GPU .*is_available\(\) is False"
    with pytest.raises(ConfigError, match=need_cuda):
        swap_to_semi_structured(model)
    with pytest.raises(ConfigError, match="dtype float16 or bfloat16, got torch.float32"):
        swap_to_semi_structured(model, dtype=torch.float32)
    assert dict(model.named_modules()) == modules
    for k, v in model.named_parameters():
        assert v is params[k] and v.device.type == "cpu" and v.dtype == torch.float32
        assert torch.equal(v, before[k])


def test_swap_bookkeeping_with_the_conversion_stubbed(monkeypatch):
    """No CUDA here, so PyTorch's conversion is stubbed (the dense weight stands in for the sparse one): what is
    left is the swap's own work, which must keep the model's function (padding in, slicing out, bias padding),
    install what the plan says, and skip a layer PyTorch refuses, with PyTorch's message."""
    import copy

    from toolchain.gpu import semi_structured as S

    def two_four(lin):
        with torch.no_grad():
            lin.weight.view(-1, 4)[:, 1::2] = 0
        return lin

    torch.manual_seed(0)
    model = nn.Sequential(two_four(nn.Linear(128, 120)), nn.ReLU(), two_four(nn.Linear(120, 64)), nn.ReLU(),
                          two_four(nn.Linear(64, 64)), nn.ReLU(), two_four(nn.Linear(64, 96)), nn.Linear(96, 32))
    reference = copy.deepcopy(model).to(torch.float16)

    def fake_from_dense(weight, alg_id=0):
        if weight.shape == (96, 64):
            raise RuntimeError("Error original_tensor.shape torch.Size([96, 64]) is not supported! (stub)")
        return weight.clone()

    monkeypatch.setattr(S, "_require_cuda", lambda device: torch.device("cpu"))
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: False)
    monkeypatch.setattr(torch.sparse.SparseSemiStructuredTensorCUTLASS, "from_dense", staticmethod(fake_from_dense))
    report = swap_to_semi_structured(model, torch.float16)
    assert report["backend"] == "cutlass" and "cuSPARSELt is not available" in report["note"]
    got = {e["name"]: e for e in report["layers"]}
    assert got["0"]["action"] == "padded" and got["0"]["padded_shape"] == [128, 128]
    assert got["2"]["action"] == "padded" and got["2"]["padded_shape"] == [64, 128]
    assert got["4"]["action"] == "sparse" and got["4"]["padded_shape"] is None
    assert got["6"]["action"] == "skipped"
    assert "cutlass conversion refused it: Error original_tensor.shape" in got["6"]["reason"]
    assert got["7"]["action"] == "skipped" and got["7"]["reason"].startswith("not 2:4")
    assert (report["sparse"], report["padded"], report["skipped"]) == (1, 2, 2)
    assert all(got[n]["max_abs_err"] == 0.0 for n in ("0", "2", "4"))
    assert isinstance(model[0], PaddedSemiStructuredLinear) and model[0].weight.shape == (128, 128)
    assert isinstance(model[2], PaddedSemiStructuredLinear) and model[2].bias.shape == (64,)
    assert type(model[4]) is nn.Linear and not model[4].weight.requires_grad           # weight swapped in place
    assert type(model[6]) is nn.Linear and model[6].weight.requires_grad and model[6].weight.dtype == torch.float16
    x = torch.randn(3, 128, dtype=torch.float16)
    assert torch.equal(model(x), reference(x))
