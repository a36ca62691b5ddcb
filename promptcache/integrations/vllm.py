"""promptcache module caches inside vLLM: ``PromptCacheConnector`` (a KV connector) and :func:`render`.

Use (see docs/vllm.md)::

    from promptcache.integrations.vllm import KeyContext, render
    ids, params = render(prompt_pml, schema, keys=KeyContext.from_model(model, tokenizer), store=DIR)
    llm = LLM(model=HF_DIR, dtype="float32", kv_transfer_config=KVTransferConfig(
        kv_connector="PromptCacheConnector", kv_connector_module_path="promptcache.integrations.vllm",
        kv_role="kv_both", kv_connector_extra_config={"store": DIR}))
    llm.generate({"prompt_token_ids": ids},
                 SamplingParams(temperature=0, extra_args={"kv_transfer_params": params}))

Scheduler side (:meth:`get_num_new_matched_tokens`): the request's ``kv_transfer_params`` list the
leading spans (content key, start, length, sha256 of the span's token ids); the connector checks
each span's tokens against the request's prompt and its key against the store, and reports the
covered run, cut to whole blocks and never including the last prompt token (vLLM computes that
one to produce the first logits). Worker side (:meth:`start_load_kv`): the entries' per-layer
``[kv_heads, n, head_dim]`` keys and values are written into the request's paged blocks through
the attention backend's own ``do_kv_cache_update`` (the same kernel vLLM's forward uses), so the
connector does not depend on the backend's block layout (CPU: ``[blocks, heads, block, 2*dim]``).
An entry stored at another offset than the one its key is used at (same relative layout) is
re-rotated (RoPE ``default`` only), and so is a span whose layout ``position`` differs from its
``start`` in vLLM's sequence (``render(..., approximate=True)``: non-prefix selections, skipped
modules' gaps closed; approximate, never saved). Entries are read and verified once per worker
and kept, prepared, in a bytes-bounded host LRU (``host_cache_bytes``, :mod:`.vllm_cache`).

Save side: a span the store lacks (``render`` lists every span of the exact prefix) is read back
from the paged blocks after vLLM has computed it (:meth:`save_kv_layer`, per layer) and written
under its content key with promptcache's meta (:meth:`wait_for_save`), so later requests and other
processes load it. The block layout is learnt once from the backend's own write kernel on a
scratch block (the CPU kernel does not store keys as plain ``[block, dim]`` rows); a layout that
cannot be read back exactly (not float32, blocks not at dim 0) is not saved, with one warning.
Only spans whose last token is computed in the request's first scheduled step, only when the KV
cache dtype is the keys' dtype, and each key at most once per vLLM process.

``kv_connector_extra_config["model_fingerprint"]`` makes the connector recompute every span's
key from the request's own tokens (params are client input: docs/vllm.md, "Checks").

``import promptcache`` never imports this module; importing it imports vLLM when vLLM is
installed. Without vLLM only :func:`render` (request side) is available here.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .vllm_cache import DEFAULT_HOST_CACHE_BYTES, HostEntryCache, Prepared, parse_limit
from .vllm_render import PARAMS_KEY, KeyContext, render, supplied_tokens, tokens_digest

__all__ = ["KeyContext", "render", "supplied_tokens", "PromptCacheConnector", "VLLM_AVAILABLE"]

logger = logging.getLogger("promptcache.vllm")

try:  # vLLM is an optional extra: the request side works without it.
    import torch
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
    )
    VLLM_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised where vLLM is absent
    VLLM_AVAILABLE = False

if TYPE_CHECKING:  # pragma: no cover
    from vllm.forward_context import ForwardContext


@dataclass
class SpanRef:
    """One stored entry supplying tokens ``start .. start+length-1`` of a request."""

    key: str
    start: int
    length: int
    base: int
    position: int = -1  # layout position of the span's first token (``start`` when -1)
    exact: bool = True  # vLLM's own prefill reproduces it (render's exactness rule): savable

    @property
    def shift(self) -> int:
        """Positions from the layout to vLLM's contiguous sequence (skipped modules close up)."""
        return 0 if self.position < 0 else self.start - self.position


