"""Content keys for cache entries and the model fingerprint that goes into them.

A key must change whenever anything that determines the cached values changes (model weights,
config, dtype, encoding policy, the module's token and position ids, its encoding context), so a
store shared between processes and machines can never hand out a cache computed differently.

Fingerprint trade-off: hashing every byte of a 7B model (~14 GB) with sha256 costs several
seconds and, for a GPU model, a copy to the host. So per tensor we hash its name, shape, dtype,
a strided sample of <= ``SAMPLE`` elements' bytes, and the wrapping int64 sum of its raw bytes
read as 8-byte words. The sum reads every byte once at memory speed, on the tensor's own device;
integer addition is order independent, so the result is the same on any thread count or device,
unlike a float sum. Any single changed element changes the sum; changes that escape both the sum
and the sample (two unsampled words swapped, deliberately compensating edits) do not happen by
accident. ``full=True`` hashes every byte with sha256 instead. Measured on a 135M-parameter
float32 model (SmolLM2-135M shape, 540 MB, 2 busy CPU cores): default 65 ms (~8 GB/s, so ~2 s
for a 14 GB model), ``full=True`` 0.7 s, a cached call (validity check only) 1.6 ms.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import numpy as np
import torch

from .base import canonical_json, dtype_name, tensor_bytes

KEY_VERSION = "promptcache-key-v1"
FINGERPRINT_VERSION = "promptcache-fp-v1"
SAMPLE = 1024
# Config fields that vary between copies of the same weights without changing any value.
VOLATILE_CONFIG_FIELDS = frozenset({
    "_name_or_path", "transformers_version", "_commit_hash", "name_or_path",
    "dtype", "torch_dtype",  # the load dtype; the actual parameter dtypes are hashed instead
    "_promptcache_amx_attention",  # in "__attn_implementation" below
    "output_attentions", "output_hidden_states", "return_dict", "use_cache",
})
_FP_ATTR = "_promptcache_fingerprint"
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def make_key(parts: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON of ``parts`` (everything that determines the values).

    Lists vs tuples and tensors vs lists of the same ints give the same key; ``1`` vs ``1.0``
    or ``True`` do not. Unsupported types raise :class:`StoreError` instead of being stringified.
    """
    if not isinstance(parts, Mapping):
        raise TypeError("make_key expects a dict of key parts")
    text = KEY_VERSION + "\n" + canonical_json(parts)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def config_fingerprint(model: Any) -> dict:
    """The value-relevant part of a transformers config as a plain dict (volatile fields dropped)."""
    config = getattr(model, "config", None)
    if config is None:
        return {"class": type(model).__qualname__}
    if hasattr(config, "to_json_string"):
        data = json.loads(config.to_json_string(use_diff=False))
    else:
        data = dict(vars(config))
    data = {k: v for k, v in data.items() if k not in VOLATILE_CONFIG_FIELDS}
    # Not serialised by transformers, but eager vs sdpa attention changes the cached floats.
    # The fast path's folded SDPA (runtime/attention.py) gives sdpa's floats to the bit: one key; its
    # AMX kernel (on where the CPU has AMX) rounds otherwise: a key of its own.
    implementation = getattr(config, "_attn_implementation", None)
    if implementation == "promptcache_sdpa":
        implementation = "sdpa+amx" if getattr(config, "_promptcache_amx_attention", False) else "sdpa"
    data["__attn_implementation"] = implementation
    data["__class"] = type(model).__qualname__
    return data


def _tensor_digest(name: str, t: torch.Tensor, full: bool) -> bytes:
    h = hashlib.sha256()
    h.update(f"{name}|{dtype_name(t.dtype)}|{list(t.shape)}|".encode())
    if t.device.type == "meta" or t.numel() == 0:
        h.update(b"no-data")
        return h.digest()
    flat = t.detach().reshape(-1)
    if full:
        h.update(tensor_bytes(flat.cpu().contiguous()))
        return h.digest()
    step = max(1, flat.numel() // SAMPLE)
    h.update(tensor_bytes(flat[::step][:SAMPLE].cpu().contiguous()))
    h.update(f"|sum={_bit_sum(flat.contiguous())}".encode())
    return h.digest()


def _bit_sum(flat: torch.Tensor) -> str:
    """Wrapping int64 sum of the tensor's bytes read as 8-byte words, plus the odd tail bytes.

    Integer addition is associative, so the result does not depend on threads or device; any
    single changed element changes its word and hence the sum. On CPU numpy sums the words in
    one thread at memory speed (~3 ms per 100 MB): torch's parallel reductions cost milliseconds
    of thread hand-off per tensor on a busy machine. GPU tensors are summed where they are.
    """
    nbytes = flat.numel() * flat.element_size()
    n8 = nbytes // 8 * 8
    if flat.device.type == "cpu":
        raw = tensor_bytes(flat)
        words = np.frombuffer(raw[:n8], dtype=np.int64)
        total = int(np.add.reduce(words, dtype=np.int64)) if n8 else 0
        return f"w{total}:{bytes(raw[n8:]).hex()}"
    b = flat.view(torch.uint8)
    try:
        total = int(b[:n8].view(torch.int64).sum().item()) if n8 else 0
    except RuntimeError:  # storage offset not 8-byte aligned: sum on the host instead
        return _bit_sum(flat.cpu())
    return f"w{total}:{bytes(b[n8:].cpu().numpy()).hex()}"


def _validity_token(model: torch.nn.Module) -> tuple:
    """Changes when a parameter is replaced or modified in place through autograd-visible ops."""
    return tuple((n, t.data_ptr(), t._version, t.dtype, tuple(t.shape), t.device.type)
                 for n, t in model.state_dict(keep_vars=True).items())


def model_fingerprint(model: Any, *, full: bool = False, refresh: bool = False) -> str:
    """Hex sha256 over the model's config and weights; cached on the model object.

    The cache is invalidated when any parameter/buffer is replaced, changes dtype/device, or is
    modified in place (its autograd version counter moves). Writes through ``.data`` bypass that
    counter: pass ``refresh=True`` after such surgery.
    """
    cfg = canonical_json(config_fingerprint(model))
    token = None
    if isinstance(model, torch.nn.Module):
        token = (_validity_token(model), full, cfg)
        cached = getattr(model, _FP_ATTR, None)
        if not refresh and cached is not None and cached[0] == token:
            return cached[1]
    h = hashlib.sha256()
    h.update(f"{FINGERPRINT_VERSION}|full={full}|".encode())
    h.update(cfg.encode())
    if isinstance(model, torch.nn.Module):
        with torch.no_grad():
            for name, t in model.state_dict(keep_vars=True).items():
                h.update(_tensor_digest(name, t, full))
    fp = h.hexdigest()
    if token is not None:
        try:
            object.__setattr__(model, _FP_ATTR, (token, fp))
        except AttributeError:
            pass
    return fp
