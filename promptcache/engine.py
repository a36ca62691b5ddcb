"""The Prompt Cache engine: a facade over schemas, the module encoder and the model runner.

Public surface: :class:`PromptCache` (``add_schema``, ``remove_schema``, ``plan``, ``request``,
``next_token_logits``, ``generate``, ``begin``, ``memory_report``, ``prefix_stats``) and the results
(:mod:`promptcache.results`). A prompt goes one of two ways:

* PML: parsed and bound against its schema, turned into a request (:func:`promptcache.plan.make_request`);
  the request's modules come from :class:`~promptcache.modules.encoder.ModuleEncoder` (tiers, store,
  or re-encoded), optionally some are recomputed (:mod:`promptcache.recompute`), and the
  :class:`~promptcache.runtime.runner.ModelRunner` prefills the rest and decodes;
* plain text or chat messages: :class:`~promptcache.prefix.runner.PrefixRunner` (prefix caching).

The rules for who attends to whom live in :mod:`promptcache.plan`; forwards only in the runner.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Callable, Mapping

import torch

from .lora.engine import LoraMethods
from .lora.schemas import LoraSchemas
from .models import adapter_for
from .modules.encoder import ModuleEncoder, SchemaState
from .modules.relocate import relocation_for
from .modules.tiers import TieredModuleCache
from .plan import POLICIES, Plan, Request, build_plan, encoding_contexts, make_request
from .pml.binding import BoundPrompt, bind
from .pml.errors import PromptError
from .pml.layout import Layout, build_layout
from .pml.model import Prompt, Schema
from .pml.parser import load_prompt, load_schema, parse_prompt, parse_schema
from .prefix.runner import PrefixRunner, is_pml_prompt
from .recompute import Selection, cached_spans, choose, parse_policy, prefill_with_recompute, prepare
from .results import EncodeReport, GenerationResult
from .roles import ChatRenderer
from .runtime.compiled import CompiledForwards, WarmupReport, buffer_bucket, resolve_dtype
from .runtime.fused import FusedLongForwards
from .runtime.prepack import PackedLinears
from .runtime.prepack import supported as prepack_supported
from .runtime.kv import ModuleKV, SplicedCache
from .runtime.request import ActiveRequest, ChunkedPrefill
from .runtime.runner import ModelRunner, oracle_forward
from .runtime.sampling import SamplingOptions, check_max_new_tokens, eos_token_ids

__all__ = ["PromptCache", "ActiveRequest", "GenerationResult", "EncodeReport", "SchemaState",
           "oracle_forward", "check_max_new_tokens"]


def _looks_like_xml(text: str) -> bool:
    return text.lstrip().startswith("<")


class PromptCache(LoraMethods):
    """Modular attention reuse over one transformers causal LM.

    Args:
        model, tokenizer: any supported transformers model (see ``promptcache.models``) and its tokenizer,
            loaded from disk or built in memory.
        encoding: ``"scaffold"`` (default) or ``"independent"``; see :mod:`promptcache.plan`.
        placement: ``"device"`` keeps module caches in device memory; ``"host"`` keeps them in (pinned,
            on CUDA) host memory and copies them per request.
        reserve_tokens: room preallocated after the prompt for generated tokens.
        progress: show a progress bar while encoding schemas with several forwards.
        recompute: default selective-recompute policy (``"none"``, ``"boundary:K"``, ``"boundary:P%"``,
            ``"deviation:R"``, ``"full"``, ``"auto:B"``; see :mod:`promptcache.recompute`);
            ``generate``/``next_token_logits`` may override it.
        store: a persistent module-cache store (directory, ``redis://...``, ``memory://`` URL or a
            ``CacheStore``): modules are loaded from it instead of encoded, and written to it.
        max_device_bytes, max_host_bytes: byte budgets of the device and host tiers of module caches
            (``None``: unlimited); least-recently-used modules are evicted device -> host -> store.
            See :mod:`promptcache.modules.tiers` and docs/store.md.
        prefix_cache, prefix_max_bytes, prefix_policy, prefix_ttl_s: automatic prefix caching of
            plain-text and chat prompts (a radix tree of KV on the device; byte budget, ``"lru"``,
            ``"lfu"`` or ``"ttl"`` eviction with ``prefix_ttl_s`` seconds); see docs/prefix.md.
        max_positions: the context window: a schema laid out past it, or a prompt whose positions
            exceed it, is refused before any tensor is allocated, and generation stops at it.
            ``None`` (default): the model's own (:meth:`ModelAdapter.max_positions`), which may be
            unknown (ALiBi Falcon: no check). A smaller value tightens the limit.
        dtype: cast the model (in place) to this dtype first (``"bf16"``, ``"fp32"``, ``"fp16"`` or a
            ``torch.dtype``); ``None`` keeps the model's. Module caches and store keys follow it.
        compile: run PML cached prefills and their decode through ``torch.compile``d forwards over a
            static KV buffer, one graph per shape bucket (see docs/fastpath.md,
            :mod:`promptcache.runtime.compiled`); :meth:`warmup` compiles ahead, :meth:`compile_report`
            says what ran compiled and what did not, and why. On CPU the norms and MLPs of long eager
            forwards (full prefills, module encoding) run compiled too (:mod:`promptcache.runtime.fused`).
        prepack: prepack linear weights for oneDNN once (CPU, bf16/fp16), shared by every forward, eager
            and compiled: shorter forwards are bound by reading weights, and unpacked ones are reordered
            on every call (:mod:`promptcache.runtime.prepack`). Costs a packed copy of the weights.
            ``None`` (default): on with ``compile=True`` where supported; ``True`` insists.
        adapters: LoRA adapters to load at start, ``{name: PEFT adapter folder}``; requests pick one
            with ``adapter="name"`` (``None``: the base model). See :meth:`load_adapter`, docs/lora.md.
    """

    def __init__(self, model, tokenizer, *, encoding: str = "scaffold", placement: str = "device",
                 device: str | torch.device | None = None, reserve_tokens: int = 256,
                 progress: bool = True, recompute: str = "none", store=None,
                 max_device_bytes: int | None = None, max_host_bytes: int | None = None,
                 prefix_cache: bool = True, prefix_max_bytes: int | None = None,
                 prefix_policy: str = "lru", prefix_ttl_s: float | None = None,
                 max_positions: int | None = None, dtype: str | torch.dtype | None = None,
                 compile: bool = False, prepack: bool | None = None,
                 adapters: Mapping[str, str | os.PathLike] | None = None) -> None:
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
        cast = resolve_dtype(dtype)
        if cast is not None and cast != next(model.parameters()).dtype:
            model.to(cast)
        self.dtype = next(model.parameters()).dtype
        self.encoding = encoding
        self.placement = placement
        self.reserve_tokens = reserve_tokens
        parse_policy(recompute)  # a bad policy string fails here, not at the first request
        self.recompute = recompute
        self.progress = progress
        self.renderer = ChatRenderer(tokenizer, self.adapter.fallback_roles())
        self.runner = ModelRunner(model, self.adapter, self.device, self.dtype, reserve_tokens,
                                  self.max_positions)
        self.num_layers, self.kv_heads, self.head_dim = self.runner.num_layers, self.runner.kv_heads, \
            self.runner.head_dim
        self.prepacked = self._prepack(prepack, compile)
        self.fast = CompiledForwards(self.runner, self.adapter.family) if compile else None
        self.fused = (FusedLongForwards.of(model) if self.fast is not None and self.fast.eager_reason is None
                      and self.device.type == "cpu" else None)  # long eager forwards: fused norms/MLPs
        self.schemas: dict[str, SchemaState] = {}
        if store is not None:
            from .store import open_store

            store = open_store(store)
        self.store = store
        self.relocation = relocation_for(model, self.adapter)
        self.module_cache = TieredModuleCache(self.device, placement, store, self.relocation,
                                              (self.num_layers, self.kv_heads, self.head_dim), self.dtype,
                                              max_device_bytes, max_host_bytes)
        self.encoder = ModuleEncoder(self.runner, self.module_cache, self.relocation, encoding=encoding,
                                     family=self.adapter.family, progress=progress)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.prefix = PrefixRunner(self.runner, tokenizer, self.renderer, self.eos_ids,
                                   enabled=prefix_cache, max_bytes=prefix_max_bytes,
                                   policy=prefix_policy, ttl_s=prefix_ttl_s)
        self.lora_schemas = LoraSchemas(self.encoder)  # each schema's keys under each adapter
        self._lora_in_use: Counter[str] = Counter()  # open requests per adapter (unload waits for 0)
        for name, path in (adapters or {}).items():
            self.load_adapter(name, path)

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
        self.encoder.check_window(layout)  # before the contexts, before any tensor of this schema
        contexts = encoding_contexts(layout, self.encoding)
        state = self.encoder.encode(layout, contexts, replaces=self.schemas.get(parsed.name))
        self.schemas[parsed.name] = state
        self.lora_schemas.drop_schema(parsed.name)  # derived on next use, from the new layout
        return state.report

    def remove_schema(self, name: str) -> None:
        if name not in self.schemas:
            raise KeyError(f"no schema named {name!r} (have: {', '.join(self.schemas) or 'none'})")
        self.encoder.remove(self.schemas.pop(name))
        self.lora_schemas.drop_schema(name)

    def check_prompt_window(self, needed: int, what: str, file: str | None = None,
                            line: int | None = None) -> None:
        """Refuse a request needing ``needed`` positions past the context window
        (:meth:`ModelRunner.check_window`)."""
        self.runner.check_window(needed, what, file, line)

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

    def request(self, prompt, adapter: str | None = None) -> tuple[SchemaState, Request]:
        """A PML prompt parsed, bound to its schema and turned into a request: ``(schema state, request)``;
        the state's keys are those of LoRA ``adapter`` (``None``: the base model)."""
        state, _, request = self._bind(prompt, adapter)
        return state, request

    def _bind(self, prompt, adapter: str | None = None) -> tuple[SchemaState, BoundPrompt, Request]:
        """Parse, bind, make the request and check it against the context window."""
        parsed = self._parse_prompt(prompt)
        state = self.lora_schemas.state(self._state(parsed.schema, parsed), adapter)
        bound = bind(parsed, state.layout, self.renderer)
        request = make_request(bound, state.contexts)
        needed = max(request.computed_pos, default=-1) + 1  # the last prompt token is always computed
        self.check_prompt_window(needed, f"prompt for schema {parsed.schema!r}", parsed.file, parsed.loc.line)
        return state, bound, request

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

    def plan(self, prompt) -> Plan:
        """The dense plan of a prompt: tokens, positions, origin and visibility (the oracle's input)."""
        state, request = self.request(prompt)
        return build_plan(request, state.layout, state.contexts, self.encoding)

    @staticmethod
    def prompt_ids(state: SchemaState, request: Request) -> list[int]:
        """The request's tokens in position order (what the baseline computes)."""
        segs = state.layout.segments
        pairs = [(segs[i].start + k, segs[i].tokens[k]) for i, n in request.cached_spans for k in range(n)]
        pairs += list(zip(request.computed_pos, request.computed_ids))
        return [t for _, t in sorted(pairs)]

    @staticmethod
    def _pieces(kv: dict[int, ModuleKV] | SchemaState, request: Request) -> list[ModuleKV]:
        """The request's cached spans as pieces (the first ``n`` tokens of each segment, views)."""
        return [kv[i].slice(n) if n < kv[i].length else kv[i] for i, n in request.cached_spans]

    def prefill_cached(self, state: SchemaState, request: Request, recompute: str | None = None
                       ) -> tuple[torch.Tensor, SplicedCache, int, int]:
        """Splice the request's module caches, optionally recompute some of them, prefill the rest.

        Returns ``(first-token logits, cache, next position, tokens recomputed)``. The modules are
        pinned in their tier (loaded or re-encoded if evicted) until the prefill has copied them
        into the request's own cache; then the tiers are brought back within their budgets.
        """
        job, next_pos, recomputed, pinned = self._cached_prefill(state, request, recompute)
        try:
            logits = job.step()
        finally:
            self.encoder.release(pinned)
        return logits, job.cache, next_pos, recomputed

    def _cached_prefill(self, state: SchemaState, request: Request, recompute: str | None,
                        reserve: int | None = None, chunk: int | None = None
                        ) -> tuple[ChunkedPrefill, int, int, list]:
        """Pin the request's modules and set up its prefill: ``(job, next position, tokens
        recomputed, pinned)``; the caller releases ``pinned`` once the job is done (or failed).

        Selective recompute runs here, whole (its fused prefill is not chunked: the returned job
        is already done); otherwise the computed tokens wait in the job, to run in one forward or
        in chunks, each seeing the cache by layout position (gaps and all)."""
        kv, pinned, _ = self.encoder.obtain(state, [i for i, _ in request.cached_spans])
        try:
            runner = self.runner
            pieces = self._pieces(kv, request)
            # Parsed first: a bad override fails even when nothing is cached.
            policy = parse_policy(self.recompute if recompute is None else recompute)
            if policy.kind != "none" and pieces:
                spans = cached_spans(state.layout.segments, request.cached_spans)
                # The uncached tokens go along: a recomputed token must see those before it.
                pieces, selection = prepare(runner, pieces, spans, policy,
                                            (request.computed_ids, request.computed_pos))
                if len(selection):
                    logits, cache = prefill_with_recompute(runner, pieces, spans, selection,
                                                           request.computed_ids, request.computed_pos)
                    job = ChunkedPrefill.finished(runner, cache, logits)
                    return job, max(request.computed_pos) + 1, len(selection), pinned
            q_pos = runner.positions(request.computed_pos)
            room = _room(runner, reserve, len(request.computed_ids), chunk)
            if self.fast is not None:  # the static buffer: the pieces land there directly
                cache = self.fast.new_cache(pieces, room, len(request.computed_ids))
            else:
                cache = runner.new_cache(pieces, room)
            job = ChunkedPrefill(runner, cache, request.computed_ids, q_pos, by_position=True)
            return job, int(q_pos.max()) + 1, 0, pinned
        except BaseException:
            self.encoder.release(pinned)
            raise

    @torch.inference_mode()
    def begin(self, prompt, *, use_cache: bool = True, recompute: str | None = None,
              max_new_tokens: int | None = None, insert_prefix: bool = True,
              prefill_chunk: int | None = None, prefill: bool = True,
              reserve: int | None = None, adapter: str | None = None) -> ActiveRequest:
        """Start one request: parse and bind (PML) or tokenize (text, chat), check the context
        window, take the cached KV (module pins, or a locked prefix-tree path) and prefill.

        ``prefill=False`` leaves the prefill to the caller, ``req.prefill_step(prefill_chunk)``
        one chunk per call (a server interleaves them with decode steps); otherwise it runs here,
        in chunks of ``prefill_chunk`` tokens when given (the same logits to float rounding; the
        fused selective-recompute prefill is never chunked). ``max_new_tokens`` is only checked.
        ``reserve``: room for generated tokens in the request's buffer (default ``reserve_tokens``).
        The caller ends the request with ``req.finish(generated_ids, kv)`` (prefix path: caches
        prompt and answer) or ``req.abort()``; both release what the request holds.
        ``adapter``: the LoRA adapter the request runs under (``None``: the base model); its
        module caches and prefix tree are that adapter's own (docs/lora.md).
        Errors: ``PromptError``/``PMLError`` (PML), ``ValueError`` (window, empty prompt,
        arguments), ``TypeError`` (not a prompt), ``UnknownAdapterError`` (a ``KeyError``: no
        such adapter loaded); nothing is held after one.
        """
        if max_new_tokens is not None:
            check_max_new_tokens(max_new_tokens)
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                          or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be a positive integer or None, got {prefill_chunk!r}")
        self.runner.sync()
        t0 = time.perf_counter()
        with self.runner.lora_scope(adapter):  # caches made here run under it, whenever they run
            if not is_pml_prompt(prompt):
                req = self.prefix.begin(prompt, use_cache, insert_prefix, t0=t0, reserve=reserve,
                                        prefill_chunk=prefill_chunk)
            else:
                if reserve is None and max_new_tokens is not None and self.fast is not None:
                    reserve = self._static_room(max_new_tokens)
                req = self._begin_pml(prompt, use_cache, recompute, reserve, prefill_chunk, t0, adapter)
            self._track_adapter(req, adapter)
            if prefill:
                while not req.prefill_step(prefill_chunk):
                    pass
        return req

    def _begin_pml(self, prompt, use_cache: bool, recompute: str | None, reserve: int | None,
                   chunk: int | None, t0: float, adapter: str | None = None) -> ActiveRequest:
        state, bound, request = self._bind(prompt, adapter)
        modules = sorted("/".join(path) for path in bound.selected if path)
        runner = self.runner
        if not use_cache:
            ids = self.prompt_ids(state, request)
            cache = runner.new_cache([], _room(runner, reserve, len(ids), chunk))
            job = ChunkedPrefill(runner, cache, ids, torch.arange(len(ids), device=runner.device),
                                 by_position=False)  # contiguous 0..n-1: plain causal
            return ActiveRequest(runner, "pml", job, len(ids), 0, len(ids), 0, False, modules, t0, ids,
                                 _nothing_to_close)
        job, next_pos, recomputed, pinned = self._cached_prefill(state, request, recompute, reserve, chunk)
        release = lambda: self.encoder.release(pinned)  # noqa: E731
        return ActiveRequest(runner, "pml", job, next_pos, request.num_cached, len(request.computed_ids),
                             recomputed, True, modules, t0, lambda: self.prompt_ids(state, request),
                             _release_static(job.cache), on_prefilled=release)

    @torch.inference_mode()
    def select_tokens(self, prompt, policy: str, adapter: str | None = None) -> Selection:
        """What recompute ``policy`` would recompute for ``prompt`` (for inspection and tests);
        the same inputs as :meth:`prefill_cached` gives the policy."""
        with self.runner.lora_scope(adapter):
            state, request = self.request(prompt, adapter)
            pieces = self._pieces(state.kv, request)
            spans = cached_spans(state.layout.segments, request.cached_spans)
            return choose(self.runner, pieces, spans, policy, (request.computed_ids, request.computed_pos))

    @torch.inference_mode()
    def next_token_logits(self, prompt, use_cache: bool = True, recompute: str | None = None, *,
                          insert_prefix: bool = True, adapter: str | None = None) -> torch.Tensor:
        """Logits of the first generated token (float32 tensor of vocabulary size), under LoRA
        ``adapter`` (``None``: the base model)."""
        req = self.begin(prompt, use_cache=use_cache, recompute=recompute, insert_prefix=insert_prefix,
                         adapter=adapter)
        logits = req.logits
        req.finish([], req.cache)
        return logits.float()

    @torch.inference_mode()
    def oracle_logits(self, prompt, adapter: str | None = None) -> torch.Tensor:
        """Logits from ONE ordinary forward over the plan with its positions and 4-D mask (under
        LoRA ``adapter``; ``None``: the base model)."""
        with self.runner.lora_scope(adapter):
            return self.runner.oracle_forward(self.plan(prompt))

    @torch.inference_mode()
    def generate(self, prompt, max_new_tokens: int = 64, use_cache: bool = True, *,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 repetition_penalty: float = 1.0, stop: list[str] | None = None,
                 seed: int | None = None, stream: Callable[[str], None] | None = None,
                 recompute: str | None = None, insert_prefix: bool = True,
                 adapter: str | None = None) -> GenerationResult:
        """Generate a reply; greedy unless ``temperature > 0``. ``stream`` receives text as it grows.

        ``prompt`` is PML, plain text or a list of chat messages (dispatch rules:
        :func:`promptcache.prefix.runner.prompt_kind`). The last two reuse the longest cached
        prefix and, with ``insert_prefix``, cache the prompt and generated tokens for next time.

        ``max_new_tokens``: at most this many tokens are generated; ``0`` means *prefill only*: the
        prompt is computed and the result holds ``first_token_logits`` (and the timings) with no
        text and no token ids. A negative value (or a non-integer) raises ``ValueError``.
        Generation also stops at the model's context window (``max_positions``): the prompt plus
        the generated tokens never use more positions; ``result.window_full`` then says so. A
        prompt that alone does not fit is refused (``PromptError`` for PML, ``ValueError`` otherwise).
        ``adapter``: the LoRA adapter to generate with (``None``: the base model; docs/lora.md).
        """
        check_max_new_tokens(max_new_tokens)
        options = SamplingOptions(temperature, top_p, top_k, repetition_penalty, list(stop or []), seed)
        req = self.begin(prompt, use_cache=use_cache, recompute=recompute, max_new_tokens=max_new_tokens,
                         insert_prefix=insert_prefix, prefill=False, adapter=adapter)
        return req.generate(options, max_new_tokens, stream, self.eos_ids, self.renderer.decode)

    def warmup(self, suffix_lengths=None, cache_lengths=None, *, prompts=(),
               max_new_tokens: int | None = None) -> WarmupReport:
        """Compile the fast path's graphs now instead of at the first requests (``compile=True``).

        ``prompts``: PML prompts whose requests should find their graphs compiled (their suffix
        and buffer buckets, with room for ``max_new_tokens``, default ``reserve_tokens``; decode
        included): the precise choice when the requests are known. ``suffix_lengths``: new-token
        counts to expect (default 1 and 16: decode and a short question); ``cache_lengths``: cache
        sizes (default, without prompts: each added schema's whole layout plus ``reserve_tokens``).
        Each is rounded up to its bucket. Returns seconds per bucket.
        """
        if self.fast is None:
            return WarmupReport(compiled=False, reason="compile=False")
        if prompts:
            room = self._static_room(max_new_tokens)
            report = WarmupReport(compiled=True)
            for prompt in prompts:
                _, request = self.request(prompt)
                computed = len(request.computed_ids)
                cap = buffer_bucket(request.num_cached, computed, room)
                one = self.fast.warmup([computed, 1], [cap])
                report.buckets.update(one.buckets)
                report.total_s += one.total_s
                report.compiled, report.reason = one.compiled, one.reason
            return report
        if cache_lengths is None and self.schemas:
            cache_lengths = [_layout_length(s) + self.reserve_tokens for s in self.schemas.values()]
        return self.fast.warmup(suffix_lengths, cache_lengths)

    def _prepack(self, prepack: bool | None, compile: bool) -> PackedLinears | None:
        """Prepack the linear weights when asked (``True``), or by default on the fast path."""
        if prepack is False or (prepack is None and not compile):
            return None
        why_not = prepack_supported(self.device, self.dtype)
        if why_not is not None:
            if prepack:
                raise ValueError(f"prepack=True: {why_not}")
            return None
        return PackedLinears.of(self.model)

    def _static_room(self, max_new_tokens: int | None) -> int:
        """Room for generated tokens in a fast-path request's static buffer. Its size is paid by
        every forward where attention reads the whole buffer (CUDA graphs; on CPU it reads only the
        slots written) and in memory everywhere: the tokens asked for, not more,
        capped by ``reserve_tokens`` (decode past it moves to the next bucket)."""
        return self.reserve_tokens if max_new_tokens is None else min(max_new_tokens, self.reserve_tokens)

    def compile_report(self) -> dict:
        """What the fast path did: buckets used, compiles (seconds), recompiles, eager fallbacks and why."""
        prepacked = self.prepacked.report() if self.prepacked is not None else None
        if self.fast is None:
            return {"enabled": False, "eager_reason": "compile=False", "prepacked": prepacked}
        fused = self.fused.report() if self.fused is not None else None
        return {**self.fast.report(), "prepacked": prepacked, "fused_long_forwards": fused}

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
        report = self.encoder.memory_report(self.schemas, self.bytes_per_token(), self.placement)
        report["by_adapter"] = self.bytes_by_adapter()
        return report

    def store_report(self) -> dict | None:
        """``{"store_hits", "store_misses"}``: modules loaded from the store vs encoded in this process
        (since construction); ``None`` without a store."""
        if self.store is None:
            return None
        return dict(self.encoder.store_counts)


