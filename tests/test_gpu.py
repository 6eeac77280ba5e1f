"""GPU target on the CPU: the 2:4 bundle's graph, NVIDIA's sparsity checker, onnxruntime against
transformers, the engine build scripts' behaviour without TensorRT, and refusals."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from toolchain.errors import ConfigError
from toolchain.gpu.bundle import SparsityWarning, write_gpu_bundle


@pytest.fixture(scope="module")
def gpu_bundle(compressed_dir, tmp_path_factory):
    model_dir = compressed_dir("llama", "2:4", "4")
    out = tmp_path_factory.mktemp("gpu") / "bundle"
    with warnings.catch_warnings():
        warnings.simplefilter("error", SparsityWarning)      # every decoder linear is 2:4: no warning at all
        manifest = write_gpu_bundle(model_dir, out, max_seq=128)
    return model_dir, out, manifest


def test_manifest_and_files(gpu_bundle):
    _, out, manifest = gpu_bundle
    assert manifest["two_four_layers"] == manifest["decoder_linears"] == 14
    assert 0.5 < manifest["sparse_gemm_fraction"] < 1.0                 # the dense LM head is the rest
    assert manifest["profile"]["shapes"]["past_key_values.0.key"] == [[1, 2, 0, 16], [1, 2, 0, 16], [1, 2, 127, 16]]
    for f in manifest["files"]:
        assert hashlib.sha256((out / f["path"]).read_bytes()).hexdigest() == f["sha256"]
    assert {"model.onnx", "build_engine.py", "build_engine.sh", "README.md", "tokenizer.json"} <= {
        f["path"] for f in manifest["files"]}


def test_polygraphy_finds_every_decoder_weight_sparse(gpu_bundle):
    """NVIDIA's own checker (no GPU needed) on the fp16 graph: only the dense LM head is reported."""
    _, out, manifest = gpu_bundle
    polygraphy = shutil.which("polygraphy", path=str(__import__("pathlib").Path(sys.executable).parent))
    proc = subprocess.run([polygraphy, "inspect", "sparsity", str(out / "model.onnx")], capture_output=True,
                          text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    eligible = int(re.search(r"Found: (\d+) weight tensor", text).group(1))
    assert eligible == 15                                                # 14 decoder linears + the LM head
    non_sparse = set(re.findall(r"Found non-sparse tensor: (\S+)", text))
    assert non_sparse == {"lm_head.weight_t"}


def test_graph_gemms_are_fp16_with_2of4_along_k(gpu_bundle):
    import onnx
    from onnx import numpy_helper

    _, out, _ = gpu_bundle
    graph = onnx.load(str(out / "model.onnx")).graph
    inits = {t.name: t for t in graph.initializer}
    w = numpy_helper.to_array(inits["model.layers.0.mlp.down_proj.weight_t"])
    assert w.dtype == np.float16 and w.shape == (128, 64)                # [K, N]
    assert ((w.reshape(32, 4, 64) != 0).sum(axis=1) <= 2).all()          # 2:4 along K
    assert numpy_helper.to_array(inits["lm_head.weight_t"]).dtype == np.float32


def test_onnxruntime_matches_transformers(gpu_bundle):
    from toolchain.data import sample_tokens
    from toolchain.export.onnx_check import torch_greedy
    from toolchain.export.ort_runtime import OrtDecoder, ort_session
    from toolchain.models import load_model

    model_dir, out, _ = gpu_bundle
    loaded = load_model(str(model_dir))
    ids = sample_tokens(loaded, 32)
    ort_tokens, ort_logits = OrtDecoder(ort_session(out / "model.onnx")).greedy(ids.numpy(), 8)
    ref_tokens, ref_logits = torch_greedy(loaded.model, ids, 8)
    corr = np.corrcoef(ort_logits.reshape(-1), ref_logits.numpy().reshape(-1))[0, 1]
    assert corr >= 0.999
    assert ort_tokens == ref_tokens


def test_gpu_run_command(gpu_bundle, capsys):
    from toolchain.cli import main

    _, out, _ = gpu_bundle
    assert main(["gpu-run", str(out), "--prompt", "def f(x):", "--max-new-tokens", "4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["backend"].startswith("onnxruntime") and r["new_tokens"] >= 1 and r["decode_tokens_per_s"] > 0
    assert "TensorRT not used: no model.plan" in r["backend"]
    assert main(["gpu-run", str(out), "--prompt", "x", "--backend", "tensorrt"]) == 2        # says what is missing
    assert "--backend tensorrt: no model.plan" in capsys.readouterr().err


def _no_heavy_loading(monkeypatch):
    """Make loading the tokenizer or any model fail the test: a refusal must come before either."""
    import transformers

    import toolchain.models

    def loaded(*args, **kwargs):
        raise AssertionError("loaded something heavy before refusing")

    monkeypatch.setattr(toolchain.models, "load_model", loaded)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", loaded)


def test_gpu_run_torch_backend_refuses_clearly_without_cuda(gpu_bundle, capsys, monkeypatch):
    from toolchain.cli import main

    _, out, _ = gpu_bundle
    _no_heavy_loading(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["gpu-run", str(out), "--prompt", "x", "--backend", "torch"]) == 2
    err = capsys.readouterr().err
    assert "--backend torch: semi-structured sparse kernels need a CUDA GPU" in err
    assert "torch.cuda.is_available() is False" in err and "Use --backend onnxruntime" in err
    # a PyTorch without semi-structured tensors is named as such
    monkeypatch.delattr(torch.sparse, "to_sparse_semi_structured")
    assert main(["gpu-run", str(out), "--prompt", "x", "--backend", "torch"]) == 2
    err = capsys.readouterr().err
    assert f"PyTorch {torch.__version__} has no semi-structured sparse tensors" in err
    assert "Use --backend onnxruntime" in err


def test_gpu_run_torch_backend_checks_the_source_model(gpu_bundle, tmp_path, monkeypatch):
    """The torch backend loads the model the bundle was exported from: the manifest's path, and the sha256 of
    its config and weights, which must still match."""
    from toolchain.gpu import semi_structured
    from toolchain.gpu.run import gpu_run

    model_dir, out, manifest = gpu_bundle
    assert manifest["source"] == str(model_dir.resolve())
    assert {"config.json", "model.safetensors"} <= {f["path"] for f in manifest["source_files"]}
    _no_heavy_loading(monkeypatch)
    monkeypatch.setattr(semi_structured, "semi_structured_unavailable", lambda device=None: None)
    source = tmp_path / "source"
    shutil.copytree(model_dir, source)
    bundle = tmp_path / "bundle"
    shutil.copytree(out, bundle)

    def point_at(path, **extra):
        m = json.loads((out / "manifest.json").read_text())
        m.update(source=str(path), **extra)
        (bundle / "manifest.json").write_text(json.dumps(m))

    point_at(tmp_path / "gone")
    with pytest.raises(ConfigError, match=r"exported from, .*gone, is not there any more.*--backend onnxruntime"):
        gpu_run(bundle, "x", backend="torch")
    (source / "config.json").write_text((source / "config.json").read_text().replace("{", '{"edited": 1,', 1))
    point_at(source)
    with pytest.raises(ConfigError, match=r"changed since the bundle was exported \(config.json differ"):
        gpu_run(bundle, "x", backend="torch")
    m = json.loads((out / "manifest.json").read_text())
    del m["source_files"]
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ConfigError, match="predates them"):
        gpu_run(bundle, "x", backend="torch")


def test_gpu_run_torch_backend_with_the_kernels_stubbed(gpu_bundle, monkeypatch):
    """No CUDA here: the availability check, the device and PyTorch's conversion are stubbed (the dense weight
    stands in for the sparse one), so what runs is the torch backend's own work: the source model loaded,
    its 2:4 linears swapped, greedy generation, and the same result keys as the other backends."""
    from toolchain.gpu import semi_structured
    from toolchain.gpu.run import gpu_run

    _, out, _ = gpu_bundle
    monkeypatch.setattr(semi_structured, "semi_structured_unavailable", lambda device=None: None)
    monkeypatch.setattr(semi_structured, "_require_cuda", lambda device: torch.device("cpu"))
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: False)
    monkeypatch.setattr(torch.sparse.SparseSemiStructuredTensorCUTLASS, "from_dense",
                        staticmethod(lambda weight, alg_id=0: weight.clone()))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "stub GPU")
    r = gpu_run(out, "def f(x):", max_new_tokens=4, backend="torch")
    assert r["backend"] == "torch (cutlass semi-structured, fp16, stub GPU: 14 of 15 linears 2:4 sparse)"
    assert 1 <= r["new_tokens"] <= 4 and r["decode_tokens_per_s"] > 0
    assert set(r) == set(gpu_run(out, "def f(x):", max_new_tokens=4, backend="onnxruntime"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch's semi-structured kernels need a CUDA GPU")
def test_gpu_run_torch_backend_on_cuda(gpu_bundle):
    from toolchain.gpu.run import check_torch_backend, gpu_run, torch_decoder
    from toolchain.gpu.semi_structured import semi_structured_unavailable
    from toolchain.models import load_model

    if semi_structured_unavailable() is not None:
        pytest.skip(semi_structured_unavailable())
    model_dir, out, _ = gpu_bundle
    r = gpu_run(out, "def f(x):", max_new_tokens=8, backend="torch")
    assert r["backend"].startswith("torch (") and "14 of 15 linears 2:4 sparse" in r["backend"]
    assert r["new_tokens"] >= 1 and r["decode_tokens_per_s"] > 0
    # the sparse kernels compute what the dense fp16 model computes
    decoder, _ = torch_decoder(check_torch_backend(out))
    ids = np.arange(1, 17, dtype=np.int64)[None, :]
    logits, _ = decoder.step(ids, decoder.empty_cache(1), 0)
    dense = load_model(str(model_dir), with_tokenizer=False).model.eval().to("cuda", torch.float16)
    with torch.inference_mode():
        ref = dense(input_ids=torch.from_numpy(ids).cuda()).logits.float().cpu().numpy()
    assert np.corrcoef(logits.reshape(-1), ref.reshape(-1))[0, 1] > 0.999


def test_build_scripts_fail_clearly_without_tensorrt(gpu_bundle):
    _, out, _ = gpu_bundle
    source = (out / "build_engine.py").read_text()
    assert "BuilderFlag.SPARSE_WEIGHTS" in source and "STRONGLY_TYPED" in source
    for removed in ("BuilderFlag.FP16", "BuilderFlag.INT8", "BuilderFlag.BF16", "EXPLICIT_BATCH"):
        assert removed not in source
    shell = (out / "build_engine.sh").read_text()
    assert "--sparsity=enable" in shell and "--stronglyTyped" in shell
    assert not re.search(r"--(fp16|int8|best)\b", shell)
    if __import__("importlib").util.find_spec("tensorrt") is None:
        proc = subprocess.run([sys.executable, str(out / "build_engine.py")], capture_output=True, text=True)
        assert proc.returncode == 2 and "TensorRT Python package is not installed" in proc.stderr
        assert "Traceback" not in proc.stderr
    if shutil.which("trtexec") is None:
        proc = subprocess.run(["bash", str(out / "build_engine.sh")], capture_output=True, text=True)
        assert proc.returncode == 2 and "trtexec is not on PATH" in proc.stderr


def test_models_without_2of4_are_refused_or_named(compressed_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(ConfigError, match="no decoder linear holds 2:4"):
        write_gpu_bundle(compressed_dir("llama", "0.5", "4"), tmp_path / "unstructured")
    assert not (tmp_path / "unstructured").exists()
    # one layer made dense: the bundle is written, and that layer is named
    model_dir = tmp_path / "one-dense"
    shutil.copytree(compressed_dir("llama", "2:4", "4"), model_dir)
    tensors = load_file(str(model_dir / "model.safetensors"))
    name = "model.layers.1.self_attn.v_proj.weight"
    tensors[name] = torch.where(tensors[name] == 0, torch.full_like(tensors[name], 0.01), tensors[name])
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(SparsityWarning, match="model.layers.1.self_attn.v_proj: not 2:4 along K"):
        manifest = write_gpu_bundle(model_dir, tmp_path / "b", max_seq=64)
    assert manifest["two_four_layers"] == 13
    with pytest.raises(ConfigError, match="--max-batch must be"):
        write_gpu_bundle(model_dir, tmp_path / "c", max_batch=0)


@pytest.fixture(scope="module")
def int8_bundle(compressed_dir, tmp_path_factory):
    model_dir = compressed_dir("llama", "2:4", "4")
    out = tmp_path_factory.mktemp("gpu8") / "bundle"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SparsityWarning)     # layers kept fp16 are named in warnings
        manifest = write_gpu_bundle(model_dir, out, precision="int8", max_seq=128)
    return model_dir, out, manifest


def test_int8_graph_holds_2of4_codes_along_k(int8_bundle):
    import onnx
    from onnx import numpy_helper

    _, out, manifest = int8_bundle
    assert manifest["precision"] == "int8" and manifest["calibration"]["samples"] == 32
    graph = onnx.load(str(out / "model.onnx")).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    codes = {n: v for n, v in inits.items() if n.endswith(".weight_t_int8")}
    int8_layers = [layer for layer in manifest["layers"] if layer.get("gemm") == "int8"]
    assert len(codes) == len(int8_layers) == manifest["int8_layers"] >= 7      # the rest stayed fp16, named
    assert all(layer["int8_output_error"] <= 1e-3 for layer in int8_layers)
    for name, w in codes.items():
        assert w.dtype == np.int8
        k = w.shape[0]
        assert ((w.reshape(k // 4, 4, -1) != 0).sum(axis=1) <= 2).all(), name      # 2:4 along K
        assert 0 < inits[name.replace("weight_t_int8", "input_scale")] < 1e3
        assert (inits[name.replace("weight_t_int8", "pre_quant_scale")] > 0).all()          # SmoothQuant
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") == len(codes) and ops.count("DequantizeLinear") == 2 * len(codes)


def test_int8_graph_tracks_transformers_and_the_fp16_graph(int8_bundle, gpu_bundle):
    from toolchain.data import sample_tokens
    from toolchain.export.onnx_check import torch_greedy
    from toolchain.export.ort_runtime import OrtDecoder, ort_session
    from toolchain.gpu.run import ort_perplexity
    from toolchain.models import load_model

    model_dir, out, _ = int8_bundle
    loaded = load_model(str(model_dir))
    ids = sample_tokens(loaded, 64)
    _, logits = OrtDecoder(ort_session(out / "model.onnx")).greedy(ids.numpy(), 0)
    _, ref = torch_greedy(loaded.model, ids, 0)
    assert np.corrcoef(logits.reshape(-1), ref.numpy().reshape(-1))[0, 1] > 0.99
    windows = ids.numpy().reshape(2, 32)
    ppl8 = ort_perplexity(out / "model.onnx", windows)
    ppl16 = ort_perplexity(gpu_bundle[1] / "model.onnx", windows)
    assert abs(ppl8 / ppl16 - 1) < 0.03


def test_engine_timing_says_why_it_cannot_run_here(gpu_bundle, tmp_path):
    import torch

    from toolchain.bench.gpu import run_gpu_bench
    from toolchain.models import load_model

    model_dir, out, _ = gpu_bundle
    help_text = subprocess.run([sys.executable, str(out / "build_engine.py"), "--help"], capture_output=True,
                               text=True).stdout
    assert "--dense" in help_text and "without SPARSE_WEIGHTS" in help_text
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine measures instead")
    r = run_gpu_bench("tiny", out_dir=tmp_path, source=load_model(str(model_dir), with_tokenizer=False),
                      tokens=(1, 64), bundle=out)
    assert r["engines_note"] == "TensorRT engines not timed: no CUDA device" and "engines" not in r
    assert "TensorRT engines not timed" in (tmp_path / "gpu_tiny.md").read_text()
