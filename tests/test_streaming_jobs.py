"""Streamed prune, quantize and compress: each decoder layer is read from the checkpoint when the walk reaches it
and written to the output's shards when it is final. The output equals the in-memory run's bit for bit, loads
with transformers, keeps the input's dtype, and an interrupted run leaves no output directory."""
from __future__ import annotations

import json

import pytest
import torch

from toolchain.errors import ConfigError
from toolchain.jobs import streamed
from toolchain.jobs.config import PruneConfig, QuantConfig, resolve_streaming
from toolchain.jobs.prune import run_prune
from toolchain.jobs.quantize import run_compress, run_quantize
from toolchain.models.streaming import StreamingCheckpoint
from toolchain.quant import read_quant_state

from conftest import random_ids

CALIB = dict(calib_samples=4, seqlen=32, seed=0)


@pytest.fixture(autouse=True)
def small_shards(monkeypatch):
    """Shards of 40 kB, so the tiny models' outputs are written as several shards."""
    monkeypatch.setattr(streamed, "SHARD_BYTES", 40_000)


def weights(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        if f.name != "quant_state.safetensors":
            out.update(load_file(f))
    return out


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].dtype == wb[name].dtype, name
        assert torch.equal(wa[name], wb[name]), name


def assert_same_quant_state(a, b):
    qa, qb = read_quant_state(a / "quant_state.safetensors"), read_quant_state(b / "quant_state.safetensors")
    assert qa.keys() == qb.keys() and qa
    for name in qa:
        assert qa[name].spec == qb[name].spec
        for field in ("codes", "scales", "zeros"):
            assert torch.equal(getattr(qa[name], field), getattr(qb[name], field)), (name, field)
        assert (qa[name].prune_mask is None) == (qb[name].prune_mask is None)
        if qa[name].prune_mask is not None:
            assert torch.equal(qa[name].prune_mask, qb[name].prune_mask)


def assert_sharded(directory):
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set(weights(directory))
    report = json.loads((directory / "compression.json").read_text())
    assert report["streaming"] is True and report["peak_rss_mib"] > 0
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")], "temporary directories left"


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "barber"])
def test_streamed_prune_equals_in_memory(tmp_path, tiny_llama_dir, tiny_opt_dir, family, method):
    src = str(tiny_llama_dir if family == "llama" else tiny_opt_dir)
    for streaming in (False, True):
        run_prune(src, tmp_path / str(streaming) / "out",
                  PruneConfig(method=method, sparsity="2:4", streaming=streaming, **CALIB), progress=False)
    assert_same_weights(tmp_path / "False" / "out", tmp_path / "True" / "out")
    assert_sharded(tmp_path / "True" / "out")


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("method,bits", [("rtn", "4"), ("gptq", "4"), ("aptq", "3.0")])
def test_streamed_quantize_equals_in_memory(tmp_path, tiny_llama_dir, tiny_opt_dir, family, method, bits):
    src = str(tiny_llama_dir if family == "llama" else tiny_opt_dir)
    extra = dict(sensitivity="local", candidates="2,4") if bits == "3.0" else {}
    reports = {}
    for streaming in (False, True):
        reports[streaming] = run_quantize(src, tmp_path / str(streaming) / "out", QuantConfig(
            method=method, bits=bits, group_size=32, streaming=streaming, **extra, **CALIB), progress=False)
    mem, streamed_out = tmp_path / "False" / "out", tmp_path / "True" / "out"
    assert_same_weights(mem, streamed_out)
    assert_same_quant_state(mem, streamed_out)
    assert_sharded(streamed_out)
    for key in ("avg_bits", "avg_bits_with_params", "weights"):
        assert reports[True]["quantization"][key] == reports[False]["quantization"][key]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_streamed_compress_equals_in_memory(tmp_path, tiny_llama_dir, tiny_opt_dir, family):
    src = str(tiny_llama_dir if family == "llama" else tiny_opt_dir)
    for streaming in (False, True):
        run_compress(src, tmp_path / str(streaming) / "out",
                     PruneConfig(method="sparsegpt", sparsity="2:4", streaming=streaming, **CALIB),
                     QuantConfig(method="gptq", bits="4", group_size=32, streaming=streaming, **CALIB),
                     progress=False)
    mem, streamed_out = tmp_path / "False" / "out", tmp_path / "True" / "out"
    assert_same_weights(mem, streamed_out)
    assert_same_quant_state(mem, streamed_out)
    assert_sharded(streamed_out)


