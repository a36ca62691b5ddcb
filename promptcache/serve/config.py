"""Settings of one server process (:class:`ServeConfig`), filled by ``promptcache serve`` or by tests.

Every limit the HTTP layer enforces lives here with its default, so docs/serve.md and
docs/security.md can name one place. The engine's own limits (PML bytes, elements, context
window) stay in :mod:`promptcache.pml.limits` and the model.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

API_KEY_ENV = "PROMPTCACHE_API_KEY"
ADMIN_KEY_ENV = "PROMPTCACHE_ADMIN_KEY"

MAX_BODY_BYTES = 2 << 20
"""Largest request body of the generation endpoints: a PML prompt may be 1 MiB
(``MAX_PROMPT_BYTES``), plus JSON escaping and the other fields."""

MAX_SCHEMA_BODY_BYTES = 16 << 20
"""Largest ``POST /v1/schemas`` body: the PML schema limit (``MAX_DOCUMENT_BYTES``)."""

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


@dataclass
class ServeConfig:
    """What the HTTP layer needs to know; the engine and scheduler have their own settings.

    ``api_key``: clients must send ``Authorization: Bearer <key>`` on ``/v1/*`` (``None``: open).
    ``admin_key``: needed to add or delete schemas (``None``: schema changes over HTTP are off).
    ``allowed_schema_root``: the only folder uploaded schemas may include ``src=`` files from
    (``None``: uploaded schemas include no file at all).
    ``allowed_adapter_root``: the only folder ``POST /v1/adapters`` may load LoRA adapters from
    (``None``: loading adapters over HTTP is off; ``--adapter`` at start is not restricted).
    """

    model_name: str = "smollm2"
    api_key: str | None = None
    admin_key: str | None = None
    allowed_schema_root: Path | None = None
    allowed_adapter_root: Path | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    max_schema_body_bytes: int = MAX_SCHEMA_BODY_BYTES
    default_max_tokens: int = 16
    schema_call_timeout_s: float = 3600.0
    info_call_timeout_s: float = 30.0
    metrics_call_timeout_s: float = 2.0
    created: int = 0

    def __post_init__(self) -> None:
        self.created = self.created or int(time.time())
        for name in ("max_body_bytes", "max_schema_body_bytes", "default_max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.allowed_schema_root is not None:
            root = Path(self.allowed_schema_root).resolve()
            if not root.is_dir():
                raise ValueError(f"allowed schema root {str(self.allowed_schema_root)!r} is not a folder")
            self.allowed_schema_root = root
        if self.allowed_adapter_root is not None:
            root = Path(self.allowed_adapter_root).resolve()
            if not root.is_dir():
                raise ValueError(f"allowed adapter root {str(self.allowed_adapter_root)!r} is not a folder")
            self.allowed_adapter_root = root


def key_from(flag: str | None, env_name: str) -> str | None:
    """The key given on the command line, else the environment's; empty means none."""
    value = flag if flag is not None else os.environ.get(env_name)
    return value or None
