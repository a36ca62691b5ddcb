"""The FastAPI application: OpenAI-compatible endpoints over one PromptCache and its scheduler.

``create_app(pc, scheduler, config)`` builds it; ``promptcache serve`` (``promptcache.cli``)
runs it under uvicorn. The app never runs the model itself: generation goes through
``scheduler.submit`` (events come back through the handle), and every other engine access
(schema add/remove/inspection, memory reports) through ``scheduler.call``, which runs on the
engine thread between decode steps.

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``:
400 bad request or PML (the PML message with line and column), 401 key, 403 admin actions off,
404 unknown model, schema or route, 413 body too large, 429 queue full (``Retry-After``), 500
anything unexpected (an id that is also in the log; never a traceback); they live in
:mod:`.errors`, the schema endpoints in :mod:`.schemas`. See docs/serve.md.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..pml.errors import PMLError
from ..pml.parser import parse_prompt
from ..prefix.runner import is_pml_prompt
from ..recompute import parse_policy
from ..runtime.sampling import SamplingOptions
from . import protocol as P
from .config import ServeConfig
from .errors import ApiError, BodyLimit, KeyGate, engine_error, install_error_handlers, internal_error
from .metrics import ServeMetrics
from .adapters import add_adapter_routes
from .schemas import add_schema_routes


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DISCONNECT_POLL_S = 0.5


# ---------------------------------------------------------------- the app


def create_app(pc, scheduler, config: ServeConfig, metrics: ServeMetrics | None = None) -> FastAPI:
    """The server's FastAPI app over ``pc`` and a started ``scheduler`` (see the module docstring).

    ``metrics`` should be the scheduler's observer (so that TTFT, latencies and token counts are
    recorded); a fresh one is made otherwise and only counts what the HTTP layer sees.
    """
    metrics = metrics or ServeMetrics()
    metrics.bind(scheduler.stats, lambda: _tier_report(scheduler, config))
    app = FastAPI(title="promptcache", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pc, app.state.scheduler, app.state.config, app.state.metrics = pc, scheduler, config, metrics

    def limit_for(path: str) -> int:
        return config.max_schema_body_bytes if path.rstrip("/") == "/v1/schemas" else config.max_body_bytes

    app.add_middleware(BodyLimit, limit_for=limit_for, metrics=metrics)
    app.add_middleware(KeyGate, config=config, metrics=metrics)  # added last: runs first
    install_error_handlers(app, metrics)
    _add_info_routes(app, pc, scheduler, config, metrics)
    _add_generation_routes(app, pc, scheduler, config, metrics)
    add_schema_routes(app, pc, scheduler, config)
    add_adapter_routes(app, scheduler, config)
    return app


def _tier_report(scheduler, config: ServeConfig) -> dict:
    """Module-cache tiers and bytes per LoRA adapter, read on the engine thread (a scrape must
    not race a schema change)."""
    def read(pc) -> dict:
        report = pc.memory_report()
        return {**report["tiers"], "by_adapter": report.get("by_adapter")}

    return scheduler.call(read, timeout=config.metrics_call_timeout_s)


# ---------------------------------------------------------------- /health, /metrics, /v1/models


def _add_info_routes(app: FastAPI, pc, scheduler, config: ServeConfig, metrics: ServeMetrics) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        stats = scheduler.stats()
        alive = getattr(scheduler, "alive", True)  # a property of the scheduler (a method in fakes)
        alive = alive() if callable(alive) else bool(alive)
        body = {"status": "ok" if alive else "engine stopped", "model": config.model_name,
                "queue_depth": stats.get("queue_depth"), "running": stats.get("running")}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = await run_in_threadpool(metrics.render)
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict:
        created = config.created or P.now()
        cards = [P.ModelCard(id=config.model_name, created=created)]
        cards += [P.ModelCard(id=name, created=created, parent=config.model_name) for name in _adapter_names(pc)]
        return P.ModelList(data=cards).model_dump(exclude_none=True)


# ---------------------------------------------------------------- generation


def _add_generation_routes(app: FastAPI, pc, scheduler, config: ServeConfig, metrics: ServeMetrics) -> None:
    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request) -> Response:
        prompt = body.prompt_text()
        adapter = await _check_request(body, config, pc, prompt)
        max_tokens = body.max_tokens if body.max_tokens is not None else config.default_max_tokens
        return await _serve(request, scheduler, body, prompt, max_tokens, chat=False, config=config,
                            adapter=adapter)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Response:
        adapter = await _check_request(body, config, pc, None)
        try:
            messages = body.chat_messages()
        except P.UnsupportedField as e:
            raise ApiError(400, str(e), param=e.param, code="unsupported") from None
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = limit if limit is not None else config.default_max_tokens
        return await _serve(request, scheduler, body, messages, max_tokens, chat=True, config=config,
                            adapter=adapter)


def _adapter_names(pc) -> list[str]:
    """The loaded LoRA adapters (a dict read: safe next to the engine thread)."""
    adapters = getattr(pc, "adapters", None)
    return list(adapters()) if callable(adapters) else []


def _adapter_for(model: str, config: ServeConfig, pc) -> str | None:
    """The OpenAI ``model`` field: the served name or ``"base"`` is the base model (``None``), a
    loaded adapter's name is that adapter; anything else is a 404 ``model_not_found``."""
    if model in (config.model_name, "base"):
        return None
    names = _adapter_names(pc)
    if model in names:
        return model
    served = ", ".join([repr(config.model_name), "'base'", *map(repr, names)])
    raise ApiError(404, f"the model {model!r} does not exist; this server serves {served} "
                   "(GET /v1/models lists them)", param="model", code="model_not_found", outcome="not_found")


