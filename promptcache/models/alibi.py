"""Position-faithful ALiBi for MPT and Falcon (``alibi=True``), as a per-instance patch.

In transformers 5.23 both families derive the ALiBi bias from *sequence indices*: MPT ignores
``position_ids`` altogether and Falcon counts ``cumsum`` of the 2-D padding mask (and raises
``too many values to unpack`` on a 4-D mask). A Prompt Cache layout has gaps (unselected
modules, short union members, unused parameter slots) that indices cannot express, so the bias
must come from LAYOUT positions instead.

Both models add a bias that depends on the key only (``slope_h * f(k)``); since softmax is
invariant to a per-row constant this equals ALiBi's ``-slope_h * (q - k)``. The patch keeps each
model's own form and its own arithmetic, only replacing the sequence index by the key's layout
position, so a contiguous forward is bit-for-bit unchanged:

* MPT: ``float32(slope_h) * int32(k_pos - k_pos_last)`` (MPT's bias is relative to the last key);
* Falcon: ``bfloat16(slope_h) * k_pos`` computed in bfloat16, then divided by ``sqrt(head_dim)`` and
  folded into the additive mask, as Falcon does (its eager path also adds it a second time inside
  the attention, a transformers quirk that is preserved).

Key positions: the cached keys' positions (a ``SplicedCache``'s ``key_positions`` field, set by the
model runner, or those recorded on another cache with ``set_key_positions``; ``0 ..
past-1`` when absent, as for an ordinary cache) followed by the forward's ``position_ids``
(``past .. past+q-1`` when absent, the model's own default). After the forward the cache's
recorded positions of a plain cache include the new tokens, so step-by-step generation keeps
working (the runner does the same for its ``SplicedCache``).

The patch only touches THIS model object: ``forward`` of its base model (and, for MPT, of the
head model, which drops ``position_ids``) and one method per attention module are replaced on the
instances via ``types.MethodType``; nothing is patched on a class.
"""

from __future__ import annotations

import contextvars
import math
import types
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.masking_utils import create_causal_mask
from transformers.models.falcon.modeling_falcon import build_alibi_tensor as falcon_alibi_tensor

from .positions import get_key_positions, owns_key_positions, past_key_positions, set_key_positions

_PATCHED = "_promptcache_alibi"
_POSITION_IDS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "promptcache_position_ids", default=None)  # MPT head model -> base model
_BIAS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "promptcache_alibi_bias", default=None)  # base model -> its blocks, for one forward


def is_patched(model: PreTrainedModel) -> bool:
    """Whether position-faithful ALiBi is installed on ``model``."""
    return bool(getattr(model.base_model, _PATCHED, False))


def key_positions(cache: Any, past_len: int, position_ids: torch.Tensor | None, batch: int,
                  q_len: int, device: torch.device) -> torch.Tensor:
    """Layout positions ``[b, past_len + q_len]`` of every key a forward attends to."""
    past = past_key_positions(cache, past_len, batch, device)
    if position_ids is None:
        new = torch.arange(past_len, past_len + q_len, device=device).unsqueeze(0)
    else:
        new = position_ids.to(device=device, dtype=torch.long)
        new = new.unsqueeze(0) if new.dim() == 1 else new
        if new.shape[-1] != q_len:
            raise ValueError(f"position_ids has {new.shape[-1]} positions for {q_len} tokens")
    rows = max(past.shape[0], new.shape[0])
    return torch.cat([past.expand(rows, -1), new.expand(rows, -1)], dim=-1)


def _record(cache: Any, k_pos: torch.Tensor) -> None:
    """Remember the keys' positions on a plain cache (a ``SplicedCache``'s runner sets its own)."""
    if cache is not None and not owns_key_positions(cache):
        same = k_pos.shape[0] == 1 or bool((k_pos == k_pos[:1]).all())
        set_key_positions(cache, k_pos[:1] if same else k_pos)


def _input_shape(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None):
    ref = input_ids if input_ids is not None else inputs_embeds
    if ref is None:
        raise ValueError("You have to specify either input_ids or inputs_embeds")
    return ref.shape[0], ref.shape[1], ref.device


# ---------------------------------------------------------------------------------------------
# MPT
# ---------------------------------------------------------------------------------------------