def test_the_sharded_output_loads_with_transformers(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    for streaming in (False, True):
        run_prune(str(tiny_llama_dir), tmp_path / str(streaming),
                  PruneConfig(method="wanda", sparsity="2:4", streaming=streaming, **CALIB), progress=False)
    ids = random_ids(2, 16)
    logits = {}
    for streaming in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / str(streaming), dtype=torch.float32).eval()
        with torch.no_grad():
            logits[streaming] = model(ids).logits
    assert torch.equal(logits[True], logits[False])
    assert (tmp_path / "True" / "tokenizer.json").is_file()


def test_an_interrupted_streamed_run_leaves_no_output(tmp_path, tiny_llama_dir, monkeypatch):
    load_layer = StreamingCheckpoint.load_layer

    def interrupted(self, i):
        if i == 1:
            raise KeyboardInterrupt
        return load_layer(self, i)

    monkeypatch.setattr(StreamingCheckpoint, "load_layer", interrupted)
    parent = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt):
        run_compress(str(tiny_llama_dir), parent / "out",
                     PruneConfig(method="wanda", sparsity="2:4", streaming=True, **CALIB),
                     QuantConfig(method="gptq", bits="4", group_size=32, streaming=True, **CALIB), progress=False)
    assert list(parent.iterdir()) == []


