"""LoRA adapter endpoints: ``POST /v1/adapters`` and ``DELETE /v1/adapters/{name}`` (admin), ``GET /v1/adapters``.

Loading an adapter reads a folder on the server and runs its weights inside the model, so it is
an admin action (the admin key) confined to ``--allowed-adapter-root``: without one, loading over
HTTP is off (403), like schema uploads' ``src=`` files (docs/security.md). Loading, unloading and
listing run on the engine thread through ``scheduler.call``, between decode steps. Requests pick
an adapter with the OpenAI ``model`` field (:mod:`.app`); ``GET /v1/models`` lists them too.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..lora.registry import AdapterError, UnknownAdapterError
from .auth import AuthError, check_admin_key
from .config import ServeConfig
from .errors import ApiError
from .schemas import _engine

log = logging.getLogger("promptcache.serve")


def add_adapter_routes(app: FastAPI, scheduler, config: ServeConfig) -> None:
    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(request: Request) -> JSONResponse:
        check_admin_key(request.headers.get("authorization"), config.admin_key)
        root = config.allowed_adapter_root
        if root is None:
            raise AuthError("loading LoRA adapters over HTTP is off: start the server with "
                            "--allowed-adapter-root DIR", status=403)
        name, path = await _name_and_path(request)
        folder = root / path  # an absolute path stays itself; either must resolve inside the root

        def load(engine) -> dict:
            return _card(engine.load_adapter(name, folder, allowed_root=root))

        try:
            card = await _engine(scheduler, load, config.schema_call_timeout_s)
        except AdapterError as e:
            raise ApiError(400, str(e), param="path", code="invalid_adapter") from None
        log.info("LoRA adapter %r loaded (fingerprint %s)", name, card["fingerprint"][:16])
        return JSONResponse(card, status_code=201)

    @app.get("/v1/adapters")
    async def list_adapters() -> dict:
        def cards(engine) -> list[dict]:
            return [_card(engine.runner.lora.info(n)) for n in engine.adapters()]

        return {"object": "list", "data": await _engine(scheduler, cards, config.info_call_timeout_s)}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str, request: Request) -> dict:
        check_admin_key(request.headers.get("authorization"), config.admin_key)
        try:
            await _engine(scheduler, lambda engine: engine.unload_adapter(name), config.info_call_timeout_s)
        except UnknownAdapterError as e:
            raise ApiError(404, str(e), param="name", code="model_not_found", outcome="not_found") from None
        except AdapterError as e:  # in use by open requests
            raise ApiError(409, str(e), param="name", code="adapter_in_use") from None
        log.info("LoRA adapter %r unloaded", name)
        return {"id": name, "object": "model", "deleted": True}


async def _name_and_path(request: Request) -> tuple[str, str]:
    """``{"name": str, "path": str}`` from the JSON body, else a 400 naming the field."""
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "the request body must be JSON: {\"name\": ..., \"path\": ...}",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object with 'name' and 'path'", code="invalid_value")
    for field in ("name", "path"):
        if not isinstance(body.get(field), str) or not body[field].strip():
            raise ApiError(400, f"'{field}' must be a non-empty string", param=field, code="invalid_value")
    return body["name"], body["path"]


def _card(info) -> dict:
    """What the endpoints show of an adapter: no server path (the fingerprint identifies it)."""
    return {"id": info.name, "object": "model", "fingerprint": info.fingerprint}
