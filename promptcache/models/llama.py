"""Llama (1/2/3, and GQA variants): the plain RoPE decoder every other RoPE adapter builds on.

RoPE families need no patch: ``position_ids`` reach the rotary embedding, keys are stored in the
cache already rotated at their layout positions, and a 4-D float mask is used by the attention
kernels as-is (``masking_utils`` returns a 4-D mask unchanged). Cache tensors are
``[batch, num_key_value_heads, n, head_dim]``.
"""

from __future__ import annotations

from .base import ModelAdapter, Roles


class RopeAdapter(ModelAdapter):
    """Shared base of the RoPE decoders (Llama, Qwen2, Mistral, Gemma 3)."""


class LlamaAdapter(RopeAdapter):
    """Llama family.

    Fallback roles follow the Llama 2 chat convention, for base/older checkpoints whose tokenizer
    has no chat template: ``<<SYS>>\\n...\\n<</SYS>>\\n\\n`` for the system text, ``[INST] ... [/INST]``
    around user turns, the assistant answer right after ``[/INST]`` and closed by ``</s>``. The
    system block is emitted as its own run before the first ``[INST]`` (Llama 2 puts it inside the
    first instruction; keeping it separate lets the system module be cached on its own, at a cost
    of a slightly different token sequence from the official template). The generation prompt is
    empty: the model answers directly after ``[/INST]``.
    """

    family = "llama"
    model_types = ("llama",)
    roles: Roles = {
        "system": ("<<SYS>>\n", "\n<</SYS>>\n\n"),
        "user": ("[INST] ", " [/INST]"),
        "assistant": (" ", " </s>"),
        "generation": "",
    }

