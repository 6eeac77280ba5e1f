"""onnx-check: run an exported graph in onnxruntime against the PyTorch model it came from.

It compares the logits of a prefill on real tokens, then runs greedy generation through the KV cache in
both (the ONNX side feeds `present.*` back as `past_key_values.*`) and compares the tokens.
Exactness checks use `ORT_ENABLE_BASIC`: no fusions that reorder float arithmetic beyond constant folding.
Where onnxruntime-genai is installed (the `genai` extra) and a genai_config.json beside the graph names it,
the same prompt is also generated through onnxruntime-genai, as the runtime runs the export out of the box.
"""
from __future__ import annotations

import inspect
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..data import sample_tokens
from ..errors import ConfigError, ModelLoadError
from .ort_runtime import OrtDecoder, genai_available, genai_greedy, ort_session

#: |logit difference| allowed, relative to the largest |logit| of the PyTorch prefill: loose enough for
#: MatMulNBits' reordered float sums, tight enough that a wrong weight or layout fails (docs/export.md)
RTOL_LOGITS = 1e-4


def _cache_keyword(model) -> str:
    """transformers 5.x renames the forward's `past_key_values` to `cache`; older releases only know the former."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


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
    genai = genai_check(onnx_path, ids.numpy(), torch_tokens)
    return {"onnx": str(onnx_path), "model": str(model_dir), "prompt_tokens": tokens,
            "max_abs_logit_diff": diff, "max_abs_logit": scale, "relative_diff": diff / max(scale, 1.0),
            "rtol": rtol, "argmax_agreement": agree, "logits_ok": ok_logits,
            "onnx_tokens": ort_tokens, "torch_tokens": torch_tokens, "tokens_matched": matched,
            "tokens_ok": ort_tokens == torch_tokens, "genai": genai,
            "ok": ok_logits and ort_tokens == torch_tokens and genai.get("tokens_ok", True),
            "onnx_seconds": round(ort_seconds, 3),
            "text": loaded.tokenizer.decode(ort_tokens) if loaded.tokenizer is not None else None}


def genai_check(onnx_path: str | os.PathLike, ids: np.ndarray, torch_tokens: list[int]) -> dict:
    """Greedy generation through onnxruntime-genai from the directory of `onnx_path`, compared with PyTorch's
    tokens (up to an EOS the runtime stopped at). Skipped, with the reason, where the package is absent or no
    genai_config.json beside the graph names it."""
    import json

    config = Path(onnx_path).with_name("genai_config.json")
    if not genai_available():
        return {"skipped": "onnxruntime-genai is not installed (pip install 'toolchain[genai]')"}
    if not config.is_file():
        return {"skipped": f"no genai_config.json beside {onnx_path}"}
    decoder = json.loads(config.read_text())["model"]["decoder"]
    if decoder.get("filename") != Path(onnx_path).name:
        return {"skipped": f"genai_config.json names {decoder.get('filename')}, not {Path(onnx_path).name}"}
    tokens = genai_greedy(config.parent, ids, len(torch_tokens))
    matched = sum(1 for a, b in zip(tokens, torch_tokens) if a == b)
    return {"tokens": tokens, "tokens_matched": matched, "stopped_at_eos": len(tokens) < len(torch_tokens),
            "tokens_ok": len(tokens) > 0 and tokens == torch_tokens[:len(tokens)]}
