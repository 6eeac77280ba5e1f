"""`toolchain gpu-bench`: dense fp16 against 2:4 semi-structured linears, honestly labelled.

On a CUDA device every distinct linear shape of the model's decoder is *timed* (`measure.measure_cuda`).
Without CUDA nothing is timed: `run_gpu_bench` says so and writes a roofline *estimate* per shape for a named
GPU (`estimate.roofline`, from the vendor figures in `specs.GPUS`), and every figure it writes is labelled an
estimate.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable

from toolchain.atomic import atomic_file
from toolchain.errors import ConfigError

from .measure import measure_cuda
from .report import gpu_table, plot
from .estimate import estimate_rows, summary
from .shapes import shapes_for
from .specs import GPUS, TOKENS, get_gpu, match_gpu


def _model_label(model) -> str:
    return "smollm2" if str(model) == "smollm2" else Path(str(model)).name


def run_gpu_bench(model: str, out_dir: str | Path, gpu: str = "H100-SXM", *,
                  source=None, tokens: Iterable[int] = TOKENS, measure_kwargs: dict | None = None,
                  bundle: str | Path | None = None) -> dict:
    """`toolchain gpu-bench`: measure on CUDA, else write a labelled roofline ESTIMATE for `gpu`.

    On CUDA the estimate is written for the detected device when it matches a table entry (`match_gpu`), and
    left out (with the reason) when it does not; `gpu` is then only validated. `source` (a LoadedModel, a model
    or a LLaMA-family config) supplies the shapes instead of loading `model`, which then only names the output
    files <out_dir>/gpu_<model>.{json,md,png}. `measure_kwargs` go to `measure_cuda`. With `bundle` (from
    `toolchain export --target gpu`), CUDA and TensorRT, its sparse and dense engines are built and timed end to
    end (prefill and decode); otherwise the result says why not."""
    import torch

    tokens = tuple(int(t) for t in tokens)
    if not tokens or min(tokens) < 1:
        raise ConfigError(f"tokens must be positive integers, got {tokens}")
    spec = get_gpu(gpu)  # validate the name before any work
    shapes = shapes_for(model, source)
    label = _model_label(model)
    model_of_time = ("time = max(FLOPs / peak tensor FLOPS, bytes / memory bandwidth); FLOPs = 2*N*K*T "
                     "(dense-equivalent for 2:4, against the 'with sparsity' peak); bytes = weight once (fp16 "
                     "dense N*K*2; 2:4 N*K/2*2 + 2-bit metadata per kept value) + activations T*K*2 in and "
                     "T*N*2 out. Caches, launch overhead and kernel efficiency are ignored: an upper bound on "
                     "what the hardware allows, not a kernel prediction.")
    result: dict = {"benchmark": "gpu", "model": label, "cuda": bool(torch.cuda.is_available()),
                    "tokens": list(tokens), "shapes": shapes, "measured": None, "estimate": None}
    estimate_spec = spec
    if result["cuda"]:
        measure_kwargs = dict(measure_kwargs or {})
        measure_kwargs.setdefault("tokens", tokens)
        result["measured"] = measure_cuda(shapes, **measure_kwargs)
        result["measured"]["summary"] = summary(result["measured"]["rows"], "speedup_measured", "measured")
        estimate_spec = match_gpu(result["measured"]["device"])
        if estimate_spec is None:
            result["estimate_note"] = (f"the device {result['measured']['device']!r} matches no entry of the "
                                       f"GPU table ({', '.join(GPUS)})")
        print(f"measured on {result['measured']['device']}", flush=True)
    else:
        print(f"no CUDA device: writing a roofline ESTIMATE for {spec.name}, not a measurement", flush=True)
    if bundle is not None:
        import importlib.util

        if not result["cuda"]:
            result["engines_note"] = "TensorRT engines not timed: no CUDA device"
        elif importlib.util.find_spec("tensorrt") is None:
            result["engines_note"] = "TensorRT engines not timed: the tensorrt package is not installed"
        else:
            from toolchain.gpu.run import engine_timings

            result["engines"] = {"kind": "measured", **engine_timings(bundle)}
    if estimate_spec is not None:
        rows = estimate_rows(shapes, estimate_spec, tokens)
        result["estimate"] = {"kind": "estimate",
                              "label": "roofline ESTIMATE from vendor peak figures, not a measurement",
                              "gpu": estimate_spec.figures(), "model_of_time": model_of_time, "rows": rows,
                              "summary": summary(rows, "speedup_estimate", "estimate")}
    out = Path(out_dir)
    stem = out / f"gpu_{label}"
    result["plot"], result["plot_note"] = None, None
    note = plot(result, Path(f"{stem}.png"))
    if note is None:
        result["plot"] = f"{stem}.png"
    else:
        result["plot_note"] = note
        print(note, file=sys.stderr, flush=True)
    table = gpu_table(result)
    for path, text in ((f"{stem}.json", json.dumps(result, indent=2) + "\n"), (f"{stem}.md", table)):
        with atomic_file(path) as tmp:
            tmp.write_text(text)
            tmp.chmod(0o644)  # rw-r--r--, as the other bench results (mkstemp creates files 0600)
    print(table, flush=True)
    return result
