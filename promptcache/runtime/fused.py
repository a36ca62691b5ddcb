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
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .prepack import inductor_with_grouped_linears

#: Inputs of at least this many tokens run the compiled norms/MLP (shorter ones: not worth a call
#: through dynamo's guards).
LONG_ROWS = 64
#: Module classes whose forward is fused, by the ending of their class name.
FUSED_SUFFIXES = ("RMSNorm", "MLP")

_COMPILED: dict[type, object] = {}
_FUSED_CLASSES: dict[type, type] = {}
#: Classes whose compiled forward failed, and why: they run their own forward from then on (warned once).
FAILED: dict[type, str] = {}


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
            if cls.__name__.endswith(FUSED_SUFFIXES) and "_unfused" not in cls.__dict__ \
                    and "forward" not in module.__dict__:
                module.__class__ = _fused_class(cls)
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
        return {"modules": len(self.modules), "long_rows": LONG_ROWS,
                "classes": sorted(c.__name__ for c in classes),
                "failed": {c.__name__: why for c, why in FAILED.items() if c in classes}}
