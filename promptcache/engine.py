"""The Prompt Cache engine: encode module caches once, splice them per request, generate.

Public surface: :class:`PromptCache` (``add_schema``, ``remove_schema``, ``plan``,
``next_token_logits``, ``generate``, ``memory_report``, ``prefix_stats``) and :class:`GenerationResult`.
The rules for who attends to whom live in :mod:`promptcache.plan`; this module only runs forwards.
Plain-text and chat prompts (no PML) go to automatic prefix caching, :mod:`promptcache.prefix.engine_glue`.
Module caches are keyed by content and held in device/host tiers over an optional persistent store
(``store_report``; :mod:`promptcache.tiers`, :mod:`promptcache.module_keys`, docs/store.md).
"""

from __future__ import annotations

import itertools
import numbers
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from .generation import SamplingOptions, StopChecker, TokenChooser, eos_token_ids
from .kvcache import ModuleKV, SplicedCache
from .models import adapter_for
from .models.positions import past_key_positions, set_key_positions
from .module_keys import ModuleKey, module_keys
from .partial_encode import forwards_needed
from .plan import (POLICIES, Plan, Request, build_plan, encode_groups, encoding_contexts,
                   make_request, stored_segments)
from .pml.binding import bind
from .pml.errors import PromptError, SchemaError
from .pml.layout import Layout, build_layout
from .pml.model import Prompt, Schema
from .pml.parser import load_prompt, load_schema, parse_prompt, parse_schema
from .prefix.engine_glue import PrefixRunner, is_pml_prompt
from .recompute import cached_spans, parse_policy, prefill_with_recompute, prepare
from .relocate import relocation_for
from .roles import ChatRenderer
from .tiers import SchemaKV, TieredModuleCache


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


@dataclass
class SchemaState:
    layout: Layout
    contexts: list[list[int]]
    kv: SchemaKV | dict[int, ModuleKV]        # stored segment -> KV, fetched from the tiers
    positions: dict[int, torch.Tensor]
    report: EncodeReport
    keys: dict[int, ModuleKey] = field(default_factory=dict)  # stored segment -> content key
    expect: dict = field(default_factory=dict)   # what store entries of this schema must match
    meta: dict = field(default_factory=dict)     # meta common to this schema's store entries


def _looks_like_xml(text: str) -> bool:
    return text.lstrip().startswith("<")


