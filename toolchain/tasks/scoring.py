"""The two batched kernels of the evaluation backend, plain torch over a causal LM.

- `score_continuations`: the log-likelihood of each continuation given its context. A multiple-choice item
  asks for one context with several continuations; the context is run once (its key/value cache kept) and all
  its continuations are scored on top of that cache; contexts that differ only near their end (WinoGrande) run
  their common start once the same way. Several items share one context pass: their contexts are
  right-padded into one batch; the continuations then run in chunks of similar length (so little of a pass is
  padding), each on a copy of its contexts' cache rows, masking the contexts' padding out.
- `greedy_generate`: greedy decoding of a batch of prompts with a KV cache; a row leaves the batch when it
  emits an end token or its stop check fires, so finished rows cost nothing. The prompts' common start (a
  few-shot task's examples) can run once for a whole task (`prefix_cache`) and be shared by every batch.

Both take token ids and give token ids or numbers; tokenization, truncation and stop strings are the caller's.
"""
from __future__ import annotations

import copy
import inspect
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

# Bounds one context pass: rows x (context + longest continuation) tokens.
BATCH_TOKENS = 8192
# Bounds one continuation pass by its logits, rows x length x vocabulary float32 values (and as many again for
# their log-softmax): 2^26 is 256 MB, 1,365 tokens at a 49k vocabulary, 444 at Qwen's 151k.
LOGIT_VALUES = 1 << 26


def _forward_kwargs(model) -> dict:
    """Ask for the last position's logits only where the model supports it (a context pass needs none)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache`; use the name this version's forward takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output):
    return output["cache"] if "cache" in output else output["past_key_values"]


def _pad(rows: Sequence[Sequence[int]], width: int, value: int = 0) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    return out


def _select_rows(cache, index: torch.Tensor) -> None:
    """Keep (or repeat) the cache's batch rows `index`, in place."""
    cache.reorder_cache(index)


def _rows_of(cache, index: torch.Tensor):
    """A cache holding `cache`'s batch rows `index` (repeats allowed), leaving `cache` as it was: each layer's
    reorder assigns new tensors, so shallow copies of the cache and its layers suffice."""
    if hasattr(cache, "layers"):
        rows = copy.copy(cache)
        rows.layers = [copy.copy(layer) for layer in cache.layers]
    else:
        rows = copy.deepcopy(cache)
    rows.reorder_cache(index)
    return rows


def _length_chunks(lengths: list[int], budget: int, slack: float = 0.1, min_slack: int = 64) -> list[list[int]]:
    """Positions of `lengths` cut into chunks of similar length (ascending), so that padding each chunk to its
    longest row wastes at most `slack` of its tokens (or `min_slack` tokens) and a chunk fits `budget` tokens.
    The continuations of a multiple-choice batch range from 1 to tens of tokens; padded to the longest, most of
    the pass would be padding."""
    order = sorted(range(len(lengths)), key=lambda k: lengths[k])
    chunks: list[list[int]] = []
    current: list[int] = []
    used = 0
    for k in order:
        n, width = len(current) + 1, lengths[k]
        if current and (n * width > budget or n * width - (used + width) > max(min_slack, slack * n * width)):
            chunks.append(current)
            current, used = [], 0
        current.append(k)
        used += lengths[k]
    if current:
        chunks.append(current)
    return chunks


def _shared_stems(contexts: list[tuple[int, ...]], share: float = 0.5) -> list[tuple[tuple[int, ...], list[int]]]:
    """(stem, the requests that run on it) groups: requests with the same context share all of it but its last
    token; contexts that differ only near their end (WinoGrande puts each option into the same sentence) share
    their common start when it is at least `share` of every member's context. In sorted order contexts with a
    common start are neighbours, so one pass over them finds the groups."""
    order = sorted(range(len(contexts)), key=lambda k: contexts[k])
    groups: list[tuple[int, list[int]]] = []   # (stem length, members); the stem is a prefix of every member
    for k in order:
        ctx = contexts[k]
        if groups:
            stem_len, members = groups[-1]
            first = contexts[members[0]]
            n = 0
            limit = min(stem_len, len(ctx) - 1)
            while n < limit and ctx[n] == first[n]:
                n += 1
            shortest = min(len(ctx), min(len(contexts[m]) for m in members))
            if n > 0 and n >= share * shortest:
                groups[-1] = (n, [*members, k])
                continue
        groups.append((len(ctx) - 1, [k]))
    return [(contexts[members[0]][:stem_len], members) for stem_len, members in groups]


