"""The request side of the vLLM connector: a PML prompt laid out as promptcache lays it out.

:func:`render` turns a PML prompt into ``(prompt_token_ids, kv_transfer_params)`` without running
a model: the token ids are the prompt's tokens in layout-position order (what vLLM computes), and
``kv_transfer_params["promptcache"]["spans"]`` names, for the leading run of tokens that stored
module entries reproduce exactly, which content key supplies which tokens.

Exactness rule (the only spans emitted): vLLM computes token ``t`` at position ``t`` after the
``t`` tokens before it. A stored segment reproduces that exactly when (1) its layout start equals
the number of prompt tokens before it (no position gap, so no RoPE re-rotation is needed), and
(2) its encoding context is exactly the segments supplied before it, in order (so it saw what vLLM
would have shown it: no ghost union member, no parameter scaffold, no skipped module). The run
ends at the first segment that breaks either, or that is not cached. With ``scaffold`` encoding
and a prompt on the default path (scaffold members, no arguments before the cached modules) that
is the whole cached prefix. ``render(..., approximate=True)`` also lists cached spans past a gap
or with another encoding context (non-prefix selections of ``independent`` modules), marked
``exact: false`` with their layout ``position``: the connector re-rotates them (an approximation).

This module imports no vLLM: it runs in the client's process (any Python with promptcache).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..modules.keys import ModuleKey, module_keys
from ..plan import POLICIES, Request, encoding_contexts, make_request
from ..pml.binding import bind
from ..pml.layout import Layout, build_layout
from ..pml.model import Prompt, Schema
from ..pml.parser import load_schema, parse_prompt, parse_schema
from ..roles import ChatRenderer

PARAMS_KEY = "promptcache"
PARAMS_VERSION = 1


def tokens_digest(ids: Sequence[int]) -> str:
    """sha256 of token ids as little-endian int64: binds a span to the tokens it claims to supply."""
    return hashlib.sha256(np.asarray(list(ids), dtype="<i8").tobytes()).hexdigest()


@dataclass(frozen=True)
class KeyContext:
    """What promptcache's content keys need besides the layout (see :func:`module_keys`).

    Build it with :meth:`from_model` from the same model promptcache encodes with, so that the
    keys are the ones ``PromptCache(..., store=...)`` / ``promptcache encode`` wrote.
    """

    renderer: ChatRenderer
    model: str            # promptcache.store.model_fingerprint(model)
    dtype: str            # promptcache.store.dtype_name(model dtype)
    policy: str = "scaffold"
    relative: bool = True
    offset_sensitive: bool = True

    @classmethod
    def from_model(cls, model, tokenizer, encoding: str = "scaffold") -> "KeyContext":
        """Fingerprint, dtype, relocation mode and role markers of a loaded HF model."""
        from ..models import adapter_for
        from ..modules.relocate import relocation_for
        from ..store import dtype_name, model_fingerprint

        if encoding not in POLICIES:
            raise ValueError(f"encoding must be one of {', '.join(POLICIES)}, not {encoding!r}")
        adapter = adapter_for(model)
        adapter.prepare(model)
        reloc = relocation_for(model, adapter)
        dtype = next(model.parameters()).dtype
        return cls(ChatRenderer(tokenizer, adapter.fallback_roles()), model_fingerprint(model),
                   dtype_name(dtype), encoding, reloc.relative, reloc.offset_sensitive)


def _schema(schema: str | os.PathLike | Schema) -> Schema:
    """A parsed schema: a ``Schema``, PML text, or a file path (trusted, as in ``add_schema``)."""
    if isinstance(schema, Schema):
        return schema
    if isinstance(schema, str) and schema.lstrip().startswith("<"):
        return parse_schema(schema)
    return load_schema(schema)


def prompt_ids(layout: Layout, request: Request) -> list[int]:
    """The request's tokens in layout-position order (what vLLM is given and computes)."""
    segs = layout.segments
    pairs = [(segs[i].start + k, segs[i].tokens[k]) for i, n in request.cached_spans for k in range(n)]
    pairs += list(zip(request.computed_pos, request.computed_ids))
    return [t for _, t in sorted(pairs)]


def exact_prefix(layout: Layout, contexts, request: Request) -> list[tuple[int, int]]:
    """The leading cached spans ``(segment, tokens)`` that vLLM's contiguous prefill reproduces
    exactly (see the module docstring); stops at the first gap, foreign context or computed token."""
    segs = layout.segments
    first_computed = min(request.computed_pos, default=None)
    out: list[tuple[int, int]] = []
    supplied: list[int] = []
    at = 0
    for i, n in sorted(request.cached_spans, key=lambda s: segs[s[0]].start):
        if segs[i].start != at or list(contexts[i]) != supplied:
            break
        if first_computed is not None and first_computed < at + n:
            break
        out.append((i, n))
        supplied.append(i)
        at += n
        if n < len(segs[i].tokens):  # a cut segment: what follows did not see its tail
            break
    return out


def relocated_prefix(layout: Layout, request: Request) -> list[tuple[int, int]]:
    """Every cached span ``(segment, tokens)`` before the first computed token, in position order:
    what vLLM's contiguous sequence starts with when modules are skipped (non-prefix selections).
    Why it stops at the first computed token: vLLM only takes a leading run of external tokens,
    and a computed token's KV (an argument, uncached text) is not in any store entry."""
    segs = layout.segments
    first_computed = min(request.computed_pos, default=None)
    out: list[tuple[int, int]] = []
    for i, n in sorted(request.cached_spans, key=lambda s: segs[s[0]].start):
        if first_computed is not None and first_computed < segs[i].start + n:
            break
        out.append((i, n))
    return out