async def _check_request(body: P._GenerationFields, config: ServeConfig, pc, prompt: str | None) -> str | None:
    """Refuse, before queueing, what can be refused without the engine: unsupported fields, another
    model, a bad recompute policy, PML that does not parse, a schema that was never added. Returns
    the LoRA adapter the ``model`` field names (``None``: the base model)."""
    try:
        body.check_supported()
    except P.UnsupportedField as e:
        raise ApiError(400, str(e), param=e.param, code="unsupported") from None
    adapter = _adapter_for(body.model, config, pc)
    if body.recompute is not None:
        try:
            parse_policy(body.recompute)
        except ValueError as e:
            raise ApiError(400, str(e), param="recompute", code="invalid_value") from None
    if prompt is None or not is_pml_prompt(prompt):
        return adapter
    try:
        # Linear in the input, but up to 1 MiB: off the event loop. The engine parses again on its thread.
        parsed = await run_in_threadpool(parse_prompt, prompt)
    except PMLError as e:
        raise ApiError(400, str(e), param="prompt", code="pml_error") from None
    if parsed.schema not in pc.schemas:  # a dict lookup: safe next to the engine thread
        raise ApiError(404, f"schema {parsed.schema!r} has not been added to this server "
                       f"(GET /v1/schemas lists the schemas)", param="prompt", code="schema_not_found",
                       outcome="not_found")
    return adapter


def _gen_request(body: P._GenerationFields, prompt, max_tokens: int, adapter: str | None = None):
    from .scheduler import GenRequest  # the scheduler module imports torch-heavy parts

    options = SamplingOptions(temperature=body.temperature, top_p=body.top_p, stop=body.stop_list(),
                              seed=body.seed)
    return GenRequest(prompt=prompt, max_tokens=max_tokens, options=options, use_cache=body.use_cache,
                      recompute=body.recompute, adapter=adapter)


def _submit(scheduler, req):
    from .scheduler import QueueFull

    try:
        return scheduler.submit(req)
    except RuntimeError as e:  # stopped (shutting down)
        raise ApiError(503, f"the server is not accepting requests: {e}", type_="server_error",
                       code="unavailable", outcome="error") from None
    except QueueFull as e:
        retry = max(1, math.ceil(getattr(e, "retry_after_s", 1.0) or 1.0))
        raise ApiError(429, f"the request queue is full ({e}); retry after {retry} s",
                       type_="rate_limit_error", code="queue_full", headers={"Retry-After": str(retry)},
                       outcome="rejected_queue_full") from None