@pytest.fixture()
def bf16_dir(tmp_path, tiny_llama_dir):
    """The tiny Llama stored in bf16, sharded, with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).save_pretrained(
        out, max_shard_size="40KB")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


def test_bf16_in_gives_bf16_out_and_dtype_overrides(tmp_path, bf16_dir):
    for streaming in (False, True):
        run_prune(str(bf16_dir), tmp_path / str(streaming),
                  PruneConfig(method="sparsegpt", sparsity="2:4", streaming=streaming, **CALIB), progress=False)
    out = weights(tmp_path / "True")
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "True" / "config.json").read_text())["dtype"] == "bfloat16"
    assert_same_weights(tmp_path / "False", tmp_path / "True")
    # the decoder weights are pruned 2:4 in bf16 too
    q = out["model.layers.0.self_attn.q_proj.weight"]
    assert ((q.reshape(-1, 4) == 0).sum(dim=1) >= 2).all()

    run_prune(str(bf16_dir), tmp_path / "f32",
              PruneConfig(method="sparsegpt", sparsity="2:4", streaming=True, dtype="float32", **CALIB), progress=False)
    f32 = weights(tmp_path / "f32")
    assert {t.dtype for t in f32.values()} == {torch.float32}
    # float32 output keeps what bf16 rounds away: same values after rounding
    assert all(torch.equal(f32[n].to(torch.bfloat16), out[n]) for n in out)


def test_the_streaming_decision(tmp_path, tiny_llama_dir, monkeypatch):
    from toolchain.jobs.config import calibration

    src = str(tiny_llama_dir)
    assert resolve_streaming(src, PruneConfig(method="wanda")) is False          # fits easily: in memory
    monkeypatch.setattr(calibration, "available_ram_bytes", lambda: 1000)
    assert resolve_streaming(src, PruneConfig(method="wanda")) is True           # would not fit: streams
    assert resolve_streaming(src, PruneConfig(method="wanda", streaming=False)) is False
    # an option that needs the whole model keeps the default in memory, and refuses an explicit --streaming
    assert resolve_streaming(src, PruneConfig(method="wanda", allocation="hessian")) is False
    with pytest.raises(ConfigError, match="--streaming cannot run --structured"):
        resolve_streaming(src, PruneConfig(method="flap", structured=True, streaming=True))
    with pytest.raises(ConfigError, match="--sensitivity model"):
        resolve_streaming(src, PruneConfig(method="wanda", streaming=True), QuantConfig(method="aptq", bits="3.0"))
    # a GGUF (a named model too) streams, dequantized tensor by tensor; anything else is refused by name
    assert resolve_streaming("smollm2", PruneConfig(method="wanda", streaming=True)) is True
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(ConfigError, match="Hugging Face directory of safetensors weights or a GGUF"):
        resolve_streaming(str(tmp_path / "weights.bin"), PruneConfig(method="wanda", streaming=True))


def test_the_cli_takes_streaming_and_dtype(tmp_path, tiny_llama_dir):
    from toolchain.cli import main

    out = tmp_path / "c"
    assert main(["compress", "--model", str(tiny_llama_dir), "--prune", "magnitude", "--sparsity", "2:4",
                 "--quant", "rtn", "--bits", "4", "--group-size", "32", "--streaming", "--dtype", "float16",
                 "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "compression.json").read_text())
    assert report["streaming"] is True and report["dtype"] == "float16"
    assert {t.dtype for t in weights(out).values()} == {torch.float16}


def test_sigterm_is_an_interrupt_that_leaves_nothing_behind(tmp_path, tiny_llama_dir, monkeypatch):
    """A job scheduler's stop (SIGTERM) removes the temporary and scratch directories as an interrupt does."""
    import os
    import signal

    from toolchain.cli import main

    load_layer = StreamingCheckpoint.load_layer

    def terminated(self, i):
        if i == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return load_layer(self, i)

    monkeypatch.setattr(StreamingCheckpoint, "load_layer", terminated)
    before = signal.getsignal(signal.SIGTERM)
    parent = tmp_path / "runs"
    status = main(["quantize", "--model", str(tiny_llama_dir), "--method", "gptq", "--bits", "4", "--group-size", "32",
                   "--streaming", "--calib-samples", "4", "--seqlen", "32", "--out", str(parent / "out"), "--quiet"])
    assert status == 143
    assert list(parent.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is before     # the caller's handler is back


def _layer_parts(tmp_path, layers: int):
    """A small quantization state of `layers` layers and its per-layer part files, as a streamed run writes them."""
    from toolchain.quant import QuantSpec, rtn_quantize, write_quant_state

    spec = QuantSpec(bits=4, group_size=8)
    torch.manual_seed(0)
    state = {f"model.layers.{i}.mlp.{n}": rtn_quantize(torch.randn(6, 16), spec, None)
             for i in range(layers) for n in ("up_proj", "down_proj")}
    parts = []
    for i in range(layers):
        parts.append(tmp_path / f"part-{i}.safetensors")
        write_quant_state(parts[-1], {k: v for k, v in state.items() if f".{i}." in k})
    return state, parts


def test_merged_quant_state_equals_one_write_and_maps_one_part_at_a_time(tmp_path, monkeypatch):
    """A streamed run's per-layer parts merge into the file one write of the whole state gives; while the codes
    are copied only the part being read is open, so the pages read from earlier parts leave the resident set
    and the merge's peak does not grow with the number of layers."""
    import safetensors

    from toolchain.quant import write_quant_state
    from toolchain.quant.state import merge_quant_state

    state, parts = _layer_parts(tmp_path, 4)
    write_quant_state(tmp_path / "whole.safetensors", state)

    live, most = set(), [0]
    real_open = safetensors.safe_open

    class Tracked:
        def __init__(self, path, **kwargs):
            self.handle = real_open(path, **kwargs)
            live.add(id(self))
            most[0] = max(most[0], len(live))

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __del__(self):
            live.discard(id(self))

    monkeypatch.setattr(safetensors, "safe_open", Tracked)
    merge_quant_state(parts, tmp_path / "merged.safetensors")
    monkeypatch.undo()
    assert most[0] == 1 and not live
    merged, whole = read_quant_state(tmp_path / "merged.safetensors"), read_quant_state(tmp_path / "whole.safetensors")
    assert list(merged) == list(whole)
    for name in whole:
        assert torch.equal(merged[name].codes, whole[name].codes) and torch.equal(merged[name].scales, whole[name].scales)
    assert all(part.exists() for part in parts)     # kept unless asked


def test_a_consuming_merge_deletes_each_part_once_copied(tmp_path, monkeypatch):
    """A streamed run's merge deletes each part as soon as the merge has moved past it, so the disk never holds
    the quantization state twice (a 32-layer 8B-shape GPTQ run filled the disk at the merge)."""
    from toolchain.models import shards
    from toolchain.quant.state import merge_quant_state

    state, parts = _layer_parts(tmp_path, 3)
    seen = []
    real = shards._write_tensor

    def spy(f, name, tensor, dtype, shape):   # which parts still exist as each tensor is written
        seen.append((int(name.split(".")[2]), [p.exists() for p in parts]))
        return real(f, name, tensor, dtype, shape)

    monkeypatch.setattr(shards, "_write_tensor", spy)
    merge_quant_state(parts, tmp_path / "merged.safetensors", consume=True)
    monkeypatch.undo()
    assert not any(p.exists() for p in parts)
    for layer, exists in seen:
        assert exists == [i >= layer for i in range(3)]     # earlier parts gone, this and later ones kept
    merged = read_quant_state(tmp_path / "merged.safetensors")
    assert list(merged) == list(state)
    for name, qw in state.items():
        assert torch.equal(merged[name].codes, qw.codes) and torch.equal(merged[name].scales, qw.scales)


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's malloc_trim, /proc")
def test_freed_heap_memory_goes_back_to_the_kernel(tmp_path):
    """The streamed walk trims the C heap after each layer: blocks freed below glibc's (raised) mmap threshold,
    pinned by small live blocks between them, stay resident otherwise and the peak grows with depth."""
    import subprocess
    import sys

    script = tmp_path / "heap.py"
    script.write_text(
        "import torch\n"
        "from toolchain.machine import proc_status_mib, release_free_memory\n"
        "t = torch.empty(16 << 20, dtype=torch.uint8); t.fill_(1); del t\n"   # raises the mmap threshold to 16 MiB
        "big, small = [], []\n"
        "for _ in range(20):\n"
        "    x = torch.empty(8 << 20, dtype=torch.uint8); x.fill_(1); big.append(x); small.append(torch.ones(256))\n"
        "del big\n"
        "freed = proc_status_mib('RssAnon')\n"
        "assert release_free_memory()\n"
        "print(freed - proc_status_mib('RssAnon'))\n")
    returned = float(subprocess.run([sys.executable, str(script)], check=True, capture_output=True, text=True,
                                    env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}).stdout)
    assert returned > 100      # MiB of the 160 freed


def test_a_streamed_walk_trims_the_heap_after_every_layer(tmp_path, tiny_llama_dir, monkeypatch):
    """`StreamingCheckpoint.free_layer` is where every streamed walk (the layer engine's, the ONNX builder's)
    hands freed layer memory back; a walk that stopped calling it would grow with depth again."""
    from toolchain.models import streaming

    calls = []
    monkeypatch.setattr(streaming, "release_free_memory", lambda: calls.append(1) or True)
    run_prune(str(tiny_llama_dir), tmp_path / "out", PruneConfig(method="wanda", sparsity="0.5", streaming=True, **CALIB),
              progress=False)
    layers = json.loads((tiny_llama_dir / "config.json").read_text())["num_hidden_layers"]
    assert len(calls) == layers
