"""Streamed exporters: the ONNX graph is built with each decoder layer read from the checkpoint when the builder
reaches it and every initializer written straight to the external-data file; the blob reads the codes one linear
at a time. Both give the in-memory exporters' artifacts: the same graph and weight bytes, the same blob bytes."""
from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from toolchain.cli import main
from toolchain.errors import ConfigError
from toolchain.export.blob import write_blob
from toolchain.export.onnx import export_onnx
from toolchain.export.onnx.external import ALIGNMENT, ExternalData
from toolchain.export.ort_runtime import OrtDecoder, ort_session
from toolchain.jobs import streamed
from toolchain.jobs.config import ExportConfig, QuantConfig
from toolchain.jobs.export import run_export
from toolchain.jobs.quantize import run_quantize
from toolchain.models.streaming import StreamingCheckpoint
from toolchain.quant import QuantStateFile, read_quant_state

from conftest import random_ids


def initializers(path) -> dict[str, onnx.TensorProto]:
    """The graph's initializers with their bytes (external data read back), by name, in order."""
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


def logits(path, ids: np.ndarray) -> np.ndarray:
    decoder = OrtDecoder(ort_session(path))
    out, cache = decoder.step(ids[:, :-2], decoder.empty_cache(ids.shape[0]), 0)
    steps = [out]
    for t in (2, 1):   # then token by token through the KV cache
        out, cache = decoder.step(ids[:, -t:ids.shape[1] - t + 1], cache, ids.shape[1] - t)
        steps.append(out)
    return np.concatenate(steps, axis=1)


