"""`toolchain export` and `toolchain onnx-check` end to end on a tiny compressed model."""
from __future__ import annotations

import hashlib
import json

import pytest

from toolchain.cli import main
from toolchain.errors import ConfigError, ModelLoadError
from toolchain.export.ort_runtime import genai_available
from toolchain.jobs.config import ExportConfig
from toolchain.jobs.export import parse_forms, run_export


def test_export_all_writes_every_artifact_with_a_true_manifest(compressed_dir, tmp_path, capsys):
    model_dir = compressed_dir("llama", "2:4", "4")
    out = tmp_path / "export"
    assert main(["export", "--model", str(model_dir), "--target", "all", "--onnx-weights", "float,matmulnbits",
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    paths = {a["path"] for a in manifest["artifacts"]}
    assert {"model.tcblob", "onnx/model.float.onnx", "onnx/model.matmulnbits.onnx",
            "compressed-tensors/config.json", "onnx/genai_config.json", "onnx/tokenizer.json"} <= paths
    # the default graph is the fused one; onnxruntime-genai's config names the first form given
    assert manifest["results"]["onnx"]["float"]["graph"] == "fused"
    assert json.loads((out / "onnx/genai_config.json").read_text())["model"]["decoder"]["filename"] == \
        "model.float.onnx"
    for art in manifest["artifacts"]:
        data = (out / art["path"]).read_bytes()
        assert len(data) == art["bytes"]
        assert hashlib.sha256(data).hexdigest() == art["sha256"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporary leftovers
    assert "exported" in capsys.readouterr().out
    # the exported graph passes onnx-check from the command line
    assert main(["onnx-check", "--model", str(model_dir), "--onnx", str(out / "onnx/model.matmulnbits.onnx"),
                 "--tokens", "16", "--new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "tokens match: ok" in printed
    assert "onnxruntime-genai: skipped (genai_config.json names model.float.onnx" in printed
    assert main(["onnx-check", "--model", str(model_dir), "--onnx", str(out / "onnx/model.float.onnx"),
                 "--tokens", "16", "--new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert ("onnxruntime-genai greedy generation" in printed) == genai_available()


def test_default_onnx_form_follows_the_model():
    assert parse_forms(None, quantized=True) == ["matmulnbits"]
    assert parse_forms(None, quantized=False) == ["float"]
    assert ExportConfig(target="all").validate() == ["onnx", "blob", "compressed-tensors"]
    with pytest.raises(ConfigError, match="--target fpga writes a bundle directory of its own"):
        ExportConfig(target="onnx,fpga").validate()
    with pytest.raises(ConfigError, match="--target"):
        ExportConfig(target="onnx,nope").validate()
    with pytest.raises(ConfigError, match="--onnx-weights"):
        parse_forms("int4", True)


def test_export_refuses_bad_inputs(tiny_llama_dir, compressed_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="needs a quantized model"):
        run_export(tiny_llama_dir, tmp_path / "x", ExportConfig(target="compressed-tensors"))
    assert not (tmp_path / "x").exists()
    with pytest.raises(ModelLoadError, match="not a directory"):
        run_export(tmp_path / "missing", tmp_path / "y", ExportConfig(target="onnx"))
    model_dir = compressed_dir("llama", "2:4", "4")
    with pytest.raises(ModelLoadError, match="inside the input model"):
        run_export(model_dir, model_dir / "inside", ExportConfig(target="onnx"))
    # through the CLI the same problems are one clean line, exit status 2
    assert main(["export", "--model", str(tiny_llama_dir), "--target", "nope", "--out", str(tmp_path / "z")]) == 2
    assert "--target" in capsys.readouterr().err


def test_failed_export_leaves_nothing(compressed_dir, tmp_path, monkeypatch):
    import toolchain.export.onnx as onnx_mod

    def boom(*args, **kwargs):
        raise RuntimeError("induced failure")

    monkeypatch.setattr(onnx_mod, "export_onnx", boom)
    out = tmp_path / "export"
    with pytest.raises(RuntimeError, match="induced"):
        run_export(compressed_dir("llama", "2:4", "4"), out, ExportConfig(target="blob,onnx"))
    assert list(tmp_path.iterdir()) == []


def test_dense_float_model_exports_onnx_and_blob(tiny_llama_dir, tmp_path):
    manifest = run_export(tiny_llama_dir, tmp_path / "e", ExportConfig(target="onnx,blob"))
    assert manifest["results"]["onnx"]["float"]["linears"] == {"float": 15}
    assert (tmp_path / "e" / "model.tcblob").is_file()
