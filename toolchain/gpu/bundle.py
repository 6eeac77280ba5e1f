"""`toolchain export --target gpu`: a 2:4 TensorRT-ready bundle.

    BUNDLE/
      model.onnx (+ model.onnx.data over 2 GB)   the decoder with a KV cache; decoder GEMMs in fp16 with their
                                                   weights [K, N] as initializers feeding MatMul directly
      build_engine.py, build_engine.sh            TensorRT Python API / trtexec, SPARSE_WEIGHTS, one profile
      manifest.json                               shapes, profile, precision, per-layer 2:4 status, files, the
                                                   source model's path and the sha256 of its config and weights
      README.md, tokenizer files
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

from ..atomic import atomic_dir
from ..errors import ConfigError
from ..models.loading import check_out_dir
from .sparsity import gemm_flops_fraction, two_four_status

PRECISIONS = ("fp16", "int8")
CALIB_WINDOWS, CALIB_SEQLEN = 32, 512   # int8 activation scales: the benchmarks' calibration budget
MANIFEST_FORMAT = "toolchain.gpu-bundle/1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "config.json")


class SparsityWarning(UserWarning):
    """A linear layer is not 2:4 along K: TensorRT will run it dense."""


def _templates():
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


def check_bundle_options(precision: str, max_batch: int, max_seq: int) -> None:
    """The GPU bundle's options: a precision this release builds and an engine profile that holds a token."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: this release builds {', '.join(PRECISIONS)} bundles")
    if max_batch < 1 or max_seq < 2:
        raise ConfigError(f"--max-batch must be >= 1 and --max-seq >= 2 (got {max_batch}, {max_seq})")


def profile_shapes(layers: int, kv_heads: int, head_dim: int, max_batch: int, max_seq: int) -> dict:
    """One optimization profile, (min, opt, max) per input: prompts up to max_seq tokens, and a KV cache up to
    max_seq - 1 past tokens (so past + new never exceeds max_seq). opt is a batch-1 prompt of up to 64."""
    opt_seq = min(64, max_seq)
    shapes = {name: ((1, 1), (1, opt_seq), (max_batch, max_seq)) for name in ("input_ids", "position_ids")}
    shapes["attention_mask"] = ((1, 1), (1, opt_seq), (max_batch, max_seq))
    for i in range(layers):
        for kind in ("key", "value"):
            shapes[f"past_key_values.{i}.{kind}"] = ((1, kv_heads, 0, head_dim), (1, kv_heads, 0, head_dim),
                                                     (max_batch, kv_heads, max_seq - 1, head_dim))
    return shapes


def _trtexec_shapes(shapes: dict, which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in dims[which])}" for name, dims in shapes.items())


