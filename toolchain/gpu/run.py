"""`toolchain gpu-run BUNDLE`: greedy generation through the bundle's KV cache, with tokens/s.

One generation loop drives every backend through the same `step(ids, cache, past)`. `auto` picks the TensorRT
engine (`model.plan`) when it is built, TensorRT imports and a CUDA device is present, else onnxruntime on the
bundle's `model.onnx` (its CUDA provider when available, else the CPU). `torch`, only when asked for, runs the
model the bundle was exported from in fp16 on CUDA, its 2:4 linears as PyTorch semi-structured sparse weights."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ..errors import ConfigError

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")


class TrtDecoder:
    """Prefill/decode steps through a TensorRT engine (TensorRT 10/11 tensor API), with device buffers from
    torch. Written for a GPU machine; this project's CI has none, so it is exercised there only."""

    def __init__(self, plan: Path):
        import tensorrt as trt
        import torch

        self.torch, self.trt = torch, trt
        logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(logger).deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise ConfigError(f"TensorRT could not load {plan} (built with another TensorRT or GPU?); rebuild it "
                              f"with build_engine.py")
        self.engine, self.context = engine, engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.kv_shape = {n: (engine.get_tensor_shape(n)[1], engine.get_tensor_shape(n)[3]) for n in self.past_names}
        self.stream = torch.cuda.Stream()

    def empty_cache(self, batch: int) -> dict:
        return {n: self.torch.zeros((batch, h, 0, d), dtype=self.torch.float32, device="cuda")
                for n, (h, d) in self.kv_shape.items()}

    def step(self, ids: np.ndarray, cache: dict, past_len: int):
        torch = self.torch
        batch, seq = ids.shape
        feed = {"input_ids": torch.from_numpy(ids.astype(np.int64)).cuda(),
                "attention_mask": torch.ones((batch, past_len + seq), dtype=torch.int64, device="cuda"),
                "position_ids": torch.arange(past_len, past_len + seq, device="cuda").expand(batch, seq).contiguous(),
                **cache}
        for name in self.inputs:
            self.context.set_input_shape(name, tuple(feed[name].shape))
            self.context.set_tensor_address(name, feed[name].data_ptr())
        out = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            out[name] = torch.empty(shape, dtype=torch.float32, device="cuda")
            self.context.set_tensor_address(name, out[name].data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise ConfigError("TensorRT failed to run the engine")
        self.stream.synchronize()
        cache = {n: out[n.replace("past_key_values.", "present.")] for n in self.past_names}
        return out["logits"].cpu().numpy(), cache


class TorchDecoder:
    """Prefill/decode steps through a transformers model on CUDA (the bundle's source model with
    semi-structured sparse weights); the cache is the model's own key/value cache object."""

    def __init__(self, model, device):
        import inspect

        self.model, self.device = model, device
        # transformers 5.x renames the forward's `past_key_values` to `cache`; older releases only know the former
        self.cache_keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def empty_cache(self, batch: int):
        return None

    def step(self, ids: np.ndarray, cache, past_len: int):
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(ids.astype(np.int64)).to(self.device), use_cache=True,
                             **{self.cache_keyword: cache})
        return out.logits.float().cpu().numpy(), getattr(out, "cache", None) or out.past_key_values


def check_torch_backend(bundle: Path) -> Path:
    """The source model `--backend torch` would load, once this PyTorch and machine can run semi-structured
    kernels and the source is still the exported one; a ConfigError naming why not otherwise. Loads nothing."""
    from .bundle import bundle_source
    from .semi_structured import semi_structured_unavailable

    why = semi_structured_unavailable()
    if why is not None:
        raise ConfigError(f"--backend torch: {why}. Use --backend onnxruntime, which runs the bundle's graph "
                          f"anywhere (CPU included)")
    try:
        return bundle_source(bundle)
    except ConfigError as exc:
        raise ConfigError(f"--backend torch runs the model the bundle was exported from: {exc}; or use "
                          f"--backend onnxruntime, which runs the bundle's own graph") from None


def torch_decoder(source: Path):
    """(decoder, description): the source model in fp16 on CUDA with its 2:4 linears swapped."""
    import torch

    from ..models import load_model
    from .semi_structured import swap_to_semi_structured

    model = load_model(str(source), with_tokenizer=False).model.eval()
    report = swap_to_semi_structured(model, torch.float16)
    swapped = report["sparse"] + report["padded"]
    description = (f"torch ({report['backend']} semi-structured, fp16, {torch.cuda.get_device_name(report['device'])}:"
                   f" {swapped} of {len(report['layers'])} linears 2:4 sparse)")
    return TorchDecoder(model, torch.device(report["device"])), description


