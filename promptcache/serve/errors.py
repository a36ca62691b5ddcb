"""Errors in OpenAI's shape and the two ASGI gates in front of the app (keys, body size).

Every refusal is ``{"error": {"message", "type", "param", "code"}}`` (:class:`ApiError`);
exception handlers turn validation errors, unknown routes and anything unexpected into it. A 500
carries only an id, which is logged with the traceback. :class:`KeyGate` checks keys before
anything reads the body, :class:`BodyLimit` caps the body by ``Content-Length`` and while reading.
"""

from __future__ import annotations

import logging
import uuid
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..pml.errors import PMLError
from .auth import AuthError, check_admin_key, check_api_key
from .config import ServeConfig
from .metrics import ServeMetrics

log = logging.getLogger("promptcache.serve")


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
    from ..lora.registry import UnknownAdapterError  # unloaded between the check and admission

    if isinstance(exc, UnknownAdapterError):
        return ApiError(404, str(exc), param="model", code="model_not_found", outcome="not_found")
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


def install_error_handlers(app: FastAPI, metrics: ServeMetrics) -> None:
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
