"""The ``@prompt`` compiler's output (:mod:`promptcache.compiler`): the intermediate
representation as PML schema text, and a call's selections as PML prompt text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .compiler_ir import CompileError, Hole, Item, Literal, UnionItem
from .pml.errors import PMLError
from .pml.escape import escape_attr, escape_text

# ------------------------------------------------------------------ PML text

# Text goes at column 0 and tags are indented: the parser dedents each text run by its common
# indent, and a run that starts right after an inline <parameter/> has no indent of its own, so
# indenting text would leak the indentation into the prompt.


def _render_literal(lit: Literal) -> str:
    out = []
    for piece in lit.pieces:
        if isinstance(piece, Hole):
            out.append(f"<parameter name={escape_attr(piece.slot)} length=\"{piece.length}\"/>")
        else:
            out.append(escape_text(piece))
    return "".join(out)


def _render_items(items: list[Item], depth: int, out: list[str], file: str | None) -> None:
    pad = "  " * depth
    for item in items:
        if isinstance(item, Literal):
            try:
                out.append(_render_literal(item))
            except PMLError as exc:
                raise CompileError(exc.message, file, item.line) from exc
        elif isinstance(item, UnionItem):
            out.append(f"{pad}<union scaffold={escape_attr(item.members[0].name)}>")
            _render_items(item.members, depth + 1, out, file)
            out.append(f"{pad}</union>")
        elif not item.body:
            out.append(f"{pad}<module name={escape_attr(item.name)}/>")
        else:
            out.append(f"{pad}<module name={escape_attr(item.name)}>")
            _render_items(item.body, depth + 1, out, file)
            out.append(f"{pad}</module>")


def render_schema(name: str, items: list[Item], file: str | None) -> str:
    out = [f"<schema name={escape_attr(name)}>"]
    _render_items(items, 1, out, file)
    out.append("</schema>")
    return "\n".join(out) + "\n"


@dataclass
class SelectionItem:
    name: str
    args: dict[str, str]
    children: list["SelectionItem"] = field(default_factory=list)


def render_selections(sels: list[SelectionItem], depth: int, out: list[str]) -> None:
    pad = "  " * depth
    for s in sels:
        attrs = "".join(f" {k}={escape_attr(v)}" for k, v in s.args.items())
        if not s.children:
            out.append(f"{pad}<{s.name}{attrs}/>")
            continue
        out.append(f"{pad}<{s.name}{attrs}>")
        render_selections(s.children, depth + 1, out)
        out.append(f"{pad}</{s.name}>")
