"""The fast path: a request's spliced KV in a fixed-size buffer, run through compiled forwards.

Why: once splicing is free, the suffix forward is what a user waits for; an eager forward over a
growing ``DynamicCache`` has a new shape every call, so it cannot be compiled once and reused.
Here a PML request's cache is a :class:`StaticSplicedCache`: per layer one ``[1, kv_heads, C,
head_dim]`` buffer whose capacity ``C`` is a *cache bucket*; the module pieces are copied
straight into it (one copy per piece and layer, the same copy the eager path makes when it
materialises its buffer: no concatenation in between), and every forward writes its new keys at
the buffer's write position. A forward of ``n`` new tokens is padded to a *suffix bucket* ``S``
(the padded rows see only themselves, and no real query sees them: the 4-D mask hides them and
every unwritten slot), so one compiled graph per ``(S, C)`` pair serves every prompt:

* suffix buckets: :data:`SUFFIX_BUCKETS` (1 is decode); a longer suffix runs in chunks of the largest;
* cache buckets: :func:`cache_bucket`, 256, 320, 384, 448, 512, 640, ... (a request whose cache
  outgrows its bucket during decode moves to the next one: one copy).

Compiled graphs are made by ``torch.compile(fullgraph=True, dynamic=False)`` (CUDA: mode
``"reduce-overhead"``, CUDA graphs); the inductor cache is kept on disk
(:data:`INDUCTOR_CACHE_ENV`, default ``~/.cache/promptcache/inductor``) with the FX graph cache on,
so a second process loads its kernels instead of compiling them. Nothing recompiles or falls back
to eager in silence: a bucket's first call compiles it (counted, timed); later calls run under
dynamo's ``fail_on_recompile`` stance, so a failed guard is seen, then recompiled explicitly
(counted, the guard named, warned once); dynamo's recompile limit, a failed compile or an ALiBi
model runs the same forward eagerly, warns once per reason and is counted in
:meth:`CompiledForwards.report`. What stays eager by design: :data:`EAGER_BY_DESIGN`.
"""

from __future__ import annotations

import os
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .kv import ModuleKV, SplicedCache
from .attention import grouped_query_heads, runs_fast_sdpa, use_amx_attention, use_fast_sdpa
from .malloc import keep_freed_memory
from .prepack import inductor_with_grouped_linears

#: Suffix lengths a compiled forward is padded to (1: decode). Longer suffixes run in chunks of the last.
SUFFIX_BUCKETS: tuple[int, ...] = (1, 16, 32, 64, 128, 256, 512)
#: The smallest cache bucket; the others are its doublings.
MIN_CACHE_BUCKET = 256
#: What ``compile=True`` leaves eager on purpose (listed by :meth:`CompiledForwards.report`).
EAGER_BY_DESIGN = ("baseline prefill (use_cache=False) and module encoding: eager, their norms and MLPs compiled "
                   "for 64+ tokens on CPU (runtime/fused.py)", "selective-recompute fused prefill",
                   "plain-text and chat prompts (prefix caching)", "batched decode of the server (DecodeBatch)")
#: Idle buffers kept per cache bucket for the next requests; more are freed when given back.
MAX_IDLE_BUFFERS = 2
#: Narrow attention reads the written slots rounded up to a multiple of this (CPU fast path).
NARROW_STEP = 16
#: Environment variable naming the inductor's on-disk cache (set here only when unset).
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
DEFAULT_INDUCTOR_DIR = os.path.join("~", ".cache", "promptcache", "inductor")
#: transformers' switch for grouped-query attention inside the SDPA kernel (``enable_gqa``) even
#: with a mask; set to "1" by a CPU fast path unless the user set it (see :func:`setup_cpu_gqa`).
SDPA_GQA_ENV = "TRANSFORMERS_SDPA_FORCE_GQA"
#: ALiBi models (MPT, Falcon with ``alibi=True``) build their bias from ``cache.key_positions``
#: per forward, sized to the keys held, not to a fixed buffer: they run eager (warned, counted).
#: Every RoPE family (Llama, Qwen2, Mistral, Gemma 3, Falcon with RoPE) uses the static buffer.
ALIBI_FAMILIES = ("mpt",)

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``/``"bfloat16"``/``torch.bfloat16``... -> a torch dtype (``None`` stays ``None``)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be one of {', '.join(sorted(_DTYPES))} or a torch.dtype, not {dtype!r}")


