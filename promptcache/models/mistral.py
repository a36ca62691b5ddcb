"""Mistral: RoPE + GQA, and (v0.1) a sliding window over ALL layers.

``MistralModel.forward`` builds its mask with ``create_sliding_window_causal_mask`` when
``config.sliding_window`` is set, but a ready 4-D mask bypasses that builder, so the window would
be silently lost. Unlike Qwen2/Gemma 3 it does NOT accept a per-layer-type dict (transformers 5.23
would call ``.ndim`` on it), and every layer is windowed anyway: ``attention_mask`` therefore
returns ONE 4-D tensor that already hides keys with ``q_pos - k_pos >= sliding_window``.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Roles, additive_mask, check_mask_args, window_visible
from .llama import RopeAdapter


class MistralAdapter(RopeAdapter):
    """Mistral family.

    Fallback roles follow the Mistral instruct convention ``[INST] ... [/INST]`` with the answer
    closed by ``</s>``. Mistral has no system role: system text is emitted as plain text followed by
    a blank line before the first instruction. The generation prompt is empty.
    """

    family = "mistral"
    model_types = ("mistral",)
    roles: Roles = {
        "system": ("", "\n\n"),
        "user": ("[INST] ", " [/INST]"),
        "assistant": ("", "</s>"),
        "generation": "",
    }

    def sliding_window(self) -> int | None:
        return getattr(self.text_config, "sliding_window", None)

    def attention_mask(self, visible: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                       dtype: torch.dtype) -> Any:
        check_mask_args(visible, q_pos, k_pos)
        window = self.sliding_window()
        if window is not None:
            visible = window_visible(visible, q_pos, k_pos, window)
        return additive_mask(visible, dtype)

