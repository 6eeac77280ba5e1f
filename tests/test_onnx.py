"""ONNX export: every weight form against the PyTorch model, through the KV cache, on both families."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch

from toolchain.errors import ConfigError
from toolchain.export.blob import pack_codes
from toolchain.export.onnx import ExportWarning, build_onnx, export_onnx, matmulnbits_widths
from toolchain.export.onnx_check import check_onnx
from toolchain.export.ort_runtime import OrtDecoder, ort_session
from toolchain.models import load_model


def _export(model_dir, tmp_path, form):
    path = tmp_path / f"model.{form}.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = export_onnx(model_dir, path, form)
    onnx.checker.check_model(str(path))
    return path, info, [w for w in caught if issubclass(w.category, ExportWarning)]


def test_onnx_packings_known_bytes():
    # MatMulNBits blobs: unsigned codes, first value in the lowest bits
    assert pack_codes(np.array([1, 2, 3, 0, 3, 3, 3, 3]), 2, signed=False).tolist() == [0b00111001, 0xFF]
    assert pack_codes(np.array([0x1, 0xA, 0xF, 0x0]), 4, signed=False).tolist() == [0xA1, 0x0F]
    # ONNX INT4 raw data: two's complement nibbles, first value low, odd count padded with 0
    assert pack_codes(np.array([-1, 2, -8]), 4).tolist() == [0x2F, 0x08]


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("form", ["float", "qdq", "matmulnbits"])
def test_forms_match_pytorch_and_generate(compressed_dir, tmp_path, family, form):
    model_dir = compressed_dir(family, "2:4", "4")
    path, info, caught = _export(model_dir, tmp_path, form)
    assert not caught
    n_linear = 7 * 2 if family == "llama" else 6 * 2
    untied_head = 1 if family == "llama" else 0   # the tiny llama has its own lm_head, kept float
    assert info["linears"] == ({"float": n_linear + untied_head} if form == "float"
                               else {form: n_linear, **({"float": 1} if untied_head else {})})
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ("DequantizeLinear" in ops) == (form == "qdq")
    assert ("MatMulNBits" in ops) == (form == "matmulnbits")
    r = check_onnx(model_dir, path, tokens=24, new_tokens=8)
    assert r["logits_ok"], r
    assert r["tokens_ok"], (r["onnx_tokens"], r["torch_tokens"])
    assert r["relative_diff"] < 1e-5


def test_quantized_forms_are_smaller_and_hold_the_codes(compressed_dir, tmp_path):
    from onnx import numpy_helper

    model_dir = compressed_dir("llama", None, "8")
    sizes = {form: _export(model_dir, tmp_path, form)[1]["bytes"] for form in ("float", "qdq")}
    assert sizes["qdq"] < 0.6 * sizes["float"]
    from toolchain.quant import read_quant_state

    state = read_quant_state(model_dir / "quant_state.safetensors")
    inits = {t.name: t for t in onnx.load(str(tmp_path / "model.qdq.onnx")).graph.initializer}
    name = "model.layers.1.mlp.down_proj"
    codes = numpy_helper.to_array(inits[f"{name}.codes"])
    assert codes.dtype == np.int8 and np.array_equal(codes.T, state[name].codes.numpy())
    assert np.array_equal(numpy_helper.to_array(inits[f"{name}.scales"]).T, state[name].scales.numpy())


@pytest.mark.parametrize("bits", ["3", "2"])
@pytest.mark.parametrize("form", ["qdq", "matmulnbits"])
def test_narrow_widths_use_wider_containers_exactly(compressed_dir, tmp_path, bits, form):
    model_dir = compressed_dir("llama", "0.5", bits)
    path, info, caught = _export(model_dir, tmp_path, form)
    native = form == "matmulnbits" and int(bits) in matmulnbits_widths()
    if native:
        assert not caught
    else:
        assert len(caught) == 14
        assert "model.layers.0.self_attn.q_proj" in str(caught[0].message)
        assert f"{bits}-bit codes stored as" in str(caught[0].message)
    assert check_onnx(model_dir, path, tokens=16, new_tokens=4)["ok"]


@pytest.mark.parametrize("form", ["qdq", "matmulnbits"])
def test_asymmetric_zero_points(compressed_dir, tmp_path, form):
    model_dir = compressed_dir("llama", "2:4", "4", asym=True)
    path, _, caught = _export(model_dir, tmp_path, form)
    assert not caught
    r = check_onnx(model_dir, path, tokens=16, new_tokens=4)
    assert r["ok"] and r["relative_diff"] < 1e-5


def test_group_sizes_matmulnbits_cannot_block(compressed_dir, tmp_path):
    # group 24 on 64/128 inputs: groups 24, 24, 16 (shorter last group). qdq holds it; MatMulNBits needs a
    # power-of-two block, so those layers fall back to float, each with a warning naming it.
    model_dir = compressed_dir("llama", None, "4", group_size=24)
    path, info, caught = _export(model_dir, tmp_path, "qdq")
    assert not caught and info["linears"] == {"qdq": 14, "float": 1}
    assert check_onnx(model_dir, path, tokens=16, new_tokens=4)["ok"]
    path, info, caught = _export(model_dir, tmp_path, "matmulnbits")
    assert info["linears"] == {"float": 15} and len(caught) == 14
    assert "power-of-two block size" in str(caught[0].message)
    assert check_onnx(model_dir, path, tokens=16, new_tokens=4)["ok"]


def test_per_row_groups_pad_matmulnbits_blocks(compressed_dir, tmp_path):
    model_dir = compressed_dir("opt", None, "4", group_size=-1)
    for form in ("qdq", "matmulnbits"):
        path, info, caught = _export(model_dir, tmp_path, form)
        assert not caught
        assert check_onnx(model_dir, path, tokens=16, new_tokens=4)["ok"]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_left_padded_batch_matches_pytorch(compressed_dir, tmp_path, family):
    """A batch with a left-padded row: the graph's padding mask and caller-given position ids behave as
    transformers' do, on every real (non-pad) position."""
    model_dir = compressed_dir(family, "2:4", "4")
    path, _, _ = _export(model_dir, tmp_path, "float")
    model = load_model(str(model_dir), with_tokenizer=False).model
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()
    dec = OrtDecoder(ort_session(path))
    out = dec.session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                       "position_ids": pos.numpy(), **dec.empty_cache(2)})[0]
    real = mask.numpy().astype(bool)
    assert np.abs(out[real] - ref[real]).max() < 1e-5 * max(1.0, np.abs(ref).max())


