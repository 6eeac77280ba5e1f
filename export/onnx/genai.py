"""What onnxruntime-genai needs beside an exported decoder graph: `genai_config.json` and the tokenizer.

The config follows the schema that onnxruntime-genai's own model builder writes (`model.decoder` with the
graph's file, head counts and I/O name patterns; `search` with the generation defaults), so `og.Model(dir)`
loads the export as it is. `past_present_share_buffer` says whether the graph can fill one max-length KV
buffer in place (the fused form's GroupQueryAttention can; the plain form's Concat cache cannot).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ...atomic import atomic_file
from ...errors import ModelLoadError

CONFIG_NAME = "genai_config.json"
#: transformers model_type -> the onnxruntime-genai model type that runs it (decoder-only LLaMA-style models)
GENAI_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}


def genai_model_type(model_type: str) -> str | None:
    """The onnxruntime-genai model type for a transformers `model_type`, or None where it has none (OPT)."""
    return GENAI_MODEL_TYPES.get(model_type)


def special_token_ids(model_dir: str | os.PathLike, config: dict, tokenizer=None) -> dict:
    """bos/eos/pad token ids: generation_config.json first (it names a chat model's turn end), then
    config.json, then the tokenizer; as onnxruntime-genai's builder resolves them."""
    sources = []
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        sources.append(json.loads(gen.read_text()))
    sources.append(config)
    if tokenizer is not None:
        sources.append({k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    ids = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids[key] = next((s[key] for s in sources if s.get(key) is not None), None)
    if ids["eos_token_id"] is None:
        raise ModelLoadError(f"{model_dir}: no eos_token_id in generation_config.json, config.json or the "
                             f"tokenizer; onnxruntime-genai needs one to stop generating")
    if ids["bos_token_id"] is None:
        ids["bos_token_id"] = ids["eos_token_id"] if isinstance(ids["eos_token_id"], int) else ids["eos_token_id"][0]
    if ids["pad_token_id"] is None:
        ids["pad_token_id"] = ids["eos_token_id"] if isinstance(ids["eos_token_id"], int) else ids["eos_token_id"][0]
    return ids


def genai_config(config: dict, filename: str, layers: int, heads: int, kv_heads: int, head_dim: int,
                 tokens: dict, share_buffer: bool, threads: int | None = None) -> dict:
    """The genai_config.json of a decoder graph `filename` (beside the config) of a model with HF `config`."""
    context = int(config.get("max_position_embeddings") or 2048)
    session = {"log_id": "onnxruntime-genai", "provider_options": []}
    if threads:
        session["intra_op_num_threads"] = int(threads)
    return {
        "model": {
            "bos_token_id": tokens["bos_token_id"],
            "context_length": context,
            "decoder": {
                "session_options": session,
                "filename": filename,
                "head_size": head_dim,
                "hidden_size": int(config["hidden_size"]),
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": heads,
                "num_hidden_layers": layers,
                "num_key_value_heads": kv_heads,
            },
            "eos_token_id": tokens["eos_token_id"],
            "pad_token_id": tokens["pad_token_id"],
            "type": genai_model_type(config["model_type"]),
            "vocab_size": int(config["vocab_size"]),
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": share_buffer, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def write_genai_files(model_dir: str | os.PathLike, onnx_path: str | os.PathLike, kv_heads: list[int],
                      heads: list[int], head_dim: int, share_buffer: bool) -> dict:
    """Write genai_config.json and the tokenizer files beside `onnx_path`. Returns what was written, or why
    nothing was (a family onnxruntime-genai has no model type for, or layers with differing KV heads, which its
    one cache shape cannot hold)."""
    from transformers import AutoTokenizer

    model_dir, onnx_path = Path(model_dir), Path(onnx_path)
    config = json.loads((model_dir / "config.json").read_text())
    if genai_model_type(config.get("model_type", "")) is None:
        return {"written": False, "reason": f"onnxruntime-genai has no model type for {config.get('model_type')!r} "
                                            f"(it runs {', '.join(GENAI_MODEL_TYPES)})"}
    if len(set(kv_heads)) != 1:
        return {"written": False, "reason": f"layers differ in KV heads ({sorted(set(kv_heads))}); "
                                            f"onnxruntime-genai keeps one cache shape for every layer"}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception:
        tokenizer = None
    tokens = special_token_ids(model_dir, config, tokenizer)
    cfg = genai_config(config, onnx_path.name, len(kv_heads), max(heads), kv_heads[0], head_dim, tokens,
                       share_buffer)
    files = [onnx_path.with_name(CONFIG_NAME)]
    with atomic_file(files[0]) as tmp:
        tmp.write_text(json.dumps(cfg, indent=4) + "\n")
    if tokenizer is not None:
        # HF marks "no limit" as 1e30, which JSON writes as a huge decimal: the context length is the limit
        tokenizer.model_max_length = cfg["model"]["context_length"]
        files += [Path(f) for f in tokenizer.save_pretrained(onnx_path.parent) if Path(f).is_file()]
    return {"written": True, "config": str(files[0]), "tokenizer": tokenizer is not None,
            "past_present_share_buffer": share_buffer, "files": [str(f) for f in files]}
