"""Build the ONNX graph of a loaded model, save it, or export a compressed model directory."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ...errors import ConfigError, ModelLoadError
from ...models import ADAPTERS, ArchAdapter
from ...quant import QuantizedWeight
from .decoder import DecoderGraph
from .fused import FusedDecoderGraph, fused_unsupported
from .graph import OPSET, Graph
from .weights import FORMS, LM_HEADS, ExportWarning, LinearWriter

GRAPHS = ("fused", "plain")   # contrib-op graph for onnxruntime(-genai), or op by op for any runtime

EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GiB cap: larger graphs keep weights in a side file


def exportable_adapter(family: str) -> ArchAdapter:
    """The adapter of `family`, when it lays its decoder out for export."""
    exportable = {a.family: a for a in ADAPTERS if a.layout is not None}
    if family not in exportable:
        raise ModelLoadError(f"ONNX export has no graph for the {family!r} family "
                             f"(supported: {', '.join(exportable)})")
    return exportable[family]


def build_onnx(model: torch.nn.Module, family: str, quant: dict[str, QuantizedWeight], form: str = "float",
               accuracy_level: int = 0, fp16_gemm: bool = False, int8_plan: dict[str, dict] | None = None,
               graph: str = "plain", lm_head: str = "float", stream=None, data=None):
    """The ONNX ModelProto of `model` with its linears in `form` and its decoder as `graph` (fused: contrib
    ops; plain: op by op), and the LinearWriter holding the record of what each layer became; its `graph` says
    which decoder was written (a model the fused form cannot represent is written plain, with a warning).
    `lm_head` int8/int4: an LM head that was never quantized becomes MatMulNBits (see `lm_head_codes`).
    Streamed: `stream` (a StreamingCheckpoint whose model is `model`) gives the decoder layers one at a time,
    and `data` (an `ExternalData`) takes each initializer's bytes as it is made."""
    if graph not in GRAPHS:
        raise ConfigError(f"--onnx-graph {graph!r}: choose one of {', '.join(GRAPHS)}")
    if lm_head not in LM_HEADS:
        raise ConfigError(f"--lm-head {lm_head!r}: choose one of {', '.join(LM_HEADS)}")
    if lm_head != "float" and (fp16_gemm or int8_plan is not None):
        raise ConfigError("--lm-head int8/int4 is MatMulNBits, an onnxruntime contrib op; the GPU bundle has none")
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
    if graph == "fused" and (fp16_gemm or int8_plan is not None):
        raise ConfigError("fp16 and int8 GEMMs are written in the plain graph only (TensorRT has no contrib ops)")
    writer = LinearWriter(Graph(data), form, quant.copy(), accuracy_level=accuracy_level, fp16_gemm=fp16_gemm,
                          int8_plan=int8_plan, lm_head=lm_head)
    why = fused_unsupported(model, adapter) if graph == "fused" else None
    if why is not None:
        warnings.warn(f"--onnx-graph fused: {why}; writing the plain graph", ExportWarning, stacklevel=2)
        graph = "plain"
    with torch.no_grad():
        decoder = (FusedDecoderGraph if graph == "fused" else DecoderGraph)(model, adapter, writer, stream)
        proto = decoder.build()
    writer.dims, writer.graph, writer.graph_fallback = decoder.dims, graph, why
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


def build_streamed(model_dir: str | os.PathLike, source, out_path: str | os.PathLike, form: str,
                   accuracy_level: int, graph: str, lm_head: str):
    """Build and write the graph of `model_dir` without holding its weights: the decoder layers are read from the
    checkpoint one at a time (`StreamingCheckpoint`), the codes one linear at a time (`source.quant`, a
    `QuantStateFile`), and each initializer's bytes go to `<out>.data` as they are made (`ExternalData`). Both
    files are written under temporary names and renamed when complete. Returns (files, LinearWriter)."""
    from ...atomic import atomic_file
    from ...models.streaming import StreamingCheckpoint
    from .external import ExternalData

    out_path = Path(out_path)
    data_path = out_path.with_name(f"{out_path.name}.data")
    stream = StreamingCheckpoint(model_dir)
    data = ExternalData(data_path.with_name(f".{data_path.name}.{os.getpid()}.tmp"), data_path.name)
    try:
        proto, writer = build_onnx(stream.model, stream.adapter.family, source.quant, form, accuracy_level,
                                   graph=graph, lm_head=lm_head, stream=stream, data=data)
        data.close()
        os.replace(data.path, data_path)
    except BaseException:
        data.discard()
        raise
    try:
        with atomic_file(out_path) as tmp:
            tmp.write_bytes(proto.SerializeToString())
    except BaseException:
        data_path.unlink(missing_ok=True)
        raise
    return [out_path, data_path], writer


def export_onnx(model_dir: str | os.PathLike, out_path: str | os.PathLike, form: str = "float",
                accuracy_level: int = 0, graph: str = "plain", genai: bool = False, lm_head: str = "float",
                streaming: bool = False) -> dict:
    """Read a compressed model directory and write its ONNX graph in weight form `form` to `out_path`.
    `accuracy_level` is MatMulNBits': 0 (default) is exact fp32 compute, 4 quantizes activations to int8
    (faster on CPU, no longer bit-faithful to the PyTorch model: onnx-check measures by how much). `graph`:
    fused (contrib ops) or plain (op by op). `genai`: also write genai_config.json and the tokenizer beside
    the graph, so onnxruntime-genai runs that directory as it is. `streaming`: never hold the model or the
    graph's weights (`build_streamed`; a Hugging Face safetensors directory); the weights always go to
    `<out>.data`, and the graph and weights equal the in-memory export's."""
    from ..source import read_compressed

    source = read_compressed(model_dir, require_quant=False, lazy=streaming)
    if streaming:
        files, writer = build_streamed(model_dir, source, out_path, form, accuracy_level, graph, lm_head)
    else:
        from ...models import load_model

        loaded = load_model(str(model_dir), with_tokenizer=False)
        proto, writer = build_onnx(loaded.model, loaded.adapter.family, source.quant, form, accuracy_level,
                                   graph=graph, lm_head=lm_head)
        del loaded
        files = save_onnx(proto, out_path)
    layers = writer.layers
    genai_files = None
    if genai:
        from .genai import write_genai_files

        d = writer.dims
        genai_files = write_genai_files(model_dir, out_path, [kv for _, kv in d.layer_heads],
                                        [h for h, _ in d.layer_heads], d.head_dim,
                                        share_buffer=writer.graph == "fused")
    forms: dict[str, int] = {}
    for info in layers.values():
        if "form" in info:   # entries without one are layer-level notes (projections kept apart)
            forms[info["form"]] = forms.get(info["form"], 0) + 1
    return {"path": str(out_path), "form": form, "graph": writer.graph, "genai": genai_files, "opset": OPSET,
            "streaming": streaming,
            **({"graph_fallback": writer.graph_fallback} if writer.graph_fallback else {}), "files": [str(f) for f in files],
            "bytes": sum(f.stat().st_size for f in files), "linears": forms, "embedding": writer.embedding,
            "accuracy_level": accuracy_level if form == "matmulnbits" or lm_head != "float" else None,
            "lm_head": (layers["lm_head"].get("codes", layers["lm_head"]["form"]) if "lm_head" in layers
                        else "float (the tied embedding table)"),
            "warnings": {k: v["warning"] for k, v in layers.items() if "warning" in v},
            "layers": layers}
