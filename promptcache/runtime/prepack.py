"""Prepacked linear weights on CPU: oneDNN's blocked weight layout made once per weight, shared by
the eager forwards and every compiled graph.

Why: on CPU a bf16 ``nn.Linear`` already runs through oneDNN (AMX where the CPU has it), but
``aten::mm`` reorders the weight into oneDNN's blocked layout on every call. A short forward is
bound by reading the weights, and that reorder reads and writes them once more: on the persona
case (16 new tokens, SmolLM2-135M, one thread) the linears took 39 ms of a 60 ms compiled cached
TTFT, 27 ms prepacked (``benchmarks/fastpath.py --profile``); eager 16-token forwards 59 -> 43 ms
(``benchmarks/prepack.py``), with the same logits (oneDNN runs the same kernels on the packed copy). Inductor's ``freezing`` prepacks too, but only inside each
compiled graph (a copy of every weight per shape bucket) and only when set globally before
dynamo traces; here one packed copy per weight serves all graphs and the eager paths.

How: each ``nn.Linear`` of the model becomes a :class:`PackedLinear` (its class switched in
place; parameters, hooks and wrappers such as PEFT's stay as they are), whose ``forward`` calls
oneDNN's linear on the packed weight; inside ``torch.compile`` the call is the opaque custom op
``promptcache::packed_linear`` (its fake kernel gives the output shape), so graphs read the same
packed copy. The packed copy is found by the weight's memory and checked against the weight's
version counter: a weight changed in place is repacked before use, never served stale. Any case
the packed kernel does not cover (another dtype or device, autograd, a weight not packed) runs
the plain ``F.linear``.

Cost: one packed copy of every linear weight (about the model's size again: ``bytes`` in
:meth:`PackedLinears.report`), which is why only the fast path turns it on by default
(``PromptCache(compile=True)`` on CPU in bf16/fp16; ``prepack=True``/``False`` decides otherwise).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

#: oneDNN packs a weight for an expected number of rows. ``benchmarks/prepack.py`` (SmolLM2 bf16, one
#: thread, eager forwards of 1 / 16 / 128 / 1,149 tokens, ms): plain 57 / 59 / 93 / 572; hint 1:
#: 39 / 42 / 85 / 602; hint 16: 39 / 42 / 76 / 523; hint 128: 40 / 43 / 77 / 514; hint 1024:
#: 40 / 43 / 76 / 562.
DEFAULT_BATCH_HINT = 128


@dataclass
class _Packed:
    """A weight's packed copy, and what tells whether it still is that weight's."""

    packed: torch.Tensor
    owner: weakref.ref  # the weight tensor packed: while it lives, its memory is not reused
    version: int
    shape: torch.Size
    dtype: torch.dtype
    hint: int


#: Packed copies by the packed weight's data pointer (one per weight, whoever calls).
_PACKED: dict[int, _Packed] = {}


def supported(device: torch.device, dtype: torch.dtype) -> str | None:
    """``None`` when weights of ``dtype`` on ``device`` can be prepacked, else why not."""
    if device.type != "cpu":
        return f"prepacked weights are a CPU path (device is {device.type})"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    if dtype == torch.float16 and torch.ops.mkldnn._is_mkldnn_fp16_supported():
        return None
    return f"oneDNN on this CPU does not prepack {str(dtype).replace('torch.', '')} weights (bf16/fp16 only)"


def _pack(weight: torch.Tensor, hint: int) -> _Packed:
    """Pack ``weight`` and register the copy (dropped when the weight is freed)."""
    ptr = weight.data_ptr()
    entry = _Packed(_reorder(weight, hint), weakref.ref(weight), weight._version, weight.shape, weight.dtype, hint)
    _PACKED[ptr] = entry
    weakref.finalize(weight, _drop, ptr, entry)  # a freed model leaves no packed copy behind
    return entry


def _reorder(weight: torch.Tensor, hint: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), hint)


def _drop(ptr: int, entry: _Packed) -> None:
    if _PACKED.get(ptr) is entry:
        del _PACKED[ptr]


def _lookup(weight: torch.Tensor) -> _Packed | None:
    """The packed copy of ``weight`` (repacked first if the weight changed in place), or ``None``."""
    entry = _PACKED.get(weight.data_ptr())
    if entry is None or entry.owner() is None or entry.shape != weight.shape or entry.dtype != weight.dtype:
        return None
    if entry.version != weight._version:  # written in place since it was packed: repack, same entry
        entry.packed, entry.version = _reorder(weight, entry.hint), weight._version
    return entry


def packed_or_plain(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the packed weight when there is one and it applies."""
    entry = None
    if x.dtype == weight.dtype and x.device.type == "cpu" and not (torch.is_grad_enabled() and weight.requires_grad):
        entry = _lookup(weight)
    if entry is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), entry.packed, bias, "none", [], "")


