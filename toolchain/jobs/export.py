"""`toolchain export`: every target of a compressed model, dispatched from one entry.

    --target onnx|blob|compressed-tensors|all    one directory of artifacts with a manifest:
      manifest.json              every artifact: path, bytes, sha256; what each target wrote
      model.tcblob               packed N:M low-bit blob (docs/blob-format.md)
      onnx/model.<form>.onnx     decoder with KV cache, one file per weight form (--onnx-graph fused|plain);
                                 its weights in model.<form>.onnx.data when streamed or over 2 GiB
      onnx/genai_config.json     onnxruntime-genai's config for the first form, and the tokenizer beside it
      compressed-tensors/        pack-quantized checkpoint (vLLM's format)
    --target fpga                an accelerator bundle (toolchain.fpga.bundle, docs/fpga.md)
    --target gpu                 a 2:4 TensorRT-ready bundle (toolchain.gpu.bundle, docs/gpu.md)

Every directory is written to a temporary path and renamed, so a failed export leaves nothing half-written.
`--streaming` (by default when the model would not fit in memory; `config/calibration.py: resolve_streaming`): the ONNX
graph is built one decoder layer at a time from the checkpoint, its weights written to the data file as they
are made, and the blob, ONNX and compressed-tensors writers read the codes one linear at a time
(docs/scale.md). The manifest records
`streaming` and the peak memory.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

from ..atomic import atomic_dir
from ..errors import ConfigError
from ..export.manifest import list_artifacts
from ..export.source import read_compressed
from ..machine import AnonPeak, peak_rss_mib
from ..models.loading import check_out_dir
from .config import BUNDLE_TARGETS, ExportConfig, resolve_streaming

MANIFEST_FORMAT = "toolchain.export/1"


def run_export(model_dir: str | os.PathLike, out: str | os.PathLike, cfg: ExportConfig | None = None,
               given: set[str] | None = None) -> dict:
    """Export `model_dir` (written by toolchain prune/quantize/compress) to `out`. Returns the artifacts'
    manifest, or the FPGA bundle's report, or the GPU bundle's manifest. `given`: the options set on the
    command line (refused where they would have no effect)."""
    cfg = cfg or ExportConfig()
    targets = cfg.validate(given)
    if cfg.streaming and targets[0] in BUNDLE_TARGETS:
        raise ConfigError(f"--streaming applies to --target onnx, blob, compressed-tensors (or all) only; the {targets[0]} bundle loads "
                          f"the whole model: drop --streaming")
    if targets == ["fpga"]:
        from ..fpga.bundle import write_bundle

        return write_bundle(model_dir, out, cfg.accel_config, synth=not cfg.no_synth)
    if targets == ["gpu"]:
        from ..gpu.bundle import write_gpu_bundle

        return write_gpu_bundle(model_dir, out, cfg.precision, cfg.max_batch, cfg.max_seq)
    return write_artifacts(model_dir, out, targets, cfg.onnx_weights, cfg.onnx_graph, cfg.accuracy_level,
                           cfg.lm_head, streaming=resolve_streaming(model_dir, cfg))


def parse_forms(text: str | None, quantized: bool) -> list[str]:
    from ..export.onnx import FORMS

    if text is None:
        return ["matmulnbits"] if quantized else ["float"]
    forms = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in forms if f not in FORMS]
    if bad or not forms:
        raise ConfigError(f"--onnx-weights {text!r}: choose from {', '.join(FORMS)} (comma list allowed)")
    return forms


def write_artifacts(model_dir: str | os.PathLike, out: str | os.PathLike, targets: list[str],
                    onnx_weights: str | None = None, onnx_graph: str = "fused", accuracy_level: int = 0,
                    lm_head: str = "float", streaming: bool = False) -> dict:
    """Write the blob / ONNX / compressed-tensors artifacts of `model_dir` into `out`; returns the manifest.
    The ONNX directory also holds genai_config.json (naming the first weight form) and the tokenizer, so
    onnxruntime-genai runs it as it is. `streaming`: the writers never hold the whole model (the same
    artifacts; ONNX weights always in `<graph>.data`; compressed-tensors reads the codes one linear at a time)."""
    source = read_compressed(model_dir, lazy=streaming)
    check_out_dir(model_dir, out)
    forms = parse_forms(onnx_weights, bool(source.quant)) if "onnx" in targets else []
    if "compressed-tensors" in targets and not source.quant:
        raise ConfigError(f"--target compressed-tensors needs a quantized model ({model_dir} has no "
                          f"quant_state.safetensors); run toolchain quantize or compress first")
    results: dict[str, dict] = {}
    with atomic_dir(out) as tmp, AnonPeak() as anon:
        if "blob" in targets:
            from ..export.blob import write_blob

            t0 = time.perf_counter()
            results["blob"] = {**_summary(write_blob(model_dir, tmp / "model.tcblob", streaming=streaming)),
                               "seconds": round(time.perf_counter() - t0, 3)}
        if "onnx" in targets:
            from ..export import onnx

            (tmp / "onnx").mkdir()
            results["onnx"] = {}
            for i, form in enumerate(forms):
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")   # the per-layer fallbacks are recorded in the result
                    info = onnx.export_onnx(model_dir, tmp / "onnx" / f"model.{form}.onnx", form, accuracy_level,
                                            graph=onnx_graph, genai=i == 0, lm_head=lm_head, streaming=streaming)
                if info["genai"] is None:
                    info.pop("genai")
                info.pop("layers")
                results["onnx"][form] = {**info, "seconds": round(time.perf_counter() - t0, 3)}
        if "compressed-tensors" in targets:
            from ..export.compressed_tensors import export_compressed_tensors

            t0 = time.perf_counter()
            results["compressed-tensors"] = {
                **_summary(export_compressed_tensors(model_dir, tmp / "compressed-tensors", streaming=streaming)),
                "seconds": round(time.perf_counter() - t0, 3)}
        manifest = {"format": MANIFEST_FORMAT, "source": str(Path(model_dir).resolve()),
                    "targets": targets, "streaming": streaming, "peak_rss_mib": round(peak_rss_mib(), 1),
                    "peak_anon_mib": round(max(anon.peak_mib, AnonPeak.read_mib()), 1), "artifacts": list_artifacts(tmp), "results": _relative(results, tmp)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    manifest["out"] = str(Path(out).resolve())
    return manifest


def _summary(info) -> dict:
    """A writer's summary without bulky per-tensor detail (kept in the artifacts themselves)."""
    if not isinstance(info, dict):
        return {}
    return {k: v for k, v in info.items() if k not in ("tensors", "layers", "per_tensor")}


def _relative(value, root: Path):
    """Paths inside the temporary directory, rewritten relative to the export directory."""
    prefix = str(root) + os.sep
    if isinstance(value, dict):
        return {k: _relative(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v, root) for v in value]
    if isinstance(value, str) and value.startswith(prefix):
        return value[len(prefix):]
    return value
