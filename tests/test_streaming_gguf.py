"""Streaming a GGUF: each tensor is dequantized when its layer is reached (`models/gguf_index.py`), with
transformers' own name map and q/k processing, so a streamed job equals the job on the whole dequantized model."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from toolchain.jobs import streamed
from toolchain.jobs.config import PruneConfig, QuantConfig, resolve_streaming
from toolchain.jobs.quantize import run_quantize
from toolchain.models.loading import float32_bytes
from toolchain.models.streaming import StreamingCheckpoint

from conftest import make_llama, random_ids
from test_models import write_llama_gguf
from test_streaming_jobs import assert_same_quant_state, assert_same_weights

CALIB = dict(calib_samples=4, seqlen=32, seed=0)


@pytest.fixture(scope="module")
def q8_gguf(tmp_path_factory, tokenizer):
    """A tiny llama GGUF whose decoder linears are Q8_0 blocks (dequantized on load), the rest F32."""
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf"
    add = gguf.GGUFWriter.add_tensor

    def add_tensor(writer, name, tensor, *args, **kwargs):
        if name.startswith("blk.") and tensor.ndim == 2:
            return add(writer, name, gguf.quants.quantize(tensor, gguf.GGMLQuantizationType.Q8_0),
                       raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        return add(writer, name, tensor, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(gguf.GGUFWriter, "add_tensor", add_tensor)
    try:
        write_llama_gguf(path, make_llama(len(tokenizer), seed=5), tokenizer)
    finally:
        mp.undo()
    assert {t.tensor_type for t in gguf.GGUFReader(str(path)).tensors} == {gguf.GGMLQuantizationType.Q8_0,
                                                                          gguf.GGMLQuantizationType.F32}
    return path


def test_gguf_streams_tensor_by_tensor(q8_gguf):
    """Every tensor equals the whole load's (q/k rows un-permuted, Q8_0 dequantized), read one at a time."""
    from toolchain.models import load_model

    whole = load_model(q8_gguf, with_tokenizer=False).model.state_dict()
    ckpt = StreamingCheckpoint(q8_gguf)
    assert all(p.is_meta for p in ckpt.layers.parameters())
    assert ckpt.stored_dtype() == torch.float32
    for i in range(len(ckpt.layers)):
        for name, tensor in ckpt.layer_state(i, ckpt.load_layer(i)).items():
            assert torch.equal(tensor, whole[name]), name
        ckpt.free_layer(i)
    for name in ckpt.outside_names():
        assert torch.equal(ckpt.outside_tensor(name), whole[name]), name
    assert float32_bytes(q8_gguf) == 4 * sum(t.numel() for t in whole.values())


def test_streamed_quantize_of_a_gguf_equals_in_memory(q8_gguf, tmp_path, monkeypatch):
    """GPTQ (statistics, solves, the next layer's inputs): the same weights and codes, bit for bit."""
    monkeypatch.setattr(streamed, "SHARD_BYTES", 40_000)
    for streaming in (False, True):
        run_quantize(str(q8_gguf), tmp_path / str(streaming),
                     QuantConfig(method="gptq", bits="4", group_size=32, streaming=streaming, **CALIB), progress=False)
    assert_same_weights(tmp_path / "False", tmp_path / "True")
    assert_same_quant_state(tmp_path / "False", tmp_path / "True")
    report = json.loads((tmp_path / "True" / "compression.json").read_text())
    assert report["streaming"] is True and report["dtype"] == "float32"
    assert report["source"] == {"kind": "gguf", "path": str(q8_gguf.resolve())}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "True")   # the sharded output loads
    assert model.config.num_hidden_layers == 2


def test_streamed_perplexity_of_a_gguf(q8_gguf):
    from toolchain.evaluate import perplexity, perplexity_streamed
    from toolchain.models import load_model

    windows = random_ids(6, 32)
    whole = perplexity(load_model(q8_gguf, with_tokenizer=False).model, windows, progress=False)
    assert perplexity_streamed(StreamingCheckpoint(q8_gguf), windows, progress=False) == whole


def test_gguf_streaming_decision(q8_gguf, monkeypatch):
    assert resolve_streaming(str(q8_gguf), PruneConfig(method="wanda", sparsity="2:4")) is False
    monkeypatch.setattr("toolchain.jobs.config.calibration.available_ram_bytes", lambda: 1)
    assert resolve_streaming(str(q8_gguf), PruneConfig(method="wanda", sparsity="2:4")) is True
    assert np.isclose(float32_bytes(q8_gguf) / 4, sum(t.n_elements for t in gguf.GGUFReader(str(q8_gguf)).tensors))
