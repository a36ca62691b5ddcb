"""Each added schema's module keys under each adapter, encoded lazily under that adapter.

``add_schema`` encodes a schema under the base model. A request under adapter ``A`` needs the
same modules encoded under ``A``: :meth:`LoraSchemas.state` derives a
:class:`~promptcache.modules.encoder.SchemaState` with the same layout and contexts whose keys
are made with ``A``'s model key (:func:`promptcache.lora.fingerprint.combined_fingerprint`) in
place of the base fingerprint. Nothing is encoded up front: the request's ``obtain`` finds the
modules in the tiers or the store by those keys, or encodes them, under ``A`` (the runner's
adapter scope is set around the whole request). Entries of different adapters therefore never
share a key; two names for the same adapter share every entry.
"""

from __future__ import annotations

from contextlib import nullcontext

from ..modules.encoder import ModuleEncoder, SchemaState
from ..modules.keys import module_keys
from ..modules.tiers import SchemaKV
from ..store import dtype_name


class LoraSchemas:
    """Derived schema states by ``(schema name, adapter name)``, referenced in the tiers."""

    def __init__(self, encoder: ModuleEncoder) -> None:
        self.encoder = encoder
        self._states: dict[tuple[str, str], SchemaState] = {}

    def state(self, base: SchemaState, adapter: str | None) -> SchemaState:
        """``base`` itself for ``adapter=None``, else its keys under ``adapter`` (made once; made
        again when the schema was re-added)."""
        if adapter is None:
            return base
        slot = (base.name, adapter)
        derived = self._states.get(slot)
        if derived is not None and derived.layout is base.layout:
            return derived
        if derived is not None:
            self._drop(slot)
        derived = self._states[slot] = self._derive(base, adapter)
        self.encoder.cache.ref(k.tier_key for k in derived.keys.values())
        return derived

    def _derive(self, base: SchemaState, adapter: str) -> SchemaState:
        encoder, runner = self.encoder, self.encoder.runner
        fp = runner.lora.fingerprint(adapter)
        keys = module_keys(base.layout, base.contexts, list(base.keys), model=fp, dtype=dtype_name(runner.dtype),
                           policy=encoder.encoding, relative=encoder.relocation.relative,
                           offset_sensitive=encoder.relocation.offset_sensitive)
        expect = {**base.expect, "model": fp}
        meta = {**base.meta, "model": fp, "adapter": runner.lora.info(adapter).fingerprint}
        state = SchemaState(base.layout, base.contexts, {}, base.positions, base.report, keys, expect, meta)
        state.lora = adapter  # type: ignore[attr-defined]  # read by holders of a state (the scope to use)

        def fetch(i: int):
            scope = runner.lora_scope(adapter) if runner.lora_name != adapter else nullcontext()
            with scope:
                return encoder.module_kv(state, i)

        state.kv = SchemaKV(keys, fetch)
        return state

    def drop_schema(self, name: str) -> None:
        """Schema ``name`` was removed or replaced: its derived states go (tier refs dropped)."""
        for slot in [s for s in self._states if s[0] == name]:
            self._drop(slot)

    def drop_adapter(self, adapter: str) -> None:
        """Adapter ``adapter`` is unloaded: its derived states go, and with them the tier entries
        no other state references (the store keeps its entries: they are keyed by fingerprint)."""
        for slot in [s for s in self._states if s[1] == adapter]:
            self._drop(slot)

    def _drop(self, slot: tuple[str, str]) -> None:
        state = self._states.pop(slot)
        self.encoder.cache.unref(k.tier_key for k in state.keys.values())

    def states(self) -> dict[tuple[str, str], SchemaState]:
        return dict(self._states)
