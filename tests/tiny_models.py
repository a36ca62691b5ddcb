"""Tiny random-weight models of every supported family, and the splice/oracle helpers tests share.

The factories build float32, eval-mode, seeded models small enough to run a forward in milliseconds.
Weights are drawn with a larger ``initializer_range`` than the library default so that attention
is far from uniform: a wrong mask or a wrong position then moves the logits by much more than
the test tolerances, which keeps the equivalence tests able to fail.

The helpers implement the project's correctness oracle:

* :func:`oracle_logits` is ONE ordinary forward over the whole token sequence with explicit
  ``position_ids`` and the adapter's 4-D mask built from a visibility matrix;
* :func:`encode_kv` / :func:`splice_cache` / :func:`cached_logits` are the Prompt Cache path:
  modules are encoded separately at their own (possibly gapped) positions, their per-layer K/V
  are concatenated into one ``DynamicCache`` and the rest is computed on top of it.
"""

from __future__ import annotations

import torch
from transformers import (
    DynamicCache,
    FalconConfig,
    FalconForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MptConfig,
    MptForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from promptcache.models import adapter_for
from promptcache.models.base import ModelAdapter
from promptcache.models.positions import get_key_positions, set_key_positions

FAMILIES: list[str] = [
    "llama",
    "llama-gqa",
    "falcon-rope",
    "falcon-new-arch",
    "falcon-alibi",
    "mpt",
    "qwen2",
    "mistral",
    "gemma3",
]
ALIBI_FAMILIES: list[str] = ["falcon-alibi", "mpt"]

VOCAB = 128
SLIDING_WINDOW = 8  # small on purpose: the 25-30 token test sequences cross it

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               initializer_range=0.2)


def _config(family: str, overrides: dict):
    """The config of one tiny family; ``overrides`` are config keyword arguments."""
    rope = dict(_COMMON, intermediate_size=128, max_position_embeddings=512)
    if family in ("llama", "llama-gqa"):
        kv = 2 if family == "llama-gqa" else 4
        return LlamaConfig(**{**rope, "num_key_value_heads": kv, **overrides}), LlamaForCausalLM
    if family == "qwen2":  # Qwen2 has q/k/v biases: exercised here
        return Qwen2Config(**{**rope, "num_key_value_heads": 2, **overrides}), Qwen2ForCausalLM
    if family == "mistral":
        return (MistralConfig(**{**rope, "num_key_value_heads": 2, "sliding_window": SLIDING_WINDOW,
                                 **overrides}), MistralForCausalLM)
    if family == "gemma3":
        kw = {**rope, "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16,
              "sliding_window": SLIDING_WINDOW, "layer_types": ["sliding_attention", "full_attention"],
              "tie_word_embeddings": False,
              **overrides}
        return Gemma3TextConfig(**kw), Gemma3ForCausalLM
    if family.startswith("falcon"):
        falcon = dict(_COMMON, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
        arch = {
            # Falcon-7B style: rotary, multi-query (one shared K/V head), parallel attention.
            "falcon-rope": dict(alibi=False, multi_query=True, new_decoder_architecture=False,
                                parallel_attn=True),
            # Falcon-40B/180B style: grouped K/V heads, two layer norms.
            "falcon-new-arch": dict(alibi=False, new_decoder_architecture=True, num_kv_heads=2,
                                    parallel_attn=True),
            # Falcon-RW style: ALiBi, full multi-head attention, sequential blocks, biases.
            "falcon-alibi": dict(alibi=True, multi_query=False, new_decoder_architecture=False,
                                 parallel_attn=False, bias=True),
        }[family]
        return FalconConfig(**{**falcon, **arch, **overrides}), FalconForCausalLM
    if family == "mpt":
        kw = dict(vocab_size=VOCAB, d_model=64, n_heads=4, n_layers=2, max_seq_len=128,
                  initializer_range=0.2, use_cache=False)
        return MptConfig(**{**kw, **overrides}), MptForCausalLM
    raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}")


def tiny_model(family: str, seed: int = 0, attn_implementation: str | None = None,
               **overrides) -> PreTrainedModel:
    """A seeded, float32, eval-mode random model of ``family`` (one of :data:`FAMILIES`)."""
    config, cls = _config(family, overrides)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return cls(config).to(torch.float32).eval()


