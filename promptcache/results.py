"""What the engine reports: one generation (:class:`GenerationResult`) and one schema encode
(:class:`EncodeReport`). Plain data, shared by the PML path and prefix caching."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GenerationResult:
    """What one ``generate`` call produced, and what it cost.

    ``ttft_s`` runs from the call (the prompt PML text not yet parsed) to the first token's logits,
    including parsing, cache assembly and host-to-device copies, with CUDA synchronised.
    ``window_full``: generation stopped before ``max_new_tokens`` (and before EOS or a stop string)
    because the next token would not fit in the model's context window (``max_positions``).
    """

    text: str
    token_ids: list[int]
    ttft_s: float
    total_s: float
    prompt_tokens: int
    cached_tokens: int
    computed_tokens: int
    use_cache: bool
    recomputed_tokens: int = 0
    first_token_logits: torch.Tensor | None = field(default=None, repr=False)
    window_full: bool = False


@dataclass
class EncodeReport:
    """What ``add_schema`` did: how many tokens were encoded into how many forwards, and how long it took.

    ``encode_s`` counts the encoding forwards and the writes to the store; ``load_s`` the modules
    taken from memory tiers or loaded from the store (``store_hits`` of them from the store,
    ``memory_hits`` already held in memory, ``encoded_segments`` computed here).
    """

    schema: str
    policy: str
    segments: int
    stored_tokens: int
    encoded_tokens: int
    forwards: int
    encode_s: float
    bytes: int
    load_s: float = 0.0
    store_hits: int = 0
    memory_hits: int = 0
    encoded_segments: int = 0