def test_dense_model_float_only(tiny_llama_dir, tmp_path):
    path, info, _ = _export(tiny_llama_dir, tmp_path, "float")
    assert check_onnx(tiny_llama_dir, path, tokens=16, new_tokens=4)["ok"]
    with pytest.raises(ConfigError, match="needs quantized weights"):
        export_onnx(tiny_llama_dir, tmp_path / "x.onnx", "qdq")
    with pytest.raises(ConfigError, match="choose one of"):
        build_onnx(load_model(str(tiny_llama_dir), with_tokenizer=False).model, "llama", {}, "int3")


def test_io_names_follow_optimum(compressed_dir, tmp_path):
    path, _, _ = _export(compressed_dir("llama", "2:4", "4"), tmp_path, "float")
    graph = onnx.load(str(path)).graph
    inputs = [i.name for i in graph.input]
    outputs = [o.name for o in graph.output]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs[3:] == [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert outputs == ["logits"] + [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]


def test_lossless_int8_blocks_detection():
    from toolchain.export.onnx import lossless_int8_blocks

    gen = torch.Generator().manual_seed(0)
    scales = (torch.rand(5, 2, 1, generator=gen) * 0.01 + 1e-3).half().float()
    codes = torch.randint(-127, 128, (5, 2, 32), generator=gen).float()
    codes[:, :, 0] = 127  # each block reaches the extreme code, as Q8_0 blocks do
    table = (scales * codes).reshape(5, 64)
    got = lossless_int8_blocks(table)
    assert got is not None
    assert np.array_equal(got[0].reshape(5, 2, 32), codes.numpy().astype(np.int8))
    assert np.array_equal(got[1], scales[..., 0].numpy())
    assert lossless_int8_blocks(torch.randn(5, 64, generator=gen)) is None
    assert lossless_int8_blocks(table[:, :48]) is None   # not a whole number of blocks


@pytest.mark.parametrize("form", ["qdq", "matmulnbits"])
def test_int8_block_embedding_is_stored_compactly_and_exactly(compressed_dir, tmp_path, form):
    """A tied embedding that is exactly int8 blocks (as GGUF Q8_0 tables are) is stored as codes in the
    quantized forms; the tied lm_head reads the same initializers, and outputs still match PyTorch."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = compressed_dir("opt", "2:4", "4")
    model_dir = tmp_path / "q8-embed"
    shutil.copytree(src, model_dir)
    tensors = load_file(str(model_dir / "model.safetensors"))
    name = "model.decoder.embed_tokens.weight"
    table = tensors[name].reshape(tensors[name].shape[0], -1, 32)
    scales = (table.abs().amax(-1, keepdim=True) / 127).half().float()
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))   # OPT's padding row is all zeros
    tensors[name] = (scales * torch.round(table / scales).clamp(-127, 127)).reshape(tensors[name].shape).contiguous()
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    path, info, _ = _export(model_dir, tmp_path, form)
    assert info["embedding"] == "int8 blocks of 32 (lossless)"
    inits = {t.name for t in onnx.load(str(path)).graph.initializer}
    assert name not in inits
    float_path, float_info, _ = _export(model_dir, tmp_path, "float")
    assert float_info["embedding"] == "float32"
    r = check_onnx(model_dir, path, tokens=16, new_tokens=6)
    assert r["ok"] and r["relative_diff"] < 1e-5, r


def _variant(name):
    """Tiny models whose decoder layouts differ from the fixtures': post-norm OPT with narrower embeddings
    (project_in/out, no final norm), a sliding window, tied embeddings with q/k/v biases."""
    from transformers import MistralConfig, MistralForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=320)
    if name == "opt-post-norm":
        return OPTForCausalLM(OPTConfig(ffn_dim=128, max_position_embeddings=64, word_embed_proj_dim=32,
                                        do_layer_norm_before=False, **small)).eval()
    if name == "mistral-window":
        return MistralForCausalLM(MistralConfig(intermediate_size=96, num_key_value_heads=2, sliding_window=5,
                                                **small)).eval()
    return Qwen2ForCausalLM(Qwen2Config(intermediate_size=96, num_key_value_heads=2, tie_word_embeddings=True,
                                        **small)).eval()


@pytest.mark.parametrize("name", ["opt-post-norm", "mistral-window", "qwen2-tied"])
def test_decoder_layouts_match_pytorch_through_the_cache(tmp_path, name):
    """The one decoder builder follows each adapter's layout: prefill, then decode steps through the cache."""
    from toolchain.export.onnx import save_onnx
    from toolchain.models import adapter_for

    model = _variant(name)
    proto, _ = build_onnx(model, adapter_for(model).family, {}, "float")
    save_onnx(proto, tmp_path / "model.onnx")
    dec = OrtDecoder(ort_session(tmp_path / "model.onnx"))
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids).logits.numpy()
    logits, cache = dec.step(ids[:, :9].numpy(), dec.empty_cache(1), 0)
    steps = [logits]
    for t in range(9, 12):
        logits, cache = dec.step(ids[:, t:t + 1].numpy(), cache, t)
        steps.append(logits)
    out = np.concatenate(steps, axis=1)
    assert np.abs(out - ref).max() < 1e-5 * max(1.0, np.abs(ref).max())


def test_unsupported_activation_is_named(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir), with_tokenizer=False).model
    model.config.hidden_act = "gelu"
    with pytest.raises(ConfigError, match="llama activation 'gelu'"):
        build_onnx(model, "llama", {}, "float")
