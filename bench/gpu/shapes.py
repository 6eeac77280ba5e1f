"""The distinct linear shapes of a model's decoder, from the loaded model or a LLaMA-family config."""
from __future__ import annotations

from pathlib import Path

from toolchain.errors import ConfigError, ToolchainError


def _llama_config_shapes(config) -> list[tuple[str, str, int, int]]:
    """(block, linear name, N, K) of one LLaMA-family decoder layer from its transformers config."""
    hidden, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return [("attn", "self_attn.q_proj", heads * head_dim, hidden),
            ("attn", "self_attn.k_proj", kv_heads * head_dim, hidden),
            ("attn", "self_attn.v_proj", kv_heads * head_dim, hidden),
            ("attn", "self_attn.o_proj", hidden, heads * head_dim),
            ("mlp", "mlp.gate_proj", inter, hidden),
            ("mlp", "mlp.up_proj", inter, hidden),
            ("mlp", "mlp.down_proj", hidden, inter)]


def linear_shapes(model_or_config) -> list[dict]:
    """The distinct (N, K) shapes of the decoder's linears ([N, K] = [out_features, in_features]) with counts.

    Accepts a LoadedModel, a model with a supported adapter, or a LLaMA-family transformers config. Each entry:
    {"n", "k", "count" (over all layers), "linears" (names within a layer), "blocks" ("attn"/"mlp")}."""
    from torch import nn

    from toolchain.models import adapter_for

    entries: list[tuple[str, str, int, int]] = []
    model, adapter = model_or_config, None
    if hasattr(model_or_config, "adapter") and isinstance(getattr(model_or_config, "model", None), nn.Module):
        model, adapter = model_or_config.model, model_or_config.adapter  # a LoadedModel
    if isinstance(model, nn.Module):
        adapter = adapter or adapter_for(model)
        for layer in adapter.decoder_layers(model):
            block_of = {name: sb.name for sb in adapter.subblocks(layer) for name in sb.linears}
            for name, lin in adapter.linears(layer).items():
                n, k = lin.weight.shape
                entries.append((block_of.get(name, "other"), name, int(n), int(k)))
    else:
        config = model_or_config
        adapter = adapter_for(config)  # raises a clear error for unsupported families
        if adapter.family != "llama":
            raise ConfigError(f"shapes from a config are computed for the LLaMA family only (got {adapter.family!r});"
                              f" pass the loaded model instead")
        for _ in range(config.num_hidden_layers):
            entries.extend(_llama_config_shapes(config))
    if not entries:
        raise ConfigError("the model has no decoder linears")
    shapes: dict[tuple[int, int], dict] = {}
    for block, name, n, k in entries:
        s = shapes.setdefault((n, k), {"n": n, "k": k, "count": 0, "linears": [], "blocks": []})
        s["count"] += 1
        if name not in s["linears"]:
            s["linears"].append(name)
        if block not in s["blocks"]:
            s["blocks"].append(block)
    return list(shapes.values())


def shapes_for(model: str, source=None) -> list[dict]:
    """Shapes without loading weights where possible (a config), else from the loaded model."""
    if source is not None:
        return linear_shapes(source)
    from toolchain.models import adapter_for, load_model
    from toolchain.models.loading import is_named_model, named_model_path

    path = named_model_path(model) if is_named_model(model) else Path(str(model))
    config = None
    try:
        from transformers import AutoConfig

        if path.is_file() and path.suffix == ".gguf":
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        elif (path / "config.json").is_file():
            config = AutoConfig.from_pretrained(path)
    except Exception:
        config = None
    if config is not None:
        try:
            if adapter_for(config).family == "llama":
                return linear_shapes(config)
        except ToolchainError:
            pass
    return linear_shapes(load_model(model, with_tokenizer=False))
