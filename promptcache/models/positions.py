"""Layout positions of the keys held in a transformers ``Cache``.

A spliced cache holds keys encoded at arbitrary layout positions (gaps between modules, unused
parameter slots), while transformers only knows the cache *length*. RoPE families do not care:
their keys are rotated once, when encoded. Position-faithful ALiBi (promptcache.models.alibi)
does care: the bias between a query and a key is a function of the key's layout position, so
the positions travel with the cache object. The engine's own cache
(:class:`promptcache.runtime.kv.SplicedCache`) has them as a field, ``key_positions`` (``[n]``),
which its model runner sets; these helpers read that field, and keep positions for any other
``Cache`` (one a caller or the model itself made) as a plain attribute, recorded by the ALiBi patch.
"""

from __future__ import annotations

import torch

_ATTR = "_promptcache_key_positions"


def set_key_positions(cache: object, positions: torch.Tensor) -> None:
    """Record the layout positions ``[1, n]`` (or ``[n]``) of the ``n`` keys already in ``cache``."""
    positions = torch.as_tensor(positions)
    if positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise TypeError(f"key positions must be integers, got {positions.dtype}")
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)
    if positions.dim() != 2:
        raise ValueError(f"key positions must be [batch, n], got shape {tuple(positions.shape)}")
    if owns_key_positions(cache):
        cache.key_positions = positions[0].to(torch.long)  # type: ignore[attr-defined]
    else:
        setattr(cache, _ATTR, positions.to(torch.long))


def owns_key_positions(cache: object | None) -> bool:
    """Whether ``cache`` carries its key positions as a field its runner sets (``SplicedCache``)."""
    return isinstance(getattr(cache, "key_positions", None), torch.Tensor)


def get_key_positions(cache: object | None) -> torch.Tensor | None:
    """The positions recorded by :func:`set_key_positions`, or ``None`` when none were."""
    if cache is None:
        return None
    if owns_key_positions(cache):
        positions = cache.key_positions  # type: ignore[attr-defined]
        return positions if positions.dim() == 2 else positions[None]  # [n]: one row; [b, n]: per row
    return getattr(cache, _ATTR, None)


def past_key_positions(cache: object | None, past_len: int, batch: int,
                       device: torch.device) -> torch.Tensor:
    """Positions ``[batch or 1, past_len]`` of the keys in ``cache``: recorded ones, else ``0..past_len-1``.

    A cache cropped after its positions were recorded (e.g. ``Cache.crop``) keeps the leading
    positions; a cache holding more keys than recorded positions is an error, since guessing the
    missing positions would silently bias attention.
    """
    stored = get_key_positions(cache)
    if stored is None:
        return torch.arange(past_len, device=device).unsqueeze(0)
    if stored.shape[-1] < past_len:
        raise ValueError(
            f"the cache holds {past_len} keys but only {stored.shape[-1]} key positions were recorded "
            "with set_key_positions(); record the positions of every key")
    if stored.shape[0] not in (1, batch):
        raise ValueError(f"recorded key positions have batch {stored.shape[0]}, the input has {batch}")
    return stored[:, :past_len].to(device)