def install_mpt(model: PreTrainedModel) -> bool:
    """Install position-faithful ALiBi on an MPT model object. Returns False if already there."""
    base = model.base_model
    if getattr(base, _PATCHED, False):
        return False
    heads = base.num_heads
    # MPT's own slopes (including its head reordering for non powers of two): its bias for two
    # keys is [-slope, 0].
    slopes = -base.build_mpt_alibi_tensor(heads, 2, device="cpu")[:, 0, 0]
    original_bias = base.build_mpt_alibi_tensor
    original_forward = base.forward

    def build_mpt_alibi_tensor(self, *args, **kwargs):
        bias = _BIAS.get()
        return original_bias(*args, **kwargs) if bias is None else bias

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, inputs_embeds=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                position_ids=None, **kwargs):
        if position_ids is None:
            position_ids = _POSITION_IDS.get()
        batch, q_len, device = _input_shape(input_ids, inputs_embeds)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        k_pos = key_positions(past_key_values, past_len, position_ids, batch, q_len, device)
        if k_pos.shape[0] > 1 and not bool((k_pos == k_pos[:1]).all()):
            raise NotImplementedError("MPT's ALiBi bias is shared by the batch: give every row the same positions")
        rel = (k_pos[0] - k_pos[0, -1]).to(torch.int32)
        bias = rel.view(1, 1, -1) * slopes.to(device).view(-1, 1, 1)  # [heads, 1, keys], float32
        token = _BIAS.set(bias)
        try:
            out = original_forward(input_ids=input_ids, past_key_values=past_key_values,
                                   attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                   use_cache=use_cache, output_attentions=output_attentions,
                                   output_hidden_states=output_hidden_states, return_dict=return_dict,
                                   **kwargs)
        finally:
            _BIAS.reset(token)
        _record(past_key_values, k_pos)
        return out

    base.build_mpt_alibi_tensor = types.MethodType(build_mpt_alibi_tensor, base)
    base.forward = types.MethodType(forward, base)
    if model is not base:  # MptForCausalLM.forward swallows position_ids: hand them over
        head_forward = model.forward

        def model_forward(self, *args, position_ids=None, **kwargs):
            token = _POSITION_IDS.set(position_ids)
            try:
                return head_forward(*args, **kwargs)
            finally:
                _POSITION_IDS.reset(token)

        model.forward = types.MethodType(model_forward, model)
    setattr(base, _PATCHED, True)
    return True


# ---------------------------------------------------------------------------------------------
# Falcon
# ---------------------------------------------------------------------------------------------

def install_falcon(model: PreTrainedModel) -> bool:
    """Install position-faithful ALiBi on a Falcon ``alibi=True`` model object.

    ``use_alibi`` is turned off on the instance so that Falcon's forward never builds its index
    based bias (nor chokes on a 4-D mask); the wrapper builds the bias from positions, folds it
    into the 4-D mask exactly like Falcon does, and hands the per-key bias to each attention
    module (which needs it non-None to skip rotary embeddings and for its eager path).
    """
    base = model.base_model
    if getattr(base, _PATCHED, False):
        return False
    heads = base.num_heads
    # Falcon's own slopes, rounded to bfloat16 as Falcon rounds them: its bias for keys 0, 1.
    ones = torch.ones(1, 2, dtype=torch.long)
    slopes = falcon_alibi_tensor(ones, heads, torch.bfloat16).view(heads, 2)[:, 1]
    original_forward = base.forward

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, position_ids=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        batch, q_len, device = _input_shape(input_ids, inputs_embeds)
        if input_ids is not None and inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
            input_ids = None
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        padding_2d = attention_mask is not None and attention_mask.dim() == 2
        if padding_2d and position_ids is None and get_key_positions(past_key_values) is None:
            k_pos = (attention_mask.cumsum(dim=-1) - 1) * attention_mask  # Falcon's own rule
        else:
            k_pos = key_positions(past_key_values, past_len, position_ids, batch, q_len, device)
        k_pos = k_pos.to(device=device, dtype=torch.long).expand(batch, -1)
        dtype = inputs_embeds.dtype
        alibi = (slopes.to(device)[None, :, None] * k_pos[:, None, :]).reshape(batch * heads, 1, -1).to(dtype)

        causal_mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds,
                                         attention_mask=attention_mask, past_key_values=past_key_values,
                                         allow_is_causal_skip=False)
        if causal_mask is not None and causal_mask.dim() == 4:
            min_dtype = torch.finfo(dtype).min
            if causal_mask.dtype == torch.bool:
                causal_mask = torch.where(causal_mask, torch.zeros((), device=device, dtype=dtype), min_dtype)
            per_key = alibi.reshape(batch, heads, 1, -1) / math.sqrt(self.config.hidden_size // heads)
            attention_mask = torch.masked_fill(per_key, causal_mask < -1, min_dtype)
        token = _BIAS.set(alibi)
        try:
            out = original_forward(input_ids=input_ids, past_key_values=past_key_values,
                                   attention_mask=attention_mask, position_ids=position_ids,
                                   inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        finally:
            _BIAS.reset(token)
        _record(past_key_values, k_pos)
        return out

    for block in base.h:
        attention = block.self_attention
        attention_forward = attention.forward

        def attn_forward(self, hidden_states, alibi=None, attention_mask=None, *args,
                         _original=attention_forward, **kwargs):
            if alibi is None:
                alibi = _BIAS.get()
            return _original(hidden_states, alibi, attention_mask, *args, **kwargs)

        attention.forward = types.MethodType(attn_forward, attention)
    base.use_alibi = False
    base.forward = types.MethodType(forward, base)
    setattr(base, _PATCHED, True)
    return True
