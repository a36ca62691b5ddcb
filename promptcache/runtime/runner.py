"""The model runner: the ONE place that turns KV pieces, new tokens, positions and visibility into
logits and an updated cache.

Every forward of the package goes through :class:`ModelRunner`: module encoding
(:mod:`promptcache.modules.encoder`), the spliced and the baseline prefill of a request
(:mod:`promptcache.engine`), selective recompute's check pass and fused prefill
(:mod:`promptcache.recompute`), prefix caching (:mod:`promptcache.prefix.runner`), the decode loop
and the one-forward oracle. The caches it builds are :class:`~promptcache.runtime.kv.SplicedCache`
objects (also for the baseline: a cache with no pieces), whose ``key_positions`` field it sets
after every forward; ALiBi and sliding windows read that field.

Visibility is a ``[q, past + q]`` boolean matrix (query i sees key j). When it is the model's own
causal pattern (contiguous positions after every past key, all past visible) the runner passes a
2-D mask and lets the model take its fast path; otherwise the adapter builds a 4-D mask from
layout positions (:meth:`ModelRunner.index_causal`).

Decoding is batch-ready: :meth:`ModelRunner.decode_step` takes a list of
:class:`DecodeSequence` (each with its own cache, token and position) and returns one logits row
per sequence, one forward each; :class:`~promptcache.runtime.batch.DecodeBatch` runs concurrent
requests in ONE forward per step. A request's life from admission to its end (chunked prefill,
finish, abort) is :mod:`promptcache.runtime.request`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from ..lora.registry import LoraRegistry
from ..pml.errors import PromptError
from .attention import torch_sdpa_only
from .kv import ModuleKV, SplicedCache
from .sampling import SamplingOptions, TokenStream



@dataclass
class ForwardCall:
    """What a forward hook sees, before the forward: its tokens, positions, visibility and cache."""

    ids: Sequence[int]
    q_pos: torch.Tensor
    visible: torch.Tensor | None
    cache: SplicedCache


ForwardHook = Callable[[ForwardCall], None]


class _StopForward(Exception):
    """Raised by a pre-hook to end a forward after the layers it needed."""


@dataclass
class DecodeSequence:
    """One sequence of a decode step: its cache, the token to feed and that token's position."""

    cache: SplicedCache
    token: int
    position: int


