"""quant_state.safetensors: the one source of integer truth for every exporter.

Per quantized linear, with its full module name as prefix (e.g. `model.layers.0.self_attn.q_proj`):
  `<name>.codes`       int8 (symmetric, signed) or uint8 (asymmetric) [out, in]; pruned weights hold the zero code
  `<name>.scales`      float16 [out, n_groups] (exact: scales are fp16 when they are made)
  `<name>.zeros`       uint8 [out, n_groups], asymmetric only (symmetric zero is 0)
  `<name>.prune_mask`  uint8 [out, ceil(in / 8)], eight positions per byte along `in`, least significant bit
                       first (numpy's packbits, bitorder "little"), 1 = pruned; only for layers with pruned weights
The safetensors metadata key `toolchain` holds JSON: {"format": "toolchain.quant_state/2", "layers":
{name: {"bits", "group_size", "symmetric", "shape", "groups": [[start, end], ...]}}}.

Format 1 stored the mask as one uint8 per weight [out, in]; it is still read. A model with any exact zero has a
mask (zeros are pruned weights), and a dense model dequantized from a GGUF has a few in most layers, so one byte
per weight made the mask as large as the codes.
"""
from __future__ import annotations

import json
import os
from collections.abc import MutableMapping
from pathlib import Path

import numpy as np
import torch

from ..errors import ToolchainError
from .quantizer import QuantizedWeight, QuantSpec

FORMAT = "toolchain.quant_state/2"
UNPACKED_MASK_FORMAT = "toolchain.quant_state/1"


