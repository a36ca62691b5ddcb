"""The adapter interface between the Prompt Cache engine and one transformers model family.

The engine never looks at a model's internals: it asks the adapter how big a layer's K/V is,
what to pass as ``attention_mask`` for an arbitrary visibility pattern at arbitrary layout
positions, whether layers have a sliding window, where the decoder layers are, how cached modules
relocate (when the family decides it), and which role markers to use when the tokenizer has no
chat template. ``prepare``
installs whatever the family needs so that ONE ordinary forward with explicit ``position_ids``
and the adapter's mask is the exact reference (the "oracle") for the spliced-cache path.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from ..roles import GENERIC_ROLES

# Attention implementations whose kernels take an arbitrary 4-D additive float mask. Flash
# attention (varlen kernels, 2-D padding masks only) and paged/kernel back-ends do not.
MASK_4D_IMPLEMENTATIONS = ("eager", "sdpa", "promptcache_sdpa")  # the last: runtime/attention.py

Roles = dict[str, Any]  # {"system": (open, close), "user": ..., "assistant": ..., "generation": str}



class UnsupportedModelError(ValueError):
    """The model's family has no adapter; the message names the supported families."""


def text_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """The decoder config (multimodal models such as Gemma 3 nest it under ``text_config``)."""
    return config.get_text_config(decoder=True)


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[q, k]`` visibility -> ``[1, 1, q, k]`` additive mask: 0 where visible, dtype-min elsewhere.

    The smallest finite value (not ``-inf``) is what transformers itself uses: a row that happens
    to be fully masked then gives a uniform softmax instead of NaNs. It must be a *float* mask of
    the model's dtype: eager attention adds it to the scores, MPT turns it into a boolean with
    ``.to(torch.bool)`` (non-zero = hidden), so a boolean "True = visible" mask would be wrong there.
    """
    if visible.dtype != torch.bool or visible.dim() != 2:
        raise ValueError(f"visible must be a [q, k] bool tensor, got {visible.dtype} {tuple(visible.shape)}")
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None]


def window_visible(visible: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                   window: int) -> torch.Tensor:
    """``visible`` restricted to keys less than ``window`` positions behind the query.

    Same rule as transformers' ``sliding_window_overlay`` (``kv_idx > q_idx - window``), but on
    layout positions instead of sequence indices.
    """
    dist = q_pos.reshape(-1, 1).to(visible.device) - k_pos.reshape(1, -1).to(visible.device)
    return visible & (dist < window)


class ModelAdapter:
    """Base adapter: plain causal decoders whose attention takes a 4-D additive mask as-is.

    Subclasses set ``family``/``model_types`` and override what differs: ``kv_shape`` details,
    sliding-window masks, role markers, and ``_patch`` for families that need one (ALiBi).
    """

    family: str = ""
    model_types: tuple[str, ...] = ()
    roles: Roles = GENERIC_ROLES  # fallback role markers (tokenizers without a chat template)

    def __init__(self, config: PreTrainedConfig) -> None:
        self.config = config
        self.text_config = text_config(config)

    # -- preparation -----------------------------------------------------------------------
    def prepare(self, model: PreTrainedModel) -> PreTrainedModel:
        """Make ``model`` (this object only) accept Prompt Cache's masks and positions. Idempotent."""
        self._ensure_4d_mask_attention(model)
        self._patch(model)
        return model

    def _patch(self, model: PreTrainedModel) -> None:
        """Family-specific instance patch; nothing for families that honour positions natively."""

    def _ensure_4d_mask_attention(self, model: PreTrainedModel) -> None:
        current = model.config._attn_implementation
        if current in MASK_4D_IMPLEMENTATIONS:
            return
        target = "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"
        warnings.warn(
            f"promptcache: attention implementation {current!r} of this {type(model).__name__} cannot "
            f"take the 4-D attention masks Prompt Cache needs; switching this model to {target!r}",
            UserWarning, stacklevel=3)
        self._switch_attention(model, target)

    def _switch_attention(self, model: PreTrainedModel, target: str) -> None:
        """Set ``target`` on this model's configs (and sub-configs) without global side effects."""
        if type(model)._can_set_attn_implementation():
            model.set_attn_implementation(target)
            return
        # Models whose attention classes are chosen at __init__ (Falcon, MPT) cannot switch through
        # the public API; their configs are switched directly and subclasses fix the modules.
        for module in model.modules():
            if isinstance(module, PreTrainedModel):
                module.config._attn_implementation = target

    # -- shapes and masks -------------------------------------------------------------------
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    def head_dim(self) -> int:
        cfg = self.text_config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def num_kv_heads(self) -> int:
        cfg = self.text_config
        return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads

    def kv_shape(self, model: PreTrainedModel | None = None) -> tuple[int, int, int]:
        """``(num_layers, num_kv_heads, head_dim)`` of the K/V tensors the model puts in a cache."""
        return self.num_layers(), self.num_kv_heads(), self.head_dim()

    def attention_mask(self, visible: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                       dtype: torch.dtype) -> Any:
        """What to pass as ``model(attention_mask=...)`` for visibility ``visible`` ``[q, k]``.

        ``q_pos``/``k_pos`` are the layout positions of queries and keys (used for sliding windows).
        """
        check_mask_args(visible, q_pos, k_pos)
        return additive_mask(visible, dtype)

    def batch_attention_mask(self, visible: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                             dtype: torch.dtype) -> Any:
        """:meth:`attention_mask` for a batch of rows: ``visible`` ``[b, q, k]``, ``q_pos`` ``[b, q]``,
        ``k_pos`` ``[b, k]`` (each row at its own layout positions: windows are per row). Built row by
        row with the family's own rule, so a row's mask is exactly the one it would get alone."""
        masks = [self.attention_mask(visible[b], q_pos[b], k_pos[b], dtype) for b in range(visible.shape[0])]
        if isinstance(masks[0], dict):  # per-layer-type masks (Qwen2, Gemma 3)
            return {kind: torch.cat([m[kind] for m in masks]) for kind in masks[0]}
        return torch.cat(masks)

    def batch_decode_supported(self) -> bool:
        """Whether rows at different positions can share one decode forward (per-row positions,
        a per-row 4-D mask). False where the family's attention cannot take per-row biases."""
        return True

    def max_positions(self) -> int | None:
        """How many positions (``0 .. n-1``) the model can take: its context window, or ``None``.

        Rotary families (Llama, Qwen2, Mistral, Gemma 3, Falcon with RoPE) read
        ``config.max_position_embeddings`` (with RoPE scaling it is already the extended window).
        Families whose config names it otherwise override this; ``None`` means the model has no
        positional limit of its own (see :meth:`FalconAdapter.max_positions`).
        """
        return _positive_int(getattr(self.text_config, "max_position_embeddings", None))

    def sliding_window(self) -> int | None:
        """The sliding window of the model's windowed layers, or ``None`` when it has none."""
        return None

    def decoder_layers(self, model: PreTrainedModel) -> nn.ModuleList:
        """The model's list of decoder blocks (``layers``/``h``/``blocks`` of its base model)."""
        base = model.base_model
        base = getattr(base, "language_model", base)  # multimodal wrappers (e.g. Gemma 3)
        for name in ("layers", "h", "blocks"):
            layers = getattr(base, name, None)
            if isinstance(layers, nn.ModuleList):
                return layers
        raise TypeError(f"cannot find the decoder layers of {type(model).__name__} "
                        "(looked for layers/h/blocks on its base model)")

    def fixed_relocation(self, model: PreTrainedModel) -> tuple[str, str] | None:
        """``(mode, reason)`` when the family decides how cached modules move between offsets
        (see :mod:`promptcache.modules.relocate`); ``None``: inspect the model's rotary embedding."""
        return None

    # -- chat roles ---------------------------------------------------------------------------
    def fallback_roles(self) -> Roles:
        """Role markers for tokenizers without a chat template: the class's ``roles`` table
        (see each family's docstring), :data:`promptcache.roles.GENERIC_ROLES` by default."""
        return dict(self.roles)


def _positive_int(value: Any) -> int | None:
    """``value`` as a window size, or ``None`` when it is missing or not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


def check_mask_args(visible: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> None:
    if visible.dim() != 2:
        raise ValueError(f"visible must be [q, k], got shape {tuple(visible.shape)}")
    q, k = visible.shape
    if q_pos.reshape(-1).shape[0] != q or k_pos.reshape(-1).shape[0] != k:
        raise ValueError(f"visible is [{q}, {k}] but got {q_pos.numel()} query and {k_pos.numel()} key positions")