def render(prompt_pml: str | Prompt, schema: str | os.PathLike | Schema, tokenizer=None, store=None, *,
           model=None, keys: KeyContext | None = None, approximate: bool = False) -> tuple[list[int], dict[str, Any]]:
    """``(prompt_token_ids, kv_transfer_params)`` of a PML prompt for vLLM with PromptCacheConnector.

    ``keys`` (or ``model`` + ``tokenizer``, from which it is built: build it once and reuse it, the
    model fingerprint hashes the weights) says how promptcache keyed the stored modules. ``store``
    (a ``CacheStore`` or a URL/directory), when given, marks each span ``stored`` true/false (the
    connector checks the store again: it loads the leading stored run and saves the missing spans
    that vLLM computes).

    ``approximate=False`` (default) lists only the exact prefix (module docstring). ``True`` lists
    every cached span up to the first computed token (modules skipped or encoded without the
    segments before them, typically ``encoding="independent"``): each span carries ``position``,
    its first token's layout position, and the connector re-rotates the entry's keys by
    ``start - position`` (vLLM closes the gaps of skipped modules). Spans that vLLM's prefill does
    not reproduce are marked ``exact: false``: vLLM attends to KV that differs from its own (the
    ``independent`` approximation) and the connector never saves them.
    """
    if keys is None:
        if model is None or tokenizer is None:
            raise ValueError("render needs keys=KeyContext(...) or model= and tokenizer=")
        keys = KeyContext.from_model(model, tokenizer)
    parsed_schema = _schema(schema)
    prompt = prompt_pml if isinstance(prompt_pml, Prompt) else parse_prompt(prompt_pml)
    if prompt.schema != parsed_schema.name:
        raise ValueError(f"the prompt is for schema {prompt.schema!r}, but the schema is {parsed_schema.name!r}")
    layout = build_layout(parsed_schema, keys.renderer)
    contexts = encoding_contexts(layout, keys.policy)
    request = make_request(bind(prompt, layout, keys.renderer), contexts)
    ids = prompt_ids(layout, request)
    exact = exact_prefix(layout, contexts, request)
    prefix = relocated_prefix(layout, request) if approximate else exact
    mk: dict[int, ModuleKey] = module_keys(layout, contexts, [i for i, _ in prefix], model=keys.model,
                                           dtype=keys.dtype, policy=keys.policy, relative=keys.relative,
                                           offset_sensitive=keys.offset_sensitive)
    if store is not None and not hasattr(store, "contains"):
        from ..store import open_store

        store = open_store(store, create=False)
    spans = []
    segs = layout.segments
    start = 0
    for k, (i, n) in enumerate(prefix):
        key = mk[i]
        span = {"key": key.store_key, "start": start, "length": n, "entry_length": key.length,
                "base": key.base, "position": segs[i].start, "module": "/".join(segs[i].owner),
                "exact": k < len(exact) and exact[k] == (i, n),
                "tokens_sha256": tokens_digest(ids[start:start + n])}
        start += n
        if store is not None:
            span["stored"] = bool(store.contains(key.store_key))
        spans.append(span)
    params = {PARAMS_KEY: {"version": PARAMS_VERSION, "spans": spans, "model": keys.model,
                           "dtype": keys.dtype, "policy": keys.policy,
                           "positions": "relative" if keys.relative else "absolute",
                           "schema": parsed_schema.name, "approximate": bool(approximate)}}
    return ids, params


def supplied_tokens(params: dict[str, Any] | None) -> int:
    """Tokens the params' leading stored spans cover from position 0 (before vLLM's block
    alignment); spans marked ``stored: false`` end the run."""
    spans = ((params or {}).get(PARAMS_KEY) or {}).get("spans") or []
    n = 0
    for s in spans:
        if s["start"] != n or s.get("stored") is False:
            break
        n += s["length"]
    return n


def prefix_span_keys(ids: Sequence[int], bounds: Sequence[tuple[int, int]], *, model: str, dtype: str,
                     policy: str = "scaffold", relative: bool = True) -> list[str]:
    """Content keys of spans ``bounds`` (``(start, end)``, contiguous from 0) of an exact prefix,
    recomputed from the tokens alone: under the exactness rule each span's encoding context is
    the spans before it, at their own positions, so its key needs no layout. Why: a connector
    configured with its model's fingerprint checks client-sent keys with this (a client cannot
    make vLLM load or save under a key that is not its tokens' content key).
    The same keys as :func:`promptcache.modules.keys.module_keys` gives such spans."""
    from ..modules.keys import KEY_SCHEME, segment_digest
    from ..store.keys import make_key

    fixed = {"scheme": KEY_SCHEME, "model": model, "dtype": dtype, "policy": policy,
             "positions": "relative" if relative else "absolute"}
    digests = [segment_digest(list(ids[s:e]), range(s, e), 0) for s, e in bounds]
    return [make_key({**fixed, "context": digests[:k], "segment": d}) for k, d in enumerate(digests)]
