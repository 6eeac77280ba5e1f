"""Write a model's tensors into Hugging Face sharded safetensors as they become final, so no whole model is ever
held: `ShardWriter` buffers at most one shard (cut at the groups it is given, a decoder layer each), writes it,
and on `close()` names the shards `model-0000k-of-0000n.safetensors` and writes `model.safetensors.index.json`.

`write_safetensors` is the file writer under it: the header is computed from the dtypes and shapes alone, then
each tensor is produced and written in turn, so a file can be assembled from tensors read one at a time (the
quantization state of a streamed run is merged from its per-layer parts this way).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

import torch

INDEX = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
DTYPES_BY_CODE = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
# A shard is cut at group (layer) boundaries once it holds this much; the buffer it needs is part of the
# streamed peak memory (docs/scale.md), so it is smaller than transformers' 5 GB default.
DEFAULT_SHARD_BYTES = 1 << 30

Entry = tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]


def _nbytes(dtype: torch.dtype, shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def write_safetensors(path: str | os.PathLike, entries: Iterable[Entry], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file from (name, dtype, shape, produce) entries; each tensor is produced only when
    its bytes are written, and must have the dtype and shape declared."""
    entries = list(entries)
    header: dict = {}
    offset = 0
    for name, dtype, shape, _ in entries:
        size = _nbytes(dtype, shape)
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": [int(s) for s in shape],
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)      # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, dtype, shape, produce in entries:
            tensor = produce().detach().to("cpu").contiguous()
            if tensor.dtype != dtype or list(tensor.shape) != [int(s) for s in shape]:
                raise ValueError(f"{name}: produced {tensor.dtype} {list(tensor.shape)}, declared {dtype} {list(shape)}")
            if tensor.numel():
                f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)


def tensor_entry(name: str, tensor: torch.Tensor) -> Entry:
    return name, tensor.dtype, tuple(tensor.shape), lambda: tensor


class ShardWriter:
    """HF sharded safetensors written group by group. Floating tensors are converted to `dtype` (None: kept)."""

    def __init__(self, directory: str | os.PathLike, dtype: torch.dtype | None = None,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dtype, self.max_shard_bytes = dtype, int(max_shard_bytes)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.closed = False

    def _convert(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        if self.dtype is not None and tensor.is_floating_point():
            return tensor.to("cpu", self.dtype)
        return tensor.to("cpu")

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """One group of final tensors (a decoder layer), kept together in one shard."""
        if self.closed:
            raise RuntimeError("ShardWriter.add after close()")
        group = {name: self._convert(t) for name, t in tensors.items()}
        size = sum(t.numel() * t.element_size() for t in group.values())
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        clash = set(group) & (set(self._pending) | {n for _, names in self._shards for n in names})
        if clash:
            raise ValueError(f"tensor written twice: {sorted(clash)[:3]}")
        self._pending.update(group)
        self._pending_bytes += size
        if self._pending_bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        path = self.directory / f".shard-{len(self._shards) + 1:05d}.safetensors"
        write_safetensors(path, [tensor_entry(n, t) for n, t in self._pending.items()], {"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self.total_bytes += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> Path:
        """Write the last shard, give every shard its final name and write the index; returns the directory."""
        self._flush()
        self.closed = True
        n = len(self._shards)
        weight_map = {}
        for k, (path, names) in enumerate(self._shards, start=1):
            final = f"model-{k:05d}-of-{n:05d}.safetensors"
            os.rename(path, self.directory / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return self.directory