#: ``promptcache::packed_linear``: the compiled graphs' view of :func:`packed_or_plain`, opaque to
#: inductor (a plain ``torch.library`` op: its dispatch costs ~2 us a call, ``custom_op``'s ~5 us).
_LIB = torch.library.Library("promptcache", "FRAGMENT")
_LIB.define("packed_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIB.impl("packed_linear", packed_or_plain, "CPU")


@torch.library.register_fake("promptcache::packed_linear", lib=_LIB)
def _packed_linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is prepacked: the class a packed module is switched to.

    Why a class and not an instance ``forward``: compiled graphs guard on every module's
    ``__dict__`` keys they read, and 211 instance attributes cost ~0.4 ms of guard checks per
    compiled call on SmolLM2 (1.67 -> 1.24 ms per call); the class is one identity guard per module, as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.promptcache.packed_linear.default(x, self.weight, self.bias)
        return packed_or_plain(x, self.weight, self.bias)


class PackedLinears:
    """The prepacked linears of one model (module docstring); :meth:`remove` undoes it."""

    def __init__(self, model: nn.Module, batch_hint: int = DEFAULT_BATCH_HINT) -> None:
        self.batch_hint = batch_hint
        self.modules: list[nn.Linear] = []
        self.bytes = 0
        seen: set[int] = set()
        for module in model.modules():
            if type(module) not in (nn.Linear, PackedLinear) or "forward" in module.__dict__:
                continue  # subclasses (quantized, PEFT) keep their own forward
            weight = module.weight
            if supported(weight.device, weight.dtype) is not None:
                continue
            if weight.data_ptr() not in seen:  # tied weights (lm_head = embeddings) pack once
                seen.add(weight.data_ptr())
                _pack(weight, batch_hint)
                self.bytes += weight.numel() * weight.element_size()
            module.__class__ = PackedLinear
            self.modules.append(module)

    @classmethod
    def of(cls, model: nn.Module, batch_hint: int = DEFAULT_BATCH_HINT) -> "PackedLinears":
        """The model's prepacked linears: made once per model, shared by every engine over it."""
        existing = model.__dict__.get("_promptcache_prepacked")
        if existing is None or not existing.live():  # never packed, removed, or a deep copy's
            existing = cls(model, batch_hint)
            model.__dict__["_promptcache_prepacked"] = existing
        return existing

    def live(self) -> bool:
        """Whether every module's packed copy is there (a deep copy of a model has none)."""
        return bool(self.modules) and all(_lookup(m.weight) is not None for m in self.modules)

    def remove(self) -> None:
        """Give every linear its own forward back and drop the packed copies."""
        for module in self.modules:
            module.__class__ = nn.Linear
            _PACKED.pop(module.weight.data_ptr(), None)
        self.modules, self.bytes = [], 0

    def report(self) -> dict:
        return {"linears": len(self.modules), "bytes": self.bytes, "batch_hint": self.batch_hint}
