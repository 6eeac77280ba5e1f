"""Model loading and one architecture adapter per family."""
from __future__ import annotations

from ..errors import ModelLoadError
from .base import ArchAdapter, DecoderLayout, SubBlock
from .llama import LlamaAdapter
from .opt import OPTAdapter

ADAPTERS: tuple[ArchAdapter, ...] = (LlamaAdapter(), OPTAdapter())


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model_or_config) -> ArchAdapter:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise ModelLoadError(
        f"unsupported model family {model_type!r}; supported model_type values: {', '.join(supported_model_types())}"
    )


from .loading import LoadedModel, load_model, save_model  # noqa: E402

__all__ = ["ArchAdapter", "DecoderLayout", "SubBlock", "adapter_for", "supported_model_types", "LoadedModel", "load_model",
           "save_model"]
