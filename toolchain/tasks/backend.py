"""`toolchain`, an lm-evaluation-harness model backend that is fast on a CPU.

It is lm-eval's `hf` backend (HFLM) with its two hot paths replaced: tokenization, the context/continuation
split, left truncation, stop-sequence handling and post-processing are inherited unchanged, so both backends
see the same tokens; only the forward passes are organised differently (scoring.py):
- log-likelihood requests that share a context (the choices of a multiple-choice item) run that context once
  and score all its continuations on its KV cache, several items per forward pass;
- generation is greedy with a KV cache, in batches, each row leaving the batch as soon as it stops; the
  prompts' common start (a few-shot prompt's examples) is computed once per task and shared by every batch.

`lm_eval --model toolchain --model_args pretrained=smollm2` works once this module is imported (it registers
the name); `toolchain eval --tasks` builds it around an already loaded model.
"""
from __future__ import annotations

import json

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm.auto import tqdm

from ..errors import ConfigError, ModelLoadError
from .scoring import BATCH_TOKENS, common_prefix_length, greedy_generate, prefix_cache, score_continuations

GEN_BATCH = 32  # prompts decoded together: a decoding step reads every weight once for the whole batch


@register_model("toolchain")
class ToolchainLM(HFLM):
    def __init__(self, pretrained="smollm2", loaded=None, batch_tokens: int = BATCH_TOKENS,
                 gen_batch_size: int = GEN_BATCH, **kwargs) -> None:
        """`pretrained`: a model spec as every toolchain command takes (`smollm2`, a GGUF file, a Hugging Face
        directory); or `loaded`: a `LoadedModel` already in memory."""
        if loaded is None:
            from ..models import load_model

            loaded = load_model(pretrained)
        if loaded.tokenizer is None:
            raise ModelLoadError("the model has no tokenizer; task evaluation tokenizes prompts and answers")
        kwargs.pop("batch_size", None)
        super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, backend="causal", batch_size=1,
                         **kwargs)
        self.batch_tokens = int(batch_tokens)
        self.gen_batch_size = int(gen_batch_size)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        pairs = []
        for _, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise ConfigError(f"a continuation of {len(continuation)} tokens exceeds the model's "
                                  f"{self.max_length}-token window")
            # Left truncation as the hf backend does it: keep the last max_length + 1 tokens of the pair.
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            pairs.append((whole[:len(whole) - len(continuation)], list(continuation)))
        with tqdm(total=len(pairs), disable=disable_tqdm or self.rank != 0, desc="loglikelihood") as bar:
            scores = score_continuations(self.model, pairs, self.batch_tokens, progress=bar.update)
        for (request, _, _), answer in zip(requests, scores):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return scores

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        eos_ids = {self.eot_token_id}
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos_ids.update(configured if isinstance(configured, (list, tuple)) else [configured] if configured is not None else [])
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="generate")
        for members in groups.values():
            kwargs = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
            if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0:
                raise ConfigError("the toolchain backend decodes greedily; this task asks for sampling")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = kwargs.pop("max_gen_toks")
            max_ctx = self.max_length - max_new
            if max_ctx <= 0:
                raise ConfigError(f"max_gen_toks {max_new} leaves no room for a prompt in the model's "
                                  f"{self.max_length}-token window")
            prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=max_ctx) for i in members}
            order = sorted(members, key=lambda i: -len(prompts[i]))
            # A few-shot task puts the same examples before every question: run them once for the task.
            shared = common_prefix_length([prompts[i] for i in order]) if len(order) > 1 else 0
            prefix = (shared, prefix_cache(self.model, prompts[order[0]][:shared])) if shared else None

            def stopped(ids: list[int]) -> bool:
                text = self.tok_decode(ids, skip_special_tokens=False)
                return any(s in text for s in until)

            for start in range(0, len(order), self.gen_batch_size):
                chunk = order[start:start + self.gen_batch_size]
                generated = greedy_generate(self.model, [prompts[i] for i in chunk], max_new, stopped,
                                            sorted(eos_ids), prefix)
                for i, ids in zip(chunk, generated):
                    text = postprocess_generated_text(self.tok_decode(ids), until, None)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]
