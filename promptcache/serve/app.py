"""The FastAPI application: OpenAI-compatible endpoints over one PromptCache and its scheduler.

``create_app(pc, scheduler, config)`` builds it; ``promptcache serve`` (``promptcache.cli``)
runs it under uvicorn. The app never runs the model itself: generation goes through
``scheduler.submit`` (events come back through the handle), and every other engine access
(schema add/remove/inspection, memory reports) through ``scheduler.call``, which runs on the
engine thread between decode steps.

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``:
400 bad request or PML (the PML message with line and column), 401 key, 403 admin actions off,
404 unknown model, schema or route, 413 body too large, 429 queue full (``Retry-After``), 500
anything unexpected (an id that is also in the log; never a traceback). See docs/serve.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..pml.errors import PMLError
from ..pml.parser import parse_prompt, parse_schema
from ..prefix.runner import is_pml_prompt
from ..recompute import parse_policy
from ..runtime.sampling import SamplingOptions
from . import protocol as P
from .auth import AuthError, check_admin_key, check_api_key
from .config import ServeConfig
from .metrics import ServeMetrics

log = logging.getLogger("promptcache.serve")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DISCONNECT_POLL_S = 0.5


# ---------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered in OpenAI's shape with ``status``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, outcome: str = "invalid") -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}
        self.outcome = outcome

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class BodyTooLarge(Exception):
    """Raised from the body reader when a request body passes its limit (answered 413)."""

    def __init__(self, limit: int, seen: int) -> None:
        super().__init__(f"request body is larger than the limit of {limit} bytes (got at least {seen})")
        self.limit, self.seen = limit, seen


def too_large(limit: int, seen: int) -> ApiError:
    return ApiError(413, f"request body of {seen} bytes is over the limit of {limit} bytes",
                    code="request_too_large", outcome="too_large")


def internal_error(exc: BaseException, where: str) -> ApiError:
    """A 500 whose id is logged with the traceback; the body carries the id only."""
    error_id = uuid.uuid4().hex[:16]
    log.error("internal error %s in %s: %s", error_id, where, exc,
              exc_info=(type(exc), exc, exc.__traceback__))
    return ApiError(500, f"internal server error (id {error_id}; the server log has the details)",
                    type_="server_error", code="internal_error", outcome="error")


def engine_error(exc: BaseException, where: str) -> ApiError:
    """An exception from the engine: PML and value errors are the client's (400), the rest 500."""
    if isinstance(exc, PMLError):
        return ApiError(400, str(exc), param="prompt", code="pml_error")
    if isinstance(exc, (ValueError, TypeError)):  # window, special-token injection, bad arguments (scheduler contract)
        return ApiError(400, str(exc), code="invalid_value")
    return internal_error(exc, where)


class BodyLimit:
    """ASGI middleware: refuse bodies over a per-path limit, by ``Content-Length`` and while reading."""

    def __init__(self, app, limit_for: Callable[[str], int], metrics: ServeMetrics) -> None:
        self.app, self.limit_for, self.metrics = app, limit_for, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            self.metrics.rejected("too_large")
            await too_large(limit, int(declared)).response()(scope, receive, send)
            return
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit, seen)
            return message

        await self.app(scope, limited_receive, send)


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
    _install_error_handlers(app, metrics)
    _add_info_routes(app, pc, scheduler, config, metrics)
    _add_generation_routes(app, pc, scheduler, config, metrics)
    _add_schema_routes(app, pc, scheduler, config)
    return app


def _tier_report(scheduler, config: ServeConfig) -> dict:
    """Module-cache tiers, read on the engine thread (a scrape must not race a schema change)."""
    return scheduler.call(lambda pc: pc.memory_report()["tiers"], timeout=config.metrics_call_timeout_s)


def _install_error_handlers(app: FastAPI, metrics: ServeMetrics) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        metrics.rejected(exc.outcome)
        return exc.response()

    @app.exception_handler(AuthError)
    async def _auth_error(request: Request, exc: AuthError) -> JSONResponse:
        metrics.rejected("unauthorized")
        return _auth_response(exc)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        metrics.rejected("too_large")
        return too_large(exc.limit, exc.seen).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.rejected("invalid")
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif param:
            message = f"{param}: {message}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        return ApiError(400, message, param=param, code="invalid_request").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, BodyTooLarge):  # FastAPI wraps body-reading errors in a 400
            return await _too_large(request, cause)
        metrics.rejected("not_found" if exc.status_code == 404 else "invalid")
        message = (f"no route {request.method} {request.url.path}" if exc.status_code == 404
                   else str(exc.detail))
        return ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        metrics.rejected("error")
        return internal_error(exc, f"{request.method} {request.url.path}").response()


