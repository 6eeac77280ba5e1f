"""`toolchain export`: every artifact of a compressed model in one directory, with a manifest.

    out/
      manifest.json              every artifact: path, bytes, sha256; what each target wrote
      model.tcblob               packed N:M low-bit blob (docs/blob-format.md)
      onnx/model.<form>.onnx     decoder with KV cache, one file per weight form
      compressed-tensors/        pack-quantized checkpoint (vLLM's format)

The directory is written to a temporary path and renamed, so a failed export leaves nothing half-written.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

from ..atomic import atomic_dir
from ..errors import ConfigError
from ..models.loading import check_out_dir
from .source import read_compressed

TARGETS = ("onnx", "blob", "compressed-tensors")
MANIFEST_FORMAT = "toolchain.export/1"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def parse_targets(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(TARGETS)
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        raise ConfigError(f"--target {text!r}: choose from {', '.join(TARGETS)} or all (comma list allowed)")
    return names


def parse_forms(text: str | None, quantized: bool) -> list[str]:
    from .onnx import FORMS

    if text is None:
        return ["matmulnbits"] if quantized else ["float"]
    forms = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in forms if f not in FORMS]
    if bad or not forms:
        raise ConfigError(f"--onnx-weights {text!r}: choose from {', '.join(FORMS)} (comma list allowed)")
    return forms


def run_export(model_dir: str | os.PathLike, out: str | os.PathLike, targets: str = "all",
               onnx_weights: str | None = None) -> dict:
    """Export `model_dir` (written by toolchain prune/quantize/compress) to `out`; returns the manifest."""
    chosen = parse_targets(targets)
    source = read_compressed(model_dir)
    check_out_dir(model_dir, out)
    forms = parse_forms(onnx_weights, bool(source.quant)) if "onnx" in chosen else []
    needs_quant = [t for t in chosen if t == "compressed-tensors"]
    if needs_quant and not source.quant:
        raise ConfigError(f"--target compressed-tensors needs a quantized model ({model_dir} has no "
                          f"quant_state.safetensors); run toolchain quantize or compress first")
    results: dict[str, dict] = {}
    with atomic_dir(out) as tmp:
        if "blob" in chosen:
            from .blob import write_blob

            t0 = time.perf_counter()
            results["blob"] = {**_summary(write_blob(model_dir, tmp / "model.tcblob")),
                               "seconds": round(time.perf_counter() - t0, 3)}
        if "onnx" in chosen:
            from .onnx import export_onnx

            (tmp / "onnx").mkdir()
            results["onnx"] = {}
            for form in forms:
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")   # the per-layer fallbacks are recorded in the result
                    info = export_onnx(model_dir, tmp / "onnx" / f"model.{form}.onnx", form)
                info.pop("layers")
                results["onnx"][form] = {**info, "seconds": round(time.perf_counter() - t0, 3)}
        if "compressed-tensors" in chosen:
            from .compressed_tensors import export_compressed_tensors

            t0 = time.perf_counter()
            results["compressed-tensors"] = {
                **_summary(export_compressed_tensors(model_dir, tmp / "compressed-tensors")),
                "seconds": round(time.perf_counter() - t0, 3)}
        artifacts = [{"path": str(f.relative_to(tmp)), "bytes": f.stat().st_size, "sha256": sha256_file(f)}
                     for f in sorted(p for p in tmp.rglob("*") if p.is_file())]
        manifest = {"format": MANIFEST_FORMAT, "source": str(Path(model_dir).resolve()),
                    "targets": chosen, "artifacts": artifacts, "results": _relative(results, tmp)}
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
