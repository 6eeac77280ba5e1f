"""Peer tools as rows of the quality benchmarks: llm-compressor's GPTQ and round-to-nearest.

llm-compressor pins other versions of transformers and compressed-tensors than toolchain, so it is never a
dependency of the package: the benchmark makes it a virtual environment of its own under <out>/work/, which
borrows this environment's CPU torch through a .pth line (a pip constraint keeps pip from replacing it), and runs
`bench/scripts/llmcompressor_peer.py` there. The peer quantizes the same dense model on the same calibration
windows and grid; its dequantized weights come back as a safetensors file, and toolchain evaluates them with the
same code as its own rows.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

from toolchain.errors import ToolchainError

LLMCOMPRESSOR = "llmcompressor==0.14.0.1"
PEER_SCRIPT = Path(__file__).resolve().parent / "scripts" / "llmcompressor_peer.py"


def llmcompressor_env(work: Path) -> Path:
    """The python of llm-compressor's own environment under `work`, made (once) if missing."""
    env = work / "llmcompressor-venv"
    python = env / "bin" / "python"
    stamp = env / ".installed"
    if stamp.is_file():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    (purelib / "toolchain-torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    constraints = env / "constraints.txt"
    constraints.write_text(f"torch=={torch.__version__}\n")
    print(f"installing {LLMCOMPRESSOR} into {env} (its own environment)", flush=True)
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(constraints), LLMCOMPRESSOR],
                          capture_output=True, text=True)
    if done.returncode:
        raise ToolchainError(f"could not install {LLMCOMPRESSOR} into {env}:\n{done.stderr[-2000:]}")
    stamp.write_text(LLMCOMPRESSOR + "\n")
    return python


def llmcompressor_quantize(python: Path, model_dir: Path, calib: torch.Tensor, method: str, bits: int,
                           group_size: int, work: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Quantize `model_dir` with llm-compressor on the windows `calib`; returns its dequantized linear weights and
    the run's facts (wall time of its `oneshot`, peak RSS of the process)."""
    from safetensors.torch import load_file, save_file

    work.mkdir(parents=True, exist_ok=True)
    calib_file, weights_file = work / "calib.safetensors", work / f"{method}{bits}-g{group_size}.safetensors"
    save_file({"input_ids": calib.contiguous()}, str(calib_file))
    cmd = [str(python), str(PEER_SCRIPT), "--model", str(model_dir), "--calib", str(calib_file), "--method", method,
           "--bits", str(bits), "--group-size", str(group_size), "--out", str(weights_file)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "peak-rss-kib %M", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode:
        raise ToolchainError(f"llm-compressor {method} {bits}-bit failed:\n{done.stderr[-3000:]}")
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    rss = [line for line in done.stderr.splitlines() if line.startswith("peak-rss-kib ")]
    facts["process_seconds"] = round(wall, 1)
    if rss:
        facts["peak_rss_mib"] = round(int(rss[-1].split()[1]) / 1024)
    return load_file(str(weights_file)), facts


def with_weights(loaded, weights: dict[str, torch.Tensor]):
    """`loaded` with the named weights replaced (every name must exist and keep its shape)."""
    params = dict(loaded.model.named_parameters())
    for name, value in weights.items():
        if name not in params or params[name].shape != value.shape:
            raise ToolchainError(f"peer weight {name} {tuple(value.shape)} does not match the model")
        with torch.no_grad():
            params[name].copy_(value)
    return loaded
