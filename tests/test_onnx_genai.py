"""The fused ONNX graph (GroupQueryAttention, SkipSimplifiedLayerNormalization, stacked projections) against the
plain graph and PyTorch, and the export as onnxruntime-genai runs it, on tiny LLaMA and Qwen2 models."""
from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch

from toolchain.export.onnx import ExportWarning, build_onnx, export_onnx, save_onnx
from toolchain.export.onnx_check import check_onnx
from toolchain.export.ort_runtime import OrtDecoder, genai_available, ort_session
from toolchain.models import adapter_for, load_model
from toolchain.quant import read_quant_state

needs_genai = pytest.mark.skipif(not genai_available(),
                                 reason="onnxruntime-genai is not installed (pip install 'toolchain[genai]')")


def _export(model_dir, path, form, graph):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = export_onnx(model_dir, path, form, graph=graph, genai=True)
    onnx.checker.check_model(str(path))
    return info, [w for w in caught if issubclass(w.category, ExportWarning)]


def _ops(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_equals_plain_and_pytorch(compressed_dir, tmp_path, family):
    model_dir = compressed_dir(family, "2:4", "4")
    logits = {}
    for graph in ("plain", "fused"):
        path = tmp_path / graph / "model.onnx"
        path.parent.mkdir()
        info, caught = _export(model_dir, path, "matmulnbits", graph)
        assert not caught and info["graph"] == graph
        r = check_onnx(model_dir, path, tokens=24, new_tokens=8)
        assert r["logits_ok"] and r["relative_diff"] < 1e-5, r
        assert r["tokens_ok"], (r["onnx_tokens"], r["torch_tokens"])
        _, logits[graph] = OrtDecoder(ort_session(path)).greedy(np.arange(3, 19)[None, :], 0)
    ops = _ops(tmp_path / "fused" / "model.onnx")
    # one attention and one q/k/v weight, gate/up weight and down weight per layer (plus o_proj), two layers
    assert ops["GroupQueryAttention"] == 2 and ops["MatMulNBits"] == 2 * 4
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * 2
    assert "Softmax" not in ops
    producers = {o: n.op_type for n in onnx.load(str(tmp_path / "fused" / "model.onnx")).graph.node for o in n.output}
    assert {producers[f"present.{i}.{kv}"] for i in range(2) for kv in ("key", "value")} == {"GroupQueryAttention"}
    assert np.abs(logits["fused"] - logits["plain"]).max() < 1e-5 * max(1.0, np.abs(logits["plain"]).max())


def test_fused_graph_carries_the_codes_of_quant_state(compressed_dir, tmp_path):
    from onnx import numpy_helper

    model_dir = compressed_dir("qwen2", "2:4", "4")
    path = tmp_path / "model.onnx"
    info, _ = _export(model_dir, path, "matmulnbits", "fused")
    state = read_quant_state(model_dir / "quant_state.safetensors")
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    prefix = "model.layers.1.self_attn"
    packed = inits[f"{prefix}.qkv_proj.qweight"]                     # [N, blocks, block / 2] uint8
    low, high = packed & 0xF, packed >> 4
    codes = np.stack([low, high], -1).reshape(packed.shape[0], -1).astype(np.int32) - 8   # symmetric offset 8
    stacked = np.concatenate([state[f"{prefix}.{p}_proj"].codes.numpy() for p in "qkv"])
    assert np.array_equal(codes[:, :stacked.shape[1]], stacked)
    scales = np.concatenate([state[f"{prefix}.{p}_proj"].scales.numpy() for p in "qkv"])
    assert np.array_equal(inits[f"{prefix}.qkv_proj.scales"], scales)
    assert f"{prefix}.qkv_proj.bias" in inits   # Qwen2's q/k/v biases, stacked the same way
    assert info["layers"][f"{prefix}.k_proj"]["stacked_into"] == f"{prefix}.qkv_proj"


@needs_genai
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_genai_runs_the_export_as_it_is(compressed_dir, tmp_path, family):
    import onnxruntime_genai as og

    model_dir = compressed_dir(family, "2:4", "4")
    path = tmp_path / "model.onnx"
    info, _ = _export(model_dir, path, "matmulnbits", "fused")
    config = json.loads((tmp_path / "genai_config.json").read_text())
    assert info["genai"]["written"] and config["model"]["type"] == family
    assert config["search"]["past_present_share_buffer"] is True      # the runtime's default, in-place cache
    assert config["model"]["decoder"]["filename"] == "model.onnx"
    assert config["model"]["eos_token_id"] == 2 and config["model"]["context_length"] == 256
    assert config["model"]["decoder"]["num_key_value_heads"] == 2
    # the tokenizer files beside the graph load in onnxruntime-genai and round-trip text
    model = og.Model(str(tmp_path))
    tokenizer = og.Tokenizer(model)
    ids = tokenizer.encode("def f(x): return x")
    assert tokenizer.decode(ids) == "def f(x): return x"
    r = check_onnx(model_dir, path, tokens=24, new_tokens=8)
    assert r["genai"]["tokens_ok"], (r["genai"], r["torch_tokens"])
    assert r["genai"]["tokens_matched"] == len(r["genai"]["tokens"]) > 0


def _narrow_layer(model, i: int, heads: int, kv_heads: int, inner: int):
    """Cut layer `i` to `heads` query heads, `kv_heads` KV heads and an MLP `inner` wide, as structured
    pruning leaves a model (the other layers keep the config's widths)."""
    layer, d = model.model.layers[i], model.config.hidden_size // model.config.num_attention_heads

    def cut(linear, rows=None, cols=None):
        w = linear.weight.data[:rows, :cols] if rows else linear.weight.data[:, :cols]
        new = torch.nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None)
        new.weight.data = w.clone()
        if linear.bias is not None:
            new.bias.data = linear.bias.data[:w.shape[0]].clone()
        return new

    a, m = layer.self_attn, layer.mlp
    a.q_proj, a.k_proj, a.v_proj = cut(a.q_proj, heads * d), cut(a.k_proj, kv_heads * d), cut(a.v_proj, kv_heads * d)
    a.o_proj = cut(a.o_proj, cols=heads * d)
    a.num_key_value_groups = heads // kv_heads
    m.gate_proj, m.up_proj, m.down_proj = cut(m.gate_proj, inner), cut(m.up_proj, inner), cut(m.down_proj, cols=inner)
    return model


