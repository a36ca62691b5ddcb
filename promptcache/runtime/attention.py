"""The fast path's SDPA on CPU: attention over the written slots only, and short query blocks with
the query heads that share a K/V head folded into one call.

Why: a cached prefill computes a few new tokens (16 on the persona case) against a static buffer,
and on CPU torch's flash kernel then (1) reads every slot of the buffer, written or not, and (2)
runs one small block per query head. (1): the fast path makes the mask only as wide as the slots
written, rounded up (``compiled.NARROW_STEP``), and attention here reads only that many keys and
values (persona case, 1,118 tokens in a 1,280-slot buffer: cached TTFT 51.8 -> 49.7 ms,
``benchmarks/fastpath.py --variants bf16-compiled-wide,bf16-compiled``). (2): SmolLM2's 9 query
heads over its 3 K/V heads cost 313 us per layer at 16 queries over 1,280 slots, folded (3 heads
of 48 rows) 274 us; 2 queries 208 -> 96 us; 48 queries 756 -> 562 us; but 1 query (decode) 68 ->
83 us and 64 queries 647 -> 676 us, so only 2..:data:`FOLD_MAX_ROWS` queries are folded (one-off
microbenchmark, bf16, one thread). Both give the same result to the bit: each query row is computed
alone, against the same keys, mask row and order, and the slots dropped are ones the mask hides.

Where the CPU has AMX, the fast path's bf16 attention (compiled graphs and long eager forwards:
a cached prefill's suffix, a decode step, a full prefill, a module being encoded; an additive bf16
mask or none, i.e. causal) runs on :mod:`.amx_attention`'s kernel instead (the op
``promptcache::amx_attention``, opaque to inductor), which rounds like torch's bf16 kernel but not
to the same bits: the module store's keys say so (``store/keys.py``), and :func:`torch_sdpa_only`
keeps the oracle on torch's SDPA. :func:`use_amx_attention` turns it off per model.

How: transformers looks its attention function up by the model's ``_attn_implementation``; the CPU
fast path switches an ``"sdpa"`` model to :data:`NAME`, registered here, which narrows and folds
where that applies and otherwise calls transformers' own ``sdpa_attention_forward``. Module store
keys treat the two as one implementation while the AMX kernel is off (same floats to the bit).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import amx_attention

NAME = "promptcache_sdpa"
#: Query blocks of 2..FOLD_MAX_ROWS tokens are folded (module docstring).
FOLD_MAX_ROWS = 48


def fast_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` ``[b, heads, q, d]``, ``key``/``value``
    ``[b, kv_heads, k, d]``, a 4-D mask; returns ``[b, q, heads, d]``. A mask narrower than the
    keys (the fast path's static buffer) means the slots past it are never visible: they are not read."""
    if (getattr(getattr(module, "config", None), AMX_FLAG, False) and dropout == 0.0 and not kwargs.get("softcap")
            and kwargs.get("position_bias") is None and kwargs.get("cache") is None
            and not kwargs.get("output_attentions") and getattr(module, "is_causal", True)
            and amx_attention.unsupported(query, key, value, attention_mask) is None):  # built: the flag says
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return torch.ops.promptcache.amx_attention.default(query, key, value, attention_mask, scale), None
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-1] < key.shape[-2]:
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


#: The config attribute that lets a model's attention run on the AMX kernel (:func:`use_amx_attention`).
AMX_FLAG = "_promptcache_amx_attention"

_LIB = torch.library.Library("promptcache", "FRAGMENT")
_LIB.define("amx_attention(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale) -> Tensor")
_LIB.impl("amx_attention", amx_attention.attention, "CPU")


@torch.library.register_fake("promptcache::amx_attention", lib=_LIB)
def _amx_attention_fake(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    b, heads, rows, dim = query.shape
    return query.new_empty((b, rows, heads, dim))


AttentionInterface.register(NAME, fast_sdpa_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_fast_sdpa(model: torch.nn.Module) -> bool:
    """Switch an ``"sdpa"`` model to :data:`NAME`; returns whether it now runs it. Models on another
    attention (the user's choice, or a family without SDPA) are left as they are."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    if config._attn_implementation == NAME:
        return True
    if config._attn_implementation != "sdpa" or not type(model)._can_set_attn_implementation():
        return False
    model.set_attn_implementation(NAME)
    return config._attn_implementation == NAME


def use_amx_attention(model: torch.nn.Module, on: bool = True) -> str | None:
    """Let the model's fast-path attention run on :mod:`.amx_attention` where it takes the inputs
    (``on=False``: never); returns ``None`` when it will, else why not (torch's SDPA then runs)."""
    probe = torch.zeros((1, 1, 1, amx_attention.MAX_HEAD_DIM // 2), dtype=torch.bfloat16)
    reason = "turned off" if not on else amx_attention.unavailable(probe, probe, probe, probe[..., :1])
    for c in _configs(model):
        setattr(c, AMX_FLAG, reason is None)
    return reason


@contextlib.contextmanager
def torch_sdpa_only(model: torch.nn.Module):
    """Run torch's SDPA (not the AMX kernel) inside this block: the oracle's forward, which must not
    share the code it checks."""
    configs = [c for c in _configs(model) if getattr(c, AMX_FLAG, False)]
    for c in configs:
        setattr(c, AMX_FLAG, False)
    try:
        yield
    finally:
        for c in configs:
            setattr(c, AMX_FLAG, True)


def _configs(model: torch.nn.Module) -> list:
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    return list({id(c): c for c in (config, text) if c is not None}.values())


def runs_fast_sdpa(model: torch.nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == NAME


def grouped_query_heads(model: torch.nn.Module) -> bool:
    """Whether the model's query heads share K/V heads (what folding needs)."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    heads, kv_heads = getattr(text, "num_attention_heads", None), getattr(text, "num_key_value_heads", None)
    return bool(heads and kv_heads and heads != kv_heads)


def restore_sdpa(model: torch.nn.Module) -> None:
    """Undo :func:`use_fast_sdpa` (side-by-side benchmarks and tests)."""
    if runs_fast_sdpa(model):
        model.set_attn_implementation("sdpa")
