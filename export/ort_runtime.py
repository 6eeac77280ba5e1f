"""Running an exported decoder graph in onnxruntime: sessions, prefill and decode steps through its KV cache
(feeding `present.*` back as `past_key_values.*`), greedy generation, and latency timing."""
from __future__ import annotations

import os
import time

import numpy as np

from ..errors import ModelLoadError


def ort_session(path: str | os.PathLike, level: str = "basic", threads: int | None = None):
    """A CPU session of the graph at `path`. `basic` allows no fusions that reorder float arithmetic beyond
    constant folding (exactness checks); `all` allows every fusion (timing)."""
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


def genai_available() -> bool:
    """Whether onnxruntime-genai (the optional `genai` extra) is installed."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def genai_greedy(model_dir: str | os.PathLike, ids: np.ndarray, new_tokens: int, model=None) -> list[int]:
    """Greedy tokens after the prompt `ids` [1, S] from onnxruntime-genai running the export in `model_dir`
    (its genai_config.json) as it is; generation stops early at an EOS token, as the runtime does. `model`: an
    already loaded `og.Model` of that directory."""
    import onnxruntime_genai as og

    if model is None:
        try:
            model = og.Model(str(model_dir))
        except Exception as exc:
            raise ModelLoadError(f"onnxruntime-genai cannot load {model_dir}: {exc}") from None
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=int(ids.shape[1]) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(ids, dtype=np.int32))
    tokens: list[int] = []
    while not generator.is_done() and len(tokens) < new_tokens:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens
