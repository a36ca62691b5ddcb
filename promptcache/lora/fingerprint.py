"""Fingerprints of the base model and of LoRA adapters, for cache keys.

A module's or a prefix's KV depends on the adapter in force (LoRA changes the key and value
projections), so every key that names "the model" must name the adapter too. What names it is a
hash of the adapter's weights and config as loaded into the model: not its name, not its folder,
so the same adapter loaded from another folder (or under another name) reuses its entries, and
another adapter under a reused name never does.

Loading an adapter through transformers' PEFT integration renames the wrapped base weights
(``q_proj.weight`` becomes ``q_proj.base_layer.weight``, a ``modules_to_save`` module's weights
``...original_module.weight``) and adds ``lora_*`` and ``modules_to_save`` tensors, which would
change :func:`promptcache.store.model_fingerprint` of the model object. :func:`base_fingerprint`
hashes the base weights under their original names instead, so base-model keys are the same
before, during and after adapters are loaded (and equal ``model_fingerprint`` of the plain model).
"""

from __future__ import annotations

import enum
import hashlib
from typing import Any

import torch

from ..store.base import canonical_json
from ..store.keys import FINGERPRINT_VERSION, _tensor_digest, config_fingerprint, model_fingerprint

LORA_FINGERPRINT_VERSION = "promptcache-lora-v1"
#: adapter_config.json fields that vary between copies of the same adapter without changing a value.
VOLATILE_ADAPTER_FIELDS = frozenset({"base_model_name_or_path", "revision", "inference_mode", "peft_version",
                                     "auto_mapping"})
_BASE_FP_ATTR = "_promptcache_base_fingerprint"


def _is_adapter_part(part: str) -> bool:
    """A state-dict path component under which PEFT keeps an adapter's own tensors, by adapter name."""
    return part.startswith("lora_") or part == "modules_to_save"


def is_lora_name(name: str) -> bool:
    """A state-dict entry that belongs to an adapter (``...lora_A.<adapter>.weight``,
    ``...modules_to_save.<adapter>.weight``)."""
    return any(_is_adapter_part(part) for part in name.split("."))


def base_items(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's base tensors under the names they had before any adapter was injected."""
    return [(name.replace(".base_layer.", ".").replace(".original_module.", "."), t)
            for name, t in model.state_dict(keep_vars=True).items() if not is_lora_name(name)]


def has_lora_layers(model: torch.nn.Module) -> bool:
    """Has PEFT injected layers into ``model`` (even if every adapter was deleted since)?"""
    return any(".base_layer." in name or ".original_module." in name for name, _ in model.named_parameters())


def base_fingerprint(model: torch.nn.Module) -> str:
    """``model_fingerprint`` of the model without its adapters (see the module docstring).

    Without injected layers this IS ``model_fingerprint(model)`` (same cache, same value); with
    them the same hash over the base tensors' original names, cached until a base tensor changes.
    """
    if not has_lora_layers(model):
        return model_fingerprint(model)
    items = base_items(model)
    cfg = canonical_json(config_fingerprint(model))
    token = (tuple((n, t.data_ptr(), t._version, t.dtype, tuple(t.shape), t.device.type) for n, t in items), cfg)
    cached = getattr(model, _BASE_FP_ATTR, None)
    if cached is not None and cached[0] == token:
        return cached[1]
    h = hashlib.sha256()
    h.update(f"{FINGERPRINT_VERSION}|full=False|".encode())
    h.update(cfg.encode())
    with torch.no_grad():
        for name, t in items:
            h.update(_tensor_digest(name, t, False))
    fp = h.hexdigest()
    object.__setattr__(model, _BASE_FP_ATTR, (token, fp))
    return fp


def _plain(value: Any) -> Any:
    """A PEFT config value as canonical-JSON-able data (sets sorted, enums by value)."""
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((_plain(v) for v in value), key=repr)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def adapter_config(model: torch.nn.Module, name: str) -> dict:
    """The value-relevant part of adapter ``name``'s PEFT config."""
    config = model.peft_config[name]
    data = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    return {k: _plain(v) for k, v in data.items() if k not in VOLATILE_ADAPTER_FIELDS}


def adapter_tensors(model: torch.nn.Module, name: str) -> list[tuple[str, torch.Tensor]]:
    """Adapter ``name``'s tensors (LoRA matrices and ``modules_to_save`` copies), named without
    the adapter name (``...q_proj.lora_A.weight``)."""
    out = []
    for full, t in model.state_dict(keep_vars=True).items():
        parts = full.split(".")
        for i, part in enumerate(parts[:-1]):
            if _is_adapter_part(part) and parts[i + 1] == name:
                out.append((".".join(parts[:i + 1] + parts[i + 2:]), t))
                break
    return out


def adapter_fingerprint(model: torch.nn.Module, name: str) -> str:
    """sha256 over adapter ``name``'s config and every byte of its weights (adapters are small)."""
    tensors = adapter_tensors(model, name)
    if not tensors:
        raise ValueError(f"adapter {name!r} has no LoRA tensors in the model (not a LoRA adapter?)")
    h = hashlib.sha256()
    h.update(f"{LORA_FINGERPRINT_VERSION}|".encode())
    h.update(canonical_json(adapter_config(model, name)).encode())
    with torch.no_grad():
        for tensor_name, t in sorted(tensors, key=lambda item: item[0]):
            h.update(_tensor_digest(tensor_name, t, True))
    return h.hexdigest()


def combined_fingerprint(base: str, adapter: str | None) -> str:
    """The "model" part of every cache key: the base fingerprint, or base and adapter together."""
    if adapter is None:
        return base
    return hashlib.sha256(f"{LORA_FINGERPRINT_VERSION}|{base}|{adapter}".encode()).hexdigest()
