"""quant_state.safetensors: the one source of integer truth for every exporter.

Per quantized linear, with its full module name as prefix (e.g. `model.layers.0.self_attn.q_proj`):
  `<name>.codes`       int8 (symmetric, signed) or uint8 (asymmetric) [out, in]; pruned weights hold the zero code
  `<name>.scales`      float16 [out, n_groups] (exact: scales are fp16 when they are made)
  `<name>.zeros`       uint8 [out, n_groups], asymmetric only (symmetric zero is 0)
  `<name>.prune_mask`  uint8 [out, in], 1 = pruned, only for layers with pruned weights
The safetensors metadata key `toolchain` holds JSON: {"format": "toolchain.quant_state/1", "layers":
{name: {"bits", "group_size", "symmetric", "shape", "groups": [[start, end], ...]}}}.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import ToolchainError
from .quantizer import QuantizedWeight, QuantSpec

FORMAT = "toolchain.quant_state/1"


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
            tensors[f"{name}.prune_mask"] = qw.prune_mask.to(torch.uint8).contiguous().cpu()
        layers[name] = {"bits": qw.spec.bits, "group_size": qw.spec.group_size, "symmetric": sym,
                        "shape": list(qw.codes.shape), "groups": [list(g) for g in qw.spec.groups(qw.codes.shape[1])]}
    save_file(tensors, str(path), metadata={"toolchain": json.dumps({"format": FORMAT, "layers": layers})})


def read_quant_state(path: str | os.PathLike) -> dict[str, QuantizedWeight]:
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("toolchain", "{}"))
            if meta.get("format") != FORMAT:
                raise ToolchainError(f"{path}: not a {FORMAT} file (format {meta.get('format')!r})")
            out = {}
            for name, info in meta["layers"].items():
                spec = QuantSpec(info["bits"], info["group_size"], info["symmetric"])
                codes = handle.get_tensor(f"{name}.codes").to(torch.int32)
                scales = handle.get_tensor(f"{name}.scales").float()
                zeros = (handle.get_tensor(f"{name}.zeros").to(torch.int32) if not spec.symmetric
                         else torch.zeros_like(scales, dtype=torch.int32))
                keys = set(handle.keys())
                mask = handle.get_tensor(f"{name}.prune_mask").bool() if f"{name}.prune_mask" in keys else None
                if list(codes.shape) != info["shape"]:
                    raise ToolchainError(f"{path}: {name}.codes has shape {list(codes.shape)}, metadata says {info['shape']}")
                out[name] = QuantizedWeight(codes, scales, zeros, spec, mask)
            return out
    except ToolchainError:
        raise
    except Exception as exc:
        raise ToolchainError(f"cannot read quant state {path}: {exc}") from None


def merge_quant_state(parts: list[Path], path: str | os.PathLike) -> None:
    """Write one quant_state.safetensors from per-layer parts (each written by `write_quant_state`), reading
    one tensor at a time: a streamed run never holds the whole model's codes."""
    from safetensors import safe_open

    from ..models.shards import DTYPES_BY_CODE, write_safetensors

    handles = [safe_open(str(p), framework="pt") for p in parts]
    entries, layers = [], {}
    for handle in handles:
        layers.update(json.loads(handle.metadata()["toolchain"])["layers"])
        for name in handle.keys():
            piece = handle.get_slice(name)
            entries.append((name, DTYPES_BY_CODE[piece.get_dtype()], tuple(piece.get_shape()),
                            lambda h=handle, n=name: h.get_tensor(n)))
    write_safetensors(path, entries, {"toolchain": json.dumps({"format": FORMAT, "layers": layers})})