async def _serve(request: Request, scheduler, body: P._GenerationFields, prompt, max_tokens: int, *,
                 chat: bool, config: ServeConfig, adapter: str | None = None) -> Response:
    """Submit, wait for the first event (so that errors before any token get their HTTP status),
    then answer whole or as a stream. The handle is cancelled whenever the client goes away."""
    handle = _submit(scheduler, _gen_request(body, prompt, max_tokens, adapter))
    events = handle.__aiter__()
    watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
    handed_over = False
    try:
        first = await anext(events, None)
        if first is not None and first.kind == "error":
            raise engine_error(first.error, request.url.path)
        rid = P.new_id("chatcmpl" if chat else "cmpl")
        if body.stream:
            handed_over = True
            stream = _stream(handle, events, first, rid, body, chat, body.model, watcher)
            return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)
        text, last = (first.text if first else ""), first
        while last is not None and last.kind == "token":
            last = await anext(events, None)
            if last is not None and last.kind == "token":
                text += last.text
        if last is None or last.kind != "done":
            if last is not None and last.kind == "error":
                raise engine_error(last.error, request.url.path)
            raise internal_error(RuntimeError("the request's events ended without 'done'"), request.url.path)
        return JSONResponse(_final_body(rid, chat, body.model, text, last).model_dump())
    finally:
        if not handed_over:
            watcher.cancel()
            handle.cancel()  # a no-op once done; frees the slot when we leave early


async def _cancel_on_disconnect(request: Request, handle) -> None:
    """Poll for a client that went away while we wait or stream, and cancel its request."""
    try:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        handle.cancel()
    except asyncio.CancelledError:
        pass
    except Exception:  # the connection is gone in some other way: cancel too
        handle.cancel()


def _usage(u) -> P.UsageInfo | None:
    if u is None:
        return None
    return P.UsageInfo(
        prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
        total_tokens=u.prompt_tokens + u.completion_tokens,
        prompt_tokens_details=P.PromptTokensDetails(cached_tokens=u.cached_tokens),
        promptcache=P.PromptcacheUsage(computed_tokens=u.computed_tokens, recomputed_tokens=u.recomputed_tokens,
                                       ttft_ms=round(u.ttft_s * 1000, 3), queue_ms=round(u.queue_s * 1000, 3),
                                       modules=list(u.modules)))


def _final_body(rid: str, chat: bool, model: str, text: str, done) -> P.BaseModel:
    reason, usage, created = P.finish_reason(done.finish_reason), _usage(done.usage), P.now()
    if chat:
        return P.ChatCompletionResponse(id=rid, created=created, model=model, usage=usage, choices=[
            P.ChatChoice(message=P.ChatMessageOut(content=text), finish_reason=reason)])
    return P.CompletionResponse(id=rid, created=created, model=model, usage=usage,
                                choices=[P.CompletionChoice(text=text, finish_reason=reason)])


def _sse(obj: Any) -> str:
    data = obj.model_dump_json(exclude_none=False) if isinstance(obj, P.BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


def _chunk(rid: str, chat: bool, model: str, created: int, text: str | None, reason: str | None,
           role: bool = False) -> P.BaseModel | dict:
    if chat:
        delta = P.ChatDelta(role="assistant" if role else None, content=text)
        return P.ChatCompletionChunk(id=rid, created=created, model=model,
                                     choices=[P.ChatChunkChoice(delta=delta, finish_reason=reason)])
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}]}


def _usage_chunk(rid: str, chat: bool, model: str, created: int, usage: P.UsageInfo | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage.model_dump() if usage else None}


async def _stream(handle, events: AsyncIterator, first, rid: str, body: P._GenerationFields, chat: bool,
                  model: str, watcher: asyncio.Task) -> AsyncIterator[str]:
    """SSE: chunks as tokens arrive, the finish reason, the usage chunk when asked, ``[DONE]``.
    Leaving early (client gone: Starlette cancels us) cancels the request."""
    created = P.now()
    try:
        if chat:
            yield _sse(_chunk(rid, chat, model, created, "", None, role=True))
        event = first
        while event is not None:
            if event.kind == "token":
                if event.text:
                    yield _sse(_chunk(rid, chat, model, created, event.text, None))
            elif event.kind == "done":
                yield _sse(_chunk(rid, chat, model, created, "" if not chat else None,
                                  P.finish_reason(event.finish_reason)))
                if body.include_usage():
                    yield _sse(_usage_chunk(rid, chat, model, created, _usage(event.usage)))
                break
            elif event.kind == "error":
                err = engine_error(event.error, "stream")
                yield _sse(err.body())
                break
            event = await anext(events, None)
        yield "data: [DONE]\n\n"
    finally:
        watcher.cancel()
        handle.cancel()
