"""Position layout of a schema: every token of every part gets a position id.

Sequential parts follow each other; union members share a start and the union spans its longest
member; a parameter occupies exactly ``length`` positions. The layout needs a tokenizer (and the
model's role markers), supplied through the small :class:`TokenRenderer` protocol so that the PML
layer never imports the engine.

The layout is made of *segments*: maximal runs of tokens that belong directly to one module (its
own text, role markers and parameter slots; nested modules are segments of their own). Segments
are the unit the engine caches and splices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol

from .errors import SchemaError
from .model import Module, Parameter, RoleBlock, Schema, Text, UnionBlock

ModulePath = tuple[str, ...]  # names from the root, the root itself being ()


class TokenRenderer(Protocol):
    """What the layout needs from a tokenizer: text to ids, and the model's role markers."""

    def encode(self, text: str) -> list[int]: ...

    def bos(self) -> list[int]: ...

    def role_open(self, role: str, first: bool) -> list[int]: ...

    def role_close(self, role: str) -> list[int]: ...

    def generation_prompt(self) -> list[int]: ...

    def pad_id(self) -> int: ...


@dataclass
class Segment:
    """A run of tokens owned by one module, at positions ``start .. start+len(tokens)-1``.

    kind: ``"text"`` (literal text and role markers) or ``"parameter"`` (a slot holding the
    scaffold, padded; replaced by the prompt's argument at request time).
    ``union_choices`` maps every union (by its index in ``Layout.unions``) enclosing this segment
    to the member index it lies in: the path that must be selected for the segment to exist.
    """

    index: int
    owner: ModulePath
    kind: str
    tokens: list[int]
    start: int
    union_choices: dict[int, int] = field(default_factory=dict)
    parameter: str | None = None

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    @property
    def positions(self) -> range:
        return range(self.start, self.end)


@dataclass
class LayoutEntry:
    """One row of the readable layout: a module, union, parameter, text run or role marker."""

    path: ModulePath
    kind: str  # "module" | "union" | "parameter" | "text" | "marker"
    start: int
    length: int
    cacheable: bool
    label: str = ""

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class ModuleInfo:
    """Facts about one module the binder and the engine need."""

    path: ModulePath
    cache: bool
    start: int
    end: int
    union: int | None  # index in Layout.unions when this module is a union member
    parameters: dict[str, "Segment"] = field(default_factory=dict)
    loc_line: int | None = None


@dataclass
class UnionInfo:
    """A union: where it is, its members' paths and the scaffold member's index.

    ``scaffold`` is None only when the schema says ``scaffold=""`` (no scaffold); a union without
    the attribute has its first member, as in the paper.
    """

    index: int
    parent: ModulePath
    start: int
    length: int
    members: list[ModulePath]
    scaffold: int | None