def suffix_bucket(n: int) -> int:
    """The smallest suffix bucket holding ``n`` tokens (the largest when none does: chunks)."""
    for b in SUFFIX_BUCKETS:
        if n <= b:
            return b
    return SUFFIX_BUCKETS[-1]


#: The steps between two doublings of a cache bucket, as quarters of the lower one.
CACHE_BUCKET_QUARTERS: tuple[int, ...] = (4, 5, 6, 7)


def cache_bucket(n: int) -> int:
    """The smallest cache bucket holding ``n`` keys: :data:`MIN_CACHE_BUCKET` times a power of two,
    times 1, 1.25, 1.5 or 1.75 (256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, ...).
    Why not only powers of two: where a query attends to the whole buffer (masked slots included:
    CUDA graphs; on CPU narrow attention reads only the slots written), padded keys are paid on every
    forward (persona case, before narrow attention: 1,280 slots gave 0.497x of fp32 eager where 1,536
    gave 0.51x); quarter steps keep the padding under a fifth for 4x the graphs."""
    base = MIN_CACHE_BUCKET
    while True:
        for quarters in CACHE_BUCKET_QUARTERS:
            cap = base * quarters // 4
            if n <= cap:
                return cap
        base *= 2


def buffer_bucket(held: int, computed: int, room: int) -> int:
    """The cache bucket of a request's static buffer: ``held`` cached keys, ``computed`` new
    tokens (its first forward is padded to their suffix bucket) and ``room`` generated ones."""
    return cache_bucket(max(held + computed + room, held + suffix_bucket(max(computed, 1))))


def setup_inductor_cache() -> str:
    """Point inductor at an on-disk cache (unless the user already did) and turn the FX graph
    cache on, so a second process reuses compiled kernels. Returns the directory.

    Importing ``torch._dynamo`` (transformers does) already sets the variable to inductor's
    default, a folder under /tmp: that value counts as unset."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    path = os.environ.get(INDUCTOR_CACHE_ENV)
    if not path or path == default_cache_dir():
        path = os.path.expanduser(DEFAULT_INDUCTOR_DIR)
        os.environ[INDUCTOR_CACHE_ENV] = path
    os.makedirs(path, mode=0o700, exist_ok=True)  # it holds shared objects this process will load
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    return path


def setup_cpu_gqa(device: torch.device) -> bool:
    """On CPU, let SDPA group the query heads itself instead of transformers' ``repeat_kv`` copies
    of every layer's keys and values; returns whether it is on.

    Why: the fast path always passes a 4-D mask, and with a mask transformers repeats the K/V heads
    (SmolLM2: 3 -> 9, a copy of the whole static buffer per layer and forward) before SDPA; the
    CPU kernel takes ``enable_gqa`` with a mask at the same result (persona case: cached TTFT
    77.7 -> 71.7 ms bf16 compiled, 176 -> 149 ms fp32 eager, the same logits to 1e-5). Not on CUDA,
    where a mask with ``enable_gqa`` falls back to the math kernel. Process-wide (an environment
    variable transformers reads per forward): it speeds up every CPU model of the process the same
    way; ``TRANSFORMERS_SDPA_FORCE_GQA=0`` set before turns it off."""
    if device.type != "cpu":
        return os.environ.get(SDPA_GQA_ENV) == "1"
    os.environ.setdefault(SDPA_GQA_ENV, "1")
    return os.environ[SDPA_GQA_ENV] == "1"


# ---------------------------------------------------------------------------------------- buffers


def _root(t: torch.Tensor) -> torch.Tensor:
    """The tensor owning ``t``'s memory (``t`` itself unless it is a view)."""
    return t if t._base is None else t._base