class ModelRunner:
    """Forwards of one transformers causal LM prepared by its family adapter (module docstring).

    ``reserve_tokens``: room preallocated after a prefill for generated tokens.
    ``max_positions``: the context window in force (``None``: unknown, no check); requests are
    checked against it (:meth:`check_window`) and decoding stops at it.
    ``forward_hooks``: callables run before every forward with a :class:`ForwardCall` (tests
    count forwards with them, or raise to interrupt one).
    """

    def __init__(self, model, adapter, device: torch.device, dtype: torch.dtype,
                 reserve_tokens: int = 256, max_positions: int | None = None) -> None:
        self.model = model
        self.max_positions = max_positions
        self.adapter = adapter
        self.device = device
        self.dtype = dtype
        self.reserve_tokens = reserve_tokens
        self.num_layers, self.kv_heads, self.head_dim = adapter.kv_shape(model)
        self.window = adapter.sliding_window()  # windows are by position: never the index fast path
        self.forward_hooks: list[ForwardHook] = []
        self.lora = LoraRegistry(model)  # LoRA adapters (promptcache.lora); caches carry theirs
        self.lora_name: str | None = None  # the adapter scope: what new caches and the oracle run under

    @contextmanager
    def lora_scope(self, name: str | None) -> Iterator[None]:
        """Run under LoRA adapter ``name`` (``None``: the base model): caches made inside are
        stamped with it, and every forward over such a cache puts it in force first, whenever
        it runs (a server interleaves requests of different adapters)."""
        self.lora.check(name)
        prev, self.lora_name = self.lora_name, name
        try:
            yield
        finally:
            self.lora_name = prev

    def model_fingerprint(self) -> str:
        """The "model" part of cache keys in the current adapter scope (base model: the plain
        ``model_fingerprint``, unchanged by adapters being loaded; see promptcache.lora)."""
        return self.lora.fingerprint(self.lora_name)

    def check_window(self, needed: int, what: str, file: str | None = None, line: int | None = None) -> None:
        """Refuse a request needing ``needed`` positions (``0..needed-1``) past the context window.

        PML prompts get a :class:`PromptError` naming the prompt file (``file`` or ``line`` given);
        plain-text and chat prompts a ``ValueError``.
        """
        limit = self.max_positions
        if limit is None or needed <= limit:
            return
        msg = (f"{what} needs {needed} positions, more than this model's context window of {limit} "
               f"positions ({self.adapter.family})")
        raise PromptError(msg, file, line) if file is not None or line is not None else ValueError(msg)

    # ------------------------------------------------------------------ caches

    def positions(self, values: Sequence[int] | range) -> torch.Tensor:
        return torch.as_tensor(list(values), dtype=torch.long, device=self.device)

    def new_cache(self, pieces: Sequence[ModuleKV] = (), reserve: int | None = None) -> SplicedCache:
        """A cache spliced from ``pieces`` (each with ``positions``), keys at their positions."""
        if any(p.positions is None for p in pieces):
            raise ValueError("every piece of a spliced cache needs its layout positions")
        past = (torch.cat([p.positions.to(self.device) for p in pieces]) if pieces
                else torch.zeros(0, dtype=torch.long, device=self.device))
        cache = SplicedCache(list(pieces), self.num_layers, self.device,
                             self.reserve_tokens if reserve is None else reserve, past)
        cache.lora = self.lora_name  # the adapter every forward over this cache runs under
        return cache

    @staticmethod
    def causal_visible(past_pos: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        """The request rule: a query sees every key at an earlier position, and itself."""
        return torch.cat([past_pos[None, :] < q_pos[:, None], q_pos[None, :] <= q_pos[:, None]], dim=1)

    def past_then_causal(self, past: int, n: int) -> torch.Tensor:
        """``[n, past + n]`` visibility: every past key, and the ``n`` queries causally among themselves
        (what ``visible=None`` means; built only when the model's causal path cannot serve it)."""
        visible = torch.ones(n, past + n, dtype=torch.bool, device=self.device)
        visible[:, past:] = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
        return visible

    # ------------------------------------------------------------------ forwards

    def index_causal(self, past_pos: torch.Tensor, q_pos: torch.Tensor, visible: torch.Tensor | None) -> bool:
        """Can the model's own 2-D-mask causal path stand in for ``visible``? (faster, no 4-D mask)"""
        if self.window is not None:
            return False
        n = len(q_pos)
        contiguous = n == 1 or bool((q_pos[1:] - q_pos[:-1] == 1).all())
        if not contiguous or (len(past_pos) and int(past_pos.max()) >= int(q_pos[0])):
            return False
        return visible is None or bool(visible[:, : len(past_pos)].all())

    def forward(self, cache: SplicedCache, ids: Sequence[int], q_pos: torch.Tensor,
                visible: torch.Tensor | None = None, keep: int = 1, logits: bool = True,
                last_layer: int | None = None) -> torch.Tensor | None:
        """One forward of ``ids`` at ``q_pos`` over ``cache``; ``visible`` ``[q, past + q]``, or
        ``None``: every past key and the queries causally among themselves, built densely only when
        the model's own causal path cannot be used (a dense ``[n, n]`` matrix of a long run costs
        O(n^2) memory). Appends the new keys to ``cache`` and their positions to
        ``cache.key_positions``.

        Returns the logits of query ``len(ids) - keep`` (default: the last one), or ``None`` with
        ``logits=False``. ``last_layer``: stop after that decoder layer (layers above it leave no
        KV; the cache is then only good for reading layers ``0..last_layer``).
        """
        for hook in self.forward_hooks:
            hook(ForwardCall(ids, q_pos, visible, cache))
        self.lora.activate(getattr(cache, "lora", self.lora_name))
        compiled = getattr(cache, "compiled", None)  # a static-buffer cache: the fast path
        if compiled is not None and last_layer is None:
            return compiled.forward(cache, ids, q_pos, visible, keep=keep, logits=logits)
        past_pos = cache.key_positions
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        if self.index_causal(past_pos, q_pos, visible):
            mask = torch.ones(1, len(past_pos) + len(ids), dtype=torch.long, device=self.device)
        else:
            if visible is None:
                visible = self.past_then_causal(len(past_pos), len(ids))
            mask = self.adapter.attention_mask(visible, q_pos, torch.cat([past_pos, q_pos]), self.dtype)
        stop = None
        layers = self.adapter.decoder_layers(self.model) if last_layer is not None else []
        if last_layer is not None and last_layer + 1 < len(layers):
            def raise_stop(module, args, kwargs):  # noqa: ARG001
                raise _StopForward
            stop = layers[last_layer + 1].register_forward_pre_hook(raise_stop, with_kwargs=True)
        try:
            out = self.model(input_ids=input_ids, position_ids=q_pos[None], attention_mask=mask,
                             past_key_values=cache, use_cache=True, logits_to_keep=keep)
        except _StopForward:
            out = None
        finally:
            if stop is not None:
                stop.remove()
        cache.key_positions = torch.cat([past_pos, q_pos])
        return out.logits[0, 0] if logits and out is not None else None

    def prefill(self, pieces: Sequence[ModuleKV], ids: Sequence[int], q_pos: torch.Tensor,
                visible: torch.Tensor | None = None, reserve: int | None = None, keep: int = 1,
                logits: bool = True, last_layer: int | None = None
                ) -> tuple[torch.Tensor | None, SplicedCache]:
        """Splice ``pieces`` into a new cache and run ``ids`` at ``q_pos`` over it.

        Returns ``(logits of query len(ids) - keep, cache)``; the rest as in :meth:`forward`.
        """
        cache = self.new_cache(pieces, reserve)
        out = self.forward(cache, ids, q_pos, visible, keep=keep, logits=logits, last_layer=last_layer)
        return out, cache

    def prefill_baseline(self, ids: Sequence[int]) -> tuple[torch.Tensor, SplicedCache]:
        """The no-cache baseline: ``ids`` at positions ``0..n-1``, one causal prefill."""
        logits, cache = self.prefill([], ids, torch.arange(len(ids), device=self.device))  # plain causal
        return logits, cache

    def oracle_forward(self, plan) -> torch.Tensor:
        """ONE forward over ``plan`` (positions and 4-D mask); see :func:`oracle_forward`."""
        self.lora.activate(self.lora_name)
        with torch_sdpa_only(self.model):  # not the fast path's AMX attention: the oracle checks it
            return oracle_forward(self.model, self.adapter, plan, self.device, self.dtype)

    # ------------------------------------------------------------------ decoding

    def decode_step(self, batch: Sequence[DecodeSequence]) -> list[torch.Tensor]:
        """One generated token per sequence, attending to everything in its cache.

        Returns each sequence's next-token logits. Runs the sequences one forward each (batch 1);
        the interface is the batched one.
        """
        out = []
        for seq in batch:
            q_pos = torch.tensor([seq.position], dtype=torch.long, device=self.device)
            visible = torch.ones(1, len(seq.cache.key_positions) + 1, dtype=torch.bool, device=self.device)
            out.append(self.forward(seq.cache, [seq.token], q_pos, visible))
        return out

    def decode(self, logits: torch.Tensor, cache: SplicedCache, prompt_ids: list[int],
               options: SamplingOptions, max_new_tokens: int, stream: Callable[[str], None] | None,
               next_pos: int, eos_ids: set[int], detokenize: Callable[[list[int]], str]
               ) -> tuple[list[int], str, bool]:
        """The token loop after a prefill: choose, stop, feed back at consecutive positions.

        Generated token ``k`` sits at position ``next_pos + k``, which must lie inside the context
        window. Returns the generated ids, the text kept (cut at a stop string or before EOS) and
        whether the window cut generation short of ``max_new_tokens``. The per-token logic is
        :class:`TokenStream`, which the server's scheduler uses one step at a time.
        """
        seq = TokenStream(options, prompt_ids, self.device, eos_ids, detokenize, max_new_tokens,
                          next_pos, self.max_positions)
        while not seq.done:
            token = seq.push(logits)
            if stream is not None:
                delta = seq.take_text()
                if delta:
                    stream(delta)
            if seq.done:
                break
            logits = self.decode_step([DecodeSequence(cache, token, seq.next_pos)])[0]
            seq.next_pos += 1
        return seq.generated, seq.text, seq.window_full

    def sync(self) -> None:
        """Wait for the device (CUDA) so that wall-clock times are honest."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def oracle_forward(model, adapter, plan, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """ONE forward over ``plan.token_ids`` at ``plan.position_ids`` with a 4-D mask of ``plan.visible``.

    Returns the logits of the last prompt token (the highest position): what the cached path must match.
    """
    ids = plan.token_ids.to(device)
    pos = plan.position_ids.to(device)
    mask = adapter.attention_mask(plan.visible.to(device), pos, pos, dtype)
    out = model(input_ids=ids[None], position_ids=pos[None], attention_mask=mask, use_cache=False)
    last = int(torch.nonzero(plan.in_prompt).max())
    return out.logits[0, last].float()
