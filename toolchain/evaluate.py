"""Perplexity on non-overlapping windows of an evaluation split."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import DATASETS, eval_windows, get_corpus, model_max_seqlen, tokenize
from .errors import DataError

TOKENS_PER_BATCH = 4096  # windows per forward: this many tokens...
LOGITS_PER_BATCH = 1 << 28  # ...and at most this many logits, so a large vocabulary (Qwen's 152K) runs one at a time


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, device: torch.device | str = "cpu", progress: bool = True) -> float:
    model.to(device)
    vocab = model.get_output_embeddings().weight.shape[0]
    batch = max(1, min(TOKENS_PER_BATCH // windows.shape[1], LOGITS_PER_BATCH // (windows.shape[1] * vocab)))
    nll, count = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch), desc="eval", disable=not progress, leave=False):
        ids = windows[start:start + batch].to(device)
        logits = model(ids, use_cache=False).logits.float()
        nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                     reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


def evaluate(loaded, seqlen: int = 2048, datasets: tuple[str, ...] = DATASETS, device="cpu",
             max_windows: int | None = None, progress: bool = True) -> dict:
    """Perplexity per dataset. pydoc is always available; the others are skipped with a reason if missing."""
    seqlen = min(seqlen, model_max_seqlen(loaded.model))
    results: dict = {"seqlen": seqlen, "perplexity": {}, "tokens": {}, "unavailable": {}}
    for name in datasets:
        try:
            corpus = get_corpus(dataset=name)
        except DataError as exc:
            results["unavailable"][name] = str(exc)
            continue
        windows = eval_windows(tokenize(loaded.tokenizer, corpus.eval_text), seqlen, max_windows)
        results["perplexity"][name] = perplexity(loaded.model, windows, device=device, progress=progress)
        results["tokens"][name] = int(windows.numel())
    return results