@dataclass
class LaidPiece:
    """A module piece whose K/V a :class:`StaticBuffer` still holds at slots ``start..start+length``.

    Why: consecutive requests of one schema splice mostly the same module pieces at the same slots;
    a buffer given back keeps them, so the next request copies only what differs (the splice copy
    was ~7-10% of the persona case's compiled TTFT). The piece is told again by each layer's
    (data pointer, strides) and a weak reference to the tensor owning that memory: while the owner
    lives, its memory is not reused, so the same pointer is the same data (module KV is never
    written in place once encoded); once the module is evicted and freed, the reference dies and
    the piece is copied again."""

    start: int
    length: int
    ptrs: list[int]
    strides: list[tuple[int, ...]]
    roots: tuple[weakref.ref, ...]
    shared: weakref.ref  # the ModuleKV whose K/V lists the piece had (itself or its ``origin``)

    @classmethod
    def of(cls, piece: ModuleKV, start: int) -> "LaidPiece":
        ts = (*piece.keys, *piece.values)
        return cls(start, piece.length, [t.data_ptr() for t in ts], [t.stride() for t in ts],
                   tuple(weakref.ref(_root(t)) for t in ts), weakref.ref(_lists_owner(piece)))

    def holds(self, piece: ModuleKV, start: int) -> bool:
        """Whether ``piece`` placed at ``start`` is exactly what these slots hold (asked for every
        piece of every request). First by identity: the same K/V lists as the live value laid here
        (``ModuleKV.at`` shares them; lists and tensors are never changed once made); else every
        layer's memory, as list comparisons."""
        if start != self.start or piece.length != self.length:
            return False
        owner = self.shared()
        if owner is not None and piece.keys is owner.keys and piece.values is owner.values:
            return True
        ts = (*piece.keys, *piece.values)
        return (len(ts) == len(self.roots) and [t.data_ptr() for t in ts] == self.ptrs
                and [t.stride() for t in ts] == self.strides
                and all(ref() is (t if t._base is None else t._base) for t, ref in zip(ts, self.roots)))


def _lists_owner(piece: ModuleKV) -> ModuleKV:
    origin = piece.origin
    return origin if origin is not None and origin.keys is piece.keys and origin.values is piece.values else piece


