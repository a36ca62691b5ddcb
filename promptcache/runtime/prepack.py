"""Prepacked linear weights on CPU: a packed copy made once per weight (oneDNN's blocked layout, or
:mod:`.amx`'s where the CPU has AMX-BF16), shared by the eager forwards and every compiled graph.

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
the plain ``F.linear``. Linears that read one input (:data:`LINEAR_GROUPS`) are packed as one
weight and computed in one call (:class:`_Group`; in compiled graphs :func:`group_packed_linears`).

Kernel: where :func:`default_kernel` finds AMX (bf16 weights whose input width is a multiple of 32),
:mod:`.amx`'s kernel runs on its own packed layout (faster for short inputs: ``benchmarks/prepack.py``;
rounds differently from oneDNN, within bf16); other weights and CPUs keep oneDNN's packed linear.

Cost: one packed copy of every linear weight (about the model's size again: ``bytes`` in
:meth:`PackedLinears.report`), which is why only the fast path turns it on by default
(``PromptCache(compile=True)`` on CPU in bf16/fp16; ``prepack=True``/``False`` decides otherwise).
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import amx

#: oneDNN packs a weight for an expected number of rows. ``benchmarks/prepack.py`` (SmolLM2 bf16, one
#: thread, eager forwards of 1 / 16 / 128 / 1,149 tokens, ms): plain 57 / 59 / 93 / 572; hint 1:
#: 39 / 42 / 85 / 602; hint 16: 39 / 42 / 76 / 523; hint 128: 40 / 43 / 77 / 514; hint 1024:
#: 40 / 43 / 76 / 562.
DEFAULT_BATCH_HINT = 128


#: Linears of one parent module that read the same input and are packed as ONE weight (vLLM's merged
#: QKV and gate/up projections): one oneDNN call instead of three or two. A short forward pays a
#: fixed oneDNN set-up per call (~14 us, one-off microbenchmark) and wider matrices stream faster:
#: SmolLM2's linears alone, one thread, 211 calls separate vs 121 grouped: 26.7 vs 25.4 ms for 16
#: rows, 25.4 vs 24.3 ms for one (``benchmarks/prepack.py``).
LINEAR_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass
class _Packed:
    """A weight's packed copy, and what tells whether it still is that weight's."""

    packed: torch.Tensor
    owner: weakref.ref  # the weight tensor packed: while it lives, its memory is not reused
    version: int
    shape: torch.Size
    dtype: torch.dtype
    hint: int
    kernel: str

    def current(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The packed copy of ``weight`` (repacked first if it changed in place), or ``None``."""
        if self.owner() is None or self.shape != weight.shape or self.dtype != weight.dtype:
            return None
        if self.version != weight._version:  # written in place since it was packed: repack, same entry
            self.packed, self.version = _reorder(weight, self.hint, self.kernel), weight._version
        return self.packed


