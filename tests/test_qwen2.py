"""A tiny Qwen2 (q/k/v biases, untied LM head, grouped-query attention, RoPE base 1e6) through every method and
every exporter: what qwen05 and qwen15 are, at the size of a test."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from toolchain.export.source import read_compressed
from toolchain.jobs.config import PruneConfig, QuantConfig
from toolchain.jobs.prune import run_prune
from toolchain.jobs.quantize import run_quantize
from toolchain.models import load_model

CALIB = dict(calib_samples=8, seqlen=32, seed=0)
BIASES = [f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(2) for p in "qkv"]


def reference_state(model_dir) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def assert_keeps_biases_and_head(src, out):
    """Methods rewrite decoder linear weights only: biases, embeddings, norms and the untied head are the input's."""
    want, got = reference_state(src), reference_state(out)
    assert "lm_head.weight" in got and not torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])
    for name in [*BIASES, "lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]:
        assert torch.equal(got[name], want[name]), name
    assert float(got[BIASES[1]].abs().max()) > 0.1


def density(w: torch.Tensor) -> float:
    return float((w != 0).float().mean())


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "barber"])
def test_every_pruning_method(tiny_qwen2_dir, tmp_path, method, sparsity):
    out = tmp_path / "pruned"
    run_prune(str(tiny_qwen2_dir), out, PruneConfig(method=method, sparsity=sparsity, **CALIB), progress=False)
    assert_keeps_biases_and_head(tiny_qwen2_dir, out)
    loaded = load_model(out, with_tokenizer=False)
    assert loaded.model.config.model_type == "qwen2"
    for layer in loaded.adapter.decoder_layers(loaded.model):
        for name, linear in loaded.adapter.linears(layer).items():
            w = linear.weight
            if sparsity == "2:4":
                assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all(), name
            else:
                assert density(w) == pytest.approx(0.5, abs=0.02), name
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.isfinite(loaded.model(ids).logits).all()


@pytest.mark.parametrize("method", ["rtn", "gptq", "aptq"])
def test_every_quantization_method(tiny_qwen2_dir, tmp_path, method):
    out = tmp_path / "quantized"
    run_quantize(str(tiny_qwen2_dir), out, QuantConfig(method=method, bits="4", group_size=32, **CALIB),
                 progress=False)
    assert_keeps_biases_and_head(tiny_qwen2_dir, out)
    model = read_compressed(out, require_quant=True)
    assert len(model.quant) == 14       # 7 linears x 2 layers; the head stays float
    state = reference_state(out)
    for name, qw in model.quant.items():
        assert qw.spec.bits == 4 and int(qw.codes.abs().max()) <= 8
        assert torch.equal(state[f"{name}.weight"], qw.dequantize()), name


@pytest.fixture(scope="module")
def compressed(compressed_dir):
    """2:4 SparseGPT + 4-bit GPTQ (group 32) in one `compress` run."""
    return compressed_dir("qwen2", "2:4", "4")


def test_blob_round_trip(compressed, tmp_path):
    from test_blob import assert_round_trip

    from toolchain.export.blob import write_blob

    out = tmp_path / "model.tcblob"
    blob = assert_round_trip(compressed, out, write_blob(compressed, out))
    for name in BIASES:                 # the biases travel as fp16 float tensors
        assert blob.tensor(name).shape in ((64,), (32,))
    assert "lm_head.weight" in blob.names()


@pytest.mark.parametrize("form", ["float", "matmulnbits"])
def test_onnx_matches_pytorch(compressed, tmp_path, form):
    from toolchain.export.onnx import export_onnx
    from toolchain.export.onnx_check import check_onnx

    path = tmp_path / f"model.{form}.onnx"
    export_onnx(compressed, path, form)
    result = check_onnx(compressed, path, tokens=16, new_tokens=6)
    assert result["ok"], result
    # the bias add is in the graph (dropping it moves the logits far outside the tolerance)
    import onnx

    names = {i.name for i in onnx.load(str(path), load_external_data=False).graph.initializer}
    assert set(f"{b}" for b in BIASES) <= names


def test_compressed_tensors_reads_back_in_the_library_and_transformers(compressed, tmp_path):
    from test_compressed_tensors import assert_same, check_transformers_load, expected_tensors, library_decompress

    from toolchain.export.compressed_tensors import export_compressed_tensors

    out = tmp_path / "ct"
    export_compressed_tensors(compressed, out)
    assert_same(library_decompress(out), expected_tensors(compressed))
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
    check_transformers_load(compressed, out, dequantize=False)


def test_fpga_bundle_images_equal_the_blob(compressed, tmp_path):
    """The array computes the biased projections' matrix products (the bias add stays on the host, in the blob's
    float tensors); its simulation is family-independent and tested on the LLaMA bundle."""
    from toolchain.fpga.bundle import write_bundle
    from toolchain.sim.bundle_sim import check_images

    out = tmp_path / "fpga"
    report = write_bundle(compressed, out, synth=False)
    assert report["lint"].endswith("clean")
    layers = json.loads((out / "layers.json").read_text())["layers"]
    assert len(layers) == 14 and layers[1]["name"] == "model.layers.0.self_attn.k_proj"
    checked = check_images(out)
    assert checked["layers"] == 14 and checked["words"] > 0


def test_gpu_bundle_matches_transformers(compressed, tmp_path):
    from toolchain.data import sample_tokens
    from toolchain.export.onnx_check import torch_greedy
    from toolchain.export.ort_runtime import OrtDecoder, ort_session
    from toolchain.gpu.bundle import SparsityWarning, write_gpu_bundle

    out = tmp_path / "gpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error", SparsityWarning)
        write_gpu_bundle(compressed, out, max_seq=64)
    loaded = load_model(str(compressed))
    ids = sample_tokens(loaded, 16)
    ort_tokens, ort_logits = OrtDecoder(ort_session(out / "model.onnx")).greedy(ids.numpy(), 6)
    ref_tokens, ref_logits = torch_greedy(loaded.model, ids, 6)
    assert np.corrcoef(ort_logits.reshape(-1), ref_logits.numpy().reshape(-1))[0, 1] >= 0.999
    assert ort_tokens == ref_tokens


def test_perplexity_bounds_the_logits_of_a_large_vocabulary(monkeypatch):
    """Qwen's 152K-token head makes [batch, T, vocab] logits large: the evaluation batches by logits too, and the
    perplexity does not depend on the batch."""
    from conftest import random_ids, tiny_loaded

    from toolchain import evaluate

    model = tiny_loaded("qwen2").model
    windows = random_ids(6, 32)
    batches = []
    model.register_forward_pre_hook(lambda module, args, kwargs: batches.append(kwargs["input_ids"].shape[0]
                                                                                if "input_ids" in kwargs
                                                                                else args[0].shape[0]),
                                    with_kwargs=True)
    whole = evaluate.perplexity(model, windows, progress=False)
    assert batches == [6]
    monkeypatch.setattr(evaluate, "LOGITS_PER_BATCH", 2 * 32 * 320)      # two windows' logits of the tiny vocabulary
    batches.clear()
    assert evaluate.perplexity(model, windows, progress=False) == pytest.approx(whole, rel=1e-6)
    assert batches == [2, 2, 2]
