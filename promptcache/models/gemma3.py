"""Gemma 3: RoPE with separate local/global rotary bases, interleaved sliding-window layers.

Facts checked against transformers 5.23 (tests/test_models_adapters.py keeps them honest):

* Positions: ``Gemma3TextModel.forward`` feeds the same ``position_ids`` to the rotary embedding
  of every layer type (``sliding_attention`` uses the local base, ``full_attention`` the global
  one), so explicit layout positions reach both. The embedding scale (``sqrt(hidden_size)``) is
  applied inside the embedding layer and does not interact with positions or masks.
* Masks: a plain 4-D tensor is used unchanged by EVERY layer, i.e. the sliding window is silently
  dropped. The forward accepts a mapping ``{"full_attention": m, "sliding_attention": m_sw}`` and
  gives each layer the mask of its type, so :meth:`Gemma3Adapter.attention_mask` returns that
  mapping, with ``m_sw`` additionally hiding keys whose layout distance ``q_pos - k_pos`` is
  ``>= sliding_window`` (transformers' own rule, on positions instead of indices).
* Modules longer than the window: the engine encodes a module with this same mask builder, so
  inside a module a sliding layer sees only the last ``sliding_window`` positions, exactly as the
  one-forward oracle does. Later queries (other modules, the suffix, generated tokens) get the same
  rule: a cached key more than ``sliding_window - 1`` positions behind the query is simply hidden
  from sliding layers, and stays visible to full-attention layers. Nothing is dropped from the
  cache; the window is a mask, not an eviction. Gaps in the layout count as distance.
* Caches: ``DynamicCache(config=gemma3_config)`` (and the cache the model creates itself when
  ``use_cache=True`` and no cache is passed) uses ``DynamicSlidingWindowLayer`` for sliding layers,
  which KEEPS ONLY THE LAST ``sliding_window - 1`` KEYS on every update, including the keys given
  through ``ddp_cache_data``. Spliced keys would be lost and the sliding layers would hold fewer
  keys than the full layers, so the mask widths would disagree. Build caches WITHOUT a config
  (``DynamicCache()`` or ``DynamicCache(ddp_cache_data=[(k, v), ...])``: plain ``DynamicLayer`` per
  layer) and pass one explicitly when encoding modules.
* ``use_bidirectional_attention`` configs (embedding models) are not generative; not supported.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from .base import Roles, UnsupportedModelError
from .qwen2 import LayerTypedAdapter


class Gemma3Adapter(LayerTypedAdapter):
    """Gemma 3 (text-only ``gemma3_text`` and the multimodal ``gemma3`` wrapper).

    Fallback roles are Gemma's turn markers: ``<start_of_turn>user\\n ... <end_of_turn>\\n`` and
    ``<start_of_turn>model\\n ... <end_of_turn>\\n``; generation opens a model turn. Gemma has no
    system role (its template folds the system text into the first user turn): system text gets a
    user turn of its own so that it can be cached as a module.
    """

    family = "gemma3"
    model_types = ("gemma3_text", "gemma3")
    roles: Roles = {
        "system": ("<start_of_turn>user\n", "<end_of_turn>\n"),
        "user": ("<start_of_turn>user\n", "<end_of_turn>\n"),
        "assistant": ("<start_of_turn>model\n", "<end_of_turn>\n"),
        "generation": "<start_of_turn>model\n",
    }

    def prepare(self, model: PreTrainedModel) -> PreTrainedModel:
        if getattr(self.text_config, "use_bidirectional_attention", False):
            raise UnsupportedModelError(
                "Gemma 3 with use_bidirectional_attention (an embedding model) is not a causal decoder")
        return super().prepare(model)