class _Group:
    """Linears that read the same input, packed as one concatenated weight (:data:`LINEAR_GROUPS`).

    The first member called with an input computes every member's output in one call; the others,
    called with that same input object (and unchanged version), get their slice of it. Any other
    input computes the whole group again, so results never depend on the call order. The slices
    are views of one output (eager code reshapes and copies them; the compiled op copies them).
    Limit: an inference tensor has no version counter, so an input written in place *between* two
    members' calls inside ``torch.inference_mode`` would not be noticed; no supported family does
    that (q/k/v and gate/up read the same hidden states back to back), and compiled graphs never
    use this memo (one grouped op, :func:`group_packed_linears`)."""

    def __init__(self, modules: list[nn.Linear], hint: int, kernel: str) -> None:
        self.hint, self.kernel = hint, kernel
        self.weights = [weakref.ref(m.weight) for m in modules]
        self.biases = [weakref.ref(m.bias) for m in modules] if modules[0].bias is not None else []
        self.shapes = [m.weight.shape for m in modules]
        self.dtype = modules[0].weight.dtype
        self.sizes = [m.out_features for m in modules]
        self.offsets = [sum(self.sizes[:k]) for k in range(len(modules))]
        self.ptrs = [m.weight.data_ptr() for m in modules]
        self._memo: tuple | None = None  # (input, its version, fused output, members served)
        self._pack([m.weight for m in modules], [m.bias for m in modules if m.bias is not None])

    def _pack(self, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> None:
        with torch.no_grad():
            self.packed = _reorder(torch.cat([w.detach() for w in weights]), self.hint, self.kernel)
            self.bias = torch.cat([b.detach() for b in biases]) if biases else None
        self.versions = tuple(t._version for t in (*weights, *biases))

    def _current(self, index: int, weight: torch.Tensor) -> bool:
        """Whether the group still packs ``weight`` as member ``index`` (repacked if any member changed)."""
        weights = [ref() for ref in self.weights]
        biases = [ref() for ref in self.biases]
        if any(t is None for t in (*weights, *biases)) or weight.shape != self.shapes[index] or weight.dtype != self.dtype:
            return False
        if tuple(t._version for t in (*weights, *biases)) != self.versions:
            self._pack(weights, biases)
        return True

    def output(self, index: int, x: torch.Tensor, weight: torch.Tensor, memo: bool = True) -> torch.Tensor | None:
        """Member ``index``'s output for ``x`` (a view of the group's), or ``None`` if not packed.
        ``memo=False`` (a member alone in a compiled graph, whose buffers the graph reuses) computes
        the group's output and keeps nothing."""
        held, version = self._memo, _version(x)
        if memo and held is not None and held[0] is x and held[1] == version and index not in held[3]:
            fused, served = held[2], held[3] | {index}
        elif self._current(index, weight):
            fused, served = _linear(x, self.packed, self.bias), frozenset((index,))
        else:
            return None
        if memo:
            self._memo = None if len(served) == len(self.sizes) else (x, version, fused, served)
        return fused.narrow(-1, self.offsets[index], self.sizes[index])

    def fused(self, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor | None:
        """Every member's output for ``x``, concatenated (the grouped op of compiled graphs), or
        ``None`` if ``weights`` are not this group's members, in order, still packed."""
        if [w.data_ptr() for w in weights] != self.ptrs or not self._current(0, weights[0]):
            return None
        return _linear(x, self.packed, self.bias)


@dataclass
class _Member:
    """A weight packed as member ``index`` of ``group``."""

    group: _Group
    index: int


#: Packed copies by the packed weight's data pointer (one per weight, whoever calls).
_PACKED: dict[int, _Packed | _Member] = {}


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


def _pack(weight: torch.Tensor, hint: int, kernel: str) -> _Packed:
    """Pack ``weight`` and register the copy (dropped when the weight is freed)."""
    ptr = weight.data_ptr()
    entry = _Packed(_reorder(weight, hint, kernel), weakref.ref(weight), weight._version, weight.shape,
                    weight.dtype, hint, kernel)
    _PACKED[ptr] = entry
    weakref.finalize(weight, _drop, ptr, entry)  # a freed model leaves no packed copy behind
    return entry


def _pack_group(modules: list[nn.Linear], hint: int, kernel: str) -> _Group:
    """Pack ``modules``' weights as one group and register each member (all dropped when one is freed)."""
    group = _Group(modules, hint, kernel)
    for index, ptr in enumerate(group.ptrs):
        _PACKED[ptr] = _Member(group, index)
    for m in modules:
        weakref.finalize(m.weight, _drop_group, group.ptrs, group)
    return group


def _reorder(weight: torch.Tensor, hint: int, kernel: str) -> torch.Tensor | amx.AmxWeight:
    """``weight`` packed for ``kernel`` ("amx" where :func:`amx.unavailable` allows, else oneDNN's)."""
    if kernel == "amx" and amx.unavailable(weight) is None:
        return amx.pack(weight)
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), hint)


def _linear(x: torch.Tensor, packed: torch.Tensor | amx.AmxWeight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if isinstance(packed, amx.AmxWeight):
        return amx.linear(x, packed, bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype))
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def default_kernel() -> str:
    """"amx" where this CPU, torch and compiler run :mod:`.amx`'s kernel (``PROMPTCACHE_AMX=0``:
    never), else "onednn"."""
    if os.environ.get("PROMPTCACHE_AMX", "1") == "0":
        return "onednn"
    probe = torch.zeros((amx.COLUMNS, amx.COLUMNS), dtype=torch.bfloat16)  # a weight it takes
    return "amx" if amx.unavailable(probe) is None else "onednn"


def _version(x: torch.Tensor) -> int:
    return -1 if x.is_inference() else x._version  # inference tensors cannot be written outside inference mode


def _drop(ptr: int, entry: _Packed) -> None:
    if _PACKED.get(ptr) is entry:
        del _PACKED[ptr]


def _drop_group(ptrs: list[int], group: _Group) -> None:
    for ptr in ptrs:
        entry = _PACKED.get(ptr)
        if isinstance(entry, _Member) and entry.group is group:
            del _PACKED[ptr]


def _lookup(weight: torch.Tensor) -> _Packed | _Member | None:
    """The registry entry serving ``weight``, or ``None``."""
    entry = _PACKED.get(weight.data_ptr())
    if isinstance(entry, _Packed) and entry.current(weight) is None:
        return None
    if isinstance(entry, _Member) and not entry.group._current(entry.index, weight):
        return None
    return entry