@dataclass
class SaveJob:
    """A span vLLM computes this step and the store lacks: save it under ``key`` with ``meta``."""

    req_id: str
    key: str
    start: int
    length: int
    block_ids: list[int]
    meta: dict


@dataclass
class LoadJob:
    """What one request loads this step: tokens ``lo .. hi-1`` of the concatenated spans."""

    req_id: str
    spans: list[SpanRef]
    lo: int
    hi: int
    block_ids: list[int]
    expect: dict | None = None  # model, dtype, policy, positions: checked against each entry's meta


def _spans_of(params: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The span list of a request's ``kv_transfer_params`` (empty when absent or malformed)."""
    pc = (params or {}).get(PARAMS_KEY) if isinstance(params, dict) else None
    spans = pc.get("spans") if isinstance(pc, dict) else None
    return spans if isinstance(spans, list) else []


def _expect(request) -> dict | None:
    """What the request's params say every entry was encoded with (``store.get``'s ``expect``)."""
    pc = ((getattr(request, "kv_transfer_params", None) or {}).get(PARAMS_KEY)) or {}
    want = {k: pc[k] for k in ("model", "dtype", "policy", "positions") if k in pc}
    return want or None


def _default_inv_freq(hf_config, head_dim: int):
    """RoPE frequencies of a ``default`` rope config, or ``None`` when the type is another one."""
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    theta = (rope.get("rope_theta") if isinstance(rope, dict) else None) or getattr(hf_config, "rope_theta", None)
    if rope_type != "default" or theta is None:
        return None
    return 1.0 / (float(theta) ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


if VLLM_AVAILABLE:

    @dataclass
    class PromptCacheConnectorMetadata(KVConnectorMetadata):
        """Scheduler -> worker: the loads of this step."""

        loads: list[LoadJob] = field(default_factory=list)
        saves: list[SaveJob] = field(default_factory=list)

    class PromptCacheConnector(KVConnectorBase_V1):
        """vLLM KV connector fed by a promptcache module store (see the module docstring).

        ``kv_connector_extra_config``: ``store`` (directory, ``redis://...``; required),
        ``model_fingerprint`` (+ ``policy``, ``positions``: keys checked against the tokens),
        ``log`` (a JSON-lines log: matched, loaded, saved, load_failed).
        """

        def __init__(self, vllm_config, role, kv_cache_config=None) -> None:
            super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
            url = self._kv_transfer_config.get_from_extra_config("store", None)
            if not url:
                raise ValueError("PromptCacheConnector: kv_connector_extra_config must name a 'store' "
                                 "(a directory or redis://...)")
            from ..store import open_store

            self._store = open_store(str(url), create=False)
            self._log_path = self._kv_transfer_config.get_from_extra_config("log", None)
            # Optional: this model's promptcache fingerprint (promptcache.store.model_fingerprint).
            # When set, every span's key is recomputed from the request's tokens and must match.
            fp = self._kv_transfer_config.get_from_extra_config("model_fingerprint", None)
            self._fixed = None
            if fp:
                from ..store import dtype_name

                positions = str(self._kv_transfer_config.get_from_extra_config("positions", "relative"))
                self._fixed = {"model": str(fp), "dtype": dtype_name(vllm_config.model_config.dtype),
                               "policy": str(self._kv_transfer_config.get_from_extra_config("policy", "scaffold")),
                               "relative": positions == "relative"}
            self._block_size = vllm_config.cache_config.block_size
            self._matched: dict[str, tuple[int, int, list[SpanRef]]] = {}  # req -> (local, end, spans)
            self._pending: dict[str, Any] = {}  # req -> (request, lo, hi, spans)
            mc = vllm_config.model_config
            self._hf_config = mc.hf_config
            self._head_dim = mc.get_head_size()
            self._inv_freq = None
            self._requests: dict[str, Any] = {}  # req -> request, while it may still save
            self._saving: set[str] = set()  # keys some request of this process is saving
            self._save_buf: dict[str, tuple[dict[int, Any], dict[int, Any]]] = {}
            self._num_layers = 0
            self._warned_layout = False
            self._load_errors: set[int] = set()
            self._layout: Any = None  # learnt block layout (tensor), False when unreadable
            self._host = HostEntryCache(parse_limit(self._kv_transfer_config.get_from_extra_config(
                "host_cache_bytes", DEFAULT_HOST_CACHE_BYTES)))

        # ---------------------------------------------------------------- log

        def _log(self, **record: Any) -> None:
            """One JSON line to the configured log (tests and operators read it)."""
            if not self._log_path:
                return
            record["t"] = time.time()
            with open(self._log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

        # ---------------------------------------------------------------- scheduler side

        def _valid_spans(self, request) -> list[tuple[SpanRef, dict]]:
            """The params' leading spans that are contiguous from 0 and match the prompt's tokens."""
            ids = list(request.prompt_token_ids or [])
            n, out = 0, []
            for s in _spans_of(getattr(request, "kv_transfer_params", None)):
                try:
                    start, length, key = int(s["start"]), int(s["length"]), str(s["key"])
                    base, sha = int(s.get("base", 0)), str(s["tokens_sha256"])
                    position, exact = int(s.get("position", start)), s.get("exact", True) is True
                except (KeyError, TypeError, ValueError):
                    logger.warning("promptcache: request %s: malformed span %r ignored", request.request_id, s)
                    break
                if start != n or length <= 0 or start + length > len(ids):
                    break
                if tokens_digest(ids[start:start + length]) != sha:
                    logger.warning("promptcache: request %s: span at %d does not match the prompt's tokens",
                                   request.request_id, start)
                    break
                out.append((SpanRef(key, start, length, base, position, exact and position == start), s))
                n += length
            if self._fixed is not None and out:
                from .vllm_render import prefix_span_keys

                want = prefix_span_keys(ids, [(r.start, r.start + r.length) for r, _ in out], **self._fixed)
                for k, ((ref, _), key) in enumerate(zip(out, want)):
                    if ref.key != key:
                        logger.warning("promptcache: request %s: span at %d names key %s, not its content "
                                       "key: ignored from there", request.request_id, ref.start, ref.key[:16])
                        return out[:k]
            return out

        def _covered(self, request) -> tuple[int, list[SpanRef]]:
            """Leading prompt tokens the params' spans cover, checked against tokens and store."""
            n, refs = 0, []
            for ref, _ in self._valid_spans(request):
                if not self._store.contains(ref.key):
                    break
                refs.append(ref)
                n += ref.length
            return n, refs

        def _save_jobs(self, request, block_ids: list[int], computed_after: int) -> list[SaveJob]:
            """Spans the store lacks whose tokens are all computed by the end of this step."""
            pc = (request.kv_transfer_params or {}).get(PARAMS_KEY) or {}
            common = {k: pc[k] for k in ("model", "dtype", "policy", "positions", "schema") if k in pc}
            if self._fixed is not None:  # the keys were checked against these: record them, not the client's
                common.update({k: v for k, v in self._fixed.items() if k != "relative"},
                              positions="relative" if self._fixed["relative"] else "absolute")
            if not {"model", "dtype", "policy", "positions"} <= set(common):
                return []
            jobs = []
            for ref, span in self._valid_spans(request):
                if ref.start + ref.length > computed_after or ref.key in self._saving or not ref.exact:
                    continue  # (a relocated/approximate span's KV in vLLM is not its key's content)
                if self._store.contains(ref.key):
                    continue
                meta = {**common, "module": str(span.get("module", "")), "offset": ref.base,
                        "tokens": ref.length, "source": "vllm"}
                self._saving.add(ref.key)
                jobs.append(SaveJob(request.request_id, ref.key, ref.start, ref.length, block_ids, meta))
            return jobs

        def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
            """Whole blocks of the covered run beyond what vLLM already has, minus the last token."""
            if _spans_of(getattr(request, "kv_transfer_params", None)):
                self._requests[request.request_id] = request
            covered, refs = self._covered(request)
            prompt_len = len(request.prompt_token_ids or [])
            end = min(covered, prompt_len - 1) // self._block_size * self._block_size
            if end <= num_computed_tokens:
                self._matched.pop(request.request_id, None)
                return 0, False
            self._matched[request.request_id] = (num_computed_tokens, end, refs)
            return end - num_computed_tokens, False

        def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
            """Remember the load once vLLM has allocated blocks for the matched tokens."""
            if num_external_tokens <= 0:
                return
            local, end, refs = self._matched[request.request_id]
            lo = end - num_external_tokens
            self._pending[request.request_id] = (request, lo, end, refs)
            self._log(event="matched", req_id=request.request_id, local=local, lo=lo, hi=end,
                      tokens=num_external_tokens, keys=[r.key for r in refs])

        def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
            """The loads of requests scheduled this step (new ones, or resumed after preemption)."""
            meta = PromptCacheConnectorMetadata()
            for new in scheduler_output.scheduled_new_reqs:
                job = self._pending.pop(new.req_id, None)
                if job is not None:
                    req, lo, hi, refs = job
                    meta.loads.append(LoadJob(new.req_id, refs, lo, hi, list(new.block_ids[0]), _expect(req)))
                request = self._requests.pop(new.req_id, None)
                if request is not None:
                    after = new.num_computed_tokens + scheduler_output.num_scheduled_tokens.get(new.req_id, 0)
                    meta.saves += self._save_jobs(request, list(new.block_ids[0]), after)
            cached = scheduler_output.scheduled_cached_reqs
            for i, req_id in enumerate(cached.req_ids):
                job = self._pending.get(req_id)
                if job is None or req_id not in cached.resumed_req_ids:
                    continue
                new_block_ids = cached.new_block_ids[i]
                if new_block_ids is None:
                    continue
                req, lo, hi, refs = self._pending.pop(req_id)
                meta.loads.append(LoadJob(req_id, refs, lo, hi, list(new_block_ids[0]), _expect(req)))
            return meta

        def request_finished(self, request, block_ids):
            self._matched.pop(request.request_id, None)
            self._pending.pop(request.request_id, None)
            self._requests.pop(request.request_id, None)
            return False, None

        # ---------------------------------------------------------------- worker side

        def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
            """Nothing to prepare: writes go through each layer's backend; shapes logged once."""
            shapes = {tuple(t.shape) for t in kv_caches.values()}
            self._num_layers = len(kv_caches)
            logger.info("promptcache: %d KV cache layers, shapes %s", len(kv_caches), shapes)

        def _prepared(self, ref: SpanRef, expect: dict | None, dtype) -> Prepared:
            """The span's entry as per-layer ``[n, heads, dim]`` tensors in ``dtype``, keys rotated
            to vLLM's positions: from the host LRU, else read (and verified) from the store once."""
            from ..modules.relocate import rotate_keys, rotation
            from ..store.base import check_expect

            ck = (ref.key, ref.base + ref.shift, str(dtype))
            item = self._host.get(ck)
            if item is None:
                entry = self._store.get(ref.key)  # no expect=: a store quarantines a mismatch, and
                if entry is None:                 # the params come from clients
                    raise RuntimeError(f"promptcache: store entry {ref.key[:16]} is missing or bad")
                keys, values = entry.kv.keys, entry.kv.values
                delta = ref.base - int(entry.meta.get("offset", ref.base)) + ref.shift
                if delta != 0:
                    if self._inv_freq is None:
                        self._inv_freq = _default_inv_freq(self._hf_config, self._head_dim)
                    if self._inv_freq is None:
                        raise RuntimeError("promptcache: entry stored at another offset and this model's "
                                           "RoPE is not 'default': cannot re-rotate")
                    cos, sin = rotation(self._inv_freq, delta, keys[0].device)
                    keys = [rotate_keys(k, cos, sin) for k in keys]
                ks = [k.transpose(0, 1).to(dtype).contiguous() for k in keys]
                vs = [v.transpose(0, 1).to(dtype).contiguous() for v in values]
                item = Prepared(dict(entry.meta), ks, vs, sum(t.numel() * t.element_size() for t in ks + vs),
                                entry.dtype)
                self._host.put(ck, item)
            why = check_expect(item, expect)
            if why is not None:
                raise RuntimeError(f"promptcache: store entry {ref.key[:16]}: {why}")
            if item.keys[0].shape[0] < ref.length:
                raise RuntimeError(f"promptcache: store entry {ref.key[:16]} has {item.keys[0].shape[0]} "
                                   f"tokens, the span {ref.length}")
            return item

        def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
            """Write each load's tokens into its paged blocks, per layer and span, from the host LRU
            (entries read from the store once: :mod:`.vllm_cache`), synchronously before the forward."""
            from vllm.model_executor.models.utils import extract_layer_index

            meta = self._get_connector_metadata()
            if not isinstance(meta, PromptCacheConnectorMetadata) or not meta.loads:
                return
            if forward_context.attn_metadata is None:
                return
            layers = [(name, layer) for name, layer in forward_context.no_compile_layers.items()
                      if hasattr(layer, "impl") and getattr(layer, "kv_cache", None) is not None
                      and hasattr(layer.impl, "do_kv_cache_update")]
            if not layers:
                return
            cache0 = layers[0][1].kv_cache
            dtype = cache0.dtype if cache0.dtype in (torch.float32, torch.float16, torch.bfloat16) else None
            bs = self._block_size
            for job in meta.loads:
                t0 = time.perf_counter()
                hits = self._host.hits
                pos = torch.arange(job.lo, job.hi)
                blocks = torch.tensor(job.block_ids, dtype=torch.long)
                try:
                    parts = [(ref, self._prepared(ref, job.expect, dtype or torch.float32)) for ref in job.spans]
                    for _, item in parts:
                        if len(item.keys) != len(layers):
                            raise RuntimeError(f"promptcache: entries have {len(item.keys)} layers, vLLM has "
                                               f"{len(layers)} attention layers (another model?)")
                        self._check_shapes(item.keys, layers)
                except (RuntimeError, ValueError, KeyError, OSError) as err:
                    # vLLM recomputes or fails these blocks (kv_load_failure_policy); the engine lives on.
                    logger.warning("promptcache: request %s: load failed: %s", job.req_id, err)
                    self._load_errors |= {int(b) for b in blocks[pos // bs].unique()}
                    self._log(event="load_failed", req_id=job.req_id, error=str(err)[:300])
                    continue
                t_read = time.perf_counter()
                slots = (blocks[pos // bs] * bs + pos % bs).to(cache0.device)
                for name, layer in layers:
                    idx = extract_layer_index(name)
                    for ref, item in parts:
                        a, b = max(job.lo, ref.start), min(job.hi, ref.start + ref.length)
                        if a >= b:
                            continue
                        k = item.keys[idx][a - ref.start:b - ref.start].to(layer.kv_cache.device)
                        v = item.values[idx][a - ref.start:b - ref.start].to(layer.kv_cache.device)
                        layer.impl.do_kv_cache_update(layer, k, v, layer.kv_cache, slots[a - job.lo:b - job.lo])
                t1 = time.perf_counter()
                self._log(event="loaded", req_id=job.req_id, lo=job.lo, hi=job.hi, tokens=job.hi - job.lo,
                          layers=len(layers), host_hits=self._host.hits - hits, read_ms=round((t_read - t0) * 1000, 3),
                          write_ms=round((t1 - t_read) * 1000, 3), ms=round((t1 - t0) * 1000, 3))

        @staticmethod
        def _check_shapes(keys: list, layers: list) -> None:
            """Entries must have vLLM's KV heads and head size in every layer."""
            from vllm.model_executor.models.utils import extract_layer_index

            for name, layer in layers:  # keys per layer [n, heads, dim]
                have = tuple(keys[extract_layer_index(name)].shape[1:])
                want = (layer.num_kv_heads, layer.head_size)
                if have != want:
                    raise RuntimeError(f"promptcache: entry heads/dim {have} != vLLM's {want} in {name}")

        def get_block_ids_with_load_errors(self) -> set[int]:
            """Blocks whose load failed this step (reported once)."""
            out, self._load_errors = self._load_errors, set()
            return out

        def wait_for_layer_load(self, layer_name: str) -> None:
            """Loads are synchronous in :meth:`start_load_kv`: nothing to wait for."""
            return

        def _probe_layout(self, layer, kv_layer) -> "torch.Tensor | None":
            """Where the backend's own write kernel puts each (k/v, token, head, dim) inside one
            block: ``[2, block, heads, dim]`` offsets into the block's flattened memory, learnt
            by writing distinct numbers into a scratch block (never the live cache). ``None`` when
            the layout is not a bijection within one block at dim 0, or not float32 (not exact)."""
            bs, heads, dim = self._block_size, layer.num_kv_heads, layer.head_size
            if kv_layer.dtype != torch.float32:
                return None
            n = bs * heads * dim
            scratch = torch.full((1, *kv_layer.shape[1:]), -1.0, dtype=kv_layer.dtype, device=kv_layer.device)
            if scratch.numel() != 2 * n:
                return None
            k = torch.arange(n, dtype=torch.float32).view(bs, heads, dim).to(kv_layer.device)
            layer.impl.do_kv_cache_update(layer, k, k + n, scratch, torch.arange(bs, device=kv_layer.device))
            flat = scratch.reshape(-1).cpu()
            vals = flat.round().long()
            ok = (vals >= 0) & (vals < 2 * n) & (flat == vals.float())
            where = torch.full((2 * n,), -1, dtype=torch.long)
            where[vals[ok]] = torch.nonzero(ok).squeeze(1)
            if int(ok.sum()) != 2 * n or bool((where < 0).any()):
                return None
            return where.view(2, bs, heads, dim)

        def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
            """Copy this layer's K/V of each save job out of the paged blocks, through the block
            layout learnt from the backend's write kernel (:meth:`_probe_layout`)."""
            meta = self._get_connector_metadata()
            if not isinstance(meta, PromptCacheConnectorMetadata) or not meta.saves:
                return
            from vllm.forward_context import get_forward_context
            from vllm.model_executor.models.utils import extract_layer_index

            if self._layout is None:
                layer = get_forward_context().no_compile_layers.get(layer_name)
                probe = self._probe_layout(layer, kv_layer) if layer is not None else None
                self._layout = probe if probe is not None else False
                if probe is None:
                    logger.warning("promptcache: KV block layout %s (%s) could not be read back exactly: "
                                   "modules computed by vLLM are not saved", tuple(kv_layer.shape), kv_layer.dtype)
            if self._layout is False:
                return
            where, bs = self._layout, self._block_size
            idx = extract_layer_index(layer_name)
            for job in meta.saves:
                pos = torch.arange(job.start, job.start + job.length)
                k = torch.empty(where.shape[2], job.length, where.shape[3], dtype=kv_layer.dtype)
                v = torch.empty_like(k)
                blocks = pos // bs
                for b in blocks.unique().tolist():
                    sel = torch.nonzero(blocks == b).squeeze(1)
                    offs = pos[sel] % bs
                    flat = kv_layer[job.block_ids[b]].reshape(-1).cpu()
                    k[:, sel] = flat[where[0, offs]].permute(1, 0, 2)  # [m, heads, dim] -> [heads, m, dim]
                    v[:, sel] = flat[where[1, offs]].permute(1, 0, 2)
                ks, vs = self._save_buf.setdefault(job.key, ({}, {}))
                ks[idx], vs[idx] = k, v

        def wait_for_save(self) -> None:
            """Write each save job whose every layer was copied to the store, under its content key."""
            meta = self._get_connector_metadata()
            if not isinstance(meta, PromptCacheConnectorMetadata) or not meta.saves:
                return
            from ..runtime.kv import ModuleKV
            from ..store import CacheEntry, dtype_name

            for job in meta.saves:
                ks, vs = self._save_buf.pop(job.key, ({}, {}))
                n = self._num_layers
                if n == 0 or sorted(ks) != list(range(n)):
                    continue
                keys, values = [ks[i] for i in range(n)], [vs[i] for i in range(n)]
                if dtype_name(keys[0].dtype) != job.meta["dtype"]:
                    if not self._warned_layout:
                        logger.warning("promptcache: vLLM's KV dtype %s is not the keys' %s: not saved",
                                       keys[0].dtype, job.meta["dtype"])
                        self._warned_layout = True
                    continue
                t0 = time.perf_counter()
                ok = self._store.put(job.key, CacheEntry(ModuleKV(keys, values), dict(job.meta)))
                self._log(event="saved", req_id=job.req_id, key=job.key, start=job.start, tokens=job.length,
                          ok=bool(ok), ms=round((time.perf_counter() - t0) * 1000, 3))