@dataclass
class Layout:
    """The laid-out schema: segments in document order, module and union tables, a total span."""

    schema: Schema
    segments: list[Segment]
    entries: list[LayoutEntry]
    modules: dict[ModulePath, ModuleInfo]
    unions: list[UnionInfo]
    length: int
    open_role: str | None  # role left open at the end of the schema (``<user open="true">``)
    uses_roles: bool

    def module_segments(self, path: ModulePath) -> list[Segment]:
        return [s for s in self.segments if s.owner == path]

    def table(self) -> str:
        """A fixed-width table of the layout, one row per entry, indented by nesting depth."""
        rows = [("name", "kind", "start", "end", "length", "cached")]
        for e in self.entries:
            name = "/".join(e.path) or self.schema.name
            if e.label:
                name = f"{name}:{e.label}"
            indent = "  " * len(e.path)
            rows.append((indent + name, e.kind, str(e.start), str(e.end), str(e.length),
                         "yes" if e.cacheable else "no"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"total positions: {self.length}, segments: {len(self.segments)}")
        return "\n".join(lines)


class _Builder:
    def __init__(self, schema: Schema, renderer: TokenRenderer) -> None:
        self.schema = schema
        self.r = renderer
        self.segments: list[Segment] = []
        self.entries: list[LayoutEntry] = []
        self.modules: dict[ModulePath, ModuleInfo] = {}
        self.unions: list[UnionInfo] = []
        self.first_role = True
        self.uses_roles = False
        self.open_role: str | None = None

    def emit(self, owner: ModulePath, tokens: list[int], pos: int, choices: dict[int, int],
             kind: str = "text", parameter: str | None = None, label: str = "",
             cacheable: bool = True) -> int:
        if not tokens:
            return pos
        prev = self.segments[-1] if self.segments else None
        if (kind == "text" and prev is not None and prev.kind == "text" and prev.owner == owner
                and prev.end == pos and prev.union_choices == choices):
            prev.tokens.extend(tokens)  # extend the current run: one segment per contiguous run
        else:
            self.segments.append(Segment(len(self.segments), owner, kind, list(tokens), pos,
                                         dict(choices), parameter))
        self.entries.append(LayoutEntry(owner, "marker" if label.startswith("<") else kind,
                                        pos, len(tokens), cacheable, label))
        return pos + len(tokens)

    def walk(self, children: list, owner: ModulePath, pos: int, choices: dict[int, int],
             cacheable: bool) -> int:
        for child in children:
            if isinstance(child, Text):
                pos = self.emit(owner, self.r.encode(child.text), pos, choices,
                                label=_preview(child.text), cacheable=cacheable)
            elif isinstance(child, Parameter):
                pos = self.parameter(child, owner, pos, choices)
            elif isinstance(child, RoleBlock):
                self.uses_roles = True
                pos = self.emit(owner, self.r.role_open(child.role, self.first_role), pos, choices,
                                label=f"<{child.role}>", cacheable=cacheable)
                self.first_role = False
                pos = self.walk(child.children, owner, pos, choices, cacheable)
                if child.open:
                    self.open_role = child.role
                else:
                    pos = self.emit(owner, self.r.role_close(child.role), pos, choices,
                                    label=f"</{child.role}>", cacheable=cacheable)
            elif isinstance(child, Module):
                pos = self.module(child, owner + (child.name,), pos, choices, None)
            elif isinstance(child, UnionBlock):
                pos = self.union(child, owner, pos, choices)
            else:  # pragma: no cover - the parser only builds the node types above
                raise SchemaError(f"unknown schema node {type(child).__name__}")
        return pos

    def parameter(self, p: Parameter, owner: ModulePath, pos: int, choices: dict[int, int]) -> int:
        tokens = self.r.encode(p.scaffold) if p.scaffold else []
        if len(tokens) > p.length:
            raise SchemaError(f"parameter {p.name!r}: scaffold is {len(tokens)} tokens, longer than "
                              f"its length={p.length}", p.loc.file, p.loc.line)
        tokens = tokens + [self.r.pad_id()] * (p.length - len(tokens))
        seg_start = len(self.segments)
        end = self.emit(owner, tokens, pos, choices, kind="parameter", parameter=p.name,
                        label=p.name, cacheable=False)
        if len(self.segments) > seg_start:
            self.modules[owner].parameters[p.name] = self.segments[-1]
        return end

    def module(self, m: Module, path: ModulePath, pos: int, choices: dict[int, int],
               union: int | None) -> int:
        entry = LayoutEntry(path, "module", pos, 0, m.cache)
        self.entries.append(entry)
        info = ModuleInfo(path, m.cache, pos, pos, union, loc_line=m.loc.line)
        self.modules[path] = info
        end = self.walk(m.children, path, pos, choices, m.cache)
        entry.length = end - pos
        info.end = end
        return end

    def union(self, u: UnionBlock, owner: ModulePath, pos: int, choices: dict[int, int]) -> int:
        index = len(self.unions)
        members = [owner + (m.name,) for m in u.members]
        scaffold = _scaffold_index(u)
        info = UnionInfo(index, owner, pos, 0, members, scaffold)
        self.unions.append(info)
        label = (f"union (scaffold: {u.members[scaffold].name})" if scaffold is not None
                 else "union (no scaffold)")
        entry = LayoutEntry(owner, "union", pos, 0, True, label=label)
        self.entries.append(entry)
        longest = 0
        first_role, any_role = self.first_role, False
        for i, m in enumerate(u.members):
            self.first_role = first_role  # members are alternatives: each may open the first turn
            end = self.module(m, owner + (m.name,), pos, {**choices, index: i}, index)
            any_role |= not self.first_role
            longest = max(longest, end - pos)
        self.first_role = first_role and not any_role
        info.length = entry.length = longest
        return pos + longest


def _scaffold_index(u: UnionBlock) -> int | None:
    """The index of ``u``'s scaffold member (None: no scaffold), checked against its members.

    The reader already resolved the default (first member) and checked the name; a schema built
    in Python is checked here so that a bad name fails with its location, not as a KeyError later.
    """
    if u.scaffold is None:
        return None
    names = [m.name for m in u.members]
    if u.scaffold not in names:
        raise SchemaError(f"union scaffold {u.scaffold!r} is not one of its members "
                          f"({', '.join(names)})", u.loc.file, u.loc.line)
    return names.index(u.scaffold)


def _preview(text: str, width: int = 24) -> str:
    if not text.strip():
        return repr(text)  # a separator: show which one
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= width else flat[: width - 3] + "...")


def build_layout(schema: Schema, renderer: TokenRenderer) -> Layout:
    """Tokenize ``schema`` in document order and assign every token a position id."""
    b = _Builder(schema, renderer)
    root: ModulePath = ()
    b.modules[root] = ModuleInfo(root, True, 0, 0, None, loc_line=schema.root.loc.line)
    pos = b.emit(root, renderer.bos(), 0, {}, label="<bos>")
    end = b.walk(schema.root.children, root, pos, {}, True)
    b.modules[root].end = end
    b.entries.insert(0, LayoutEntry(root, "module", 0, end, True))
    return Layout(schema, b.segments, b.entries, b.modules, b.unions, end, b.open_role, b.uses_roles)


def iter_modules(layout: Layout) -> Iterator[ModuleInfo]:
    return iter(layout.modules.values())
