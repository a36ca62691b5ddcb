"""Falcon: three cache layouts and two position schemes in one model class.

K/V heads stored in the cache (``FalconAttention`` in transformers 5.23):

* ``new_decoder_architecture=True`` (Falcon-40B/180B): the ``num_kv_heads`` K/V groups are
  BROADCAST to all ``num_attention_heads`` before the cache update, so the cache holds
  ``num_attention_heads`` heads (expanded copies), not ``num_kv_heads``;
* ``multi_query=True`` (Falcon-7B): one shared K/V head;
* otherwise (Falcon-RW): ``num_kv_heads`` (= ``num_attention_heads`` by default).

``alibi=False`` models use RoPE and need nothing. ``alibi=True`` models get position-faithful
ALiBi from :mod:`promptcache.models.alibi` in :meth:`FalconAdapter.prepare`; before that, they
reject 4-D masks outright.

The attention class is chosen at ``__init__`` (``FalconFlashAttention2`` for flash attention), so
switching this model to SDPA also turns its flash modules back into plain ``FalconAttention``
(per instance, via ``__class__``; they share weights and ``__init__``).
"""

from __future__ import annotations

from transformers import PreTrainedModel
from transformers.models.falcon.modeling_falcon import FalconAttention, FalconFlashAttention2

from . import alibi
from .base import ModelAdapter


class FalconAdapter(ModelAdapter):
    """Falcon family.

    Fallback roles are the plain-text dialogue format of Falcon's instruct checkpoints:
    ``System: ...\\n``, ``User: ...\\n``, ``Assistant: ...\\n``; generation prompt ``Assistant:``.
    """

    family = "falcon"
    model_types = ("falcon",)

    def num_kv_heads(self) -> int:
        cfg = self.text_config
        if cfg.new_decoder_architecture:
            return cfg.num_attention_heads
        if cfg.multi_query:
            return 1
        return cfg.num_kv_heads or cfg.num_attention_heads

    def head_dim(self) -> int:
        return self.text_config.hidden_size // self.text_config.num_attention_heads

    def max_positions(self) -> int | None:
        """``config.max_position_embeddings`` with RoPE; ``None`` with ALiBi.

        ALiBi Falcon (Falcon-RW) has no position table: its bias is computed from positions for any
        length, and ``max_position_embeddings`` is a config default the model never reads, so no
        limit is known. Pass ``PromptCache(max_positions=...)`` to impose the training length.
        """
        if self.text_config.alibi:
            return None
        return super().max_positions()

    def _switch_attention(self, model: PreTrainedModel, target: str) -> None:
        super()._switch_attention(model, target)
        for module in model.modules():
            if type(module) is FalconFlashAttention2:
                module.__class__ = FalconAttention

    def _patch(self, model: PreTrainedModel) -> None:
        if self.text_config.alibi:
            alibi.install_falcon(model)

    def fixed_relocation(self, model: PreTrainedModel) -> tuple[str, str] | None:
        if alibi.is_patched(model):
            return "absolute", "Falcon ALiBi computes its bias from absolute positions in bfloat16"
        return None