def write_quant_state(path: str | os.PathLike, weights: dict[str, QuantizedWeight]) -> None:
    from safetensors.torch import save_file

    tensors, layers = {}, {}
    for name, qw in weights.items():
        sym = qw.spec.symmetric
        tensors[f"{name}.codes"] = qw.codes.to(torch.int8 if sym else torch.uint8).contiguous().cpu()
        tensors[f"{name}.scales"] = qw.scales.half().contiguous().cpu()
        if not sym:
            tensors[f"{name}.zeros"] = qw.zeros.to(torch.uint8).contiguous().cpu()
        if qw.prune_mask is not None and bool(qw.prune_mask.any()):
            tensors[f"{name}.prune_mask"] = pack_mask(qw.prune_mask)
        layers[name] = {"bits": qw.spec.bits, "group_size": qw.spec.group_size, "symmetric": sym,
                        "shape": list(qw.codes.shape), "groups": [list(g) for g in qw.spec.groups(qw.codes.shape[1])]}
    save_file(tensors, str(path), metadata={"toolchain": json.dumps({"format": FORMAT, "layers": layers})})


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool [out, in] mask as uint8 [out, ceil(in / 8)], eight positions per byte, least significant first."""
    return torch.from_numpy(np.packbits(mask.cpu().numpy().astype(bool), axis=1, bitorder="little"))


def unpack_mask(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """`pack_mask` undone: bool [out, columns]."""
    bits = np.unpackbits(packed.numpy(), axis=1, count=columns, bitorder="little")
    return torch.from_numpy(bits).bool()


def _read_linear(handle, path: Path, name: str, info: dict, keys: set[str], packed: bool = True) -> QuantizedWeight:
    """One linear's QuantizedWeight from an open quant_state file (`packed`: its masks are bit-packed, format 2)."""
    spec = QuantSpec(info["bits"], info["group_size"], info["symmetric"])
    codes = handle.get_tensor(f"{name}.codes").to(torch.int32)
    scales = handle.get_tensor(f"{name}.scales").float()
    zeros = (handle.get_tensor(f"{name}.zeros").to(torch.int32) if not spec.symmetric
             else torch.zeros_like(scales, dtype=torch.int32))
    if list(codes.shape) != info["shape"]:
        raise ToolchainError(f"{path}: {name}.codes has shape {list(codes.shape)}, metadata says {info['shape']}")
    mask = None
    if f"{name}.prune_mask" in keys:
        stored = handle.get_tensor(f"{name}.prune_mask")
        rows, columns = codes.shape
        expected = [rows, (columns + 7) // 8] if packed else [rows, columns]
        if list(stored.shape) != expected:
            raise ToolchainError(f"{path}: {name}.prune_mask has shape {list(stored.shape)}, expected {expected}")
        mask = unpack_mask(stored, columns) if packed else stored.bool()
    return QuantizedWeight(codes, scales, zeros, spec, mask)


def _layers_of(handle, path: Path) -> tuple[dict, bool]:
    """The file's per-linear metadata, and whether its masks are bit-packed."""
    meta = json.loads((handle.metadata() or {}).get("toolchain", "{}"))
    if meta.get("format") not in (FORMAT, UNPACKED_MASK_FORMAT):
        raise ToolchainError(f"{path}: not a {FORMAT} file (format {meta.get('format')!r})")
    return meta["layers"], meta["format"] == FORMAT


def read_quant_state(path: str | os.PathLike) -> dict[str, QuantizedWeight]:
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            layers, packed = _layers_of(handle, path)
            return {name: _read_linear(handle, path, name, info, keys, packed) for name, info in layers.items()}
    except ToolchainError:
        raise
    except Exception as exc:
        raise ToolchainError(f"cannot read quant state {path}: {exc}") from None


class QuantStateFile(MutableMapping):
    """quant_state.safetensors read one linear at a time, when asked for: the streamed exporters hold one
    linear's codes (int32 in memory, four times their stored size) instead of the whole model's.

    Reads are not cached (each `[name]` reads the file again, memory-mapped, and closes it), so the codes leave
    memory with the caller's last reference. Entries set on it (an exporter's stacked q/k/v) live in an overlay
    and never touch the file."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                self.keys_in_file = set(handle.keys())
                self.layers, self.packed = _layers_of(handle, self.path)
        except ToolchainError:
            raise
        except Exception as exc:
            raise ToolchainError(f"cannot read quant state {self.path}: {exc}") from None
        self.added: dict[str, QuantizedWeight] = {}

    def __getitem__(self, name: str) -> QuantizedWeight:
        from safetensors import safe_open

        if name in self.added:
            return self.added[name]
        if name not in self.layers:
            raise KeyError(name)
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                return _read_linear(handle, self.path, name, self.layers[name], self.keys_in_file, self.packed)
        except ToolchainError:
            raise
        except Exception as exc:
            raise ToolchainError(f"cannot read {name} from quant state {self.path}: {exc}") from None

    def __setitem__(self, name: str, value: QuantizedWeight) -> None:
        self.added[name] = value

    def __delitem__(self, name: str) -> None:
        if name not in self.added:
            raise KeyError(f"{name}: only entries added to a QuantStateFile can be removed (the file is read-only)")
        del self.added[name]

    def __contains__(self, name) -> bool:
        return name in self.added or name in self.layers

    def __iter__(self):
        yield from self.layers
        yield from (n for n in self.added if n not in self.layers)

    def __len__(self) -> int:
        return len(self.layers) + sum(n not in self.layers for n in self.added)

    def copy(self) -> "QuantStateFile":
        """A view of the same file with its own overlay (as `dict.copy` gives the in-memory state)."""
        other = object.__new__(QuantStateFile)
        other.path, other.keys_in_file, other.layers, other.added = self.path, self.keys_in_file, self.layers, dict(self.added)
        other.packed = self.packed
        return other


def merge_quant_state(parts: list[Path], path: str | os.PathLike, consume: bool = False) -> None:
    """Write one quant_state.safetensors from per-layer parts (each written by `write_quant_state`), reading
    one tensor at a time: a streamed run never holds the whole model's codes. `consume`: delete each part once
    its last tensor is copied, so the disk holds the state about once, not twice (at 70B, 130 GB each)."""
    from safetensors import safe_open

    from ..models.shards import DTYPES_BY_CODE, write_safetensors

    # Only the part being copied is open: a part's memory map keeps the pages read from it in this process's
    # resident set until it is closed, so holding every part open would grow the peak with the model's depth.
    open_part: dict[Path, object] = {}

    def close_open_part() -> None:
        for done in list(open_part):
            del open_part[done]
            if consume:   # the entries come part by part, in order: nothing later reads this one
                done.unlink()

    def read(part: Path, name: str) -> torch.Tensor:
        if part not in open_part:
            close_open_part()
            open_part[part] = safe_open(str(part), framework="pt")
        return open_part[part].get_tensor(name)

    entries, layers = [], {}
    for part in parts:
        handle = safe_open(str(part), framework="pt")
        meta = json.loads(handle.metadata()["toolchain"])
        if meta.get("format") != FORMAT:   # masks packed or not: one file cannot hold both
            raise ToolchainError(f"{part}: format {meta.get('format')!r}, the merged file is {FORMAT}")
        layers.update(meta["layers"])
        for name in handle.keys():
            piece = handle.get_slice(name)
            entries.append((name, DTYPES_BY_CODE[piece.get_dtype()], tuple(piece.get_shape()),
                            lambda p=part, n=name: read(p, n)))
        del handle
    write_safetensors(path, entries, {"toolchain": json.dumps({"format": FORMAT, "layers": layers})})
    close_open_part()
