"""The ``@prompt`` compiler's data (:mod:`promptcache.compiler`): its errors, the intermediate
representation (literal lines with f-string holes, modules, unions) and the call-time tests that
pick a union's member from the call's arguments. One job: what a compiled function *is*.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass
from typing import Any, Callable, Union

from .pml.errors import PMLError

DEFAULT_PARAM_LENGTH = 16
"""Slot length (in tokens) of an f-string hole without a format spec or a ``lengths`` entry."""

ModulePath = tuple[str, ...]


class CompileError(PMLError):
    """The function (or a call of it) cannot be turned into PML; ``line`` is the real source line."""


class ArgumentTypeError(CompileError, TypeError):
    """A call passed a value of the wrong type to a condition or ``match`` (e.g. ``"yes"`` for a
    bare ``if flag:``, or a str where the cases are ints): refusing beats silently picking nothing."""


# ------------------------------------------------------------------ intermediate representation


@dataclass
class Hole:
    """An f-string hole: the PML parameter ``slot`` (unique in its module) filled by ``param``."""

    param: str
    length: int
    line: int
    slot: str = ""


@dataclass
class Literal:
    """One string statement: text pieces and holes, in order."""

    pieces: list[Union[str, Hole]]
    line: int


@dataclass
class ModuleItem:
    """A generated module: a union member (``test`` says when it is chosen) or a text wrapper."""

    name: str
    line: int
    body: list["Item"]
    test: "Test | None" = None


@dataclass
class UnionItem:
    """An ``if`` chain or a ``match``: members are tried in order, the first true one is chosen."""

    line: int
    members: list[ModuleItem]
    check: "KindCheck | None" = None


Item = Union[Literal, ModuleItem, UnionItem]


# ------------------------------------------------------------------ call-time tests


def value_kind(value: Any) -> str:
    """The type family a value belongs to for comparisons (bool is not a number here)."""
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "str"
    return type(value).__name__


_KIND_NAMES = {"None": "None", "bool": "bool", "number": "int/float", "str": "str"}


@dataclass
class Where:
    file: str | None
    line: int
    source: str  # the condition or subject as written, for messages

    def type_error(self, message: str) -> ArgumentTypeError:
        return ArgumentTypeError(message, self.file, self.line)


@dataclass
class Truth:
    """``if name:`` -- the argument must be a bool, so a string like "no" cannot pass as true."""

    param: str
    where: Where

    def evaluate(self, args: dict[str, Any]) -> bool:
        value = args[self.param]
        if not isinstance(value, bool):
            raise self.where.type_error(
                f"condition `{self.where.source}` needs a bool for {self.param!r}, "
                f"got {value!r} ({type(value).__name__})")
        return value


@dataclass
class Not:
    inner: "Test"

    def evaluate(self, args: dict[str, Any]) -> bool:
        return not self.inner.evaluate(args)


OPS: dict[type, tuple[str, Callable[[Any, Any], bool]]] = {
    ast.Eq: ("==", operator.eq), ast.NotEq: ("!=", operator.ne),
    ast.Lt: ("<", operator.lt), ast.LtE: ("<=", operator.le),
    ast.Gt: (">", operator.gt), ast.GtE: (">=", operator.ge),
    ast.Is: ("is", operator.is_), ast.IsNot: ("is not", operator.is_not),
}
FLIP = {ast.Lt: ast.Gt, ast.Gt: ast.Lt, ast.LtE: ast.GtE, ast.GtE: ast.LtE}


@dataclass
class Compare:
    """``param OP literal``: the argument must be of the literal's type (None passes ==/!=)."""

    param: str
    op: type
    literal: Any
    where: Where

    def evaluate(self, args: dict[str, Any]) -> bool:
        value = args[self.param]
        want = value_kind(self.literal)
        equality = self.op in (ast.Eq, ast.NotEq, ast.Is, ast.IsNot)
        if want != "None" and value_kind(value) != want and not (value is None and equality):
            raise self.where.type_error(
                f"condition `{self.where.source}` compares {self.param!r} with a "
                f"{_KIND_NAMES[want]}, got {value!r} ({type(value).__name__})")
        return bool(OPS[self.op][1](value, self.literal))


@dataclass
class Case:
    """One ``case``: equal to one of ``values`` (same type family), or anything for ``_``."""

    param: str
    values: list[Any]
    wildcard: bool

    def evaluate(self, args: dict[str, Any]) -> bool:
        value = args[self.param]
        return self.wildcard or any(value_kind(value) == value_kind(v) and value == v for v in self.values)


@dataclass
class Always:
    def evaluate(self, args: dict[str, Any]) -> bool:
        return True


Test = Union[Truth, Not, Compare, Case, Always]


@dataclass
class KindCheck:
    """A ``match`` subject must be of a type its cases are written in (or None)."""

    param: str
    kinds: set[str]
    where: Where

    def __call__(self, args: dict[str, Any]) -> None:
        value = args[self.param]
        if self.kinds and value is not None and value_kind(value) not in self.kinds:
            want = " or ".join(sorted(_KIND_NAMES[k] for k in self.kinds))
            raise self.where.type_error(
                f"`match {self.where.source}` has {want} cases, got {value!r} "
                f"({type(value).__name__})")