class StaticBuffer:
    """Per-layer K/V buffers ``[1, kv_heads, capacity, head_dim]`` and the write position.

    One buffer serves one request at a time (leased from :class:`BufferPool`); the write position
    is a 0-d tensor set before each forward, so its value never becomes a compile guard (the
    ``cumulative_length`` lesson of transformers' StaticCache: a reused buffer must be reset).
    ``held``: the module pieces its slots still hold, by start slot (:class:`LaidPiece`); a forward
    drops those it overwrites.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (1, kv_heads, capacity, head_dim)
        self.capacity = capacity
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.write_at = torch.zeros((), dtype=torch.long, device=device)
        self.held: dict[int, LaidPiece] = {}
        for t in (*self.keys, *self.values, self.write_at):
            torch._dynamo.mark_static_address(t)  # CUDA graphs need fixed addresses


class BufferPool:
    """Free :class:`StaticBuffer` objects per capacity; a busy bucket gets another buffer.

    Memory: one buffer per live request (``2 x layers x kv_heads x capacity x head_dim`` elements),
    plus at most :data:`MAX_IDLE_BUFFERS` idle ones per bucket kept for reuse."""

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> None:
        self.shape, self.dtype, self.device = shape, dtype, device
        self.free: dict[int, list[StaticBuffer]] = {}
        self.allocated: dict[int, int] = {}

    def lease(self, capacity: int) -> StaticBuffer:
        free = self.free.setdefault(capacity, [])
        if free:
            return free.pop()
        self.allocated[capacity] = self.allocated.get(capacity, 0) + 1
        return StaticBuffer(*self.shape, capacity, self.dtype, self.device)

    def give_back(self, buf: StaticBuffer) -> None:
        free = self.free.setdefault(buf.capacity, [])
        if len(free) < MAX_IDLE_BUFFERS:
            free.append(buf)


class StaticLayer(CacheLayerMixin):
    """One layer of a :class:`StaticSplicedCache`: writes new K/V at the write position and
    returns the whole buffer (the mask hides what is not the request's; with narrow attention the
    mask is narrower and attention reads only its width). Outside a forward,
    ``keys``/``values`` are views of the tokens held, like every other cache of the package."""

    is_compileable = True
    is_sliding = False

    def __init__(self, cache: "StaticSplicedCache", index: int) -> None:
        super().__init__()
        self.cache, self.index = cache, index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the buffers exist before the first forward."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        buf = self.cache.buffer
        k, v = buf.keys[self.index], buf.values[self.index]
        slots = torch.arange(key_states.shape[-2], device=k.device) + buf.write_at
        k.index_copy_(2, slots, key_states)
        v.index_copy_(2, slots, value_states)
        return k, v

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.buffer.capacity, 0

    def get_seq_length(self) -> int:
        return self.cache.length

    def get_max_length(self) -> int:
        return self.cache.buffer.capacity


class StaticSplicedCache(Cache):
    """A request cache in a leased :class:`StaticBuffer` (module docstring).

    Same contract as :class:`~promptcache.runtime.kv.SplicedCache` for the rest of the package:
    ``layers[i].keys``/``values`` are ``[1, H, n, D]`` views of the ``n`` tokens held and
    ``key_positions`` their layout positions. ``compiled`` routes
    :meth:`ModelRunner.forward` to :meth:`CompiledForwards.forward`. The buffer goes back to the
    pool on :meth:`release` (the request's end) or when the cache is garbage-collected.
    """

    def __init__(self, owner: "CompiledForwards", buffer: StaticBuffer, num_layers: int) -> None:
        Cache.__init__(self, layers=[StaticLayer(self, i) for i in range(num_layers)])
        self.compiled = owner
        self.buffer = buffer
        self.length = 0
        self.key_positions = torch.zeros(0, dtype=torch.long, device=owner.device)
        self._finalizer = weakref.finalize(self, owner.pool.give_back, buffer)

    def refresh_views(self) -> None:
        """Point ``layers[i].keys``/``values`` at the tokens held (after a forward or a copy)."""
        n = self.length
        for layer, k, v in zip(self.layers, self.buffer.keys, self.buffer.values):
            layer.keys, layer.values = k[..., :n, :], v[..., :n, :]

    def splice(self, pieces: Sequence[ModuleKV]) -> None:
        """Copy the module pieces straight into the buffer, in order (the one copy of assembly),
        except those the buffer still holds at the same slots from an earlier request."""
        buf, at, held, copied = self.buffer, 0, {}, 0
        for p in pieces:
            n = p.length
            laid = buf.held.get(at)
            if laid is None or not laid.holds(p, at):
                for i in range(len(self.layers)):
                    buf.keys[i][0, :, at:at + n].copy_(p.keys[i], non_blocking=True)
                    buf.values[i][0, :, at:at + n].copy_(p.values[i], non_blocking=True)
                laid, copied = LaidPiece.of(p, at), copied + n
            held[at] = laid
            at += n
        buf.held = held
        self.compiled.splice_tokens["copied"] += copied
        self.compiled.splice_tokens["reused"] += at - copied
        self.length = at
        self.refresh_views()

    def overwrite(self, start: int) -> None:
        """Slots from ``start`` on are about to be written: forget the pieces held there."""
        held = self.buffer.held
        if any(p.start + p.length > start for p in held.values()):
            self.buffer.held = {s: p for s, p in held.items() if p.start + p.length <= start}

    def move_to(self, buffer: StaticBuffer) -> None:
        """Continue in a bigger ``buffer`` (decode outgrew the bucket): copy, give the old one back."""
        n = self.length
        for src, dst in ((self.buffer.keys, buffer.keys), (self.buffer.values, buffer.values)):
            for s, d in zip(src, dst):
                d[..., :n, :].copy_(s[..., :n, :])
        buffer.held = {s: p for s, p in self.buffer.held.items() if p.start + p.length <= n}
        self._finalizer()
        self.buffer = buffer
        self._finalizer = weakref.finalize(self, self.compiled.pool.give_back, buffer)
        self.refresh_views()

    def release(self) -> None:
        """Give the buffer back now (idempotent); the cache must not be used afterwards."""
        self._finalizer()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


# ---------------------------------------------------------------------------------------- forwards


@dataclass
class WarmupReport:
    """What :meth:`CompiledForwards.warmup` compiled: seconds per ``(suffix, cache)`` bucket."""

    buckets: dict[str, float] = field(default_factory=dict)
    total_s: float = 0.0
    compiled: bool = True
    reason: str | None = None

    def __str__(self) -> str:
        rows = ", ".join(f"{k}: {v:.1f}s" for k, v in self.buckets.items())
        return f"warm-up {self.total_s:.1f}s ({rows or 'nothing'})" + (f"; eager: {self.reason}" if self.reason else "")


def _step(model, cache, input_ids, position_ids, mask, keep):
    """The forward that is compiled: padded tokens over the static cache, one logits row."""
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                past_key_values=cache, use_cache=True, logits_to_keep=keep)
    return out.logits


class CompiledForwards:
    """Bucketed compiled forwards of one model over :class:`StaticSplicedCache` buffers.

    Made by ``PromptCache(compile=True)``; see the module docstring for buckets and fallbacks.
    ``eager_reason``: why this model never compiles (unsupported family), or ``None``.
    Weights are not frozen into the graphs: inductor's freezing would prepack a copy of every
    weight per graph (+325 MB per bucket for SmolLM2 in bf16); :mod:`.prepack` keeps one packed
    copy that every graph and the eager paths share.
    """

    def __init__(self, runner, family: str, mode: str | None = None) -> None:
        self.runner = runner
        self.device = runner.device
        self.dtype = runner.dtype
        self.pool = BufferPool((runner.num_layers, runner.kv_heads, runner.head_dim), runner.dtype, runner.device)
        self.cache_dir = setup_inductor_cache()
        self.sdpa_gqa = setup_cpu_gqa(self.device)
        #: glibc keeps freed activation memory instead of page-faulting it in again: .malloc
        self.malloc = keep_freed_memory() if self.device.type == "cpu" else "off (not CPU)"
        # The fast path's SDPA (CPU, .attention): short query blocks fold the query heads sharing a
        # K/V head into one call; attention reads only the written slots (rounded up to
        # NARROW_STEP), the mask being that wide and dynamic in the graphs (not with CUDA graphs).
        fast_sdpa = self.device.type == "cpu" and use_fast_sdpa(runner.model)
        self.folded_heads = fast_sdpa and grouped_query_heads(runner.model)
        self.narrow_attention = fast_sdpa and mode is None
        #: the CPU fast path's attention on the AMX kernel (.amx_attention): None, or why not
        self.amx_attention = use_amx_attention(runner.model) if fast_sdpa and mode is None else "not the CPU fast path"
        self.mode = mode if mode is not None else ("reduce-overhead" if self.device.type == "cuda" else None)
        self.eager_reason: str | None = None
        if family in ALIBI_FAMILIES or getattr(runner.adapter.text_config, "alibi", False):
            self.eager_reason = (f"compile=True is not supported for the {family} family with ALiBi (its bias "
                                 "is sized to the keys held, not to a static buffer); its forwards run eager")
            warnings.warn(f"promptcache: {self.eager_reason}", UserWarning, stacklevel=3)
        if self.device.type == "cpu" and self.mode is None:  # packed q/k/v and gate/up as one call each
            self._fn = torch.compile(_step, fullgraph=True, dynamic=False, backend=inductor_with_grouped_linears())
        else:
            self._fn = torch.compile(_step, fullgraph=True, dynamic=False, mode=self.mode)
        _raise_recompile_limit(len(SUFFIX_BUCKETS) * 24)
        self.compiled_buckets: dict[tuple[int, int], float] = {}
        self.calls: dict[tuple[int, int], int] = {}
        self.recompiles = 0
        self.last_recompile_error: str | None = None
        self.recompile_reasons: dict[str, int] = {}
        self.fallbacks: dict[str, int] = {}
        self.splice_tokens = {"copied": 0, "reused": 0}  # module tokens copied into buffers, or already there
        #: Run a request in an already compiled bucket (a bigger buffer, more padded rows) when its
        #: own is not compiled yet, instead of compiling it inside the request. Off by default
        #: (exact buckets, compiled at first use); ``promptcache serve --compile`` turns it on, so
        #: that requests after the warm-up never wait for a compile while a compiled bucket fits.
        self.prefer_compiled = False
        self._warned: set[str] = set()

    # -------------------------------------------------------------------- caches

    def new_cache(self, pieces: Sequence[ModuleKV] = (), reserve: int | None = None,
                  computed: int = 0) -> "StaticSplicedCache | SplicedCache":
        """A static cache holding ``pieces`` (at their positions), with room for ``computed`` new
        tokens and ``reserve`` generated ones, in the smallest cache bucket that fits."""
        room = (self.runner.reserve_tokens if reserve is None else reserve)
        if self.eager_reason is not None:  # the family's own eager cache, counted (warned at start)
            self.fallbacks[self.eager_reason] = self.fallbacks.get(self.eager_reason, 0) + 1
            return self.runner.new_cache(pieces, room)
        if any(p.positions is None for p in pieces):
            raise ValueError("every piece of a spliced cache needs its layout positions")
        held = sum(p.length for p in pieces)
        cap = self._warm_cap(buffer_bucket(held, computed, room), held, computed)
        cache = StaticSplicedCache(self, self.pool.lease(cap), self.runner.num_layers)
        cache.lora = getattr(self.runner, "lora_name", None)  # the adapter its forwards run under
        cache.splice(pieces)
        if pieces:
            cache.key_positions = torch.cat([p.positions.to(self.device) for p in pieces])
        return cache

    # -------------------------------------------------------------------- compiled buckets first

    def _warm_cap(self, cap: int, held: int, rows: int) -> int:
        """With :attr:`prefer_compiled`: the smallest *compiled* cache bucket of at least ``cap``
        slots in which ``rows`` new tokens over ``held`` keys and then decode run without compiling;
        ``cap`` itself when it is compiled, or when none is (it then compiles at its first call)."""
        rows = min(max(rows, 1), SUFFIX_BUCKETS[-1])  # a longer prefill runs in chunks of the largest

        def warm(c: int) -> bool:
            return (1, c) in self.compiled_buckets and self._warm_size(None, rows, held, c) is not None

        if not self.prefer_compiled or warm(cap):
            return cap
        return min((c for (_, c) in self.compiled_buckets if c >= cap and warm(c)), default=cap)

    def _warm_size(self, size: int | None, rows: int, past: int, cap: int) -> int | None:
        """With :attr:`prefer_compiled`: ``size`` when ``(size, cap)`` is compiled, else the smallest
        compiled suffix bucket of at least ``rows`` that fits after ``past`` keys (padding more rows
        costs milliseconds, a compile seconds to minutes); ``size`` when there is none."""
        if size is not None and (not self.prefer_compiled or (size, cap) in self.compiled_buckets):
            return size
        fits = [s for (s, c) in self.compiled_buckets if c == cap and rows <= s and past + s <= cap]
        return min(fits, default=size)

    # -------------------------------------------------------------------- forwards

    def forward(self, cache: StaticSplicedCache, ids: Sequence[int], q_pos: torch.Tensor,
                visible: torch.Tensor | None, keep: int = 1, logits: bool = True) -> torch.Tensor | None:
        """:meth:`ModelRunner.forward` over a static cache: in chunks of the largest suffix bucket,
        each padded to its bucket and run compiled (or eager, counted, when it cannot be)."""
        n = len(ids)
        past = cache.length
        if visible is None:
            visible = self.runner.past_then_causal(past, n)
        step = SUFFIX_BUCKETS[-1]
        if n > step and bool(visible[:, past:].triu(1).any()):
            self._fallback("a query sees a later query of the same forward: it cannot be chunked")
            step = n
        want, out = n - keep, None
        for a in range(0, n, step):
            b = min(n, a + step)
            rows = visible[a:b, : past + b]
            chunk_out = self._chunk(cache, ids[a:b], q_pos[a:b], rows, want - a if a <= want < b else 0)
            if a <= want < b:
                out = chunk_out
        return out[0, 0].clone() if logits else None  # CUDA graphs reuse their output memory

    def _chunk(self, cache: StaticSplicedCache, ids: Sequence[int], q_pos: torch.Tensor,
               visible: torch.Tensor, keep_row: int) -> torch.Tensor:
        """One padded forward of ``len(ids)`` tokens (at most a suffix bucket) over ``cache``."""
        n, past = len(ids), cache.length
        size = suffix_bucket(n) if n <= SUFFIX_BUCKETS[-1] else n
        if past + size > cache.buffer.capacity:
            bigger = cache_bucket(past + size + self.runner.reserve_tokens)
            cache.move_to(self.pool.lease(self._warm_cap(bigger, past, n)))
        cap = cache.buffer.capacity
        size = self._warm_size(size, n, past, cap)
        dev = self.device
        # the slots attention reads: the whole buffer, or (narrow attention) the written ones rounded up
        narrow = self.narrow_attention and runs_fast_sdpa(self.runner.model)  # not if switched back since
        width = min(cap, -(-(past + size) // NARROW_STEP) * NARROW_STEP) if narrow else cap
        pad_pos = torch.cat([q_pos, q_pos[-1:].expand(size - n)])
        k_pos = torch.zeros(width, dtype=torch.long, device=dev)
        k_pos[:past] = cache.key_positions
        k_pos[past:past + size] = pad_pos
        full = torch.zeros(size, width, dtype=torch.bool, device=dev)
        full[:n, : past + n] = visible.to(dev)
        pads = torch.arange(n, size, device=dev)
        full[pads, past + pads] = True  # a padded row sees itself only
        mask = self.runner.adapter.attention_mask(full, pad_pos, k_pos, self.dtype)
        if narrow:  # one graph per bucket for every width
            for m in (mask.values() if isinstance(mask, dict) else (mask,)):  # dict: per layer type
                torch._dynamo.maybe_mark_dynamic(m, 3)
        input_ids = torch.zeros(1, size, dtype=torch.long, device=dev)
        input_ids[0, :n] = torch.as_tensor(list(ids), dtype=torch.long, device=dev)
        keep = torch.tensor([keep_row], dtype=torch.long, device=dev)
        cache.overwrite(past)
        cache.buffer.write_at.fill_(past)
        out = self._run((size, cap), cache, input_ids, pad_pos[None], mask, keep)
        cache.length = past + n
        cache.key_positions = torch.cat([cache.key_positions, q_pos.to(dev)])
        cache.refresh_views()
        return out

    def _run(self, bucket: tuple[int, int], cache, input_ids, position_ids, mask, keep) -> torch.Tensor:
        """Call the compiled graph of ``bucket``; compile it on first use; eager when it cannot be.

        A call whose guards fail (another model class ran in between and grew a transformers
        registry, the model was put in ``train()``, an adapter was switched) is not recompiled
        behind the user's back: dynamo's ``fail_on_recompile`` stance stops it, the recompile is
        then made explicitly, counted with the guard that failed, and warned about once per reason."""
        self.calls[bucket] = self.calls.get(bucket, 0) + 1
        args = (self.runner.model, cache, input_ids, position_ids, mask, keep)
        if self.eager_reason is not None:
            self.fallbacks[self.eager_reason] = self.fallbacks.get(self.eager_reason, 0) + 1
            return _step(*args)
        if bucket not in self.compiled_buckets:
            return self._compile_call(bucket, args)
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                return self._fn(*args)
        except RuntimeError as exc:
            if "recompil" not in str(exc).lower():
                raise
            reason = _first_reason(exc)
            self.recompiles += 1
            self.last_recompile_error = str(exc)  # every cache entry's failed guard, for debugging
            self.recompile_reasons[reason] = self.recompile_reasons.get(reason, 0) + 1
            self._warn_once(f"promptcache: recompiling the compiled forward of bucket {bucket}: a guard failed "
                            f"({reason})")
            return self._compile_call(bucket, args)

    def _compile_call(self, bucket: tuple[int, int], args: tuple) -> torch.Tensor:
        """Run ``args`` through the compiled function, compiling (timed); eager when it cannot."""
        t0 = time.perf_counter()
        try:
            out = self._fn(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            self._fallback(f"dynamo's recompile limit ({_recompile_limit()}) is reached: bucket {bucket} "
                           "not compiled (raise torch._dynamo.config.recompile_limit)")
            return _step(*args)
        except Exception as exc:  # noqa: BLE001 - any compile failure: eager from now on, loudly
            self.eager_reason = f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
            self._fallback(self.eager_reason)
            return _step(*args)
        self.runner.sync()
        self.compiled_buckets[bucket] = self.compiled_buckets.get(bucket, 0.0) + time.perf_counter() - t0
        return out

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, UserWarning, stacklevel=5)

    def _fallback(self, reason: str) -> None:
        """Count an eager forward and warn once per reason (never silently)."""
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1
        self._warn_once(f"promptcache: compiled forward ran eager: {reason}")

    # -------------------------------------------------------------------- warm-up and report

    def warmup(self, suffix_lengths: Sequence[int] | None = None,
               cache_lengths: Sequence[int] | None = None) -> WarmupReport:
        """Compile the buckets of these suffix and cache lengths now (each rounded to its bucket).

        Defaults: suffix lengths ``(1, 16)`` (decode and a short question), cache length
        :data:`MIN_CACHE_BUCKET`. Runs each graph once on a scratch buffer (zeros)."""
        report = WarmupReport(reason=self.eager_reason, compiled=self.eager_reason is None)
        if self.eager_reason is not None:
            return report  # nothing compiles for this model (warned at start)
        suffixes = sorted({suffix_bucket(n) for n in (suffix_lengths or (1, 16))})
        caps = sorted({cache_bucket(n) for n in (cache_lengths or (MIN_CACHE_BUCKET,))})
        t_all = time.perf_counter()
        with torch.inference_mode():
            for cap in caps:
                for size in suffixes:
                    if (size, cap) in self.compiled_buckets or size > cap:
                        continue
                    t0 = time.perf_counter()
                    self._scratch_forward(size, cap)
                    report.buckets[f"{size}x{cap}"] = time.perf_counter() - t0
        report.total_s = time.perf_counter() - t_all
        return report

    def _scratch_forward(self, size: int, cap: int) -> None:
        """One forward of ``size`` tokens over an empty cache of capacity ``cap`` (compiles it)."""
        cache = StaticSplicedCache(self, self.pool.lease(cap), self.runner.num_layers)
        prefer, self.prefer_compiled = self.prefer_compiled, False  # compile exactly this bucket
        try:
            ids = [0] * size
            q_pos = torch.arange(size, device=self.device)
            self._chunk(cache, ids, q_pos, self.runner.past_then_causal(0, size), size - 1)
        finally:
            self.prefer_compiled = prefer
            cache.release()

    def report(self) -> dict:
        """Buckets used (calls per ``"SxC"``), compiles (seconds each), recompiles, fallbacks and why."""
        return {
            "enabled": self.eager_reason is None,
            "eager_reason": self.eager_reason,
            "mode": self.mode or "default",
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "inductor_cache_dir": self.cache_dir,
            "sdpa_gqa": self.sdpa_gqa,
            "folded_query_heads": self.folded_heads,
            "narrow_attention": self.narrow_attention,
            "amx_attention": self.amx_attention is None,
            **({"amx_attention_off": self.amx_attention} if self.amx_attention else {}),
            "malloc": self.malloc,
            "suffix_buckets": list(SUFFIX_BUCKETS),
            "cache_buckets": f"{MIN_CACHE_BUCKET} x 2^k x 1, 1.25, 1.5, 1.75 (256, 320, 384, 448, 512, ...)",
            "buckets_used": {f"{s}x{c}": n for (s, c), n in sorted(self.calls.items())},
            "compiles": len(self.compiled_buckets),
            "compile_s": {f"{s}x{c}": round(t, 3) for (s, c), t in sorted(self.compiled_buckets.items())},
            "recompiles": self.recompiles,
            "recompile_reasons": dict(self.recompile_reasons),
            "fallbacks": dict(self.fallbacks),
            "buffers": {str(c): n for c, n in sorted(self.pool.allocated.items())},
            "splice_tokens": dict(self.splice_tokens),
            "prefer_compiled": self.prefer_compiled,
            "eager_by_design": list(EAGER_BY_DESIGN),
        }


def _raise_recompile_limit(needed: int) -> None:
    """Every bucket is one entry in dynamo's cache of ``_step`` (shared by all instances): make
    room, or the ninth bucket would silently run eager at dynamo's default limit of 8."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, needed)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4 * needed)


def _recompile_limit() -> int:
    import torch._dynamo.config as dynamo_config

    return dynamo_config.recompile_limit


def _first_reason(exc: BaseException) -> str:
    """The first line of a dynamo recompile error that names the failed guard."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    guards = [ln.lstrip("- ") for ln in lines if ln.startswith("- ")]
    # "size/dtype mismatch" lines are other buckets' (or other models') entries: not the news.
    news = [g for g in guards if "mismatch" not in g]
    if news or guards:
        return (news or guards)[0][:300]
    return lines[0][:300] if lines else type(exc).__name__
