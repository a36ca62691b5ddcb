"""Compiled norms and MLPs for the long eager forwards of the fast path (full prefills, module
encoding): their elementwise ops fused, dynamic in the number of tokens.

Why: the fast path compiles the cached prefill and decode over static buffers, but a full prefill
(the no-cache baseline, a module being encoded) runs eagerly, and in bf16 on CPU its unfused
elementwise ops cost a good part of it: RMSNorm alone is six passes over the hidden states, the
MLP's activation-times-up two more over the intermediate ones. Each decoder layer's norms and MLP
get a ``forward`` that, for an input of at least :data:`LONG_ROWS` tokens outside
``torch.compile`` and autograd, runs a compiled copy of the module class's own forward (one graph
per class, any length: ``dynamic=True``); shorter inputs (decode, short suffixes) and everything
inside the fast path's own graphs run the original forward unchanged. The copy is compiled with
inductor's ``emulate_precision_casts`` (rounding to bf16 where eager does); sums still run in
another order, so bf16 logits move a little (persona case: up to 0.375, same top token; the full
prefill 505.6 -> 474.8 ms: ``benchmarks/prepack.py``).

RoPE too: transformers applies it with its modeling module's ``apply_rotary_pos_emb`` (four
multiplies, two negations, two concatenations and two adds, unfused: ~40 ms of the persona case's
bf16 full prefill, ``torch.profiler``). That function is wrapped, once per modeling module, by one
that runs a compiled copy while a fused decoder layer of this module's models runs a long input
(a thread-local flag set by the layer); for any other model or input it is the function itself.
"""

from __future__ import annotations

import sys
import threading
import warnings

import torch
from torch import nn

from .prepack import inductor_with_grouped_linears

#: Inputs of at least this many tokens run the compiled norms/MLP (shorter ones: not worth a call
#: through dynamo's guards).
LONG_ROWS = 64
#: Module classes whose forward is fused, by the ending of their class name.
FUSED_SUFFIXES = ("RMSNorm", "MLP")
#: Module classes whose long forwards run their modeling module's RoPE compiled (module docstring).
ROPE_SUFFIXES = ("DecoderLayer",)
_LONG_LAYER = threading.local()  # .on: a fused decoder layer is running a long input on this thread

_COMPILED: dict[type, object] = {}
_FUSED_CLASSES: dict[type, type] = {}
#: Classes whose compiled forward failed, and why: they run their own forward from then on (warned once).
FAILED: dict[type, str] = {}


def _long_input(x: torch.Tensor) -> bool:
    return x.dim() >= 3 and x.shape[1] >= LONG_ROWS and not torch.is_grad_enabled()  # [batch, tokens, ...]


