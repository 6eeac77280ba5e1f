"""Pins the outputs of small end-to-end runs by their hashes, so a refactor is provably behaviour-preserving.

Two tiers:
- chip-independent: magnitude 2:4 pruning and RTN quantization (sorts, elementwise arithmetic and integer
  packing only) through every exporter and the FPGA bundle's images and golden outputs. Asserted everywhere.
- chip-dependent: Wanda / SparseGPT / Barber / GPTQ / APTQ use float reductions whose rounding depends on the
  CPU's vector extensions (the kernels PyTorch dispatches to) and on the thread count. Their pins are recorded
  per `machine_key()` and asserted where one exists for this machine.

After an intended change of behaviour, regenerate the pins with
    .venv/bin/python tests/test_behaviour_pin.py
and paste its output over PINS below (the commit then says why the outputs changed).
"""
from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_llama, make_tokenizer  # noqa: E402

CALIB = dict(calib_samples=8, seqlen=32, seed=0)


def _digest(items) -> str:
    """sha256 over (name, dtype, shape, bytes) of named arrays, in name order."""
    h = hashlib.sha256()
    for name, arr in sorted(items):
        arr = np.ascontiguousarray(arr.detach().cpu().numpy() if torch.is_tensor(arr) else arr)
        h.update(f"{name}|{arr.dtype}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:16]


def _safetensors_digest(paths) -> str:
    from safetensors import safe_open

    items = []
    for path in paths:
        with safe_open(str(path), framework="pt") as f:
            items += [(k, f.get_tensor(k).float() if f.get_tensor(k).dtype == torch.bfloat16 else f.get_tensor(k))
                      for k in f.keys()]
    return _digest(items)


def _quant_state_digest(path: Path) -> str:
    """The integer state as it reads back, digested as the tensors of quant_state format 1 (one byte per mask
    position), so that a change of storage which reads back the same state keeps its pin."""
    from toolchain.quant import read_quant_state

    items = []
    for name, qw in read_quant_state(path).items():
        items.append((f"{name}.codes", qw.codes.to(torch.int8 if qw.spec.symmetric else torch.uint8)))
        items.append((f"{name}.scales", qw.scales.half()))
        if not qw.spec.symmetric:
            items.append((f"{name}.zeros", qw.zeros.to(torch.uint8)))
        if qw.prune_mask is not None:
            items.append((f"{name}.prune_mask", qw.prune_mask.to(torch.uint8)))
    return _digest(items)


def _onnx_digest(path: Path) -> str:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    items = [(t.name, numpy_helper.to_array(t)) for t in model.graph.initializer]
    h = hashlib.sha256(_digest(items).encode())
    for node in model.graph.node:   # the graph's structure: op types and wiring, in order
        h.update(f"{node.op_type}:{','.join(node.input)}>{','.join(node.output)};".encode())
    return h.hexdigest()[:16]


def _files_digest(root: Path, pattern: str) -> str:
    h = hashlib.sha256()
    for f in sorted(root.glob(pattern)):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _model_dir(tmp: Path) -> Path:
    tok = make_tokenizer()
    path = tmp / "tiny-llama"
    make_llama(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _compress(src: Path, out: Path, prune: dict | None, quant: dict | None) -> Path:
    from toolchain.jobs.config import PruneConfig, QuantConfig
    from toolchain.jobs.prune import run_prune
    from toolchain.jobs.quantize import run_compress, run_quantize

    if quant is None:
        run_prune(str(src), out, PruneConfig(**prune, **CALIB), progress=False)
    elif prune is None:
        run_quantize(str(src), out, QuantConfig(**quant, **CALIB), progress=False)
    else:
        run_compress(str(src), out, PruneConfig(**prune, **CALIB), QuantConfig(**quant, **CALIB), progress=False)
    return out


def _model_digests(d: Path) -> dict:
    out = {"weights": _safetensors_digest(sorted(d.glob("model*.safetensors")))}
    if (d / "quant_state.safetensors").exists():
        out["quant_state"] = _quant_state_digest(d / "quant_state.safetensors")
    return out


def chip_independent(tmp: Path) -> dict:
    """magnitude 2:4 + RTN 4-bit (group 32) through blob, ONNX, compressed-tensors, FPGA and GPU bundles."""
    from toolchain.export.blob import read_blob
    from toolchain.jobs.config import ExportConfig
    from toolchain.jobs.export import run_export
    from toolchain.fpga.bundle import write_bundle
    from toolchain.fpga.config import load_config
    from toolchain.fpga.layers import for_design, read_layer
    from toolchain.gpu.bundle import write_gpu_bundle
    from toolchain.sim.runner import expected_outputs

    src = _model_dir(tmp)
    model = _compress(src, tmp / "c", dict(method="magnitude", sparsity="2:4"),
                      dict(method="rtn", bits="4", group_size=32))
    pins = {f"model.{k}": v for k, v in _model_digests(model).items()}
    pruned = _compress(src, tmp / "p", dict(method="magnitude", sparsity="2:4"), None)
    pins["pruned.weights"] = _model_digests(pruned)["weights"]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_export(model, tmp / "x", ExportConfig(target="all", onnx_weights="float,qdq,matmulnbits",
                                                   onnx_graph="plain"))
    with read_blob(tmp / "x" / "model.tcblob", verify=True) as blob:
        pins["blob"] = _digest((f"{n}.{s}", blob.section(n, s)) for n in blob.names()
                               for s in blob.entry(n)["sections"])
    for form in ("float", "qdq", "matmulnbits"):
        pins[f"onnx.{form}"] = _onnx_digest(tmp / "x" / "onnx" / f"model.{form}.onnx")
    pins["compressed_tensors"] = _safetensors_digest(sorted((tmp / "x" / "compressed-tensors").glob("*.safetensors")))

    bundle = tmp / "fpga"
    write_bundle(model, bundle, lint_rtl=False, synth=False)
    pins["fpga.mem"] = _files_digest(bundle, "mem/*.mem")
    pins["fpga.rtl"] = _files_digest(bundle, "rtl/*")
    pins["fpga.hls"] = _files_digest(bundle, "hls/*")
    pins["fpga.json"] = _files_digest(bundle, "[acl]*.json")
    cfg = load_config(str(bundle / "accel.json"))
    outputs = []
    with read_blob(bundle / "model.tcblob") as blob:
        for name in blob.names():
            if blob.entry(name)["kind"] != "quant":
                continue
            layer = for_design(read_layer(blob, name), cfg)
            acts = np.random.default_rng(0).integers(-127, 128, size=(4, layer.k))
            outputs.append((name, expected_outputs(cfg, layer, acts)))
    pins["fpga.golden"] = _digest(outputs)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_gpu_bundle(pruned, tmp / "gpu", max_seq=64)
    pins["gpu.onnx"] = _onnx_digest(tmp / "gpu" / "model.onnx")
    return pins


def chip_dependent(tmp: Path) -> dict:
    """The calibrated methods: Barber(Wanda) 2:4 + GPTQ 4-bit; SparseGPT 50% + APTQ 3.5 bits (2,4), lstsq."""
    src = _model_dir(tmp)
    pins = {}
    a = _compress(src, tmp / "a", dict(method="barber", init="wanda", sparsity="2:4"),
                  dict(method="gptq", bits="4", group_size=32))
    pins.update({f"barber_wanda_gptq.{k}": v for k, v in _model_digests(a).items()})
    b = _compress(src, tmp / "b", dict(method="sparsegpt", sparsity="0.5", resolve_mode="lstsq"),
                  dict(method="aptq", bits="3.5", candidates="2,4", group_size=32, sensitivity="local"))
    pins.update({f"sparsegpt_lstsq_aptq.{k}": v for k, v in _model_digests(b).items()})
    c = _compress(src, tmp / "c", dict(method="barber", init="sparsegpt", sparsity="0.5"), None)
    pins["barber_sparsegpt.weights"] = _model_digests(c)["weights"]
    return pins


PINS = {
    "chip_independent": {
        "model.weights": "63c1f5eac65af30d",
        "model.quant_state": "22123f2c6789f4fc",
        "pruned.weights": "cb297a92a83038e4",
        "blob": "f53d31b008c3ce07",
        "onnx.float": "84fca7b511c54341",
        "onnx.qdq": "3c7cf0e7238c2e35",
        "onnx.matmulnbits": "d1401972e79f6400",
        "compressed_tensors": "daa92919f51078f2",
        "fpga.mem": "e208dd4dfce097a5",
        "fpga.rtl": "6259e5c56e7678b4",
        "fpga.hls": "2ba4277bd48d1282",
        "fpga.json": "f0594d948de8537c",
        "fpga.golden": "e878aac477cc14c8",
        "gpu.onnx": "6c15ceacf4d47114"
    },
    "chip_dependent": {
        "AMD EPYC / AVX512 / 2 threads / openblas SkylakeX": {
            "barber_wanda_gptq.weights": "03a40b0d1f74c1d6",
            "barber_wanda_gptq.quant_state": "83c0441512e0af36",
            "sparsegpt_lstsq_aptq.weights": "f46ea95c11380b85",
            "sparsegpt_lstsq_aptq.quant_state": "5a685a507338d5d5",
            "barber_sparsegpt.weights": "bd3de474c8e38844"
        },
        "AMD EPYC / AVX512 / 2 threads / openblas Haswell": {
            "barber_wanda_gptq.weights": "03a40b0d1f74c1d6",
            "barber_wanda_gptq.quant_state": "83c0441512e0af36",
            "sparsegpt_lstsq_aptq.weights": "d3b58103c3dc8d72",
            "sparsegpt_lstsq_aptq.quant_state": "1b389f09d08891b6",
            "barber_sparsegpt.weights": "1db00cef64c40d29"
        },
        "AMD EPYC / AVX512 / 1 threads / openblas Haswell": {
            "barber_wanda_gptq.weights": "03a40b0d1f74c1d6",
            "barber_wanda_gptq.quant_state": "83c0441512e0af36",
            "sparsegpt_lstsq_aptq.weights": "d3b58103c3dc8d72",
            "sparsegpt_lstsq_aptq.quant_state": "1b389f09d08891b6",
            "barber_sparsegpt.weights": "1db00cef64c40d29"
        },
        "AMD EPYC / AVX512 / 1 threads / openblas SkylakeX": {
            "barber_wanda_gptq.weights": "03a40b0d1f74c1d6",
            "barber_wanda_gptq.quant_state": "83c0441512e0af36",
            "sparsegpt_lstsq_aptq.weights": "f46ea95c11380b85",
            "sparsegpt_lstsq_aptq.quant_state": "5a685a507338d5d5",
            "barber_sparsegpt.weights": "bd3de474c8e38844"
        }
    }
}


def test_chip_independent_outputs_are_pinned(tmp_path):
    assert chip_independent(tmp_path) == PINS["chip_independent"]


def machine_key() -> str:
    """What float rounding of the calibrated methods depends on: the CPU, PyTorch's CPU kernels and threads,
    and the kernels scipy's BLAS picked (the same CPU name can get SkylakeX or Haswell kernels from OpenBLAS,
    and the inverse Hessian factor rounds differently under each)."""
    from toolchain.machine import machine_description

    m = machine_description()
    return f"{m['cpu']} / {m['cpu_capability']} / {m['threads']} threads / {m['blas']}"


def test_calibrated_outputs_are_pinned(tmp_path):
    expected = PINS["chip_dependent"].get(machine_key())
    if expected is None:
        pytest.skip(f"no pins recorded for {machine_key()} (recorded: {sorted(PINS['chip_dependent'])})")
    assert chip_dependent(tmp_path) == expected


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        result = {"chip_independent": chip_independent(Path(d) / "i"),
                  "chip_dependent": {machine_key(): chip_dependent(Path(d) / "d")}}
    print(json.dumps(result, indent=4))