def _applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.dtype == weight.dtype and x.device.type == "cpu" and not (torch.is_grad_enabled() and weight.requires_grad)


def packed_or_plain(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    memo: bool = True) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the packed weight when there is one and it applies
    (a group member's output may be a view of its group's: :class:`_Group`)."""
    if _applies(x, weight):
        entry = _PACKED.get(weight.data_ptr())
        if isinstance(entry, _Member):
            out = entry.group.output(entry.index, x, weight, memo)
            if out is not None:
                return out
        elif entry is not None:
            packed = entry.current(weight)
            if packed is not None:
                return _linear(x, packed, bias)
    return F.linear(x, weight, bias)


def _packed_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    # compiled graphs take the layout the fake kernel promised (contiguous), not a group's slice view
    return packed_or_plain(x, weight, bias, memo=False).contiguous()


def _packed_linear_group_op(x: torch.Tensor, weights: list[torch.Tensor],
                            biases: list[Optional[torch.Tensor]]) -> torch.Tensor:
    entry = _PACKED.get(weights[0].data_ptr())
    if isinstance(entry, _Member) and _applies(x, weights[0]):
        out = entry.group.fused(x, weights)
        if out is not None:
            return out
    return torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases)], dim=-1)


#: ``promptcache::packed_linear``: the compiled graphs' view of :func:`packed_or_plain`, opaque to
#: inductor (a plain ``torch.library`` op: its dispatch costs ~2 us a call, ``custom_op``'s ~5 us);
#: ``packed_linear_group``: a group's members in one call, put in by :func:`group_packed_linears`.
_LIB = torch.library.Library("promptcache", "FRAGMENT")
_LIB.define("packed_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIB.impl("packed_linear", _packed_linear_op, "CPU")
_LIB.define("packed_linear_group(Tensor x, Tensor[] weights, Tensor?[] biases) -> Tensor")
_LIB.impl("packed_linear_group", _packed_linear_group_op, "CPU")


@torch.library.register_fake("promptcache::packed_linear", lib=_LIB)
def _packed_linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("promptcache::packed_linear_group", lib=_LIB)
def _packed_linear_group_fake(x: torch.Tensor, weights: list[torch.Tensor],
                              biases: list[Optional[torch.Tensor]]) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)))


def group_packed_linears(gm: torch.fx.GraphModule, example_inputs: list) -> int:
    """Rewrite a dynamo graph so that each packed group's members, called on one input, run as ONE
    ``packed_linear_group`` call whose output the members' users read as slices. Returns the
    number of groups rewritten. Members are recognised by their weights (the graph's inputs)."""
    real = dict(zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs))
    calls: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.promptcache.packed_linear.default:
            calls.setdefault(node.args[0], []).append(node)
    rewritten = 0
    for x, nodes in calls.items():
        by_group: dict[int, tuple[_Group, dict[int, torch.fx.Node]]] = {}
        for node in nodes:
            weight = real.get(node.args[1])
            entry = _PACKED.get(weight.data_ptr()) if isinstance(weight, torch.Tensor) else None
            if isinstance(entry, _Member):
                by_group.setdefault(id(entry.group), (entry.group, {}))[1][entry.index] = node
        for group, members in by_group.values():
            if len(members) != len(group.sizes):
                continue  # not every member reads this input: leave them alone
            ordered = [members[i] for i in range(len(group.sizes))]
            with gm.graph.inserting_before(min(ordered, key=_position(gm))):
                fused = gm.graph.call_function(torch.ops.promptcache.packed_linear_group.default,
                                               (x, [n.args[1] for n in ordered], [n.args[2] for n in ordered]))
                pieces = [gm.graph.call_function(torch.narrow, (fused, -1, group.offsets[i], group.sizes[i]))
                          for i in range(len(ordered))]
            for node, piece in zip(ordered, pieces):  # erased after the insertions it anchors
                node.replace_all_uses_with(piece)
                gm.graph.erase_node(node)
            rewritten += 1
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten


def _position(gm: torch.fx.GraphModule):
    order = {node: k for k, node in enumerate(gm.graph.nodes)}
    return order.__getitem__


