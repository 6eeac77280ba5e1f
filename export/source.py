"""The one reader of a compressed model directory, shared by every exporter.

A compressed model directory is what `toolchain prune|quantize|compress` writes: a Hugging Face directory of
dequantized float weights (`config.json`, `model.safetensors`), plus `quant_state.safetensors` (the integer
truth: codes, scales, zeros, prune masks; see `toolchain.quant.state`) and `compression.json` (what was done).
Exporters read the integer truth from here and never re-quantize or re-prune.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..quant import QuantizedWeight, QuantStateFile, read_quant_state

QUANT_STATE = "quant_state.safetensors"
COMPRESSION = "compression.json"


@dataclass
class CompressedModel:
    path: Path
    config: dict                                   # config.json
    quant: dict[str, QuantizedWeight]              # empty for a float (pruned-only or dense) model; read
                                                   # lazily (a QuantStateFile) when opened with lazy=True
    compression: dict = field(default_factory=dict)

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N kept, M) when the model was pruned N:M, else None. compression.json holds the prune record at
        its top level after `toolchain prune`, under "prune" after quantize/compress."""
        prune = self.compression.get("prune") or self.compression
        nm = prune.get("nm")
        return (int(nm[0]), int(nm[1])) if isinstance(nm, list) and len(nm) == 2 else None

    def weight_files(self) -> list[Path]:
        files = sorted(self.path.glob("*.safetensors"))
        return [f for f in files if f.name != QUANT_STATE]

    def float_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the float checkpoint (dequantized linears included), by its checkpoint name."""
        from safetensors.torch import load_file

        out: dict[str, torch.Tensor] = {}
        for f in self.weight_files():
            try:
                out.update(load_file(str(f)))
            except Exception as exc:
                raise ModelLoadError(f"cannot read {f}: {exc}") from None
        return out


def read_compressed(model_dir: str | os.PathLike, require_quant: bool = False, lazy: bool = False) -> CompressedModel:
    """Read a compressed model directory; `require_quant` refuses one without `quant_state.safetensors`.
    `lazy`: the quantization state is read one linear at a time when asked for (`QuantStateFile`: the streamed
    exporters), instead of all at once."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a directory; export reads a model directory written by "
                             f"toolchain prune/quantize/compress")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; expected a Hugging Face model directory")
    try:
        config = json.loads((path / "config.json").read_text())
    except ValueError as exc:
        raise ModelLoadError(f"{path / 'config.json'} is not valid JSON: {exc}") from None
    state_path = path / QUANT_STATE
    if state_path.is_file():
        quant = QuantStateFile(state_path) if lazy else read_quant_state(state_path)
    elif require_quant:
        raise ModelLoadError(f"{path} has no {QUANT_STATE}: run `toolchain quantize` (or `compress`) first")
    else:
        quant = {}
    compression = {}
    if (path / COMPRESSION).is_file():
        try:
            compression = json.loads((path / COMPRESSION).read_text())
        except ValueError as exc:
            raise ModelLoadError(f"{path / COMPRESSION} is not valid JSON: {exc}") from None
    model = CompressedModel(path=path, config=config, quant=quant, compression=compression)
    if not model.weight_files():
        raise ModelLoadError(f"{path} has no *.safetensors weights")
    return model
