"""Streaming a checkpoint from a meta-device skeleton: each layer, loaded on demand, equals the in-memory load
bit for bit; a sharded checkpoint streams; a missing shard or a truncated file is named before anything is built."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from toolchain.errors import ModelLoadError
from toolchain.models import load_model
from toolchain.models.streaming import StreamingCheckpoint

from conftest import random_ids


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_layers_stream_on_demand_and_equal_the_in_memory_model(family, tiny_llama_dir, tiny_opt_dir):
    path = tiny_llama_dir if family == "llama" else tiny_opt_dir
    ref = load_model(path, with_tokenizer=False).model
    stream = StreamingCheckpoint(path)
    layers = stream.layers
    assert all(p.device.type == "meta" for p in layers.parameters())
    outside = {n: t for n, t in stream.model.state_dict().items() if f"{stream.layers_path}." not in n}
    ref_state = ref.state_dict()
    assert outside and all(torch.equal(t, ref_state[n]) for n, t in outside.items())

    layer = stream.load_layer(1)
    assert all(p.device.type == "meta" for p in layers[0].parameters())
    ref_layer = dict(stream.adapter.decoder_layers(ref)[1].state_dict())
    assert layer.state_dict().keys() == ref_layer.keys()
    assert all(torch.equal(t, ref_layer[n]) and t.dtype == torch.float32 for n, t in layer.state_dict().items())
    stream.free_layer(1)
    assert all(p.device.type == "meta" for p in layers[1].parameters())

    for i in range(len(layers)):
        stream.load_layer(i)
    ids = random_ids(2, 16)
    assert torch.equal(_logits(stream.model, ids), _logits(ref, ids))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_the_embedding_table_is_dropped_after_the_first_layer_inputs_and_read_back(family, tiny_llama_dir,
                                                                                    tiny_opt_dir):
    from toolchain.engine import LayerEngine

    path = tiny_llama_dir if family == "llama" else tiny_opt_dir
    stream = StreamingCheckpoint(path, with_head=False)
    embedding = stream.model.get_input_embeddings()
    table = embedding.weight.detach().clone()
    engine = LayerEngine(stream.model, stream.adapter, random_ids(3, 16), batch_size=2, device="cpu", stream=stream)
    first = engine.capture_inputs()
    assert all(p.is_meta for p in embedding.parameters())            # gone once the inputs exist
    again = engine.capture_inputs()                                     # a second walk (compress) reads it back
    assert torch.equal(first, again)
    assert all(p.is_meta for p in embedding.parameters())
    stream.load_embeddings()
    assert torch.equal(embedding.weight, table)

    kept = StreamingCheckpoint(path, with_head=True)                   # a job that runs the head keeps it
    LayerEngine(kept.model, kept.adapter, random_ids(3, 16), device="cpu", stream=kept).capture_inputs()
    assert not any(p.is_meta for p in kept.model.get_input_embeddings().parameters())


@pytest.fixture()
def sharded_bf16_dir(tmp_path, tiny_llama_dir):
    """The tiny Llama in bf16, written in several shards with model.safetensors.index.json."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_size="40KB")
    return out


def test_a_sharded_bf16_checkpoint_streams_in_float32(sharded_bf16_dir):
    index = json.loads((sharded_bf16_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    stream = StreamingCheckpoint(sharded_bf16_dir)
    assert stream.stored_dtype() == torch.bfloat16
    from safetensors.torch import load_file

    stored = {}
    for shard in set(index["weight_map"].values()):
        stored.update(load_file(sharded_bf16_dir / shard))
    layer = stream.load_layer(0)
    for name, tensor in layer.state_dict().items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, stored[f"model.layers.0.{name}"].float())


def test_a_missing_shard_is_named(sharded_bf16_dir):
    index = json.loads((sharded_bf16_dir / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (sharded_bf16_dir / gone).unlink()
    with pytest.raises(ModelLoadError, match=f"names the shard {gone}, which is missing"):
        StreamingCheckpoint(sharded_bf16_dir)


def test_a_truncated_file_is_named(tmp_path, tiny_llama_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) - 1000])
    with pytest.raises(ModelLoadError, match=re.escape(f"corrupt safetensors file {weights}: ")):
        StreamingCheckpoint(broken)


def test_a_tensor_missing_from_the_checkpoint_is_named(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    stream = StreamingCheckpoint(broken)
    stream.load_layer(0)
    with pytest.raises(ModelLoadError, match="no tensor model.layers.1.mlp.down_proj.weight"):
        stream.load_layer(1)
