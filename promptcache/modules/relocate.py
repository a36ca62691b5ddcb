"""Moving a cached module to another offset: which families allow it, and the RoPE rotation that does it.

A module's KV depends on positions only through *relative* distances when (a) attention scores
depend on ``q - k`` alone and (b) the cached tensors carry either no position or one that can be
changed after the fact. Then a module encoded with its whole context at offset ``p`` can be moved
to ``p + d`` without a forward, and the store can key it by content with positions made relative
(:mod:`promptcache.modules.keys`). Three cases:

* ``rotate`` -- RoPE families whose frequencies do not depend on sequence length. A cached key is
  ``R(p*theta) k`` (HF convention ``k*cos + rotate_half(k)*sin``), so ``R(d*theta)`` applied to it
  gives the key at ``p + d``; values carry no position. Allowed rope types: ``default``, ``linear``
  (frequencies divided by a constant) and ``llama3`` (a fixed per-frequency rescaling); all have
  ``attention_scaling == 1``. Excluded: ``dynamic`` (NTK: frequencies change with the length),
  ``longrope`` (switches frequency sets at a length), ``yarn`` and others (length-dependent or
  with an attention factor). Gemma 3 is supported *per layer*: its rotary module holds one
  frequency set per layer type (local ``sliding_attention`` / global ``full_attention``), and each
  layer is rotated with the set of its type (``config.layer_types``).
* ``none`` -- MPT's position-faithful ALiBi: keys carry no position and its bias
  ``float32(slope) * int32(k_pos - k_pos_last)`` depends on distances only, exactly. Nothing to do.
* ``absolute`` -- everything else, keyed by absolute positions and never moved. This includes
  Falcon-ALiBi: its bias is ``bfloat16(slope) * k_pos`` computed in bfloat16 on the ABSOLUTE key
  position, so rounding differs with the offset and a shifted module would not match one encoded
  there (the model's own arithmetic is not shift-invariant beyond 256 positions).

Relocation is exact (up to float rounding) only when the whole encoding context moves with the
module; the relative-position key guarantees it, since it includes the context's relative layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models import alibi
from ..models.base import text_config
from ..runtime.kv import ModuleKV

ROTATABLE_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class Relocation:
    """How cached modules of one model move between offsets (see the module docstring)."""

    mode: str                                   # "rotate" | "none" | "absolute"
    reason: str
    inv_freq: list[torch.Tensor] = field(default_factory=list, repr=False)  # per layer (rotate)

    @property
    def relative(self) -> bool:
        """Whether the store may key modules by relative positions."""
        return self.mode in ("rotate", "none")

    @property
    def offset_sensitive(self) -> bool:
        """Whether the cached tensors themselves depend on the absolute offset."""
        return self.mode == "rotate"

    def shift(self, kv: ModuleKV, delta: int) -> ModuleKV:
        """``kv`` as if encoded ``delta`` positions later (a new object; ``kv`` is not modified)."""
        if delta == 0 or self.mode == "none":
            return kv
        if self.mode != "rotate":
            raise ValueError(f"modules of this model cannot be relocated: {self.reason}")
        cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        keys = []
        for layer, k in enumerate(kv.keys):
            inv = self.inv_freq[layer]
            cs = cache.get(id(inv))
            if cs is None:
                cs = cache[id(inv)] = rotation(inv, delta, k.device)
            keys.append(rotate_keys(k, *cs))
        return ModuleKV(keys, list(kv.values), kv.positions)


def rotation(inv_freq: torch.Tensor, delta: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` of ``delta * inv_freq`` (angle in float64: exact for large deltas), float32."""
    angle = float(delta) * inv_freq.detach().to("cpu", torch.float64)
    emb = torch.cat([angle, angle])
    return emb.cos().float().to(device), emb.sin().float().to(device)


def rotate_keys(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF RoPE on ``k`` ``[..., n, head_dim]`` by a fixed angle per frequency, computed in float32."""
    x = k.float()
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rot * sin).to(k.dtype)


def relocation_for(model, adapter) -> Relocation:
    """Inspect ``model`` (already prepared by ``adapter``) and decide how its modules relocate."""
    fixed = adapter.fixed_relocation(model)  # the family knows (ALiBi: MPT "none", Falcon "absolute")
    if fixed is not None:
        return Relocation(*fixed)
    if alibi.is_patched(model):
        return Relocation("absolute", "ALiBi without a family rule")
    rotaries = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if len(rotaries) != 1:
        return Relocation("absolute", f"{len(rotaries)} rotary embedding modules (expected one)")
    rot = rotaries[0]
    cfg = text_config(model.config)
    n_layers = adapter.num_layers()
    head_dim = adapter.head_dim()
    if isinstance(getattr(rot, "rope_type", None), dict):  # Gemma 3: one frequency set per layer type
        layer_types = list(getattr(cfg, "layer_types", None) or [])
        if len(layer_types) != n_layers:
            return Relocation("absolute", "per-type rotary embedding without config.layer_types")
        sets = {}
        for t in set(layer_types):
            why = _check(rot.rope_type.get(t), getattr(rot, f"{t}_attention_scaling", None),
                         getattr(rot, f"{t}_inv_freq", None), getattr(rot, f"{t}_original_inv_freq", None),
                         head_dim)
            if why:
                return Relocation("absolute", f"layer type {t}: {why}")
            sets[t] = getattr(rot, f"{t}_inv_freq")
        return Relocation("rotate", "RoPE per layer type (" + ", ".join(
            f"{t}: {rot.rope_type[t]}" for t in sorted(sets)) + ")", [sets[t] for t in layer_types])
    why = _check(getattr(rot, "rope_type", None), getattr(rot, "attention_scaling", None),
                 getattr(rot, "inv_freq", None), getattr(rot, "original_inv_freq", None), head_dim)
    if why:
        return Relocation("absolute", why)
    return Relocation("rotate", f"RoPE ({rot.rope_type})", [rot.inv_freq] * n_layers)


def _check(rope_type, scaling, inv_freq, original, head_dim: int) -> str | None:
    """Why this rotary set cannot be relocated by a fixed rotation, or ``None`` when it can."""
    if rope_type not in ROTATABLE_ROPE_TYPES:
        return f"rope type {rope_type!r} is not one of {', '.join(ROTATABLE_ROPE_TYPES)}"
    if scaling is None or float(scaling) != 1.0:
        return f"attention scaling {scaling!r} != 1"
    if not isinstance(inv_freq, torch.Tensor) or 2 * inv_freq.numel() != head_dim:
        return "rotary frequencies do not cover the whole head (partial rotary)"
    if isinstance(original, torch.Tensor) and not torch.equal(inv_freq, original.to(inv_freq.device)):
        return "rotary frequencies were updated at run time"
    return None
