"""`toolchain gpu-run BUNDLE`: greedy generation through the bundle's KV cache, with tokens/s.

This release runs the graph with onnxruntime (CUDA provider when onnxruntime-gpu and a GPU are present, else
the CPU); a built model.plan is reported but not yet executed here."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ..errors import ConfigError


def gpu_run(bundle: str | os.PathLike, prompt: str, max_new_tokens: int = 32) -> dict:
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from ..export.onnx_check import OrtDecoder

    bundle = Path(bundle)
    if not (bundle / "model.onnx").is_file():
        raise ConfigError(f"{bundle} has no model.onnx; write a bundle with toolchain export --target gpu")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(bundle))
    except Exception as exc:
        raise ConfigError(f"cannot load the bundle's tokenizer: {exc}") from None
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(bundle / "model.onnx"), opts, providers=providers)
    decoder = OrtDecoder(session)
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
    return {"backend": f"onnxruntime ({session.get_providers()[0]})", "prompt_tokens": int(ids.shape[1]),
            "new_tokens": len(tokens), "text": tokenizer.decode(tokens), "prefill_s": round(prefill, 4),
            "decode_tokens_per_s": round(len(tokens) / decode, 2) if decode > 0 else None,
            "engine_built": (bundle / "model.plan").is_file()}


def ort_perplexity(onnx_path: str | os.PathLike, windows: np.ndarray, level: str = "basic") -> float:
    """Perplexity of a bundle's graph on token windows [n, seqlen] (each a fresh prefill), in onnxruntime."""
    from ..export.onnx_check import OrtDecoder, ort_session

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
