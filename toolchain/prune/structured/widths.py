"""What the installed transformers can load: per-layer widths through its native `per_layer_config`
(transformers.integrations.heterogeneity), where the family's modeling code reads it."""
from __future__ import annotations

import torch


def native_per_layer_widths(model, overrides: dict) -> bool:
    """True when transformers builds `model`'s family with layer 0 changed by `overrides` (config values such as
    {"intermediate_size": 64}) through `per_layer_config`. Built on the meta device: no memory, no weights.
    Families whose modeling code reads the global config (Llama, Qwen2, Mistral, OPT in transformers 5.x) refuse
    or ignore it, and then a model's layers must all have one width."""
    from transformers import AutoModelForCausalLM

    config = model.config
    try:
        values = {**config.to_dict(), "num_hidden_layers": 2, "per_layer_config": {0: overrides}}
        probe_config = type(config).from_dict(values)
        with torch.device("meta"):
            probe = AutoModelForCausalLM.from_config(probe_config)
    except Exception:   # transformers raises several types when a family does not support it
        return False
    layers = [sum(p.numel() for p in layer.parameters()) for layer in probe.base_model.layers] \
        if hasattr(probe.base_model, "layers") else []
    return len(layers) == 2 and layers[0] != layers[1]
