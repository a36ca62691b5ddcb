"""Qwen2 (and Qwen2.5): RoPE with q/k/v biases, optional sliding-window layers.

With ``use_sliding_window`` the config marks layers ``>= max_window_layers`` as
``"sliding_attention"``. A 4-D tensor mask is used unchanged by EVERY layer (transformers builds
the window only when it builds the mask itself), so for such configs ``attention_mask`` returns
the ``{"full_attention": m, "sliding_attention": m_sw}`` mapping, which ``Qwen2Model.forward``
accepts in transformers 5.23 and indexes by each layer's type.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Roles, additive_mask, window_visible
from .llama import RopeAdapter


class LayerTypedAdapter(RopeAdapter):
    """RoPE models whose forward accepts a per-layer-type mask mapping (Qwen2, Gemma 3)."""

    def sliding_window(self) -> int | None:
        types = getattr(self.text_config, "layer_types", None) or []
        if "sliding_attention" not in types:
            return None
        return self.text_config.sliding_window

    def attention_mask(self, visible: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                       dtype: torch.dtype) -> Any:
        full = super().attention_mask(visible, q_pos, k_pos, dtype)
        window = self.sliding_window()
        if window is None:
            return full
        sliding = additive_mask(window_visible(visible, q_pos, k_pos, window), dtype)
        return {"full_attention": full, "sliding_attention": sliding}


class Qwen2Adapter(LayerTypedAdapter):
    """Qwen2 family. Fallback roles are ChatML (``<|im_start|>role\\n ... <|im_end|>\\n``), the
    format of every Qwen2 chat checkpoint; generation opens an assistant turn."""

    family = "qwen2"
    model_types = ("qwen2",)
    roles: Roles = {
        "system": ("<|im_start|>system\n", "<|im_end|>\n"),
        "user": ("<|im_start|>user\n", "<|im_end|>\n"),
        "assistant": ("<|im_start|>assistant\n", "<|im_end|>\n"),
        "generation": "<|im_start|>assistant\n",
    }