def _group_batches(groups: list[tuple[tuple[int, ...], list[int]]], cont_len: dict[int, int],
                   budget: int) -> list[list[int]]:
    """Consecutive groups (sorted longest context first) whose passes fit the token budget."""
    batches, current, rows, width_ctx, width_cont = [], [], 0, 0, 0
    for g, (ctx, members) in enumerate(groups):
        longest = max(cont_len[i] for i in members)
        w_ctx, w_cont, n = max(width_ctx, len(ctx)), max(width_cont, longest), rows + len(members)
        if current and (n * (w_ctx + w_cont) > budget or (len(current) + 1) * w_ctx > budget):
            batches.append(current)
            current, w_ctx, w_cont, n = [], len(ctx), longest, len(members)
        current.append(g)
        rows, width_ctx, width_cont = n, w_ctx, w_cont
    if current:
        batches.append(current)
    return batches


@torch.inference_mode()
def score_continuations(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                        batch_tokens: int = BATCH_TOKENS, logit_values: int = LOGIT_VALUES,
                        progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether every continuation token is the argmax) per request.

    Each request is (context ids, continuation ids), both non-empty. The model sees context + continuation[:-1]
    and is scored on the continuation, as lm-eval's `hf` backend does; requests whose contexts share their start
    (`_shared_stems`) run it once.
    """
    device = next(model.parameters()).device
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ValueError(f"request {i}: context and continuation must be non-empty")
    # Each group's stem runs once; a member's row is the rest of its context, then its continuation but the
    # last token. The stem leaves every context at least its last token, whose logits score the first
    # continuation token.
    groups = sorted(_shared_stems([tuple(ctx) for ctx, _ in requests]), key=lambda g: -len(g[0]))
    rows_in, offset = {}, {}
    for stem, members in groups:
        for i in members:
            ctx, cont = requests[i]
            rows_in[i] = (*ctx[len(stem):], *cont[:-1])
            offset[i] = len(ctx) - len(stem) - 1
    targets = {i: tuple(cont) for i, (_, cont) in enumerate(requests)}
    extra = _forward_kwargs(model)
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    cont_tokens = max(1, logit_values // model.config.vocab_size)

    for batch in _group_batches(groups, {i: len(r) for i, r in rows_in.items()}, batch_tokens):
        prefixes = [groups[g][0] for g in batch]
        members = [(slot, i) for slot, g in enumerate(batch) for i in groups[g][1]]
        width_ctx = max(len(p) for p in prefixes)
        prefix_len = torch.tensor([len(p) for p in prefixes], device=device)
        cache = None
        if width_ctx > 0:
            # Right padding keeps every real context position exact under the causal mask; the padded cache
            # slots are masked out of the continuation passes below.
            cache = _cache_of(model(_pad(prefixes, width_ctx).to(device), use_cache=True, **extra))
            ctx_mask = (torch.arange(width_ctx, device=device)[None, :] < prefix_len[:, None]).long()
        # The continuations run in chunks of similar length on copies of the contexts' cache rows.
        for chunk in _length_chunks([len(rows_in[i]) for _, i in members], cont_tokens):
            rows = [members[k] for k in chunk]
            cont_ids = _pad([rows_in[i] for _, i in rows], max(len(rows_in[i]) for _, i in rows)).to(device)
            slots = torch.tensor([slot for slot, _ in rows], device=device)
            kwargs: dict = {"position_ids": prefix_len[slots, None] + torch.arange(cont_ids.shape[1], device=device)}
            if cache is not None:
                kwargs[_cache_kwarg(model)] = _rows_of(cache, slots)
                kwargs["attention_mask"] = torch.cat([ctx_mask[slots], torch.ones_like(cont_ids)], dim=1)
            logits = model(cont_ids, use_cache=cache is not None, **kwargs).logits
            logprobs = F.log_softmax(logits.float(), dim=-1)
            for row, (_, i) in enumerate(rows):
                target = torch.tensor(targets[i], device=device)
                lp = logprobs[row, offset[i]:offset[i] + len(target)]
                out[i] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
            del logits, logprobs
        if progress is not None:
            progress(len(members))
    return out  # type: ignore[return-value]


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every prompt shares, leaving each prompt at least its last token (whose logits
    give the first generated token)."""
    first, length = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        n = 0
        while n < length and p[n] == first[n]:
            n += 1
        length = n
    return max(length, 0)


