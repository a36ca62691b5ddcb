"""The connector's host-memory LRU of prepared store entries (imports no vLLM).

Why: reading an entry from the store (disk or Redis) and verifying its checksum costs far more
than writing it into vLLM's paged blocks (a 4k-token SmolLM2 entry is about 95 MB in float32).
The worker therefore reads and verifies each entry once, prepares it in the layout the backend's
write kernel takes (per layer ``[tokens, kv_heads, head_dim]``, contiguous, in the KV cache's
dtype, keys re-rotated to where they are used) and keeps it here, bounded by bytes, so later
requests naming the same entry copy from memory.

Limit: ``kv_connector_extra_config["host_cache_bytes"]`` (default :data:`DEFAULT_HOST_CACHE_BYTES`,
1 GiB per vLLM worker process; 0 turns the cache off). An entry larger than the limit is used for
its load and not kept. The store stays the source of truth: an entry removed from the store is
still served from here until evicted (the scheduler checks ``contains`` first, so a removed key is
not matched by new requests).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable

DEFAULT_HOST_CACHE_BYTES = 1 << 30


@dataclass
class Prepared:
    """One entry ready for ``do_kv_cache_update``: per layer keys and values ``[n, heads, dim]``."""

    meta: dict
    keys: list[Any]
    values: list[Any]
    nbytes: int
    dtype: str | None = None  # the stored tensors' dtype (before casting to the KV cache's)


def parse_limit(value: Any) -> int:
    """``host_cache_bytes`` from the connector's config (an int or a decimal string), checked."""
    try:
        limit = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"PromptCacheConnector: host_cache_bytes must be an integer, not {value!r}") from None
    if limit < 0:
        raise ValueError(f"PromptCacheConnector: host_cache_bytes must be >= 0, not {limit}")
    return limit


class HostEntryCache:
    """Bytes-bounded LRU of :class:`Prepared` entries (one worker thread uses it: no lock)."""

    def __init__(self, limit_bytes: int = DEFAULT_HOST_CACHE_BYTES) -> None:
        self.limit = limit_bytes
        self.used = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[Hashable, Prepared] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Prepared | None:
        """The entry, marked most recently used, or ``None``."""
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item

    def put(self, key: Hashable, item: Prepared) -> bool:
        """Keep ``item``, evicting least recently used entries to stay within the limit; ``False``
        (not kept) when it alone exceeds the limit."""
        old = self._items.pop(key, None)
        if old is not None:
            self.used -= old.nbytes
        if item.nbytes > self.limit:
            return False
        while self._items and self.used + item.nbytes > self.limit:
            _, gone = self._items.popitem(last=False)
            self.used -= gone.nbytes
        self._items[key] = item
        self.used += item.nbytes
        return True
