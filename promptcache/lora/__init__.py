"""LoRA adapters per request, with caches keyed by the adapter's fingerprint (docs/lora.md).

:class:`LoraRegistry` (one per model runner) loads, unloads and switches PEFT adapters;
:mod:`promptcache.lora.fingerprint` hashes adapters and the base model for cache keys;
:class:`LoraSchemas` holds each added schema's keys under each adapter.
"""

from .fingerprint import adapter_fingerprint, base_fingerprint, combined_fingerprint
from .registry import AdapterError, AdapterInfo, LoraRegistry, UnknownAdapterError, check_folder, check_name

__all__ = ["AdapterError", "AdapterInfo", "LoraRegistry", "UnknownAdapterError", "adapter_fingerprint",
           "base_fingerprint", "check_folder", "check_name", "combined_fingerprint"]
