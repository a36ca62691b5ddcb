"""The engine's LoRA methods (:class:`LoraMethods`, a base of ``PromptCache``), kept here so the
engine stays about requests: load, unload and list adapters, bytes per adapter, and the count of
open requests per adapter that makes unloading wait. See docs/lora.md.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .registry import AdapterError, AdapterInfo

if TYPE_CHECKING:
    from ..runtime.request import ActiveRequest


class LoraMethods:
    """``PromptCache``'s adapter methods; they use its ``runner``, ``lora_schemas``, ``prefix``,
    ``module_cache`` and ``_lora_in_use`` (set in ``PromptCache.__init__``)."""

    def load_adapter(self, name: str, path: str | os.PathLike, *,
                     allowed_root: str | os.PathLike | None = None) -> AdapterInfo:
        """Load the PEFT LoRA adapter in folder ``path`` as ``name`` (a local folder with
        ``adapter_config.json``; inside ``allowed_root`` when given). Requests pick it with
        ``adapter=name``; its caches are keyed by its fingerprint (weights and config), so the same
        adapter under another name or folder shares them. Raises ``AdapterError`` (a ``ValueError``);
        refused with ``compile=True`` (compiled graphs are not checked against adapter switches)."""
        if getattr(self, "fast", None) is not None:
            raise AdapterError("LoRA adapters cannot be used with compile=True: compiled forwards are not "
                               "tested against adapter switches (docs/lora.md)")
        return self.runner.lora.load(name, path, allowed_root)

    def unload_adapter(self, name: str) -> AdapterInfo:
        """Unload adapter ``name``: its module caches leave the memory tiers and its prefix tree
        goes (unless another loaded name holds the same adapter); the store keeps its entries.
        Refused (``AdapterError``) while a request under it is open."""
        info = self.runner.lora.info(name)
        if self._lora_in_use.get(name):
            raise AdapterError(f"adapter {name!r} is in use by {self._lora_in_use[name]} open request(s); "
                               "unload it when they end")
        self.lora_schemas.drop_adapter(name)
        self.runner.lora.unload(name)
        if not self.runner.lora.names_with(info.model_key):
            self.prefix.drop_tree(info.model_key)
        self.module_cache.enforce()
        return info

    def adapters(self) -> list[str]:
        """Names of the loaded LoRA adapters (``self.runner.lora.info(name)`` for details)."""
        return self.runner.lora.names()

    def bytes_by_adapter(self) -> dict[str, dict[str, int]]:
        """Cached bytes per adapter (``"base"``: none): ``module_bytes`` in the memory tiers and
        ``prefix_bytes`` in the prefix tree. Two names of the same adapter share (and both show)
        the same entries."""
        lora = self.runner.lora
        names = {lora.fingerprint(None): ["base"]}
        for name in lora.names():
            names.setdefault(lora.info(name).model_key, []).append(name)
        out = {n: {"module_bytes": 0, "prefix_bytes": 0} for ns in names.values() for n in ns}
        for res in self.module_cache.residents():
            for n in names.get(res.meta.get("model"), ()):
                out[n]["module_bytes"] += res.nbytes
        for key, nbytes in self.prefix.bytes_by_tree().items():
            for n in names.get(key if key is not None else lora.fingerprint(None), ()):
                out[n]["prefix_bytes"] += nbytes
        return out

    def _track_adapter(self, req: ActiveRequest, adapter: str | None) -> None:
        """Stamp the request's cache with its adapter and count it open until it ends, so that the
        adapter cannot be unloaded under it."""
        req.cache.lora = adapter
        if adapter is None:
            return
        self._lora_in_use[adapter] += 1
        inner = req.on_close

        def close(generated: list[int], kv, completed: bool) -> None:
            try:
                inner(generated, kv, completed)
            finally:
                self._lora_in_use[adapter] -= 1
                if self._lora_in_use[adapter] <= 0:
                    del self._lora_in_use[adapter]

        req.on_close = close