def write_gpu_bundle(model_dir: str | os.PathLike, out: str | os.PathLike, precision: str = "fp16",
                     max_batch: int = 1, max_seq: int = 2048) -> dict:
    from ..export.onnx import build_onnx, save_onnx
    from ..export.manifest import sha256_file
    from ..models import load_model
    from ..quant.smoothquant import INT8_MAX_ERROR, calibrate_input_amax, plan_int8

    check_bundle_options(precision, max_batch, max_seq)
    model_dir = Path(model_dir)
    check_out_dir(model_dir, out)
    loaded = load_model(str(model_dir), with_tokenizer=precision == "int8")
    adapter, model = loaded.adapter, loaded.model
    module_names = {id(m): n for n, m in model.named_modules()}
    layers = [{"name": module_names[id(linear)], "shape": list(linear.weight.shape), **two_four_status(linear.weight)}
              for layer in adapter.decoder_layers(model) for linear in adapter.linears(layer).values()]
    sparse = [layer for layer in layers if layer["two_four"]]
    if not sparse:
        raise ConfigError(f"{model_dir}: no decoder linear holds 2:4 along K, so the bundle would run entirely "
                          f"dense; prune it first (toolchain prune --sparsity 2:4)")
    for layer in layers:
        if not layer["two_four"]:
            warnings.warn(f"{layer['name']}: not 2:4 along K ({layer['reason']}); TensorRT will run it dense",
                          SparsityWarning, stacklevel=2)
    max_seq = min(max_seq, int(getattr(model.config, "max_position_embeddings", max_seq) or max_seq))
    calibration = None
    if precision == "int8":
        from ..data import calibration_data

        windows, calibration = calibration_data(loaded, CALIB_WINDOWS, CALIB_SEQLEN, seed=0)
        names = [layer["name"] for layer in layers]
        plan = plan_int8(loaded, names, windows, calibrate_input_amax(loaded, names, windows))
        for layer in layers:
            choice = plan[layer["name"]]
            layer.update(gemm="int8" if choice["int8"] else "fp16", smooth_alpha=choice["alpha"],
                         int8_output_error=round(choice["error"], 6))
            if not choice["int8"]:
                warnings.warn(f"{layer['name']}: int8 output error {choice['error']:.3g} on calibration exceeds "
                              f"{INT8_MAX_ERROR}; this layer stays fp16", SparsityWarning, stacklevel=2)
        proto, writer = build_onnx(model, adapter.family, {}, "float", fp16_gemm=True,
                                   int8_plan={n: p for n, p in plan.items() if p["int8"]})
    else:
        proto, writer = build_onnx(model, adapter.family, {}, "float", fp16_gemm=True)
    dims = writer.dims
    shapes = profile_shapes(dims.layers, dims.kv_heads, dims.head_dim, max_batch, max_seq)
    head = model.get_output_embeddings().weight
    all_gemms = layers + [{"name": "lm_head", "shape": list(head.shape), "two_four": False,
                           "reason": "the LM head stays dense"}]
    env = _templates()
    with atomic_dir(out) as tmp:
        save_onnx(proto, tmp / "model.onnx")
        profile = {name: [list(d) for d in dims_] for name, dims_ in shapes.items()}
        (tmp / "build_engine.py").write_text(env.get_template("build_engine.py.j2").render(
            generator="toolchain", profile_json=json.dumps(profile)))
        (tmp / "build_engine.sh").write_text(env.get_template("build_engine.sh.j2").render(
            generator="toolchain", min_shapes=_trtexec_shapes(shapes, 0), opt_shapes=_trtexec_shapes(shapes, 1),
            max_shapes=_trtexec_shapes(shapes, 2)))
        os.chmod(tmp / "build_engine.sh", 0o755)
        os.chmod(tmp / "build_engine.py", 0o755)
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
        (tmp / "README.md").write_text(bundle_readme(precision, max_batch, max_seq, len(sparse), len(layers)))
        manifest = {
            "format": MANIFEST_FORMAT, "source": str(model_dir.resolve()),
            "source_files": source_files(model_dir), "precision": precision,
            "graph": {"file": "model.onnx", "opset": 21,
                      "gemm": ("float16" if precision == "fp16" else
                               "int8 explicit Q/DQ: weights symmetric per output channel, inputs static per tensor"),
                      "fp32": "embeddings, norms, RoPE, softmax, residual sums, LM head"},
            "calibration": calibration,
            "int8_layers": sum(1 for layer in layers if layer.get("gemm") == "int8") if precision == "int8" else None,
            "profile": {"max_batch": max_batch, "max_seq": max_seq, "shapes": profile},
            "layers": all_gemms,
            "two_four_layers": len(sparse), "decoder_linears": len(layers),
            "sparse_gemm_fraction": gemm_flops_fraction(all_gemms),
            "files": [{"path": str(p.relative_to(tmp)), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
                      for p in sorted(tmp.iterdir()) if p.is_file()],
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _source_candidates(source: Path) -> list[Path]:
    """What loading the source model reads: a GGUF file itself, or a model directory's config and weights."""
    if source.is_file():
        return [source]
    weights = (".safetensors", ".safetensors.index.json")
    return sorted(p for p in source.iterdir() if p.is_file() and (p.name == "config.json" or p.name.endswith(weights)))


def source_files(source: Path) -> list[dict]:
    """The source model's config and weight files with their sha256, so that `gpu-run --backend torch`, which
    loads the source model rather than the bundle's graph, can tell that it still holds what was exported."""
    from ..export.manifest import sha256_file

    return [{"path": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in _source_candidates(source)]


def bundle_source(bundle: Path) -> Path:
    """The model the bundle was exported from, as manifest.json records it, checked to be unchanged since."""
    from ..export.manifest import sha256_file

    path = bundle / "manifest.json"
    if not path.is_file():
        raise ConfigError(f"{bundle} has no manifest.json, which names the model the bundle was exported from; "
                          f"re-export it with toolchain export --target gpu")
    manifest = json.loads(path.read_text())
    if not manifest.get("source"):
        raise ConfigError(f"{path} records no source model; re-export the bundle with toolchain export --target gpu")
    source = Path(manifest["source"])
    if not source.exists():
        raise ConfigError(f"the model the bundle was exported from, {source}, is not there any more; restore it "
                          f"or re-export the bundle from where it is now")
    if "source_files" not in manifest:
        raise ConfigError(f"{path} records no sha256 of its source model's files (the bundle predates them), so "
                          f"{source} cannot be checked to be the exported model; re-export the bundle")
    folder = source.parent if source.is_file() else source
    changed = [f["path"] for f in manifest["source_files"]
               if not (folder / f["path"]).is_file() or sha256_file(folder / f["path"]) != f["sha256"]]
    if changed:
        raise ConfigError(f"the source model {source} changed since the bundle was exported ({', '.join(changed)} "
                          f"differ from the sha256 in {path}); re-export the bundle")
    return source


def bundle_readme(precision: str, max_batch: int, max_seq: int, sparse: int, total: int) -> str:
    return f"""# GPU bundle ({precision}, 2:4)

`model.onnx` is the whole decoder with a KV cache (inputs `input_ids`, `attention_mask`, `position_ids`,
`past_key_values.{{i}}.key|value`; outputs `logits`, `present.{{i}}.key|value`). {sparse} of its {total}
decoder linear weights hold 2:4 along K and feed fp16 MatMuls directly; norms, softmax, residual sums and the
LM head stay fp32. `manifest.json` lists every layer's 2:4 status and the files' sha256.

On a machine with an NVIDIA GPU (Ampere or newer for sparse tensor cores) and TensorRT 10/11:

    python build_engine.py           # TensorRT Python API: SPARSE_WEIGHTS, strongly typed -> model.plan
    ./build_engine.sh                # the same with trtexec (--stronglyTyped --sparsity=enable)

The engine's profile allows batches up to {max_batch} and up to {max_seq} tokens of context.
`build_engine.py` also writes `sparsity_report.json`: the layers TensorRT found eligible for sparse math and
those it picked sparse tactics for.

Anywhere (CPU included), onnxruntime runs the same graph:

    toolchain gpu-run BUNDLE --prompt "def fibonacci(n):" --max-new-tokens 32

On an Ampere-or-newer NVIDIA GPU, PyTorch's semi-structured 2:4 kernels run the model the bundle was exported
from (fp16; the source path and its files' sha256 are in `manifest.json`):

    toolchain gpu-run BUNDLE --backend torch --prompt "def fibonacci(n):"
"""