class KeyGate:
    """ASGI middleware: every ``/v1/`` request needs the API key, schema changes the admin key.

    Checked before anything reads or validates the body, so a client without a key learns
    nothing from parse errors and costs no parsing. ``/health`` and ``/metrics`` are open.
    """

    def __init__(self, app, config: ServeConfig, metrics: ServeMetrics) -> None:
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("path", "").startswith("/v1/"):
            headers = dict(scope.get("headers") or [])
            authorization = headers.get(b"authorization", b"").decode("latin-1") or None
            try:
                if _is_admin_route(scope["method"], scope["path"]):
                    check_admin_key(authorization, self.config.admin_key)
                else:
                    check_api_key(authorization, self.config.api_key, self.config.admin_key)
            except AuthError as e:
                self.metrics.rejected("unauthorized")
                await _auth_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _is_admin_route(method: str, path: str) -> bool:
    return method in ("POST", "PUT", "PATCH", "DELETE") and path.rstrip("/").startswith("/v1/schemas")


def _auth_response(exc: AuthError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
    return ApiError(exc.status, exc.message, type_="authentication_error" if exc.status == 401
                    else "permission_error", code="invalid_api_key" if exc.status == 401 else "forbidden",
                    headers=headers).response()


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
        card = P.ModelCard(id=config.model_name, created=config.created or P.now())
        return P.ModelList(data=[card]).model_dump()


# ---------------------------------------------------------------- generation


def _add_generation_routes(app: FastAPI, pc, scheduler, config: ServeConfig, metrics: ServeMetrics) -> None:
    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request) -> Response:
        prompt = body.prompt_text()
        await _check_request(body, config, pc, prompt)
        max_tokens = body.max_tokens if body.max_tokens is not None else config.default_max_tokens
        return await _serve(request, scheduler, body, prompt, max_tokens, chat=False, config=config)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Response:
        await _check_request(body, config, pc, None)
        try:
            messages = body.chat_messages()
        except P.UnsupportedField as e:
            raise ApiError(400, str(e), param=e.param, code="unsupported") from None
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = limit if limit is not None else config.default_max_tokens
        return await _serve(request, scheduler, body, messages, max_tokens, chat=True, config=config)


async def _check_request(body: P._GenerationFields, config: ServeConfig, pc, prompt: str | None) -> None:
    """Refuse, before queueing, what can be refused without the engine: unsupported fields, another
    model, a bad recompute policy, PML that does not parse, a schema that was never added."""
    try:
        body.check_supported()
    except P.UnsupportedField as e:
        raise ApiError(400, str(e), param=e.param, code="unsupported") from None
    if body.model != config.model_name:
        raise ApiError(404, f"the model {body.model!r} does not exist; this server serves "
                       f"{config.model_name!r}", param="model", code="model_not_found", outcome="not_found")
    if body.recompute is not None:
        try:
            parse_policy(body.recompute)
        except ValueError as e:
            raise ApiError(400, str(e), param="recompute", code="invalid_value") from None
    if prompt is None or not is_pml_prompt(prompt):
        return
    try:
        # Linear in the input, but up to 1 MiB: off the event loop. The engine parses again on its thread.
        parsed = await run_in_threadpool(parse_prompt, prompt)
    except PMLError as e:
        raise ApiError(400, str(e), param="prompt", code="pml_error") from None
    if parsed.schema not in pc.schemas:  # a dict lookup: safe next to the engine thread
        raise ApiError(404, f"schema {parsed.schema!r} has not been added to this server "
                       f"(GET /v1/schemas lists the schemas)", param="prompt", code="schema_not_found",
                       outcome="not_found")


def _gen_request(body: P._GenerationFields, prompt, max_tokens: int):
    from .scheduler import GenRequest  # the scheduler module imports torch-heavy parts

    options = SamplingOptions(temperature=body.temperature, top_p=body.top_p, stop=body.stop_list(),
                              seed=body.seed)
    return GenRequest(prompt=prompt, max_tokens=max_tokens, options=options, use_cache=body.use_cache,
                      recompute=body.recompute)


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
                 chat: bool, config: ServeConfig) -> Response:
    """Submit, wait for the first event (so that errors before any token get their HTTP status),
    then answer whole or as a stream. The handle is cancelled whenever the client goes away."""
    handle = _submit(scheduler, _gen_request(body, prompt, max_tokens))
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
            stream = _stream(handle, events, first, rid, body, chat, config.model_name, watcher)
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
        return JSONResponse(_final_body(rid, chat, config.model_name, text, last).model_dump())
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


# ---------------------------------------------------------------- schemas