@torch.inference_mode()
def prefix_cache(model, prefix: Sequence[int]):
    """The key/value cache of `prefix` (one row), to be shared by every prompt that starts with it: a few-shot
    prompt repeats the same examples before each question, so they are computed once for the whole task."""
    device = next(model.parameters()).device
    ids = torch.as_tensor([list(prefix)], dtype=torch.long, device=device)
    return _cache_of(model(ids, use_cache=True, **_forward_kwargs(model)))


@torch.inference_mode()
def greedy_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    stop: Callable[[list[int]], bool] | None = None,
                    eos_ids: Sequence[int] = (), prefix: tuple[int, object] | None = None) -> list[list[int]]:
    """Greedy continuations of a batch of prompts (token ids), with a KV cache.

    `prefix` (length, cache from `prefix_cache`): every prompt starts with those `length` tokens, which are not
    run again; each row starts from a copy of that cache and only its own tokens are computed. The rest of each
    prompt is left-padded after the prefix; positions count real tokens only. A row is finished when it emits
    a token of `eos_ids` (kept in its output), when `stop(generated ids)` is true, or after `max_new_tokens`;
    finished rows are dropped from the cache.
    """
    device = next(model.parameters()).device
    shared, shared_cache = prefix if prefix is not None else (0, None)
    own = [list(p)[shared:] for p in prompts]
    if not all(own):
        raise ValueError(f"every prompt needs a token after the {shared}-token shared prefix")
    width = max(len(p) for p in own)
    ids = torch.zeros((len(own), width), dtype=torch.long)
    mask = torch.zeros((len(own), width), dtype=torch.long)
    for r, p in enumerate(own):
        ids[r, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs: dict = {}
    if shared_cache is not None:
        kwargs[_cache_kwarg(model)] = _rows_of(shared_cache, torch.zeros(len(own), dtype=torch.long, device=device))
        mask = torch.cat([torch.ones((len(own), shared), dtype=torch.long, device=device), mask], dim=1)
    out = model(ids, attention_mask=mask, position_ids=positions, use_cache=True, **_forward_kwargs(model), **kwargs)
    cache, next_pos = _cache_of(out), positions[:, -1] + 1
    generated: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    eos = set(int(e) for e in eos_ids)
    logits = out.logits[:, -1]
    for step in range(max_new_tokens):
        tokens = logits.argmax(-1)
        keep = []
        for row, r in enumerate(active):
            token = int(tokens[row])
            generated[r].append(token)
            if token not in eos and not (stop is not None and stop(generated[r])):
                keep.append(row)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, device=device)
            _select_rows(cache, index)
            mask, next_pos, tokens = mask[index], next_pos[index], tokens[index]
            active = [active[row] for row in keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(tokens[:, None], attention_mask=mask, position_ids=next_pos[:, None], use_cache=True,
                    **{_cache_kwarg(model): cache})
        cache, next_pos, logits = _cache_of(out), next_pos + 1, out.logits[:, -1]
    return generated