def random_ids(n: int, seed: int = 1) -> torch.Tensor:
    """``n`` random token ids in a [1, n] LongTensor."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, n), generator=gen)


def causal_visible(n: int) -> torch.Tensor:
    """A plain causal visibility matrix ``[n, n]``."""
    return torch.ones(n, n, dtype=torch.bool).tril()


def block_visible(lengths: list[int]) -> torch.Tensor:
    """Causal visibility where each block of ``lengths`` only sees itself (modules encoded alone)."""
    n = sum(lengths)
    vis = torch.zeros(n, n, dtype=torch.bool)
    start = 0
    for length in lengths:
        vis[start:start + length, start:start + length] = causal_visible(length)
        start += length
    return vis


def extend_visible(visible: torch.Tensor, extra: int) -> torch.Tensor:
    """Add ``extra`` rows/columns of tokens that see everything before them (and themselves)."""
    n = visible.shape[0]
    out = torch.zeros(n + extra, n + extra, dtype=torch.bool)
    out[:n, :n] = visible
    out[n:, :] = torch.ones(extra, n + extra, dtype=torch.bool).tril(diagonal=n)
    return out


@torch.no_grad()
def oracle_logits(model: PreTrainedModel, ad: ModelAdapter, ids: torch.Tensor, pos: torch.Tensor,
                  visible: torch.Tensor) -> torch.Tensor:
    """ONE plain forward over all of ``ids`` ([1, n]) at ``pos`` ([1, n]) with visibility ``visible``.

    Returns the logits ``[n, vocab]``.
    """
    mask = ad.attention_mask(visible, pos[0], pos[0], model.dtype)
    out = model(ids, position_ids=pos, attention_mask=mask, use_cache=False)
    return out.logits[0]


@torch.no_grad()
def encode_kv(model: PreTrainedModel, ad: ModelAdapter, ids: torch.Tensor, pos: torch.Tensor,
              visible: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Encode one module alone at ``pos``; return its per-layer ``(keys, values)``.

    A config-less ``DynamicCache`` is passed explicitly: one built from the config would give
    sliding-window layers that keep only ``window - 1`` keys (see promptcache.models.gemma3).
    """
    n = ids.shape[1]
    visible = causal_visible(n) if visible is None else visible
    cache = DynamicCache()
    mask = ad.attention_mask(visible, pos[0], pos[0], model.dtype)
    model(ids, position_ids=pos, attention_mask=mask, past_key_values=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def splice_cache(parts: list[list[tuple[torch.Tensor, torch.Tensor]]],
                 positions: list[torch.Tensor]) -> DynamicCache:
    """Concatenate encoded modules into one ``DynamicCache`` and record their layout positions."""
    layers = [
        (torch.cat([p[i][0] for p in parts], dim=-2), torch.cat([p[i][1] for p in parts], dim=-2))
        for i in range(len(parts[0]))
    ]
    cache = DynamicCache(ddp_cache_data=layers)
    set_key_positions(cache, torch.cat([p.reshape(1, -1) for p in positions], dim=1))
    return cache


@torch.no_grad()
def cached_logits(model: PreTrainedModel, ad: ModelAdapter, cache: DynamicCache, ids: torch.Tensor,
                  pos: torch.Tensor, visible_rows: torch.Tensor) -> torch.Tensor:
    """Forward ``ids`` at ``pos`` on top of ``cache``; ``visible_rows`` is ``[q, past + q]``.

    Afterwards the cache's recorded key positions include ``pos``: ALiBi models record them
    themselves (prepared models do), RoPE models do not need them, so this helper records them.
    """
    past_pos = get_key_positions(cache)
    assert past_pos is not None, "record the spliced keys' positions with set_key_positions()"
    k_pos = torch.cat([past_pos[0], pos[0]])
    mask = ad.attention_mask(visible_rows, pos[0], k_pos, model.dtype)
    out = model(ids, position_ids=pos, attention_mask=mask, past_key_values=cache, use_cache=True)
    set_key_positions(cache, k_pos.unsqueeze(0))
    return out.logits[0]


@torch.no_grad()
def greedy_oracle(model: PreTrainedModel, ad: ModelAdapter, ids: torch.Tensor, pos: torch.Tensor,
                  visible: torch.Tensor, steps: int) -> list[int]:
    """Greedy decoding where every step is one full oracle forward (no cache at all)."""
    out: list[int] = []
    for _ in range(steps):
        tok = int(oracle_logits(model, ad, ids, pos, visible)[-1].argmax())
        out.append(tok)
        ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
        pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
        visible = extend_visible(visible, 1)
    return out


@torch.no_grad()
def greedy_cached(model: PreTrainedModel, ad: ModelAdapter, cache: DynamicCache,
                  first_logits: torch.Tensor, next_pos: int, steps: int) -> list[int]:
    """Greedy decoding step by step on the spliced cache, starting from ``first_logits``."""
    out: list[int] = []
    logits = first_logits
    for step in range(steps):
        tok = int(logits.argmax())
        out.append(tok)
        if step == steps - 1:
            break
        past = get_key_positions(cache).shape[1]
        visible = torch.ones(1, past + 1, dtype=torch.bool)
        logits = cached_logits(model, ad, cache, torch.tensor([[tok]]),
                               torch.tensor([[next_pos + step]]), visible)[-1]
    return out


def gapped_layout(len_a: int = 10, gap: int = 5, len_b: int = 10, suffix: int = 5):
    """Positions of the standard splice test: A at 0..9, B at 15..24, suffix at 25..29."""
    pos_a = torch.arange(0, len_a).unsqueeze(0)
    pos_b = torch.arange(len_a + gap, len_a + gap + len_b).unsqueeze(0)
    start = len_a + gap + len_b
    pos_s = torch.arange(start, start + suffix).unsqueeze(0)
    return pos_a, pos_b, pos_s


def prepared(family: str, **kw) -> tuple[PreTrainedModel, ModelAdapter]:
    """A tiny model of ``family`` with its adapter, already prepared."""
    model = tiny_model(family, **kw)
    ad = adapter_for(model)
    ad.prepare(model)
    return model, ad