def _add_schema_routes(app: FastAPI, pc, scheduler, config: ServeConfig) -> None:
    @app.post("/v1/schemas", status_code=201)
    async def add_schema(request: Request) -> JSONResponse:
        check_admin_key(request.headers.get("authorization"), config.admin_key)
        data = await request.body()
        if not data.strip():
            raise ApiError(400, "the request body must be a PML schema document (XML)", code="empty_body")
        root = config.allowed_schema_root
        try:  # parsed here, off the engine thread; src= resolves only inside the allowed root, if any
            schema = await run_in_threadpool(parse_schema, data, None, root, allowed_root=root)
        except PMLError as e:
            raise ApiError(400, str(e), code="pml_error") from None
        replaced = schema.name in pc.schemas

        def add(engine):
            report = engine.add_schema(schema)
            return report, _schema_info(engine, schema.name)

        try:
            report, info = await run_in_threadpool(scheduler.call, add, config.schema_call_timeout_s)
        except PMLError as e:  # layout errors: context window, parameter lengths...
            raise ApiError(400, str(e), code="pml_error") from None
        except ValueError as e:
            raise ApiError(400, str(e), code="invalid_value") from None
        except TimeoutError:
            raise _busy(config.schema_call_timeout_s) from None
        info["replaced"] = replaced
        info["encode"] = {"encoded_segments": report.encoded_segments, "forwards": report.forwards,
                          "encode_ms": round(report.encode_s * 1000, 3), "store_hits": report.store_hits}
        log.info("schema %r added (%d positions)", schema.name, info["tokens"])
        return JSONResponse(info, status_code=201)

    @app.get("/v1/schemas")
    async def list_schemas() -> dict:

        def summaries(engine) -> list[dict]:
            return [_schema_summary(engine, name) for name in sorted(engine.schemas)]

        data = await _engine(scheduler, summaries, config.info_call_timeout_s)
        return {"object": "list", "data": data}

    @app.get("/v1/schemas/{name}")
    async def get_schema(name: str) -> dict:
        info = await _engine(scheduler, lambda engine: _schema_info(engine, name), config.info_call_timeout_s)
        if info is None:
            raise _no_schema(name)
        return info

    @app.delete("/v1/schemas/{name}")
    async def delete_schema(name: str, request: Request) -> dict:
        check_admin_key(request.headers.get("authorization"), config.admin_key)

        def remove(engine) -> bool:
            if name not in engine.schemas:
                return False
            engine.remove_schema(name)
            return True

        if not await _engine(scheduler, remove, config.info_call_timeout_s):
            raise _no_schema(name)
        log.info("schema %r deleted", name)
        return {"id": name, "object": "schema", "deleted": True}


async def _engine(scheduler, fn: Callable, timeout_s: float):
    """``fn(pc)`` on the engine thread (between decode steps), waited for off the event loop."""
    try:
        return await run_in_threadpool(scheduler.call, fn, timeout_s)
    except TimeoutError:
        raise _busy(timeout_s) from None


def _busy(timeout_s: float) -> ApiError:
    return ApiError(503, f"the engine did not run this within {timeout_s:g} s; try again later",
                    type_="server_error", code="engine_busy", headers={"Retry-After": "5"}, outcome="error")


def _no_schema(name: str) -> ApiError:
    return ApiError(404, f"schema {name!r} has not been added to this server", param="name",
                    code="schema_not_found", outcome="not_found")


def _schema_summary(engine, name: str) -> dict:
    state = engine.schemas[name]
    layout = state.layout
    return {"id": name, "object": "schema", "modules": sum(1 for p in layout.modules if p),
            "unions": len(layout.unions), "tokens": layout.length,
            "cached_tokens": state.report.stored_tokens, "bytes": state.report.bytes}


def _schema_info(engine, name: str) -> dict | None:
    """What GET /v1/schemas/{name} shows: modules, unions, parameters, tokens and memory."""
    state = engine.schemas.get(name)
    if state is None:
        return None
    layout = state.layout
    modules = [{"name": "/".join(path), "cache": info.cache, "start": info.start, "end": info.end,
                "tokens": info.end - info.start, "union": info.union,
                "parameters": {p: len(seg.tokens) for p, seg in info.parameters.items()}}
               for path, info in layout.modules.items() if path]
    unions = [{"index": u.index, "parent": "/".join(u.parent), "start": u.start, "length": u.length,
               "members": ["/".join(m) for m in u.members],
               "scaffold": "/".join(u.members[u.scaffold]) if u.scaffold is not None else None}
              for u in layout.unions]
    parameters = [{"module": m["name"], "name": p, "length": n} for m in modules for p, n in m["parameters"].items()]
    memory = [row for row in engine.memory_report()["modules"] if row["schema"] == name]
    return {**_schema_summary(engine, name), "open_role": layout.open_role, "modules": modules,
            "unions": unions, "parameters": parameters, "memory": memory}
