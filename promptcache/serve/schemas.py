"""Schema endpoints: ``POST /v1/schemas`` (admin), ``GET /v1/schemas``, ``GET``/``DELETE /v1/schemas/{name}``.

Uploaded schemas are parsed here, off the engine thread, with ``src=`` confined to
``--allowed-schema-root`` (without one they include no file: docs/security.md); adding, removing
and inspecting run on the engine thread through ``scheduler.call``, between decode steps.
"""

from __future__ import annotations

import logging
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..pml.errors import PMLError
from ..pml.parser import parse_schema
from .auth import check_admin_key
from .config import ServeConfig
from .errors import ApiError

log = logging.getLogger("promptcache.serve")


def add_schema_routes(app: FastAPI, pc, scheduler, config: ServeConfig) -> None:
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
