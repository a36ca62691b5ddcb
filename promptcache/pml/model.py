"""The PML object model: what a parsed schema and a parsed prompt are, independent of XML.

The parser (``parser.py``) builds these objects; the layout (``layout.py``) turns a schema into
token ranges; the engine turns a prompt plus a layout into a plan. Keeping the model plain
dataclasses means the compiler, the eval scripts and the tests can also build schemas directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union as TypingUnion

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class Location:
    """Where an element starts in its source document (1-based line)."""

    file: str | None = None
    line: int | None = None


@dataclass
class Text:
    """A run of literal text, already whitespace-normalised by the parser.

    ``text`` includes any single separator (" " or "\\n") that joins it to the previous piece, so
    tokenizing pieces in document order and concatenating the strings gives the rendered prompt.
    """

    text: str
    loc: Location = field(default_factory=Location)


@dataclass
class Parameter:
    """A slot of exactly ``length`` token positions, filled per request by a prompt argument."""

    name: str
    length: int
    scaffold: str | None = None
    loc: Location = field(default_factory=Location)


@dataclass
class RoleBlock:
    """``<system>``/``<user>``/``<assistant>``: a layout container rendered as chat markers.

    ``open=True`` (schema attribute ``open="true"``) omits the end marker so that the prompt's
    trailing text continues this same turn (document QA: document cached, question computed).
    """

    role: str
    children: list["Node"] = field(default_factory=list)
    open: bool = False
    loc: Location = field(default_factory=Location)


@dataclass
class Module:
    """A named, selectable, cacheable piece of a schema. The schema itself is the root module."""

    name: str
    children: list["Node"] = field(default_factory=list)
    cache: bool = True
    loc: Location = field(default_factory=Location)


@dataclass
class UnionBlock:
    """Alternatives sharing one start position; at most one member is selected by a prompt.

    ``scaffold`` names the member that stands in for the selected one when later parts of the
    schema are encoded (scaffold policy). The schema reader follows the Prompt Cache paper: a
    ``<union>`` without the attribute gets its first member. ``None`` (written ``scaffold=""``):
    later parts see no member of this union.
    """

    members: list[Module] = field(default_factory=list)
    scaffold: str | None = None
    loc: Location = field(default_factory=Location)


Node = TypingUnion[Text, Parameter, RoleBlock, Module, UnionBlock]


@dataclass
class Schema:
    """A parsed ``<schema name=...>``: the root module plus where it came from."""

    name: str
    root: Module
    file: str | None = None


# ---------------------------------------------------------------- prompts


@dataclass
class Selection:
    """One selected module in a prompt: its name, parameter arguments and nested selections."""

    name: str
    args: dict[str, str] = field(default_factory=dict)
    children: list["Selection"] = field(default_factory=list)
    loc: Location = field(default_factory=Location)


@dataclass
class Turn:
    """Trailing content of a prompt: plain text (``role=None``) or a ``<user>``/``<assistant>`` turn."""

    role: str | None
    text: str
    loc: Location = field(default_factory=Location)


@dataclass
class Prompt:
    """A parsed ``<prompt schema=...>``: selections at the root scope, then the uncached suffix."""

    schema: str
    selections: list[Selection] = field(default_factory=list)
    suffix: list[Turn] = field(default_factory=list)
    file: str | None = None
    loc: Location = field(default_factory=Location)
