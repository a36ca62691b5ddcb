"""Short query blocks on CPU: the query heads that share a K/V head folded into one SDPA call.

Why: a cached prefill computes a few new tokens (16 on the persona case) against the whole
static buffer, and on CPU torch's flash kernel then runs one small block per query head: SmolLM2's
9 query heads over its 3 K/V heads cost 313 us per layer at 16 queries over 1,280 slots, folded
(3 heads of 48 rows) 274 us; 2 queries 208 -> 96 us; 48 queries 756 -> 562 us; but 1 query (decode)
68 -> 83 us and 64 queries 647 -> 676 us, so only 2..:data:`FOLD_MAX_ROWS` queries are folded
(one-off microbenchmark, bf16, one thread). The result is the same to the bit: each query row is
computed alone, against the same keys and the same mask row, in the same order.

How: transformers looks its attention function up by the model's ``_attn_implementation``; the CPU
fast path switches a grouped-query model from ``"sdpa"`` to :data:`NAME`, registered here, which
folds when it applies and otherwise calls transformers' own ``sdpa_attention_forward``. Module
store keys treat the two as one implementation (same floats).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "promptcache_sdpa"
#: Query blocks of 2..FOLD_MAX_ROWS tokens are folded (module docstring).
FOLD_MAX_ROWS = 48


def folded_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` ``[b, heads, q, d]``, ``key``/``value``
    ``[b, kv_heads, k, d]``, a 4-D mask shared by the heads; returns ``[b, q, heads, d]``."""
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-1] < key.shape[-2]:
        # a mask narrower than the keys (the fast path's static buffer, :data:`NARROW_SLOTS`): the
        # slots past it are unwritten or stale, never visible; attention reads only the mask's width
        key, value = key[:, :, : attention_mask.shape[-1]], value[:, :, : attention_mask.shape[-1]]
    groups = getattr(module, "num_key_value_groups", 1)
    if (groups > 1 and 1 < query.shape[2] <= FOLD_MAX_ROWS and query.device.type == "cpu" and dropout == 0.0
            and attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[1] == 1
            and not kwargs.get("softcap") and kwargs.get("position_bias") is None and kwargs.get("cache") is None
            and not kwargs.get("output_attentions")):
        b, heads, rows, dim = query.shape
        kv_heads, slots = key.shape[1], key.shape[2]
        mask = attention_mask[:, :, :, :slots]
        folded_mask = mask[:, :, None].expand(b, 1, groups, rows, slots).reshape(b, 1, groups * rows, slots)
        out = F.scaled_dot_product_attention(query.reshape(b, kv_heads, groups * rows, dim), key, value,
                                             attn_mask=folded_mask, scale=scaling)
        return out.view(b, heads, rows, dim).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


AttentionInterface.register(NAME, folded_sdpa_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)


def fold_query_heads(model: torch.nn.Module) -> bool:
    """Switch a grouped-query CPU model from ``"sdpa"`` to :data:`NAME`; returns whether it now
    runs it. Models on another attention, or without grouped queries, are left as they are."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    heads, kv_heads = getattr(text, "num_attention_heads", None), getattr(text, "num_key_value_heads", None)
    if config is None or not heads or not kv_heads or heads == kv_heads:
        return False
    if config._attn_implementation == NAME:
        return True
    if config._attn_implementation != "sdpa" or not type(model)._can_set_attn_implementation():
        return False
    model.set_attn_implementation(NAME)
    return config._attn_implementation == NAME


def unfold_query_heads(model: torch.nn.Module) -> None:
    """Undo :func:`fold_query_heads` (side-by-side benchmarks and tests)."""
    if getattr(model.config, "_attn_implementation", None) == NAME:
        model.set_attn_implementation("sdpa")
