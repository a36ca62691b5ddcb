"""Model-family adapters: what the engine needs to know about each supported architecture.

``adapter_for(model)`` picks the adapter by ``config.model_type``; ``adapter.prepare(model)``
must be called once before the model is used with Prompt Cache's masks and positions.
"""

from __future__ import annotations

from transformers import PreTrainedConfig, PreTrainedModel

from .base import ModelAdapter, UnsupportedModelError
from .falcon import FalconAdapter
from .gemma3 import Gemma3Adapter
from .llama import LlamaAdapter
from .mistral import MistralAdapter
from .mpt import MptAdapter
from .qwen2 import Qwen2Adapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (
    LlamaAdapter, FalconAdapter, MptAdapter, Qwen2Adapter, MistralAdapter, Gemma3Adapter)


def supported_families() -> list[str]:
    return [cls.family for cls in ADAPTERS]


def adapter_for(model: PreTrainedModel | PreTrainedConfig) -> ModelAdapter:
    """The adapter for ``model`` (or a config); :class:`UnsupportedModelError` if there is none."""
    config = model if isinstance(model, PreTrainedConfig) else model.config
    model_type = getattr(config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(config)
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported by promptcache; supported families: "
        + ", ".join(supported_families()))


__all__ = ["ModelAdapter", "UnsupportedModelError", "adapter_for", "supported_families"]
