"""Compile a Python function into a PML schema, and every call of it into the matching PML prompt.

Why: a prompt whose parts depend on a few switches is tedious to write as PML by hand and easy to
get out of step with the code that picks the parts. A ``@prompt`` function states the alternatives
once, in Python syntax: every ``if``/``match`` becomes a PML union (one cacheable module per branch)
and every call becomes a prompt that selects exactly the branches its arguments choose.

The mapping (full description: docs/compiler.md):

* each bare string literal statement is a line of prompt text (the first one too, docstring or not);
* ``if``/``elif``/``else`` and ``match``/``case`` become a ``<union>`` with one ``<module>`` per
  branch, named after the branch and its source line (``if-L12``, ``elif-L14``, ``else-L12``,
  ``case-1-L18``, ``case-default-L20``); the union's scaffold is its first member;
* an f-string hole ``{city:12}`` becomes ``<parameter name="city" length="12"/>``; parameters are
  only legal inside modules, so at the top level each maximal run of literal statements that
  holds an f-string is wrapped in an always-selected module ``text-L<line>``.

Anything else in the body is a :class:`CompileError` naming the line in the real source file.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .compiler_ir import (DEFAULT_PARAM_LENGTH, ArgumentTypeError, CompileError, Hole, Item, Literal,
                          ModuleItem, ModulePath, UnionItem)
from .compiler_render import SelectionItem, render_schema, render_selections
from .compiler_walk import FunctionCompiler
from .pml.errors import PMLError
from .pml.escape import escape_attr

__all__ = ["prompt", "PromptFunction", "CompiledPrompt", "CompileError", "ArgumentTypeError",
           "DEFAULT_PARAM_LENGTH", "schema_name_for"]


# ------------------------------------------------------------------ public API


@dataclass(frozen=True)
class CompiledPrompt:
    """One call of a ``@prompt`` function: its schema, the prompt, and what was selected."""

    schema_name: str
    selected: list[ModulePath]
    """Paths of the selected modules in document order, e.g. ``[("if-L5",), ("if-L5", "case-1-L7")]``."""
    arguments: dict[ModulePath, dict[str, str]]
    """Parameter arguments per selected module that has parameters."""
    schema_text: str = field(repr=False)
    prompt_text: str = field(repr=False)

    def get_schema(self) -> str:
        return self.schema_text

    def get_prompt(self) -> str:
        return self.prompt_text


def schema_name_for(func: Callable[..., Any]) -> str:
    """``module.qualname`` made readable and XML/file-safe (``pkg.mod`` + ``f`` -> ``pkg-mod-f``).

    Derived from names only, never ``hash()``, so it is the same in every process.
    """
    raw = f"{func.__module__}.{func.__qualname__}"
    return re.sub(r"[^A-Za-z0-9_]+", "-", raw).strip("-")


_NAME_OK = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")


class PromptFunction:
    """A compiled ``@prompt`` function: call it with arguments to get a :class:`CompiledPrompt`."""

    def __init__(self, func: Callable[..., Any], *, name: str | None = None,
                 param_length: int = DEFAULT_PARAM_LENGTH,
                 lengths: dict[str, int] | None = None) -> None:
        functools.update_wrapper(self, func)
        compiler = FunctionCompiler(func, param_length, dict(lengths or {}))
        line = func.__code__.co_firstlineno
        if name is not None and not _NAME_OK.match(name):
            raise compiler.error(line, f"schema name {name!r}: use letters, digits, '_', '.', '-'")
        bad = {k: v for k, v in {"param_length": param_length, **(lengths or {})}.items()
               if not isinstance(v, int) or isinstance(v, bool) or v <= 0}
        if bad:
            raise compiler.error(line, f"slot lengths must be positive integers: {bad}")
        self.schema_name = name or schema_name_for(func)
        self._file = compiler.file
        self._items = compiler.compile()
        self._signature = inspect.signature(func)
        self._schema_text = render_schema(self.schema_name, self._items, self._file)

    def get_schema(self) -> str:
        """The PML ``<schema>`` text (the same for every call)."""
        return self._schema_text

    def __call__(self, *args: Any, **kwargs: Any) -> CompiledPrompt:
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        selected: list[ModulePath] = []
        arguments: dict[ModulePath, dict[str, str]] = {}
        sels = self._select(self._items, values, (), selected, arguments)
        out = [f"<prompt schema={escape_attr(self.schema_name)}>"]
        render_selections(sels, 1, out)
        out.append("</prompt>")
        return CompiledPrompt(self.schema_name, selected, arguments, self._schema_text,
                              "\n".join(out) + "\n")

    def _select(self, items: list[Item], values: dict[str, Any], path: ModulePath,
                selected: list[ModulePath], arguments: dict[ModulePath, dict[str, str]]
                ) -> list[SelectionItem]:
        sels = []
        for item in items:
            chosen: ModuleItem | None = None
            if isinstance(item, ModuleItem):
                chosen = item
            elif isinstance(item, UnionItem):
                if item.check is not None:
                    item.check(values)
                chosen = next((m for m in item.members if m.test and m.test.evaluate(values)),
                              None)
            if chosen is None:
                continue
            here = path + (chosen.name,)
            selected.append(here)
            args = {p.slot: self._argument(p, values) for lit in chosen.body
                    if isinstance(lit, Literal) for p in lit.pieces if isinstance(p, Hole)}
            if args:
                arguments[here] = args
            sels.append(SelectionItem(chosen.name, args,
                                   self._select(chosen.body, values, here, selected, arguments)))
        return sels

    def _argument(self, hole: Hole, values: dict[str, Any]) -> str:
        text = str(values[hole.param])
        try:
            escape_attr(text)  # fail here, naming the line, not later inside rendering
        except PMLError as exc:
            raise CompileError(f"argument {hole.param}: {exc.message}", self._file,
                               hole.line) from exc
        return text

    def __repr__(self) -> str:
        return f"<prompt function {self.__qualname__} schema={self.schema_name!r}>"


def prompt(func: Callable[..., Any] | None = None, /, *, name: str | None = None,
           param_length: int = DEFAULT_PARAM_LENGTH,
           lengths: dict[str, int] | None = None) -> Any:
    """Decorator: compile a function into a PML schema; calling it yields a :class:`CompiledPrompt`.

    Use bare (``@prompt``) or with options: ``name`` overrides the schema name, ``param_length``
    is the default slot length in tokens of an f-string hole, ``lengths`` sets it per parameter.
    A format spec in the hole (``{city:12}``) wins over both. Compile errors surface at decoration.
    """
    def wrap(f: Callable[..., Any]) -> PromptFunction:
        if not callable(f):
            raise TypeError(f"@prompt decorates a function, got {f!r}")
        return PromptFunction(f, name=name, param_length=param_length, lengths=lengths)

    return wrap(func) if func is not None else wrap