def choose_backend(bundle: Path, backend: str = "auto"):
    """(decoder, description): `torch` when asked for; else TensorRT when asked or available with a built engine
    and CUDA, else onnxruntime."""
    import importlib.util

    plan = bundle / "model.plan"
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r}: choose {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}")
    if backend == "torch":
        return torch_decoder(check_torch_backend(bundle))
    trt_ready, why = False, None
    if not plan.is_file():
        why = "no model.plan (run build_engine.py on a GPU machine)"
    elif importlib.util.find_spec("tensorrt") is None:
        why = "the tensorrt package is not installed (pip install 'toolchain[gpu]')"
    else:
        import torch

        trt_ready = torch.cuda.is_available()
        why = None if trt_ready else "no CUDA device"
    if backend == "tensorrt" and not trt_ready:
        raise ConfigError(f"--backend tensorrt: {why}")
    if trt_ready and backend != "onnxruntime":
        return TrtDecoder(plan), "tensorrt (model.plan)"
    import onnxruntime as ort

    from ..export.ort_runtime import OrtDecoder

    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(bundle / "model.onnx"), opts, providers=providers)
    note = f"; TensorRT not used: {why}" if why and backend == "auto" else ""
    return OrtDecoder(session), f"onnxruntime ({session.get_providers()[0]}){note}"


def gpu_run(bundle: str | os.PathLike, prompt: str, max_new_tokens: int = 32, backend: str = "auto") -> dict:
    from transformers import AutoTokenizer

    bundle = Path(bundle)
    if not (bundle / "model.onnx").is_file():
        raise ConfigError(f"{bundle} has no model.onnx; write a bundle with toolchain export --target gpu")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    # refuse before the tokenizer and the model are loaded
    torch_source = check_torch_backend(bundle) if backend == "torch" else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(bundle))
    except Exception as exc:
        raise ConfigError(f"cannot load the bundle's tokenizer: {exc}") from None
    if torch_source is not None:
        decoder, description = torch_decoder(torch_source)
    else:
        decoder, description = choose_backend(bundle, backend)
    ids = np.array([tokenizer(prompt, add_special_tokens=False).input_ids], dtype=np.int64)
    if ids.shape[1] == 0:
        raise ConfigError("the prompt is empty after tokenization")
    t0 = time.perf_counter()
    logits, cache = decoder.step(ids, decoder.empty_cache(1), 0)
    prefill = time.perf_counter() - t0
    tokens, past = [], ids.shape[1]
    t1 = time.perf_counter()
    for _ in range(max_new_tokens):
        nxt = int(logits[0, -1].argmax())
        tokens.append(nxt)
        if nxt == tokenizer.eos_token_id:
            break
        logits, cache = decoder.step(np.array([[nxt]]), cache, past)
        past += 1
    decode = time.perf_counter() - t1
    return {"backend": description, "prompt_tokens": int(ids.shape[1]), "new_tokens": len(tokens),
            "text": tokenizer.decode(tokens), "prefill_s": round(prefill, 4),
            "decode_tokens_per_s": round(len(tokens) / decode, 2) if decode > 0 else None}


def build_engines(bundle: Path) -> dict[str, Path]:
    """The bundle's sparse engine (model.plan) and its dense twin (model.dense.plan), built with the bundle's own
    build_engine.py where missing."""
    import subprocess
    import sys

    plans = {"sparse": bundle / "model.plan", "dense": bundle / "model.dense.plan"}
    for kind, plan in plans.items():
        if not plan.is_file():
            cmd = [sys.executable, str(bundle / "build_engine.py"), *(["--dense"] if kind == "dense" else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise ConfigError(f"building the {kind} engine failed: {proc.stderr.strip()[-1500:]}")
    return plans


def time_engine(plan: Path, prefill_tokens: int = 128, decode_steps: int = 32, repeats: int = 5) -> dict:
    """Median prefill time of `prefill_tokens` and median decode step after it, batch 1, in TensorRT."""
    from ..export.ort_runtime import time_decoder

    t = time_decoder(TrtDecoder(plan), prefill_tokens, decode_steps, repeats)
    return {key: round(value, 3) for key, value in t.items()}


def engine_timings(bundle: str | os.PathLike) -> dict:
    """Dense against sparse TensorRT engines of one bundle, end to end (measured; needs CUDA and TensorRT)."""
    plans = build_engines(Path(bundle))
    timings = {kind: time_engine(plan) for kind, plan in plans.items()}
    timings["sparse_speedup"] = {
        key: round(timings["dense"][key] / timings["sparse"][key], 3) for key in ("prefill_ms", "decode_ms_per_token")}
    return timings


def ort_perplexity(onnx_path: str | os.PathLike, windows: np.ndarray, level: str = "basic") -> float:
    """Perplexity of a bundle's graph on token windows [n, seqlen] (each a fresh prefill), in onnxruntime."""
    from ..export.ort_runtime import OrtDecoder, ort_session

    decoder = OrtDecoder(ort_session(onnx_path, level))
    nll, count = 0.0, 0
    for window in np.asarray(windows, dtype=np.int64):
        logits, _ = decoder.step(window[None, :], decoder.empty_cache(1), 0)
        logits = logits[0, :-1].astype(np.float64)
        target = window[1:]
        top = logits.max(axis=-1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0]
        nll += float((logz - logits[np.arange(target.size), target]).sum())
        count += target.size
    return float(np.exp(nll / count))
