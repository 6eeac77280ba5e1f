"""torch.distributed: two gloo ranks under torchrun give the one-process result up to summation order.

Each torchrun start imports torch and transformers once per rank, so the methods are grouped into two
launches: the CLI's compress (SparseGPT 2:4 then GPTQ 4-bit), and a script running Wanda prune, APTQ
mixed-precision quantize and depth pruning in one process group.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from toolchain import distributed
from toolchain.errors import ConfigError
from toolchain.jobs.common import check_distributed
from toolchain.jobs.config import PruneConfig, QuantConfig
from toolchain.jobs.prune import run_prune
from toolchain.jobs.quantize import run_compress, run_quantize

CALIB = dict(calib_samples=5, seqlen=32, seed=0)   # 5 windows: uneven shards [3, 2]
VENV_BIN = Path(sys.executable).parent


def torchrun(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python",
           *args]
    done = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def compare(one: Path, two: Path, quantized: bool) -> None:
    """Zero patterns agree on >= 99.5% of every decoder weight and the weights are within 1e-2 relative;
    the integer codes agree on >= 99.5%."""
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    checked = 0
    for key in a:
        if ".layers." not in key or not key.endswith("proj.weight"):
            continue
        x, y = a[key].float(), b[key].float()
        assert float(((x == 0) == (y == 0)).float().mean()) >= 0.995, key
        assert float((x - y).norm() / x.norm()) <= 1e-2, key
        checked += 1
    assert checked == 14   # 2 layers x 7 linears
    if quantized:
        qa, qb = load_file(one / "quant_state.safetensors"), load_file(two / "quant_state.safetensors")
        assert qa.keys() == qb.keys()
        for key in qa:
            if key.endswith(".codes"):
                assert float((qa[key] == qb[key]).float().mean()) >= 0.995, key
    record = json.loads((two / "compression.json").read_text())["distributed"]
    assert record == {"world_size": 2, "backend": "gloo", "windows_per_rank": [3, 2]}
    assert "distributed" not in json.loads((one / "compression.json").read_text())


def test_compress_sparsegpt_gptq_two_ranks_match_one_process(tiny_llama_dir, tmp_path):
    one = tmp_path / "one"
    run_compress(str(tiny_llama_dir), one, PruneConfig(method="sparsegpt", sparsity="2:4", **CALIB),
                 QuantConfig(method="gptq", bits=4, group_size=32, **CALIB), progress=False)
    done = torchrun([str(VENV_BIN / "toolchain"), "compress", "--model", str(tiny_llama_dir), "--prune", "sparsegpt",
                     "--sparsity", "2:4", "--quant", "gptq", "--bits", "4", "--group-size", "32", "--calib-samples",
                     "5", "--seqlen", "32", "--out", str(tmp_path / "two"), "--quiet"], tmp_path)
    assert done.stderr.count("Writing model shards: 100%") == 1   # rank 0 alone writes
    assert done.stdout.count("compressed ") == 1                    # and prints its summary
    compare(one, tmp_path / "two", quantized=True)


RANK_SCRIPT = """
import sys
from toolchain.jobs.config import PruneConfig, QuantConfig
from toolchain.jobs.prune import run_prune
from toolchain.jobs.quantize import run_quantize
src, out = sys.argv[1], sys.argv[2]
calib = dict(calib_samples=5, seqlen=32, seed=0)
run_prune(src, out + "/wanda", PruneConfig(method="wanda", sparsity="2:4", **calib), progress=False)
run_quantize(src, out + "/aptq", QuantConfig(method="aptq", bits="3.0", candidates="2,4", sensitivity="local",
                                             group_size=32, **calib), progress=False)
run_prune(src, out + "/depth", PruneConfig(method="depth", structured=True, sparsity="0.5", **calib), progress=False)
"""


def test_wanda_aptq_and_depth_two_ranks_match_one_process(tiny_llama_dir, tmp_path):
    one = tmp_path / "one"
    run_prune(str(tiny_llama_dir), one / "wanda", PruneConfig(method="wanda", sparsity="2:4", **CALIB),
              progress=False)
    run_quantize(str(tiny_llama_dir), one / "aptq", QuantConfig(
        method="aptq", bits="3.0", candidates="2,4", sensitivity="local", group_size=32, **CALIB), progress=False)
    run_prune(str(tiny_llama_dir), one / "depth", PruneConfig(method="depth", structured=True, sparsity="0.5",
                                                              **CALIB), progress=False)
    two = tmp_path / "two"
    torchrun([sys.executable, "-c", RANK_SCRIPT, str(tiny_llama_dir), str(two)], tmp_path)
    compare(one / "wanda", two / "wanda", quantized=False)
    compare(one / "aptq", two / "aptq", quantized=True)
    # the mixed-precision widths come from the summed traces, so both runs choose the same widths
    widths = [{n: v["bits"] for n, v in e["linears"].items()}
              for e in json.loads((one / "aptq" / "compression.json").read_text())["quantization"]["layers"]]
    assert widths == [{n: v["bits"] for n, v in e["linears"].items()}
                      for e in json.loads((two / "aptq" / "compression.json").read_text())["quantization"]["layers"]]
    # Block Influence sums its token sums and counts across ranks: the scores are the one process's
    depth = [json.loads((run / "depth" / "compression.json").read_text())["depth"] for run in (one, two)]
    assert depth[0]["block_influence"] == pytest.approx(depth[1]["block_influence"], rel=1e-5)
    assert depth[0]["removed_layers"] == depth[1]["removed_layers"]
    assert load_file(one / "depth" / "model.safetensors").keys() == \
        load_file(two / "depth" / "model.safetensors").keys()


def test_windows_are_split_in_contiguous_shards():
    assert distributed.shard_sizes(5, 2) == [3, 2]
    assert distributed.shard_sizes(8, 3) == [3, 3, 2]
    calib = torch.arange(10).reshape(5, 2)
    part, sizes = distributed.shard_windows(calib, distributed.World(2, 1, 1, "gloo"))
    assert sizes == [3, 2] and part.tolist() == [[6, 7], [8, 9]]
    assert distributed.shard_windows(calib, distributed.World())[0] is calib
    with pytest.raises(ConfigError, match="fewer than the 4 ranks"):
        distributed.shard_windows(calib[:3], distributed.World(4, 0, 0, "gloo"))


def test_options_without_summed_statistics_are_refused_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--method barber"):
        check_distributed(prune=PruneConfig(method="barber", sparsity="2:4", init="wanda"))
    with pytest.raises(ConfigError, match="--reconstruct block"):
        check_distributed(prune=PruneConfig(method="wanda", sparsity="2:4", reconstruct="block"))
    with pytest.raises(ConfigError, match="--sensitivity model"):
        check_distributed(quant=QuantConfig(method="aptq", bits="3.5", sensitivity="model"))
    check_distributed(prune=PruneConfig(method="sparsegpt", sparsity="2:4"), quant=QuantConfig(method="gptq"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_distributed(prune=PruneConfig(method="barber", sparsity="2:4", init="wanda"))