def assert_same_graph(memory, streamed_path):
    """The same nodes and the same initializers, byte for byte; the streamed weights live in the data file."""
    onnx.checker.check_model(str(streamed_path))          # by path: external data resolved
    a, b = onnx.load(str(memory)), onnx.load(str(streamed_path))
    assert list(a.graph.node) == list(b.graph.node)
    ia, ib = initializers(memory), initializers(streamed_path)
    assert list(ia) == list(ib)
    for name in ia:
        assert ia[name].data_type == ib[name].data_type and ia[name].dims == ib[name].dims, name
        assert numpy_helper.to_array(ia[name]).tobytes() == numpy_helper.to_array(ib[name]).tobytes(), name
    structure = onnx.load(str(streamed_path), load_external_data=False)
    external = [t for t in structure.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(not t.raw_data for t in external)
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {f"{streamed_path.name}.data"}
    # every tensor of 1 kB or more is outside the graph file, so the graph file holds the structure only
    assert all(len(numpy_helper.to_array(t).tobytes()) < 1024 for t in structure.graph.initializer
               if t.data_location != onnx.TensorProto.EXTERNAL)


class LayerWatch:
    """Counts the decoder layers a StreamingCheckpoint holds at once."""

    def __init__(self, monkeypatch):
        self.loaded, self.most, self.order = set(), 0, []
        load, free = StreamingCheckpoint.load_layer, StreamingCheckpoint.free_layer

        def load_layer(ckpt, i):
            self.loaded.add(i)
            self.order.append(i)
            self.most = max(self.most, len(self.loaded))
            return load(ckpt, i)

        def free_layer(ckpt, i):
            self.loaded.discard(i)
            return free(ckpt, i)

        monkeypatch.setattr(StreamingCheckpoint, "load_layer", load_layer)
        monkeypatch.setattr(StreamingCheckpoint, "free_layer", free_layer)


@pytest.mark.parametrize("family,form,graph", [("llama", "float", "fused"), ("llama", "float", "plain"),
                                               ("llama", "qdq", "fused"), ("llama", "qdq", "plain"),
                                               ("llama", "matmulnbits", "fused"), ("llama", "matmulnbits", "plain"),
                                               ("opt", "matmulnbits", "plain")])
def test_streamed_onnx_equals_in_memory(compressed_dir, tmp_path, monkeypatch, family, form, graph):
    model_dir = compressed_dir(family, "2:4", "4")
    memory = tmp_path / "memory" / "model.onnx"
    memory.parent.mkdir()
    a = export_onnx(model_dir, memory, form, graph=graph)
    watch = LayerWatch(monkeypatch)
    b = export_onnx(model_dir, tmp_path / "model.onnx", form, graph=graph, streaming=True)
    assert watch.order == [0, 1] and watch.most == 1 and not watch.loaded   # one layer at a time, all freed
    assert b["streaming"] is True and b["files"] == [str(tmp_path / "model.onnx"), str(tmp_path / "model.onnx.data")]
    assert (a["graph"], a["linears"], a["layers"]) == (b["graph"], b["linears"], b["layers"])
    assert_same_graph(memory, tmp_path / "model.onnx")
    ids = random_ids(2, 12).numpy()
    assert np.array_equal(logits(memory, ids), logits(tmp_path / "model.onnx", ids))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory", "model.onnx", "model.onnx.data"]


def test_streamed_onnx_of_a_sharded_dense_checkpoint(tiny_llama_dir, tmp_path, monkeypatch):
    """A sharded RTN output (written by a streamed quantize) and a dense model: every tensor read from its shard."""
    monkeypatch.setattr(streamed, "SHARD_BYTES", 40_000)
    quantized = tmp_path / "q"
    run_quantize(str(tiny_llama_dir), quantized, QuantConfig(method="rtn", bits="4", group_size=32, streaming=True),
                 progress=False)
    assert len(json.loads((quantized / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    for model_dir, form in ((quantized, "matmulnbits"), (tiny_llama_dir, "float")):
        out = tmp_path / f"export-{form}"
        out.mkdir()
        export_onnx(model_dir, out / "memory.onnx", form, graph="fused", lm_head="int8")
        export_onnx(model_dir, out / "streamed.onnx", form, graph="fused", lm_head="int8", streaming=True)
        assert_same_graph(out / "memory.onnx", out / "streamed.onnx")


def test_interrupted_streamed_onnx_leaves_nothing(compressed_dir, tmp_path, monkeypatch):
    def fail(ckpt, i):
        raise KeyboardInterrupt

    monkeypatch.setattr(StreamingCheckpoint, "free_layer", fail)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(compressed_dir("llama", "2:4", "4"), tmp_path / "model.onnx", "matmulnbits", streaming=True)
    assert list(tmp_path.iterdir()) == []


def test_external_data_alignment_and_threshold(tmp_path):
    """Small tensors stay in the graph; tensors over 1 MiB start on a 64 KiB boundary; onnx reads them back."""
    from onnx import helper

    arrays = {"small": np.arange(10, dtype=np.float32), "a": np.arange(300, dtype=np.float32),
              "big": np.arange(300_000, dtype=np.float32), "b": np.arange(700, dtype=np.int8)}
    data = ExternalData(tmp_path / "tmp.data", "m.onnx.data")
    tensors = [data.take(numpy_helper.from_array(v, k)) for k, v in arrays.items()]
    data.close()
    (tmp_path / "tmp.data").rename(tmp_path / "m.onnx.data")
    where = {t.name: {e.key: e.value for e in t.external_data} for t in tensors}
    assert where["small"] == {} and where["b"] == {}            # under 1 kB (700 bytes): inside the graph
    assert where["a"]["offset"] == "0" and where["a"]["length"] == "1200"
    assert int(where["big"]["offset"]) == ALIGNMENT and where["big"]["length"] == "1200000"
    graph = helper.make_graph([helper.make_node("Identity", [k], [f"{k}_out"]) for k in arrays], "g", [],
                              [helper.make_tensor_value_info(f"{k}_out", helper.np_dtype_to_tensor_dtype(v.dtype),
                                                             v.shape) for k, v in arrays.items()], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    back = initializers(tmp_path / "m.onnx")
    for k, v in arrays.items():
        assert np.array_equal(numpy_helper.to_array(back[k]), v)
    outs = ort_session(tmp_path / "m.onnx").run(None, {})
    assert all(np.array_equal(o, v) for o, v in zip(outs, arrays.values()))


def test_quant_state_file_reads_one_linear_at_a_time(compressed_dir):
    path = compressed_dir("llama", "2:4", "4") / "quant_state.safetensors"
    whole, lazy = read_quant_state(path), QuantStateFile(path)
    assert list(lazy) == list(whole) and len(lazy) == len(whole)
    for name, qw in whole.items():
        got = lazy[name]
        assert got.spec == qw.spec and torch.equal(got.codes, qw.codes) and torch.equal(got.scales, qw.scales)
        assert torch.equal(got.zeros, qw.zeros) and torch.equal(got.prune_mask, qw.prune_mask)
    view = lazy.copy()
    view["merged"] = whole[name]
    assert "merged" in view and "merged" not in lazy and len(view) == len(whole) + 1
    assert view.pop("merged") is whole[name] and "merged" not in view
    with pytest.raises(KeyError, match="read-only"):
        del view[name]
    with pytest.raises(KeyError):
        lazy["model.layers.9.nope"]


@pytest.mark.parametrize("key", [("llama", "2:4", "4"), ("llama", None, "3"), ("opt", "2:4", "8")])
def test_streamed_blob_is_byte_identical(compressed_dir, tmp_path, key):
    model_dir = compressed_dir(*key)
    a = write_blob(model_dir, tmp_path / "memory.tcblob")
    b = write_blob(model_dir, tmp_path / "streamed.tcblob", streaming=True)
    assert (tmp_path / "memory.tcblob").read_bytes() == (tmp_path / "streamed.tcblob").read_bytes()
    assert a["tensors"] == b["tensors"] and a["file_size"] == b["file_size"]


@pytest.mark.parametrize("key", [("llama", "2:4", "4"), ("opt", None, "3")])
def test_streamed_compressed_tensors_are_byte_identical_and_never_read_the_whole_state(compressed_dir, tmp_path,
                                                                                      monkeypatch, key):
    from toolchain.export import compressed_tensors, source

    model_dir = compressed_dir(*key)
    a = compressed_tensors.export_compressed_tensors(model_dir, tmp_path / "memory")
    monkeypatch.setattr(source, "read_quant_state", lambda *_: pytest.fail("the whole quant state was read"))
    b = compressed_tensors.export_compressed_tensors(model_dir, tmp_path / "streamed", streaming=True)
    assert a["files"] == b["files"] and a["config_groups"] == b["config_groups"] and a["sparsity"] == b["sparsity"]
    for name in a["files"]:
        assert (tmp_path / "memory" / name).read_bytes() == (tmp_path / "streamed" / name).read_bytes(), name


def test_export_streaming_option(compressed_dir, tmp_path, monkeypatch, capsys):
    model_dir = compressed_dir("llama", "2:4", "4")
    out = tmp_path / "e"
    assert main(["export", "--model", str(model_dir), "--target", "onnx,blob", "--streaming", "--onnx-graph", "plain",
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["streaming"] is True and manifest["results"]["onnx"]["matmulnbits"]["streaming"] is True
    assert manifest["peak_rss_mib"] >= manifest["peak_anon_mib"] > 0
    assert {"onnx/model.matmulnbits.onnx", "onnx/model.matmulnbits.onnx.data", "model.tcblob"} <= \
        {a["path"] for a in manifest["artifacts"]}
    onnx.checker.check_model(str(out / "onnx/model.matmulnbits.onnx"))
    # the default follows the memory available, as prune and quantize do: too little RAM streams
    monkeypatch.setattr("toolchain.jobs.config.calibration.available_ram_bytes", lambda: 1)
    assert run_export(model_dir, tmp_path / "auto", ExportConfig(target="blob"))["streaming"] is True
    assert run_export(model_dir, tmp_path / "no", ExportConfig(target="blob", streaming=False))["streaming"] is False
    capsys.readouterr()
    assert main(["export", "--model", str(model_dir), "--target", "fpga", "--streaming", "--out", str(tmp_path / "f")]) != 0
    assert ("--streaming has no effect here: it applies to --target onnx, blob, compressed-tensors (or all) only"
            in capsys.readouterr().err)
    with pytest.raises(ConfigError, match="the gpu bundle loads the whole model"):
        run_export(model_dir, tmp_path / "g", ExportConfig(target="gpu", streaming=True))


def test_streamed_export_refuses_what_is_not_a_compressed_directory(tmp_path):
    from toolchain.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="is not a directory; export reads a model directory"):
        run_export("smollm2", tmp_path / "x", ExportConfig(target="onnx", streaming=True))
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(ConfigError, match="--streaming reads a Hugging Face directory of safetensors weights or a GGUF"):
        run_export(tmp_path / "weights.bin", tmp_path / "y", ExportConfig(target="onnx", streaming=True))


def test_scale_bench_plan_runs_what_only_names_and_the_steps_it_reads_from():
    from toolchain.bench import scale

    assert scale.scale_plan(None) == {8: list(scale.STEPS), 32: list(scale.STEPS)}
    # the checkpoint's readers first, so the checkpoint is deleted before the chain's outputs pile up
    assert [s for s in scale.STEPS if scale.STEPS[s][0] is None] == list(scale.STEPS)[:3]
    assert scale.scale_plan(["onnx@32"]) == {32: ["wanda", "rtn", "onnx"]}
    assert scale.scale_plan(["gptq", "blob@8"]) == {8: ["gptq", "wanda", "rtn", "blob"], 32: ["gptq"]}
    with pytest.raises(ConfigError, match="'onnx@16'"):
        scale.scale_plan(["onnx@16"])


def test_scale_bench_chain_on_a_small_shape(tiny_llama_dir, tmp_path, monkeypatch):
    """`toolchain bench scale`'s chain (SparseGPT and Wanda prunes, GPTQ and RTN quantizations, blob and ONNX
    exports, each streamed in a subprocess) on the same code path with a small shape: every row has its peak
    memory and its artifact checked, and no model folder is left behind."""
    from toolchain.bench import scale

    shape = dict(scale.SHAPE, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=256)
    monkeypatch.setattr(scale, "DEPTHS", (2,))
    result = scale.run_scale_bench(str(tiny_llama_dir), tmp_path, shape=shape)
    rows = {r["step"]: r for r in result["rows"]}
    assert list(rows) == list(scale.STEPS)
    assert all(r["peak_rss_mib"] >= r["peak_anon_mib"] > 0 for r in rows.values())
    for step in scale.PRUNE_STEPS:
        assert rows[step]["dtypes"] == ["bfloat16"] and rows[step]["linears_checked"] == 2 * 7
        assert rows[step]["linears_not_2of4"] == 0
    assert rows["gptq"]["quant_state"] and rows["rtn"]["quant_state"]
    assert rows["onnx"]["onnx_checker"] == "ok" and rows["blob"]["blob_tensors"] > 0
    table = (tmp_path / "scale_llama3-8b-shape.md").read_text()
    assert "| 2 | onnx |" in table and "| 2 | gptq |" in table
    assert not list((tmp_path / "work").iterdir())   # checkpoint and outputs removed


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_streamed_perplexity_equals_in_memory(tiny_llama_dir, tiny_opt_dir, monkeypatch, family):
    """`toolchain eval --streaming`: every window through one decoder layer at a time, then the final norm and
    the head, in the in-memory forward's batches: the same perplexity, bit for bit, on the tiny models."""
    from toolchain.jobs.inspect import run_eval

    model = str(tiny_llama_dir if family == "llama" else tiny_opt_dir)
    memory = run_eval(model, 32, ("pydoc",), progress=False, streaming=False)
    watch = LayerWatch(monkeypatch)
    streamed_result = run_eval(model, 32, ("pydoc",), progress=False, streaming=True)
    assert watch.order == [0, 1] and watch.most == 1 and not watch.loaded
    assert streamed_result["streaming"] is True and memory["streaming"] is False
    assert streamed_result["perplexity"] == memory["perplexity"] and streamed_result["tokens"] == memory["tokens"]


def test_streamed_eval_refusals(tiny_llama_dir, tmp_path, capsys):
    from toolchain.jobs.inspect import run_eval

    with pytest.raises(ConfigError, match="--streaming cannot run --tasks"):
        run_eval(str(tiny_llama_dir), 32, ("pydoc",), tasks="arc_easy", streaming=True)
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(ConfigError, match="--streaming reads a Hugging Face directory of safetensors weights or a GGUF"):
        run_eval(str(tmp_path / "weights.bin"), 32, ("pydoc",), streaming=True)
    assert main(["eval", "--model", str(tiny_llama_dir), "--seqlen", "32", "--datasets", "pydoc", "--streaming",
                 "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["streaming"] is True


def test_streaming_bench_times_both_modes_alternated_and_finds_them_identical(tiny_llama_dir, tmp_path):
    """`toolchain bench streaming` on a tiny model: both modes run in every round, in alternating order, the
    ratio is the median of the rounds' own ratios, and the two outputs hold the same tensors bit for bit."""
    from toolchain.bench import streaming

    result = streaming.run_streaming_bench(str(tiny_llama_dir), tmp_path, only=["gptq 4-bit"], rounds=2,
                                           calib_samples=4, seqlen=32)
    (row,) = result["rows"]
    assert row["job"] == "gptq 4-bit" and all(len(v) == 2 for v in row["runs"].values())
    per_round = [s["wall_seconds"] / m["wall_seconds"] for s, m in zip(row["runs"]["streamed"], row["runs"]["in memory"])]
    assert row["ratios"] == [round(x, 3) for x in per_round]
    assert row["identical"]["tensors"] > 10 and row["identical"]["differ"] == []
    assert "identical" in (tmp_path / f"streaming_{tiny_llama_dir.name}.md").read_text()
    assert not list((tmp_path / "work").glob("streaming-bench-*"))


def test_same_tensors_names_a_changed_tensor(tiny_llama_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from toolchain.bench.streaming import same_tensors

    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)
    (f,) = copy.glob("*.safetensors")
    tensors = load_file(str(f))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(f), metadata={"format": "pt"})
    assert same_tensors(tiny_llama_dir, copy)[1] == [name]