class PromptCache:
    """Modular attention reuse over one transformers causal LM.

    Args:
        model, tokenizer: any supported transformers model (see ``promptcache.models``) and its tokenizer,
            loaded from disk or built in memory.
        encoding: ``"scaffold"`` (default) or ``"independent"``; see :mod:`promptcache.plan`.
        placement: ``"device"`` keeps module caches in device memory; ``"host"`` keeps them in (pinned,
            on CUDA) host memory and copies them per request.
        reserve_tokens: room preallocated after the prompt for generated tokens.
        progress: show a progress bar while encoding schemas with several forwards.
        recompute: default selective-recompute policy (``"none"``, ``"boundary:K"``, ``"deviation:R"``,
            ``"full"``; see :mod:`promptcache.recompute`); ``generate``/``next_token_logits`` may override it.
        store: a persistent module-cache store (directory, ``redis://...``, ``memory://`` URL or a
            ``CacheStore``): modules are loaded from it instead of encoded, and written to it.
        max_device_bytes, max_host_bytes: byte budgets of the device and host tiers of module caches
            (``None``: unlimited); least-recently-used modules are evicted device -> host -> store.
            See :mod:`promptcache.tiers` and docs/store.md.
        prefix_cache, prefix_max_bytes, prefix_policy, prefix_ttl_s: automatic prefix caching of
            plain-text and chat prompts (a radix tree of KV on the device; byte budget, ``"lru"``,
            ``"lfu"`` or ``"ttl"`` eviction with ``prefix_ttl_s`` seconds); see docs/prefix.md.
        max_positions: the context window: a schema laid out past it, or a prompt whose positions
            exceed it, is refused before any tensor is allocated, and generation stops at it.
            ``None`` (default): the model's own (:meth:`ModelAdapter.max_positions`), which may be
            unknown (ALiBi Falcon: no check). A smaller value tightens the limit.
    """

    def __init__(self, model, tokenizer, *, encoding: str = "scaffold", placement: str = "device",
                 device: str | torch.device | None = None, reserve_tokens: int = 256,
                 progress: bool = True, recompute: str = "none", store=None,
                 max_device_bytes: int | None = None, max_host_bytes: int | None = None,
                 prefix_cache: bool = True, prefix_max_bytes: int | None = None,
                 prefix_policy: str = "lru", prefix_ttl_s: float | None = None,
                 max_positions: int | None = None) -> None:
        if encoding not in POLICIES:
            raise ValueError(f"encoding must be one of {', '.join(POLICIES)}, not {encoding!r}")
        if placement not in ("device", "host"):
            raise ValueError(f"placement must be 'device' or 'host', not {placement!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.adapter = adapter_for(model)
        self.adapter.prepare(model)
        self.max_positions = _window(max_positions, self.adapter.max_positions())
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if self.device != next(model.parameters()).device:
            model.to(self.device)
        self.dtype = next(model.parameters()).dtype
        self.encoding = encoding
        self.placement = placement
        self.reserve_tokens = reserve_tokens
        parse_policy(recompute)  # a bad policy string fails here, not at the first request
        self.recompute = recompute
        self.progress = progress
        self.renderer = ChatRenderer(tokenizer, self.adapter.fallback_roles())
        self.num_layers, self.kv_heads, self.head_dim = self.adapter.kv_shape(model)
        self.schemas: dict[str, SchemaState] = {}
        if store is not None:
            from .store import open_store

            store = open_store(store)
        self.store = store
        self.relocation = relocation_for(model, self.adapter)
        self._modules = TieredModuleCache(self.device, placement, store, self.relocation,
                                          (self.num_layers, self.kv_heads, self.head_dim), self.dtype,
                                          max_device_bytes, max_host_bytes)
        self._store_counts = {"store_hits": 0, "store_misses": 0}
        self._eos = eos_token_ids(model, tokenizer)
        self._sliding = bool(getattr(model.config.get_text_config(), "sliding_window", None))
        self.prefix = PrefixRunner(self, enabled=prefix_cache, max_bytes=prefix_max_bytes,
                                   policy=prefix_policy, ttl_s=prefix_ttl_s)

    # ------------------------------------------------------------------ schemas

    def add_schema(self, schema: str | os.PathLike | Schema, *, base_dir: str | os.PathLike | None = None,
                   allowed_root: str | os.PathLike | None = None) -> EncodeReport:
        """Parse (a file path, PML text or a ``Schema``), lay out and encode every cacheable module.

        Schemas are trusted within their folder (docs/security.md): a file's ``src=`` includes
        resolve inside its folder, or inside ``allowed_root``; PML text includes files only when
        given ``base_dir`` (confined to it, or to ``allowed_root``). Re-adding a schema of the
        same name replaces it.
        """
        if isinstance(schema, Schema):
            parsed = schema
        elif isinstance(schema, str) and _looks_like_xml(schema):
            parsed = parse_schema(schema, base_dir=base_dir, allowed_root=allowed_root)
        else:
            parsed = load_schema(schema, allowed_root=allowed_root)
        layout = build_layout(parsed, self.renderer)
        contexts = encoding_contexts(layout, self.encoding)
        state = self._encode(layout, contexts)
        self.schemas[parsed.name] = state
        return state.report

    def remove_schema(self, name: str) -> None:
        if name not in self.schemas:
            raise KeyError(f"no schema named {name!r} (have: {', '.join(self.schemas) or 'none'})")
        self._modules.unref(k.tier_key for k in self.schemas.pop(name).keys.values())

    def layout(self, name: str) -> Layout:
        return self._state(name).layout

    def _state(self, name: str, prompt: Prompt | None = None) -> SchemaState:
        state = self.schemas.get(name)
        if state is None:
            have = ", ".join(sorted(self.schemas)) or "none"
            raise PromptError(f"schema {name!r} has not been added (added schemas: {have}); "
                              "call add_schema() first",
                              prompt.file if prompt else None, prompt.loc.line if prompt else None)
        return state

    @torch.inference_mode()
    def _encode(self, layout: Layout, contexts: list[list[int]]) -> SchemaState:
        """Key every stored segment, take what the tiers/store hold, encode only the rest."""
        from .store import dtype_name, model_fingerprint

        self._check_schema_window(layout)  # before any tensor of this schema exists

        segs = layout.segments
        keep = stored_segments(layout)
        fp = model_fingerprint(self.model)
        keys = module_keys(layout, contexts, keep, model=fp, dtype=dtype_name(self.dtype),
                           policy=self.encoding, relative=self.relocation.relative,
                           offset_sensitive=self.relocation.offset_sensitive)
        expect = {"model": fp, "dtype": dtype_name(self.dtype), "policy": self.encoding,
                  "positions": "relative" if self.relocation.relative else "absolute"}
        meta = {**expect, "schema": layout.schema.name, "family": self.adapter.family}
        positions = {i: torch.tensor(list(segs[i].positions), dtype=torch.long, device=self.device)
                     for i in keep}
        state = SchemaState(layout, contexts, {}, positions, None, keys, expect, meta)  # type: ignore[arg-type]
        state.kv = SchemaKV(keys, lambda i: self._module_kv(state, i))
        try:
            kv, pinned, counts = self._obtain(state, keep, progress=True)
        except BaseException:  # e.g. interrupted: what was encoded stays in the store, not in memory
            self._modules.drop_unreferenced(k.tier_key for k in keys.values())
            raise
        nbytes = sum(kv[i].nbytes for i in keep)
        self._modules.release(pinned)
        old = self.schemas.get(layout.schema.name)
        self._modules.ref(k.tier_key for k in keys.values())
        if old is not None:
            self._modules.unref(k.tier_key for k in old.keys.values())
        self._modules.enforce()
        state.report = EncodeReport(layout.schema.name, self.encoding, len(keep),
                                    sum(len(segs[i].tokens) for i in keep), counts["tokens"],
                                    counts["forwards"], counts["encode_s"], nbytes, counts["load_s"],
                                    counts["store_hits"], counts["memory_hits"], counts["encoded"])
        return state

    def _check_schema_window(self, layout: Layout) -> None:
        """Refuse a layout whose positions run past the model's context window."""
        limit = self.max_positions
        if limit is not None and layout.length > limit:
            schema = layout.schema
            raise SchemaError(f"schema {schema.name!r} lays out {layout.length} positions (0..{layout.length - 1}), "
                              f"more than this model's context window of {limit} positions "
                              f"({self.adapter.family}); shorten its modules or parameter lengths",
                              schema.file, schema.root.loc.line)

    def check_prompt_window(self, needed: int, what: str, file: str | None = None,
                            line: int | None = None) -> None:
        """Refuse a request needing ``needed`` positions (``0..needed-1``) past the context window.

        PML prompts get a :class:`PromptError` naming the prompt file (``file`` given); plain-text
        and chat prompts a ``ValueError``.
        """
        limit = self.max_positions
        if limit is None or needed <= limit:
            return
        msg = (f"{what} needs {needed} positions, more than this model's context window of {limit} "
               f"positions ({self.adapter.family})")
        raise PromptError(msg, file, line) if file is not None or line is not None else ValueError(msg)

    def _module_kv(self, state: SchemaState, i: int) -> ModuleKV:
        """One stored segment's KV (not pinned): from the tiers or the store, else re-encoded."""
        kv, pinned, _ = self._obtain(state, [i])
        self._modules.release(pinned)
        self._modules.enforce()
        return kv[i]

    def _obtain(self, state: SchemaState, needed: list[int], progress: bool = False
                ) -> tuple[dict[int, ModuleKV], list[str], dict]:
        """The KV of the stored segments ``needed``, pinned: from the tiers or the store, the rest encoded.

        Returns ``(kv by segment, tier keys to release, counts)``. A segment no tier holds is
        re-encoded with whatever of its context is missing (:func:`forwards_needed`); encoded
        segments go into the home tier and, write-through, into the store.
        """
        work: dict[int, ModuleKV] = {}
        pinned: list[str] = []
        counts = {"tokens": 0, "forwards": 0, "encode_s": 0.0, "load_s": 0.0, "store_hits": 0,
                  "memory_hits": 0, "encoded": 0}

        def available(i: int) -> bool:
            if i in work:
                return True
            key = state.keys.get(i)
            if key is None:
                return False  # parameter slots and cache="false" text are never stored
            t0 = time.perf_counter()
            kv, source = self._modules.fetch(key, state.expect, pin=True)
            counts["load_s"] += time.perf_counter() - t0
            if kv is None:
                return False
            work[i] = kv
            pinned.append(key.tier_key)
            counts["store_hits" if source == "store" else "memory_hits"] += 1
            return True

        try:
            missing = [i for i in needed if not available(i)]
            if missing:
                runs = forwards_needed(encode_groups(state.contexts), available, missing)
                self._encode_runs(state, runs, work, pinned, counts, progress)
        except BaseException:
            self._modules.release(pinned)
            raise
        self._store_counts["store_hits"] += counts["store_hits"]
        self._store_counts["store_misses"] += counts["encoded"]
        return {i: work[i] for i in needed}, pinned, counts

    def _encode_runs(self, state: SchemaState, runs: list, work: dict[int, ModuleKV], pinned: list[str],
                     counts: dict, progress: bool) -> None:
        """Run the encoding forwards ``runs`` (past + computed segments) into ``work`` and the tiers.

        Consecutive runs mostly share their past (a union's members, the text after a union): the
        previous forward's cache (a :class:`_Trunk`) supplies the shared prefix as one piece, so
        assembling a past of P segments is not P small copies per run (issue 12, item 13).
        """
        segs = state.layout.segments
        bar = tqdm(runs, desc=f"encoding {state.layout.schema.name}", unit="fwd",
                   disable=not (progress and self.progress) or len(runs) < 4, leave=False)
        trunk: _Trunk | None = None
        for g in bar:
            t0 = time.perf_counter()
            ids = [t for i in g.segments for t in segs[i].tokens]
            q_pos = torch.tensor([p for i in g.segments for p in segs[i].positions], device=self.device)
            shared, tokens = trunk.shared(g.context) if trunk is not None else (0, 0)
            rest = g.context[shared:]
            past_pos = torch.tensor([p for i in rest for p in segs[i].positions], dtype=torch.long,
                                    device=self.device)
            pieces = [work[i] for i in rest]
            if tokens:
                past_pos = torch.cat([trunk.positions[:tokens], past_pos])
                pieces.insert(0, trunk.kv.slice(tokens))
            cache = SplicedCache(pieces, self.num_layers, self.device)
            set_key_positions(cache, past_pos[None])
            # visible=None: all of the past, causal among the run (no dense matrix unless needed)
            self._forward(ids, q_pos, past_pos, None, cache, logits=False)
            layers = [(layer.keys, layer.values) for layer in cache.layers]
            at = len(past_pos)
            # The trunk may stand in for work[i] only up to the first segment already held (a loaded
            # copy, kept below, need not equal this recompute bit for bit).
            fresh = next((k for k, i in enumerate(g.segments) if i in work), len(g.segments))
            for i in g.segments:
                n = len(segs[i].tokens)
                if i not in work:  # a loaded segment recomputed inside a chain keeps its loaded copy
                    kv = ModuleKV.from_layers(layers, at, at + n)
                    key = state.keys.get(i)
                    if key is not None:
                        owner = "/".join(segs[i].owner) or "(root)"
                        meta = {**state.meta, "module": owner, "offset": key.base, "tokens": n}
                        kv = self._modules.put(key, kv, meta, pin=True)
                        pinned.append(key.tier_key)
                        counts["encoded"] += 1
                    work[i] = kv
                at += n
            trunk = _Trunk.after(g.context + g.segments[:fresh], segs, layers, torch.cat([past_pos, q_pos]))
            self._sync()
            counts["tokens"] += len(ids)
            counts["forwards"] += 1
            counts["encode_s"] += time.perf_counter() - t0

    # ------------------------------------------------------------------ forwards

    def _index_causal(self, past_pos: torch.Tensor, q_pos: torch.Tensor, visible: torch.Tensor | None) -> bool:
        """Can the model's own 2-D-mask causal path stand in for ``visible``? (faster, no 4-D mask)"""
        if self._sliding:
            return False
        n = len(q_pos)
        contiguous = n == 1 or bool((q_pos[1:] - q_pos[:-1] == 1).all())
        if not contiguous or (len(past_pos) and int(past_pos.max()) >= int(q_pos[0])):
            return False
        return visible is None or bool(visible[:, : len(past_pos)].all())

    def _forward(self, ids: list[int], q_pos: torch.Tensor, past_pos: torch.Tensor,
                 visible: torch.Tensor | None, cache, logits: bool = True, keep: int = 1):
        """One forward of ``ids`` at ``q_pos`` over ``cache`` whose keys sit at ``past_pos``.

        ``visible`` ``[q, past + q]``; ``None`` means every past key and the queries causally, built
        densely only when the model's own causal path cannot be used (a dense ``[n, n]`` matrix
        of a long run costs O(n^2) memory: issue 12, item 13).

        Returns the logits of query ``len(ids) - keep`` (default: the last one), or ``None``.
        """
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        if self._index_causal(past_pos, q_pos, visible):
            mask = torch.ones(1, len(past_pos) + len(ids), dtype=torch.long, device=self.device)
        else:
            k_pos = torch.cat([past_pos, q_pos])
            if visible is None:
                visible = past_then_causal(len(past_pos), len(ids), self.device)
            mask = self.adapter.attention_mask(visible, q_pos, k_pos, self.dtype)
        out = self.model(input_ids=input_ids, position_ids=q_pos[None], attention_mask=mask,
                         past_key_values=cache, use_cache=True, logits_to_keep=keep)
        set_key_positions(cache, torch.cat([past_pos, q_pos])[None])  # for ALiBi and sliding windows
        return out.logits[0, 0] if logits else None

    # ------------------------------------------------------------------ requests

    def _parse_prompt(self, prompt: str | os.PathLike | Prompt) -> Prompt:
        """A ``Prompt``; PML text (a ``str`` is never opened as a file); a ``Path`` is loaded.

        Prompts are untrusted: naming a file in a ``str`` must neither read it nor reveal whether
        it exists, so file loading is explicit (``load_prompt(path)`` or a ``pathlib.Path``)."""
        if isinstance(prompt, Prompt):
            return prompt
        if isinstance(prompt, (str, bytes)):
            if isinstance(prompt, str) and not _looks_like_xml(prompt):
                raise PromptError("a str prompt given here must be PML text (<prompt schema=...>); a "
                                  "str is never opened as a file: to use a prompt file, pass "
                                  "promptcache.load_prompt(path) or a pathlib.Path")
            return parse_prompt(prompt)
        if isinstance(prompt, os.PathLike):
            return load_prompt(prompt)
        raise TypeError(f"a PML prompt is a Prompt, PML text or a pathlib.Path, not {type(prompt).__name__}")

    def _request(self, prompt) -> tuple[SchemaState, Request]:
        parsed = self._parse_prompt(prompt)
        state = self._state(parsed.schema, parsed)
        bound = bind(parsed, state.layout, self.renderer)
        request = make_request(bound, state.contexts)
        needed = max(request.computed_pos, default=-1) + 1  # the last prompt token is always computed
        self.check_prompt_window(needed, f"prompt for schema {parsed.schema!r}", parsed.file, parsed.loc.line)
        return state, request

    def plan(self, prompt) -> Plan:
        """The dense plan of a prompt: tokens, positions, origin and visibility (the oracle's input)."""
        state, request = self._request(prompt)
        return build_plan(request, state.layout, state.contexts, self.encoding)

    def _prompt_ids(self, state: SchemaState, request: Request) -> list[int]:
        """The request's tokens in position order (what the baseline computes)."""
        segs = state.layout.segments
        pairs = [(segs[i].start + k, segs[i].tokens[k]) for i, n in request.cached_spans for k in range(n)]
        pairs += list(zip(request.computed_pos, request.computed_ids))
        return [t for _, t in sorted(pairs)]

    def _prefill_cached(self, state: SchemaState, request: Request, recompute: str | None = None):
        """Splice the request's module caches, optionally recompute some of them, prefill the rest.

        Returns ``(first-token logits, cache, next position, tokens recomputed)``. The modules are
        pinned in their tier (loaded or re-encoded if evicted) until the prefill has copied them
        into the request's own cache; then the tiers are brought back within their budgets.
        """
        kv, pinned, _ = self._obtain(state, [i for i, _ in request.cached_spans])
        try:
            return self._prefill_spliced(state, request, recompute, kv)
        finally:
            self._modules.release(pinned)
            self._modules.enforce()

    def _prefill_spliced(self, state: SchemaState, request: Request, recompute: str | None,
                         kv: dict[int, ModuleKV]):
        pieces = [kv[i].slice(n) if n < kv[i].length else kv[i] for i, n in request.cached_spans]
        past_pos = (torch.cat([state.positions[i][:n] for i, n in request.cached_spans])
                    if request.cached_spans else torch.zeros(0, dtype=torch.long, device=self.device))
        # Parsed first: a bad override fails even when nothing is cached.
        policy = parse_policy(self.recompute if recompute is None else recompute)
        if policy.kind != "none" and request.cached_spans:
            spans = cached_spans(state.layout.segments, request.cached_spans)
            # The uncached tokens go along: a recomputed token must see those before it.
            pieces, selection = prepare(self, pieces, past_pos, spans, policy,
                                        (request.computed_ids, request.computed_pos))
            if len(selection):
                logits, cache = prefill_with_recompute(self, pieces, past_pos, spans, selection,
                                                       request.computed_ids, request.computed_pos)
                return logits, cache, max(request.computed_pos) + 1, len(selection)
        cache = SplicedCache(pieces, self.num_layers, self.device, self.reserve_tokens)
        q_pos = torch.tensor(request.computed_pos, dtype=torch.long, device=self.device)
        visible = torch.cat([past_pos[None, :] < q_pos[:, None], q_pos[None, :] <= q_pos[:, None]], dim=1)
        set_key_positions(cache, past_pos[None])
        logits = self._forward(request.computed_ids, q_pos, past_pos, visible, cache)
        return logits, cache, int(q_pos.max()) + 1, 0

    def _prefill_baseline(self, ids: list[int]):
        from transformers import DynamicCache

        cache = DynamicCache()
        q_pos = torch.arange(len(ids), device=self.device)
        logits = self._forward(ids, q_pos, q_pos[:0], None, cache)  # plain causal
        return logits, cache, len(ids)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def next_token_logits(self, prompt, use_cache: bool = True, recompute: str | None = None, *,
                          insert_prefix: bool = True) -> torch.Tensor:
        """Logits of the first generated token (float32 tensor of vocabulary size)."""
        if not is_pml_prompt(prompt):  # plain text or chat messages: prefix caching
            return self.prefix.next_token_logits(prompt, use_cache, insert_prefix)
        state, request = self._request(prompt)
        if use_cache:
            logits, _, _, _ = self._prefill_cached(state, request, recompute)
        else:
            logits, _, _ = self._prefill_baseline(self._prompt_ids(state, request))
        return logits.float()

    @torch.inference_mode()
    def oracle_logits(self, prompt) -> torch.Tensor:
        """Logits from ONE ordinary forward over the plan with its positions and 4-D mask."""
        return oracle_forward(self.model, self.adapter, self.plan(prompt), self.device, self.dtype)

    @torch.inference_mode()
    def generate(self, prompt, max_new_tokens: int = 64, use_cache: bool = True, *,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 repetition_penalty: float = 1.0, stop: list[str] | None = None,
                 seed: int | None = None, stream: Callable[[str], None] | None = None,
                 recompute: str | None = None, insert_prefix: bool = True) -> GenerationResult:
        """Generate a reply; greedy unless ``temperature > 0``. ``stream`` receives text as it grows.

        ``prompt`` is PML, plain text or a list of chat messages (dispatch rules:
        :func:`promptcache.prefix.engine_glue.prompt_kind`). The last two reuse the longest cached
        prefix and, with ``insert_prefix``, cache the prompt and generated tokens for next time.

        ``max_new_tokens``: at most this many tokens are generated; ``0`` means *prefill only*: the
        prompt is computed and the result holds ``first_token_logits`` (and the timings) with no
        text and no token ids. A negative value (or a non-integer) raises ``ValueError``.
        Generation also stops at the model's context window (``max_positions``): the prompt plus
        the generated tokens never use more positions; ``result.window_full`` then says so. A
        prompt that alone does not fit is refused (``PromptError`` for PML, ``ValueError`` otherwise).
        """
        check_max_new_tokens(max_new_tokens)
        if not is_pml_prompt(prompt):
            options = SamplingOptions(temperature, top_p, top_k, repetition_penalty, list(stop or []), seed)
            return self.prefix.generate(prompt, max_new_tokens, use_cache, insert_prefix, options, stream)
        self._sync()
        t0 = time.perf_counter()
        state, request = self._request(prompt)
        recomputed = 0
        if use_cache:
            logits, cache, next_pos, recomputed = self._prefill_cached(state, request, recompute)
            self._sync()
            ttft = time.perf_counter() - t0
            prompt_ids = self._prompt_ids(state, request)  # for the repetition penalty; after TTFT
            cached, computed = request.num_cached, len(request.computed_ids)
        else:
            prompt_ids = self._prompt_ids(state, request)
            logits, cache, next_pos = self._prefill_baseline(prompt_ids)
            self._sync()
            ttft = time.perf_counter() - t0
            cached, computed = 0, len(prompt_ids)
        first_logits = logits.float().cpu()
        options = SamplingOptions(temperature, top_p, top_k, repetition_penalty, list(stop or []), seed)
        generated, text, window_full = self.decode(logits, cache, prompt_ids, options, max_new_tokens,
                                                   stream, next_pos)
        self._sync()
        return GenerationResult(text, generated, ttft, time.perf_counter() - t0, len(prompt_ids), cached,
                                computed, use_cache, recomputed, first_logits, window_full)

    def decode(self, logits: torch.Tensor, cache, prompt_ids: list[int], options: SamplingOptions,
               max_new_tokens: int, stream: Callable[[str], None] | None, next_pos: int
               ) -> tuple[list[int], str, bool]:
        """The token loop after a prefill: choose, stop, feed back at consecutive positions.

        Generated token ``k`` sits at position ``next_pos + k``, which must lie inside the context
        window. Returns the generated ids, the text kept (cut at a stop string or before EOS) and
        whether the window cut generation short of ``max_new_tokens``.
        """
        chooser = TokenChooser(options, prompt_ids, self.device)
        stopper = StopChecker(self._eos, options.stop, self.renderer.decode)
        generated: list[int] = []
        text, shown = "", 0
        budget = max_new_tokens
        if self.max_positions is not None:
            budget = max(0, min(max_new_tokens, self.max_positions - next_pos))
        finished = False
        for step in range(budget):
            token = chooser(logits)
            generated.append(token)
            finished, text = stopper.done(generated)
            if stream is not None and len(text) > shown:
                stream(text[shown:])
                shown = len(text)
            if finished or step == budget - 1:
                break
            logits = self._decode_step(token, next_pos, cache)
            next_pos += 1
        return generated, text, budget < max_new_tokens and not finished

    def _decode_step(self, token: int, position: int, cache) -> torch.Tensor:
        """One generated token at ``position``, attending to everything in ``cache``."""
        input_ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
        q_pos = torch.tensor([position], dtype=torch.long, device=self.device)
        past_len = cache.get_seq_length()
        past_pos = past_key_positions(cache, past_len, 1, self.device)[0, :past_len]
        if self._sliding:  # windows are by position, so the model's index-based mask would be wrong
            visible = torch.ones(1, past_len + 1, dtype=torch.bool, device=self.device)
            mask = self.adapter.attention_mask(visible, q_pos, torch.cat([past_pos, q_pos]), self.dtype)
        else:
            mask = torch.ones(1, past_len + 1, dtype=torch.long, device=self.device)
        out = self.model(input_ids=input_ids, position_ids=q_pos[None], attention_mask=mask,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        set_key_positions(cache, torch.cat([past_pos, q_pos])[None])
        return out.logits[0, -1]

    def prefix_stats(self) -> dict:
        """Prefix caching counters: hits, misses, hit rate, tokens reused/computed, bytes, evictions."""
        return self.prefix.stats()

    # ------------------------------------------------------------------ memory

    def bytes_per_token(self) -> int:
        """2 (K and V) x layers x kv_heads x head_dim x dtype bytes."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    def memory_report(self) -> dict:
        """Module caches per schema and module, per tier, totals, and the per-token check.

        ``modules``: one row per schema and module with its ``tokens``, ``bytes`` (its size when
        held) and how many of those bytes are now in the ``device`` and ``host`` tiers (the rest is
        in the store, or gone and re-encoded on demand). A module shared by two schemas (same
        content key) is held once but listed under both. ``total_bytes``/``total_tokens``: what the
        memory tiers hold (each entry once); ``tiers``: bytes, entries, budget, pinned, hits, misses
        and evictions per tier, and the store's counters.
        """
        bpt = self.bytes_per_token()
        rows = []
        for name, state in self.schemas.items():
            by_module: dict[str, dict] = {}
            for i, key in state.keys.items():
                owner = "/".join(state.layout.segments[i].owner) or "(root)"
                row = by_module.setdefault(owner, {"schema": name, "module": owner, "tokens": 0, "bytes": 0,
                                                   "device_bytes": 0, "host_bytes": 0})
                row["tokens"] += key.length
                row["bytes"] += key.length * bpt
                tier = self._modules.where(key.tier_key)
                if tier is not None:
                    row[f"{tier}_bytes"] += key.length * bpt
            rows.extend(by_module.values())
        residents = list(self._modules.residents())
        total = sum(r.nbytes for r in residents)
        tokens = sum(r.key.length for r in residents)
        return {"placement": self.placement, "modules": rows, "total_bytes": total, "total_tokens": tokens,
                "bytes_per_token": bpt, "consistent": total == tokens * bpt,
                "tiers": self._modules.report(), "relocation": self.relocation.mode}

    def store_report(self) -> dict | None:
        """``{"store_hits", "store_misses"}``: modules loaded from the store vs encoded in this process
        (since construction); ``None`` without a store."""
        if self.store is None:
            return None
        return dict(self._store_counts)

    def check_prompt(self, prompt, schema: Schema | None = None) -> Prompt:
        """Parse ``prompt`` and bind it to ``schema`` laid out but not encoded; return the parsed prompt.

        Why: encoding a schema takes seconds to minutes, and a misspelled module or two members of
        one union would otherwise be reported only when the prompt is first used. With ``schema``
        ``None`` the prompt is checked against the added schema it names. Raises the PML error.
        """
        parsed = self._parse_prompt(prompt)
        if schema is None:
            layout = self._state(parsed.schema, parsed).layout
        elif parsed.schema != schema.name:
            raise PromptError(f"the prompt is for schema {parsed.schema!r}, but the schema is {schema.name!r}",
                              parsed.file, parsed.loc.line)
        else:
            layout = build_layout(schema, self.renderer)
        bind(parsed, layout, self.renderer)
        return parsed


@dataclass
class _Trunk:
    """The last encoding forward's cache, kept to supply the next run's shared past in one piece.

    ``segments`` is a context chain (a context plus a run), so two chains agree on their first
    ``m`` segments exactly when their ``m``-th segments are equal: the shared prefix is found by
    bisection. ``ends[k]``: tokens in ``segments[:k + 1]``.
    """

    segments: list[int]
    ends: list[int]
    kv: ModuleKV
    positions: torch.Tensor

    @classmethod
    def after(cls, segments: list[int], segs, layers, positions: torch.Tensor) -> _Trunk:
        ends = list(itertools.accumulate(len(segs[i].tokens) for i in segments))
        kv = ModuleKV([k[0] for k, _ in layers], [v[0] for _, v in layers])
        return cls(segments, ends, kv, positions)

    def shared(self, context: list[int]) -> tuple[int, int]:
        """``(segments, tokens)`` of the longest common prefix of ``context`` and the trunk."""
        lo, hi = 0, min(len(context), len(self.segments))
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if context[mid - 1] == self.segments[mid - 1]:
                lo = mid
            else:
                hi = mid - 1
        return lo, self.ends[lo - 1] if lo else 0


def past_then_causal(past: int, n: int, device: torch.device) -> torch.Tensor:
    """``[n, past + n]`` visibility: every past key, and the ``n`` queries causally among themselves."""
    visible = torch.ones(n, past + n, dtype=torch.bool, device=device)
    visible[:, past:] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return visible


def check_max_new_tokens(max_new_tokens: int) -> None:
    """``max_new_tokens`` must be an integer >= 0 (0: prefill only)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0 (0 = prefill only), got {max_new_tokens}")


def _window(override: int | None, model_limit: int | None) -> int | None:
    """The context window in force: ``override`` (at most the model's), else the model's."""
    if override is None:
        return model_limit
    if isinstance(override, bool) or not isinstance(override, int) or override <= 0:
        raise ValueError(f"max_positions must be a positive integer or None, got {override!r}")
    return override if model_limit is None else min(override, model_limit)


def oracle_forward(model, adapter, plan: Plan, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """ONE forward over ``plan.token_ids`` at ``plan.position_ids`` with a 4-D mask of ``plan.visible``.

    Returns the logits of the last prompt token (the highest position): what the cached path must match.
    """
    ids = plan.token_ids.to(device)
    pos = plan.position_ids.to(device)
    mask = adapter.attention_mask(plan.visible.to(device), pos, pos, dtype)
    out = model(input_ids=ids[None], position_ids=pos[None], attention_mask=mask, use_cache=False)
    last = int(torch.nonzero(plan.in_prompt).max())
    return out.logits[0, last].float()
