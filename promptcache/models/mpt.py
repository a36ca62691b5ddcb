"""MPT: ALiBi, multi-head attention, no rotary embeddings.

In transformers 5.23 MPT ignores ``position_ids`` (its head model does not even pass them on)
and computes ALiBi from sequence indices; :meth:`MptAdapter.prepare` installs position-faithful
ALiBi (:mod:`promptcache.models.alibi`). Its attention is hand-written (no SDPA/flash dispatch) and
turns the mask into a boolean with ``.to(torch.bool)``, non-zero meaning hidden: the additive float
mask of :func:`promptcache.models.base.additive_mask` is therefore right, a boolean "True =
visible" mask would be inverted. ``config.use_cache`` defaults to False for MPT: pass
``use_cache=True`` (or a cache) explicitly. Cache tensors are ``[batch, n_heads, n, head_dim]``.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from . import alibi
from .base import ModelAdapter, _positive_int


class MptAdapter(ModelAdapter):
    """MPT family.

    Fallback roles use the same plain ``System:/User:/Assistant:`` dialogue text as Falcon (MPT
    base checkpoints have no turn markers; the chat checkpoints ship a ChatML template, which wins
    over these whenever present); generation prompt ``Assistant:``.
    """

    family = "mpt"
    model_types = ("mpt",)

    def num_layers(self) -> int:
        return self.text_config.n_layers

    def num_kv_heads(self) -> int:
        return self.text_config.n_heads

    def head_dim(self) -> int:
        return self.text_config.d_model // self.text_config.n_heads

    def max_positions(self) -> int | None:
        """``config.max_seq_len``: MPT builds its ALiBi table and trains for that many positions."""
        return _positive_int(getattr(self.text_config, "max_seq_len", None))

    def _patch(self, model: PreTrainedModel) -> None:
        alibi.install_mpt(model)

    def batch_decode_supported(self) -> bool:
        """No: MPT's attention takes a 3-D ``[heads, q, k]`` ALiBi bias shared by the whole batch
        (transformers 5.23), so rows at different positions need a forward each."""
        return False

    def fixed_relocation(self, model: PreTrainedModel) -> tuple[str, str] | None:
        return "none", "MPT ALiBi: the bias depends on key distances only"