def inductor_with_grouped_linears(config_patches: dict | None = None):
    """A ``torch.compile`` backend: :func:`group_packed_linears`, then inductor (with
    ``config_patches``). Used for the fast path's CPU graphs."""
    def backend(gm: torch.fx.GraphModule, example_inputs: list):
        from torch._inductor.compile_fx import compile_fx

        group_packed_linears(gm, example_inputs)
        return compile_fx(gm, example_inputs, config_patches=config_patches)
    return backend


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

    def __init__(self, model: nn.Module, batch_hint: int = DEFAULT_BATCH_HINT, group: bool = True,
                 kernel: str | None = None) -> None:
        if kernel not in (None, "amx", "onednn"):
            raise ValueError(f"kernel must be 'amx', 'onednn' or None (the default here), not {kernel!r}")
        self.batch_hint = batch_hint
        #: "amx" (:mod:`.amx`, bf16 weights whose input width it takes; oneDNN's for the others) or "onednn"
        self.kernel = kernel or default_kernel()
        self.modules: list[nn.Linear] = []
        self.groups = 0
        self.grouped = 0  # linears packed as members of a group
        self.bytes = 0
        seen: set[int] = set()
        for members in linear_groups(model) if group else ():
            _pack_group(members, batch_hint, self.kernel)
            self._adopt(members, seen)
            self.groups += 1
            self.grouped += len(members)
        grouped = {id(m) for m in self.modules}
        for module in model.modules():
            if not _packable(module) or id(module) in grouped:  # grouped already
                continue
            if module.weight.data_ptr() not in seen:  # tied weights (lm_head = embeddings) pack once
                _pack(module.weight, batch_hint, self.kernel)
            self._adopt([module], seen)

    def _adopt(self, modules: list[nn.Linear], seen: set[int]) -> None:
        for module in modules:
            if module.weight.data_ptr() not in seen:
                seen.add(module.weight.data_ptr())
                self.bytes += module.weight.numel() * module.weight.element_size()
            module.__class__ = PackedLinear
            self.modules.append(module)

    @classmethod
    def of(cls, model: nn.Module, batch_hint: int = DEFAULT_BATCH_HINT, group: bool = True,
           kernel: str | None = None) -> "PackedLinears":
        """The model's prepacked linears: made once per model, shared by every engine over it
        (``group=False``: every linear packed alone, as before groups; ``kernel="onednn"``: oneDNN's
        kernel where AMX's would run; both for side-by-side benchmarks)."""
        existing = model.__dict__.get("_promptcache_prepacked")
        if existing is None or not existing.live():  # never packed, removed, or a deep copy's
            existing = cls(model, batch_hint, group, kernel)
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
        self.modules, self.bytes, self.groups, self.grouped = [], 0, 0, 0

    def report(self) -> dict:
        on_amx: dict[int, bool] = {}  # per packed weight (a group's is one): whether AMX's kernel runs it
        for module in self.modules:
            entry = _PACKED.get(module.weight.data_ptr())
            holder = entry.group if isinstance(entry, _Member) else entry
            if holder is not None:
                on_amx[id(holder)] = isinstance(holder.packed, amx.AmxWeight)
        return {"linears": len(self.modules), "groups": self.groups, "grouped_linears": self.grouped,
                "bytes": self.bytes, "batch_hint": self.batch_hint, "kernel": self.kernel,
                "amx_weights": sum(on_amx.values()), "onednn_weights": len(on_amx) - sum(on_amx.values())}


def linear_groups(model: nn.Module) -> list[list[nn.Linear]]:
    """The model's linears that can be packed as groups (:data:`LINEAR_GROUPS`), each in order."""
    groups: list[list[nn.Linear]] = []
    seen: set[int] = set()
    for parent in model.modules():
        for names in LINEAR_GROUPS:
            members = [parent._modules.get(name) for name in names]
            if _groupable(members, seen):
                seen.update(m.weight.data_ptr() for m in members)
                groups.append(members)
    return groups


def _packable(module: nn.Module | None) -> bool:
    """A plain linear (subclasses such as quantized or PEFT layers keep their own forward) whose
    weight dtype and device oneDNN prepacks."""
    return (type(module) in (nn.Linear, PackedLinear) and "forward" not in module.__dict__
            and supported(module.weight.device, module.weight.dtype) is None)


def _groupable(members: list[nn.Module | None], seen: set[int]) -> bool:
    """Whether ``members`` can be packed as one group: packable, same input width, dtype and
    device, all with a bias or none, distinct weights not packed already."""
    if not all(_packable(m) for m in members):
        return False
    first = members[0]
    ptrs = {m.weight.data_ptr() for m in members}
    return (len(ptrs) == len(members) and not ptrs & seen
            and all(m.in_features == first.in_features and m.weight.dtype == first.weight.dtype
                    and m.weight.device == first.weight.device and (m.bias is None) == (first.bias is None)
                    for m in members))