def _nothing_to_close(generated: list[int], kv, completed: bool) -> None:  # noqa: ARG001
    """PML requests cache nothing at the end (their module pins go when the prefill is done)."""


def _release_static(cache) -> Callable[[list[int], object, bool], None]:
    """The end of a PML request: a static (compiled-path) cache gives its buffer back to the pool."""
    release = getattr(cache, "release", None)
    if release is None:
        return _nothing_to_close
    return lambda generated, kv, completed: release()


def _layout_length(state: SchemaState) -> int:
    """Positions a schema's layout spans (its default-path requests hold about this many keys)."""
    return max((g.start + len(g.tokens) for g in state.layout.segments), default=0)


def _room(runner: ModelRunner, reserve: int | None, computed: int, chunk: int | None) -> int:
    """Buffer room after the first prefill forward: generation's reserve, plus the later chunks."""
    room = runner.reserve_tokens if reserve is None else reserve
    return room + max(0, computed - chunk) if chunk is not None else room


def _window(override: int | None, model_limit: int | None) -> int | None:
    """The context window in force: ``override`` (at most the model's), else the model's."""
    if override is None:
        return model_limit
    if isinstance(override, bool) or not isinstance(override, int) or override <= 0:
        raise ValueError(f"max_positions must be a positive integer or None, got {override!r}")
    return override if model_limit is None else min(override, model_limit)
