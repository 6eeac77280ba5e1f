"""onnx-check: run an exported graph in onnxruntime against the PyTorch model it came from.

It compares the logits of a prefill on real tokens, then runs greedy generation through the KV cache in
both (the ONNX side feeds `present.*` back as `past_key_values.*`) and compares the tokens.
Exactness checks use `ORT_ENABLE_BASIC`: no fusions that reorder float arithmetic beyond constant folding.
"""
from __future__ import annotations

import inspect
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, ModelLoadError

#: |logit difference| allowed, relative to the largest |logit| of the PyTorch prefill (measured on the tiny
#: test models and SmolLM2: about 1e-6 for float and qdq, 1e-5 for MatMulNBits; see docs/export.md)
RTOL_LOGITS = 1e-4


def ort_session(path: str | os.PathLike, level: str = "basic", threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                     "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelLoadError(f"onnxruntime cannot load {path}: {exc}") from None


class OrtDecoder:
    """Prefill and decode steps through an exported graph's KV cache."""

    def __init__(self, session):
        self.session = session
        self.past_names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
        shape = {i.name: i.shape for i in session.get_inputs()}
        self.kv_shape = {n: (shape[n][1], shape[n][3]) for n in self.past_names}
        self.output_names = [o.name for o in session.get_outputs()]

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, heads, 0, dim), np.float32) for n, (heads, dim) in self.kv_shape.items()}

    def step(self, ids: np.ndarray, cache: dict[str, np.ndarray], past_len: int):
        batch, seq = ids.shape
        feed = {"input_ids": ids.astype(np.int64),
                "attention_mask": np.ones((batch, past_len + seq), np.int64),
                "position_ids": np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy(),
                **cache}
        out = dict(zip(self.output_names, self.session.run(self.output_names, feed)))
        cache = {n: out[n.replace("past_key_values.", "present.")] for n in self.past_names}
        return out["logits"], cache

    def greedy(self, ids: np.ndarray, new_tokens: int) -> tuple[list[int], np.ndarray]:
        logits, cache = self.step(ids, self.empty_cache(ids.shape[0]), 0)
        prefill = logits
        tokens, past = [], ids.shape[1]
        for _ in range(new_tokens):
            nxt = int(logits[0, -1].argmax())
            tokens.append(nxt)
            logits, cache = self.step(np.array([[nxt]]), cache, past)
            past += 1
        return tokens, prefill


def _cache_keyword(model) -> str:
    """transformers 5.x renames the forward's `past_key_values` to `cache`; older releases only know the former."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def time_decoder(decoder, prefill_tokens: int = 128, decode_steps: int = 32, repeats: int = 5) -> dict:
    """Latency of any decoder with `step(ids, cache, past)` / `empty_cache(batch)` (onnxruntime or TensorRT):
    median prefill of `prefill_tokens` over `repeats`, and the median of `decode_steps` greedy steps after it,
    batch 1, in milliseconds."""
    ids = (np.arange(prefill_tokens) % 1000 + 100)[None, :]
    prefill, logits, cache = [], None, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits, cache = decoder.step(ids, decoder.empty_cache(1), 0)
        prefill.append(time.perf_counter() - t0)
    steps, past = [], prefill_tokens
    for _ in range(decode_steps):
        nxt = np.array([[int(logits[0, -1].argmax())]])
        t0 = time.perf_counter()
        logits, cache = decoder.step(nxt, cache, past)
        steps.append(time.perf_counter() - t0)
        past += 1
    return {"prefill_ms": 1000 * float(np.median(prefill)), "decode_ms_per_token": 1000 * float(np.median(steps))}


@torch.no_grad()
def torch_greedy(model, ids: torch.Tensor, new_tokens: int) -> tuple[list[int], torch.Tensor]:
    keyword = _cache_keyword(model)
    out = model(input_ids=ids, use_cache=True)
    prefill, logits = out.logits, out.logits
    tokens = []
    for _ in range(new_tokens):
        nxt = int(logits[0, -1].argmax())
        tokens.append(nxt)
        cache = getattr(out, "cache", None) or out.past_key_values
        out = model(input_ids=torch.tensor([[nxt]]), use_cache=True, **{keyword: cache})
        logits = out.logits
    return tokens, prefill


def sample_tokens(loaded, n: int) -> torch.Tensor:
    """The first `n` tokens of the evaluation split of the default corpus (real text), [1, n]."""
    from ..data import pydoc_corpus, tokenize

    if loaded.tokenizer is None:
        raise ConfigError("the model directory has no tokenizer; onnx-check needs one to make real tokens")
    ids = tokenize(loaded.tokenizer, pydoc_corpus().eval_text[: 40 * n])
    if ids.numel() < n:
        raise ConfigError(f"only {ids.numel()} tokens of text available, asked for {n}")
    return ids[:n][None, :]


def check_onnx(model_dir: str | os.PathLike, onnx_path: str | os.PathLike, tokens: int = 64, new_tokens: int = 16,
               rtol: float = RTOL_LOGITS) -> dict:
    """Compare `onnx_path` with the PyTorch model in `model_dir`; the result says `ok` and why."""
    from ..models import load_model

    if not Path(onnx_path).is_file():
        raise ModelLoadError(f"{onnx_path} does not exist")
    if tokens < 1 or new_tokens < 0:
        raise ConfigError(f"--tokens must be >= 1 and --new-tokens >= 0 (got {tokens}, {new_tokens})")
    loaded = load_model(str(model_dir))
    ids = sample_tokens(loaded, tokens)
    session = ort_session(onnx_path, "basic")
    t0 = time.perf_counter()
    ort_tokens, ort_prefill = OrtDecoder(session).greedy(ids.numpy(), new_tokens)
    ort_seconds = time.perf_counter() - t0
    torch_tokens, torch_prefill = torch_greedy(loaded.model, ids, new_tokens)
    ref = torch_prefill.float().numpy()
    diff = float(np.abs(ort_prefill - ref).max())
    scale = float(np.abs(ref).max())
    agree = int(np.mean(ort_prefill.argmax(-1) == ref.argmax(-1)) * 10_000) / 10_000
    ok_logits = diff <= rtol * max(scale, 1.0)
    matched = sum(1 for a, b in zip(ort_tokens, torch_tokens) if a == b)
    return {"onnx": str(onnx_path), "model": str(model_dir), "prompt_tokens": tokens,
            "max_abs_logit_diff": diff, "max_abs_logit": scale, "relative_diff": diff / max(scale, 1.0),
            "rtol": rtol, "argmax_agreement": agree, "logits_ok": ok_logits,
            "onnx_tokens": ort_tokens, "torch_tokens": torch_tokens, "tokens_matched": matched,
            "tokens_ok": ort_tokens == torch_tokens, "ok": ok_logits and ort_tokens == torch_tokens,
            "onnx_seconds": round(ort_seconds, 3),
            "text": loaded.tokenizer.decode(ort_tokens) if loaded.tokenizer is not None else None}
