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


def _batch(windows: torch.Tensor, vocab: int) -> int:
    return max(1, min(TOKENS_PER_BATCH // windows.shape[1], LOGITS_PER_BATCH // (windows.shape[1] * vocab)))


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, device: torch.device | str = "cpu", progress: bool = True) -> float:
    model.to(device)
    vocab = model.get_output_embeddings().weight.shape[0]
    batch = _batch(windows, vocab)
    nll, count = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch), desc="eval", disable=not progress, leave=False):
        ids = windows[start:start + batch].to(device)
        logits = model(ids, use_cache=False).logits.float()
        nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                     reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


@torch.inference_mode()
def perplexity_streamed(stream, windows: torch.Tensor, device: torch.device | str = "cpu",
                        progress: bool = True) -> float:
    """`perplexity` through a `StreamingCheckpoint` (its model on `meta` but for what lies outside the decoder
    layers): every window through decoder layer 0, then layer 1, ..., each layer read from the checkpoint when
    the walk reaches it and freed after (`LayerEngine.walk`), then the final norm, the output projection and the
    LM head, in the same batches of windows as `perplexity`. Holds one layer and two [N, T, d] float32
    activation buffers; the result is `perplexity`'s up to floating-point order (the layers run on the batches
    the in-memory forward uses)."""
    from .engine import LayerEngine

    model, layout = stream.model, stream.adapter.layout
    if layout is None:
        raise DataError(f"streamed perplexity needs the {stream.adapter.family} family's decoder layout; "
                        f"use --no-streaming")
    head = model.get_output_embeddings()
    batch = _batch(windows, head.weight.shape[0])
    engine = LayerEngine(model, stream.adapter, windows, batch_size=batch, device=device, stream=stream)
    last: dict[str, torch.Tensor] = {}

    def run_layer(i, layer, hidden):
        last["hidden"] = engine.forward_layer(layer, hidden)
        return {}, last["hidden"]

    engine.walk(run_layer, desc="eval", progress=progress)
    tail = [m for m in (_module(model, layout.final_norm), _module(model, layout.project_out), head) if m is not None]
    for module in tail:
        module.to(device)
    nll, count = 0.0, 0
    for s in engine.batches():
        x = last["hidden"][s]
        for module in tail:
            x = module(x)
        logits, ids = x.float(), windows[s].to(device)
        nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                     reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


def _module(model, path: str | None):
    """The module at `path`, or None where the layout has none or the model holds None there."""
    if path is None:
        return None
    for part in path.split("."):
        model = getattr(model, part, None)
        if model is None:
            return None
    return model


def evaluate(loaded, seqlen: int = 2048, datasets: tuple[str, ...] = DATASETS, device="cpu",
             max_windows: int | None = None, progress: bool = True, stream=None) -> dict:
    """Perplexity per dataset. pydoc is always available; the others are skipped with a reason if missing.
    `stream` (a `StreamingCheckpoint` of `loaded`'s model): each split is evaluated layer by layer
    (`perplexity_streamed`)."""
    seqlen = min(seqlen, model_max_seqlen(loaded.model))
    results: dict = {"seqlen": seqlen, "perplexity": {}, "tokens": {}, "unavailable": {}}
    for name in datasets:
        try:
            corpus = get_corpus(dataset=name)
        except DataError as exc:
            results["unavailable"][name] = str(exc)
            continue
        windows = eval_windows(tokenize(loaded.tokenizer, corpus.eval_text), seqlen, max_windows)
        results["perplexity"][name] = (perplexity_streamed(stream, windows, device, progress) if stream is not None
                                       else perplexity(loaded.model, windows, device=device, progress=progress))
        results["tokens"][name] = int(windows.numel())
    return results