@pytest.mark.parametrize("graph", ["plain", "fused"])
def test_layers_of_different_widths_export_and_run(tiny_qwen2_dir, tmp_path, graph):
    loaded = load_model(str(tiny_qwen2_dir), with_tokenizer=False)
    model = _narrow_layer(loaded.model, 1, heads=2, kv_heads=1, inner=96)
    model.config._attn_implementation = "eager"
    proto, writer = build_onnx(model, adapter_for(model).family, {}, "float", graph=graph)
    assert writer.graph == graph and writer.dims.layer_heads == ((4, 2), (2, 1))
    save_onnx(proto, tmp_path / "model.onnx")
    dec = OrtDecoder(ort_session(tmp_path / "model.onnx"))
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids).logits.numpy()
    logits, cache = dec.step(ids[:, :9].numpy(), dec.empty_cache(1), 0)
    steps = [logits]
    for t in range(9, 12):   # decode steps through each layer's own cache shape
        logits, cache = dec.step(ids[:, t:t + 1].numpy(), cache, t)
        steps.append(logits)
    assert cache["past_key_values.1.key"].shape == (1, 1, 12, 16)
    assert np.abs(np.concatenate(steps, 1) - ref).max() < 1e-5 * max(1.0, np.abs(ref).max())


def test_projections_that_cannot_share_a_weight_fall_back_per_layer(compressed_dir, tmp_path):
    """A layer whose q/k/v codes differ (here k_proj left float) keeps them apart, with a warning naming the
    layer; every other layer still stacks them, and the graph stays exact."""
    model_dir = compressed_dir("llama", "2:4", "4")
    loaded = load_model(str(model_dir), with_tokenizer=False)
    quant = read_quant_state(model_dir / "quant_state.safetensors")
    del quant["model.layers.1.self_attn.k_proj"]
    with pytest.warns(ExportWarning, match=r"model\.layers\.1\.self_attn: q_proj, k_proj, v_proj kept apart: "
                                           r"k_proj not quantized"):
        proto, writer = build_onnx(loaded.model, "llama", quant, "matmulnbits", graph="fused")
    assert "stacked_into" in writer.layers["model.layers.0.self_attn.k_proj"]
    assert "stacked_into" not in writer.layers["model.layers.1.self_attn.q_proj"]
    assert writer.layers["model.layers.1.self_attn.k_proj"]["form"] == "float"
    save_onnx(proto, tmp_path / "model.onnx")
    r = check_onnx(model_dir, tmp_path / "model.onnx", tokens=16, new_tokens=4)
    assert r["logits_ok"] and r["tokens_ok"], r