def _wrap_rope(module_name: str) -> None:
    """Wrap ``apply_rotary_pos_emb`` of the modeling module ``module_name`` (once): compiled while a
    fused decoder layer runs a long input, the function itself otherwise."""
    module = sys.modules.get(module_name)
    plain = getattr(module, "apply_rotary_pos_emb", None)
    if plain is None or hasattr(plain, "_promptcache_plain"):
        return
    compiled = torch.compile(plain, dynamic=True, backend=inductor_with_grouped_linears({"emulate_precision_casts": True}))

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        global rope_calls
        if not torch.compiler.is_compiling() and getattr(_LONG_LAYER, "on", False) and module_name not in FAILED_ROPE:
            try:
                out = compiled(q, k, cos, sin, *args, **kwargs)
                rope_calls += 1
                return out
            except Exception as exc:  # noqa: BLE001 - a compile failure: plain RoPE from now on, loudly
                FAILED_ROPE[module_name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                warnings.warn(f"promptcache: the compiled RoPE of {module_name} failed ({FAILED_ROPE[module_name]}); "
                              "it runs eager from now on", UserWarning, stacklevel=2)
        return plain(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._promptcache_plain = plain
    apply_rotary_pos_emb.__doc__ = plain.__doc__
    setattr(module, "apply_rotary_pos_emb", apply_rotary_pos_emb)


#: Modeling modules whose compiled RoPE failed, and why (plain RoPE from then on, warned once).
FAILED_ROPE: dict[str, str] = {}
#: Compiled RoPE calls in this process (for tests).
rope_calls = 0


def _rope_class(cls: type) -> type:
    """A subclass of the decoder layer ``cls`` whose long forwards run the compiled RoPE."""
    if cls not in _FUSED_CLASSES:
        _wrap_rope(cls.__module__)

        def forward(self, x: torch.Tensor, *args, **kwargs):
            if torch.compiler.is_compiling() or not _long_input(x):
                return cls.forward(self, x, *args, **kwargs)
            _LONG_LAYER.on = True
            try:
                return cls.forward(self, x, *args, **kwargs)
            finally:
                _LONG_LAYER.on = False

        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (cls,), {"forward": forward, "_unfused": cls})
    return _FUSED_CLASSES[cls]


def _compiled_forward(cls: type):
    """The compiled ``cls.forward`` (made once per class)."""
    if cls not in _COMPILED:
        _COMPILED[cls] = torch.compile(cls.forward, dynamic=True, backend=inductor_with_grouped_linears(
            {"emulate_precision_casts": True}))
    return _COMPILED[cls]


def _fused_class(cls: type) -> type:
    """A subclass of ``cls`` whose forward runs the compiled one on long inputs."""
    if cls not in _FUSED_CLASSES:
        def forward(self, x: torch.Tensor, *args, **kwargs):
            if (x.dim() >= 3 and x.shape[1] >= LONG_ROWS and cls not in FAILED
                    and not torch.compiler.is_compiling() and not torch.is_grad_enabled()):  # [batch, tokens, ...]
                try:
                    return _compiled_forward(cls)(self, x, *args, **kwargs)
                except Exception as exc:  # noqa: BLE001 - a compile failure: this class runs eager, loudly
                    FAILED[cls] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                    warnings.warn(f"promptcache: the compiled {cls.__name__} forward failed ({FAILED[cls]}); "
                                  "it runs eager from now on", UserWarning, stacklevel=2)
            return cls.forward(self, x, *args, **kwargs)

        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (cls,), {"forward": forward, "_unfused": cls})
    return _FUSED_CLASSES[cls]


class FusedLongForwards:
    """The model's norms and MLPs switched to their fused classes; :meth:`remove` undoes it."""

    def __init__(self, model: nn.Module) -> None:
        self.modules: list[nn.Module] = []
        for module in model.modules():
            cls = type(module)
            if "_unfused" in cls.__dict__ or "forward" in module.__dict__:
                continue
            if cls.__name__.endswith(FUSED_SUFFIXES):
                module.__class__ = _fused_class(cls)
                self.modules.append(module)
            elif cls.__name__.endswith(ROPE_SUFFIXES) and hasattr(sys.modules.get(cls.__module__), "apply_rotary_pos_emb"):
                module.__class__ = _rope_class(cls)
                self.modules.append(module)

    @classmethod
    def of(cls, model: nn.Module) -> "FusedLongForwards":
        """The model's fused norms and MLPs: switched once per model, shared by its engines."""
        existing = model.__dict__.get("_promptcache_fused")
        if existing is None or not existing.modules:
            existing = model.__dict__["_promptcache_fused"] = cls(model)
        return existing

    def remove(self) -> None:
        for module in self.modules:
            module.__class__ = type(module)._unfused
        self.modules = []

    def report(self) -> dict:
        classes = {type(m)._unfused for m in self.modules}
        modules = {c.__module__ for c in classes if c.__name__.endswith(ROPE_SUFFIXES)}
        return {"modules": len(self.modules), "long_rows": LONG_ROWS,
                "classes": sorted(c.__name__ for c in classes),
                "failed": {c.__name__: why for c, why in FAILED.items() if c in classes}
                | {f"{name}.apply_rotary_pos_emb": why for name, why in FAILED_ROPE.items() if name in modules}}
