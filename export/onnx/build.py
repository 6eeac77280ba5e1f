"""Build the ONNX graph of a loaded model, save it, or export a compressed model directory."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ...errors import ConfigError, ModelLoadError
from ...models import ADAPTERS, ArchAdapter
from ...quant import QuantizedWeight
from .decoder import DecoderGraph
from .graph import OPSET, Graph
from .weights import FORMS, LinearWriter

EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GiB cap: larger graphs keep weights in a side file


def exportable_adapter(family: str) -> ArchAdapter:
    """The adapter of `family`, when it lays its decoder out for export."""
    exportable = {a.family: a for a in ADAPTERS if a.layout is not None}
    if family not in exportable:
        raise ModelLoadError(f"ONNX export has no graph for the {family!r} family "
                             f"(supported: {', '.join(exportable)})")
    return exportable[family]


def build_onnx(model: torch.nn.Module, family: str, quant: dict[str, QuantizedWeight], form: str = "float",
               accuracy_level: int = 0, fp16_gemm: bool = False, int8_plan: dict[str, dict] | None = None):
    """The ONNX ModelProto of `model` with its linears in `form`, and the LinearWriter holding the record of
    what each layer became."""
    if form not in FORMS:
        raise ConfigError(f"--onnx-weights {form!r}: choose one of {', '.join(FORMS)}")
    if form != "float" and not quant:
        raise ConfigError(f"--onnx-weights {form} needs quantized weights (quant_state.safetensors); "
                          f"this model has none: use --onnx-weights float, or quantize it first")
    adapter = exportable_adapter(family)
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ConfigError(f"MatMulNBits accuracy level must be 0-4, got {accuracy_level}")
    if (fp16_gemm or int8_plan is not None) and form != "float":
        raise ConfigError("fp16 and int8 GEMMs apply to the float weight form only")
    writer = LinearWriter(Graph(), form, quant, accuracy_level=accuracy_level, fp16_gemm=fp16_gemm,
                          int8_plan=int8_plan)
    with torch.no_grad():
        graph = DecoderGraph(model, adapter, writer)
        proto = graph.build()
    writer.dims = graph.dims
    return proto, writer


def save_onnx(proto, path: str | os.PathLike) -> list[Path]:
    """Write `proto` to `path` (weights in `<name>.data` beside it when the graph would pass protobuf's 2 GiB
    cap). Returns the files written."""
    import onnx

    path = Path(path)
    if proto.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
        return [path, path.with_name(f"{path.name}.data")]
    onnx.save_model(proto, str(path))
    return [path]


def export_onnx(model_dir: str | os.PathLike, out_path: str | os.PathLike, form: str = "float",
                accuracy_level: int = 0) -> dict:
    """Read a compressed model directory and write its ONNX graph in weight form `form` to `out_path`.
    `accuracy_level` is MatMulNBits': 0 (default) is exact fp32 compute, 4 quantizes activations to int8
    (faster on CPU, no longer bit-faithful to the PyTorch model: onnx-check measures by how much)."""
    from ...models import load_model
    from ..source import read_compressed

    source = read_compressed(model_dir, require_quant=False)
    loaded = load_model(str(model_dir), with_tokenizer=False)
    proto, writer = build_onnx(loaded.model, loaded.adapter.family, source.quant, form, accuracy_level)
    layers = writer.layers
    files = save_onnx(proto, out_path)
    forms: dict[str, int] = {}
    for info in layers.values():
        forms[info["form"]] = forms.get(info["form"], 0) + 1
    return {"path": str(out_path), "form": form, "opset": OPSET, "files": [str(f) for f in files],
            "bytes": sum(f.stat().st_size for f in files), "linears": forms, "embedding": writer.embedding,
            "accuracy_level": accuracy_level if form == "matmulnbits" else None,
            "warnings": {k: v["warning"] for k, v in layers.items() if "warning" in v},
            "layers": layers}