def test_family_without_a_fused_form_is_written_plain_and_says_so(compressed_dir, tmp_path):
    model_dir = compressed_dir("opt", "2:4", "4")
    info, caught = _export(model_dir, tmp_path / "model.onnx", "matmulnbits", "fused")
    assert info["graph"] == "plain" and "opt family" in info["graph_fallback"]
    assert any("writing the plain graph" in str(w.message) for w in caught)
    assert not info["genai"]["written"] and "'opt'" in info["genai"]["reason"]


def test_fused_batch_rows_are_right_padded(tiny_llama_dir, tmp_path):
    """GroupQueryAttention reads each row's tokens as the first `mask.sum()` positions: a right-padded batch
    (as onnxruntime-genai feeds one) matches PyTorch on every real position."""
    path = tmp_path / "model.onnx"
    export_onnx(tiny_llama_dir, path, "float", graph="fused")
    model = load_model(str(tiny_llama_dir), with_tokenizer=False).model
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()
    dec = OrtDecoder(ort_session(path))
    out = dec.session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                       "position_ids": pos.numpy(), **dec.empty_cache(2)})[0]
    real = mask.numpy().astype(bool)
    assert np.abs(out[real] - ref[real]).max() < 1e-5 * max(1.0, np.abs(ref).max())


def test_lm_head_int8_keeps_a_q8_0_table_exact_and_int4_is_matmulnbits(compressed_dir, tmp_path):
    """--lm-head int8 on a tied table that is exactly int8 blocks (GGUF Q8_0) multiplies by those very codes:
    still exact. --lm-head int4 rounds the head to 4-bit MatMulNBits blocks: smaller, approximate."""
    import shutil

    from onnx import helper
    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "q8-table"
    shutil.copytree(compressed_dir("qwen2", "2:4", "4"), model_dir)
    tensors = load_file(str(model_dir / "model.safetensors"))
    name = "model.embed_tokens.weight"
    table = tensors[name].reshape(tensors[name].shape[0], -1, 32)
    scales = (table.abs().amax(-1, keepdim=True) / 127).half().float()
    tensors[name] = (scales * torch.round(table / scales).clamp(-127, 127)).reshape(tensors[name].shape).contiguous()
    # the tiny Qwen2 has its own head; a GGUF's tied Q8_0 table is what this form is for
    tensors.pop("lm_head.weight", None)
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    sizes = {}
    for head in ("int8", "int4"):
        path = tmp_path / head / "model.onnx"
        path.parent.mkdir()
        info = export_onnx(model_dir, path, "matmulnbits", graph="fused", lm_head=head)
        sizes[head] = info["bytes"]
        nodes = {n.output[0]: n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"}
        head_node = next(n for n in nodes.values() if n.name.startswith("lm_head"))
        assert {a.name: helper.get_attribute_value(a) for a in head_node.attribute}["bits"] == (8 if head == "int8" else 4)
        r = check_onnx(model_dir, path, tokens=16, new_tokens=4)
        if head == "int8":   # the tied table is stored once: the head's codes, looked up by GatherBlockQuantized
            assert info["lm_head"] == "its own int8 blocks (exact), shared with the embedding"
            assert "GatherBlockQuantized" in _ops(path)
            assert not [t.name for t in onnx.load(str(path)).graph.initializer if "embed_tokens" in t.name]
            assert r["ok"] and r["relative_diff"] < 1e-5, r
        else:
            assert info["lm_head"].startswith("round-to-nearest 4-bit") and 0 < r["relative_diff"] < 0.5
    # the shared int8 table is stored once; an int4 head is a second, 4-bit copy beside the exact embedding
    assert sizes["int8"] < sizes["int4"]
