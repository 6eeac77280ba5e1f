"""Write a model's tensors into Hugging Face sharded safetensors as they become final, so no whole model is ever
held: `ShardWriter` appends each group it is given (a decoder layer) to the current shard's data file at once,
cuts shards at group boundaries, and on `close()` names the shards `model-0000k-of-0000n.safetensors` and writes
`model.safetensors.index.json`. No shard is ever buffered in memory: a safetensors header must precede the data
and is only known once the shard is complete, so the header is written then and the data copied behind it by
the kernel.

`write_safetensors` is the file writer under it: the header is computed from the dtypes and shapes alone, then
each tensor is produced and written in turn, so a file can be assembled from tensors read one at a time (the
quantization state of a streamed run is merged from its per-layer parts this way).
"""
from __future__ import annotations

import errno
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
# A shard is cut at group (layer) boundaries once it holds this much (transformers' default is 5 GB; smaller
# shards are cheaper to re-download and to memory-map).
DEFAULT_SHARD_BYTES = 1 << 30

Entry = tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]


def _nbytes(dtype: torch.dtype, shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def safetensors_header(entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                       metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and the JSON header of a safetensors file holding (name, dtype, shape) in this order,
    padded so the data starts 8-byte aligned."""
    header: dict = {}
    offset = 0
    for name, dtype, shape in entries:
        size = _nbytes(dtype, shape)
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": [int(s) for s in shape],
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _write_tensor(f, name: str, tensor: torch.Tensor, dtype: torch.dtype, shape) -> None:
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.dtype != dtype or list(tensor.shape) != [int(s) for s in shape]:
        raise ValueError(f"{name}: produced {tensor.dtype} {list(tensor.shape)}, declared {dtype} {list(shape)}")
    if tensor.numel():
        f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)


def write_safetensors(path: str | os.PathLike, entries: Iterable[Entry], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file from (name, dtype, shape, produce) entries; each tensor is produced only when
    its bytes are written, and must have the dtype and shape declared."""
    entries = list(entries)
    with open(path, "wb") as f:
        f.write(safetensors_header([(name, dtype, shape) for name, dtype, shape, _ in entries], metadata))
        for name, dtype, shape, produce in entries:
            _write_tensor(f, name, produce(), dtype, shape)


def _copy_bytes(src, dst, size: int, name: Path) -> None:
    """Copy `size` bytes from `src`'s position to `dst`'s in the kernel; through a small buffer where the file
    system has no copy_file_range."""
    remaining = size
    try:
        while remaining > 0:
            copied = os.copy_file_range(src.fileno(), dst.fileno(), remaining)
            if copied == 0:
                break
            remaining -= copied
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
        while remaining > 0:
            chunk = src.read(min(remaining, 64 << 20))
            if not chunk:
                break
            dst.write(chunk)
            remaining -= len(chunk)
    if remaining:
        raise OSError(f"{name} ended {remaining} bytes early")


class ShardWriter:
    """HF sharded safetensors written group by group. Floating tensors are converted to `dtype` (None: kept).

    Each group's tensors are converted and appended, one tensor at a time, to the open shard's data file
    (`.shard-k.data`); when the shard is full its file is assembled as header + that data (`os.copy_file_range`,
    so the bytes never pass through this process) and the data file removed. The memory this needs is one
    converted tensor, not a shard."""

    def __init__(self, directory: str | os.PathLike, dtype: torch.dtype | None = None,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dtype, self.max_shard_bytes = dtype, int(max_shard_bytes)
        self._entries: list[tuple[str, torch.dtype, tuple[int, ...]]] = []   # the open shard's, in file order
        self._data = None             # the open shard's data file
        self._pending_bytes = 0
        self._names: set[str] = set()
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.closed = False

    def _target_dtype(self, tensor: torch.Tensor) -> torch.dtype:
        return self.dtype if self.dtype is not None and tensor.is_floating_point() else tensor.dtype

    def _data_path(self) -> Path:
        return self.directory / f".shard-{len(self._shards) + 1:05d}.data"

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """One group of final tensors (a decoder layer), kept together in one shard and written to disk now."""
        if self.closed:
            raise RuntimeError("ShardWriter.add after close()")
        clash = set(tensors) & self._names
        if clash:
            raise ValueError(f"tensor written twice: {sorted(clash)[:3]}")
        size = sum(_nbytes(self._target_dtype(t), t.shape) for t in tensors.values())
        if self._entries and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        if self._data is None:
            self._data = open(self._data_path(), "wb")
        for name, tensor in tensors.items():
            dtype = self._target_dtype(tensor)
            _write_tensor(self._data, name, tensor.detach().to("cpu", dtype), dtype, tuple(tensor.shape))
            self._entries.append((name, dtype, tuple(tensor.shape)))
        self._names.update(tensors)
        self._pending_bytes += size
        if self._pending_bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if self._data is None:
            return
        data_path = self._data_path()
        self._data.close()
        self._data = None
        path = self.directory / f".shard-{len(self._shards) + 1:05d}.safetensors"
        with open(path, "wb", buffering=0) as out, open(data_path, "rb", buffering=0) as data:
            out.write(safetensors_header(self._entries, {"format": "pt"}))
            out.flush()
            _copy_bytes(data, out, self._pending_bytes, data_path)
        data_path.unlink()
        self._shards.append((path, [name for name, _, _ in self._entries]))
        self.total_bytes += self._pending_bytes
        self._entries, self._pending_bytes = [], 0

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
