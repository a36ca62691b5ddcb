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

import ast
import functools
import inspect
import operator
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from .pml.errors import PMLError
from .pml.escape import escape_attr, escape_text

__all__ = ["prompt", "PromptFunction", "CompiledPrompt", "CompileError", "ArgumentTypeError",
           "DEFAULT_PARAM_LENGTH", "schema_name_for"]

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
class _Hole:
    """An f-string hole: the PML parameter ``slot`` (unique in its module) filled by ``param``."""

    param: str
    length: int
    line: int
    slot: str = ""


@dataclass
class _Literal:
    """One string statement: text pieces and holes, in order."""

    pieces: list[Union[str, _Hole]]
    line: int


@dataclass
class _Module:
    """A generated module: a union member (``test`` says when it is chosen) or a text wrapper."""

    name: str
    line: int
    body: list["_Item"]
    test: "_Test | None" = None


@dataclass
class _Union:
    """An ``if`` chain or a ``match``: members are tried in order, the first true one is chosen."""

    line: int
    members: list[_Module]
    check: "_KindCheck | None" = None


_Item = Union[_Literal, _Module, _Union]


# ------------------------------------------------------------------ call-time tests


def _kind(value: Any) -> str:
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
class _Where:
    file: str | None
    line: int
    source: str  # the condition or subject as written, for messages

    def type_error(self, message: str) -> ArgumentTypeError:
        return ArgumentTypeError(message, self.file, self.line)


@dataclass
class _Truth:
    """``if name:`` -- the argument must be a bool, so a string like "no" cannot pass as true."""

    param: str
    where: _Where

    def evaluate(self, args: dict[str, Any]) -> bool:
        value = args[self.param]
        if not isinstance(value, bool):
            raise self.where.type_error(
                f"condition `{self.where.source}` needs a bool for {self.param!r}, "
                f"got {value!r} ({type(value).__name__})")
        return value


@dataclass
class _Not:
    inner: "_Test"

    def evaluate(self, args: dict[str, Any]) -> bool:
        return not self.inner.evaluate(args)


_OPS: dict[type, tuple[str, Callable[[Any, Any], bool]]] = {
    ast.Eq: ("==", operator.eq), ast.NotEq: ("!=", operator.ne),
    ast.Lt: ("<", operator.lt), ast.LtE: ("<=", operator.le),
    ast.Gt: (">", operator.gt), ast.GtE: (">=", operator.ge),
    ast.Is: ("is", operator.is_), ast.IsNot: ("is not", operator.is_not),
}
_FLIP = {ast.Lt: ast.Gt, ast.Gt: ast.Lt, ast.LtE: ast.GtE, ast.GtE: ast.LtE}


@dataclass
class _Compare:
    """``param OP literal``: the argument must be of the literal's type (None passes ==/!=)."""

    param: str
    op: type
    literal: Any
    where: _Where

    def evaluate(self, args: dict[str, Any]) -> bool:
        value = args[self.param]
        want = _kind(self.literal)
        equality = self.op in (ast.Eq, ast.NotEq, ast.Is, ast.IsNot)
        if want != "None" and _kind(value) != want and not (value is None and equality):
            raise self.where.type_error(
                f"condition `{self.where.source}` compares {self.param!r} with a "
                f"{_KIND_NAMES[want]}, got {value!r} ({type(value).__name__})")
        return bool(_OPS[self.op][1](value, self.literal))


@dataclass
class _Case:
    """One ``case``: equal to one of ``values`` (same type family), or anything for ``_``."""

    param: str
    values: list[Any]
    wildcard: bool

    def evaluate(self, args: dict[str, Any]) -> bool:
        value = args[self.param]
        return self.wildcard or any(_kind(value) == _kind(v) and value == v for v in self.values)


@dataclass
class _Always:
    def evaluate(self, args: dict[str, Any]) -> bool:
        return True


_Test = Union[_Truth, _Not, _Compare, _Case, _Always]


@dataclass
class _KindCheck:
    """A ``match`` subject must be of a type its cases are written in (or None)."""

    param: str
    kinds: set[str]
    where: _Where

    def __call__(self, args: dict[str, Any]) -> None:
        value = args[self.param]
        if self.kinds and value is not None and _kind(value) not in self.kinds:
            want = " or ".join(sorted(_KIND_NAMES[k] for k in self.kinds))
            raise self.where.type_error(
                f"`match {self.where.source}` has {want} cases, got {value!r} "
                f"({type(value).__name__})")


# ------------------------------------------------------------------ compiling


class _Names:
    """Module names already used in one PML scope (a module's children and union members)."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def unique(self, base: str) -> str:
        name, n = base, 2
        while name in self.used:
            name, n = f"{base}-{n}", n + 1
        self.used.add(name)
        return name


def _snippet(node: ast.AST, width: int = 60) -> str:
    text = ast.unparse(node).split("\n")[0]
    return text if len(text) <= width else text[: width - 3] + "..."


def _literal_value(node: ast.expr) -> tuple[bool, Any]:
    """(True, value) for an int/float/str/bool/None literal, incl. a negative number."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str, bool, type(None)):
        return True, node.value
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
            and isinstance(node.operand, ast.Constant) and type(node.operand.value) in (int, float)):
        return True, -node.operand.value
    return False, None


def _label(value: Any) -> str:
    """A readable, XML-name-safe rendering of a case literal for a module name."""
    if isinstance(value, str):
        if not value:
            return "empty"
        return re.sub(r"[^0-9A-Za-z_]+", "_", value).strip("_")[:24] or "str"
    text = str(value).replace(".", "_")
    return "neg" + text[1:] if text.startswith("-") else text


def _assign_slots(body: list[_Item]) -> None:
    """Name the parameters of one module: ``city``, then ``city-2`` for a repeated hole."""
    seen: dict[str, int] = {}
    for item in body:
        if isinstance(item, _Literal):
            for piece in item.pieces:
                if isinstance(piece, _Hole):
                    seen[piece.param] = seen.get(piece.param, 0) + 1
                    n = seen[piece.param]
                    piece.slot = piece.param if n == 1 else f"{piece.param}-{n}"


class _Compiler:
    """Walks the function's AST once and builds the intermediate representation."""

    def __init__(self, func: Callable[..., Any], param_length: int,
                 lengths: dict[str, int]) -> None:
        self.func = func
        self.file = inspect.getsourcefile(func) or func.__code__.co_filename
        self.param_length = param_length
        self.lengths = lengths
        self.params: set[str] = set()

    def error(self, line: int, message: str) -> CompileError:
        return CompileError(message, self.file, line)

    def compile(self) -> list[_Item]:
        fn = self.parse()
        self.check_signature(fn)
        return self.root(fn.body)

    def parse(self) -> ast.FunctionDef:
        first = self.func.__code__.co_firstlineno
        try:
            source = inspect.getsource(self.func)
        except (OSError, TypeError) as exc:
            raise self.error(first, f"cannot read the source of {self.func.__qualname__} ({exc}); "
                                    "@prompt needs a function defined in a source file") from exc
        try:
            tree = ast.parse(textwrap.dedent(source))
            ast.increment_lineno(tree, first - 1)
            node = tree.body[0]
        except SyntaxError:  # dedent fails when a multi-line string has lines at column 0
            tree = ast.parse("if 1:\n" + source)
            ast.increment_lineno(tree, first - 2)
            node = tree.body[0].body[0]  # type: ignore[attr-defined]
        if not isinstance(node, ast.FunctionDef):
            raise self.error(first, f"@prompt needs a plain `def` function, got "
                                    f"{type(node).__name__}")
        return node

    def check_signature(self, fn: ast.FunctionDef) -> None:
        for p in inspect.signature(self.func).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise self.error(fn.lineno, f"@prompt functions cannot take *{p.name}/**{p.name}: "
                                            "conditions and holes must name fixed parameters")
            self.params.add(p.name)
        unknown = sorted(set(self.lengths) - self.params)
        if unknown:
            raise self.error(fn.lineno, f"lengths= names {', '.join(unknown)}, which "
                                        f"{'is' if len(unknown) == 1 else 'are'} not a parameter "
                                        f"of {fn.name}")

    def root(self, stmts: list[ast.stmt]) -> list[_Item]:
        """Top level: parameters are illegal outside modules, so wrap runs that hold holes."""
        scope, items, run = _Names(), [], []  # type: ignore[var-annotated]

        def flush() -> None:
            if any(isinstance(p, _Hole) for lit in run for p in lit.pieces):
                wrapper = _Module(scope.unique(f"text-L{run[0].line}"), run[0].line, list(run))
                _assign_slots(wrapper.body)
                items.append(wrapper)
            else:
                items.extend(run)
            run.clear()

        for stmt in stmts:
            item = self.statement(stmt, scope)
            if isinstance(item, _Literal):
                run.append(item)
            elif item is not None:
                flush()
                items.append(item)
        flush()
        return items

    def body(self, stmts: list[ast.stmt]) -> list[_Item]:
        """A branch body: its own module scope, so holes and nested unions are legal directly."""
        scope = _Names()
        items = [item for stmt in stmts if (item := self.statement(stmt, scope)) is not None]
        _assign_slots(items)
        return items

    def statement(self, stmt: ast.stmt, scope: _Names) -> _Item | None:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) \
                and isinstance(stmt.value.value, str):
            text = stmt.value.value
            return _Literal([text], stmt.lineno) if text.strip() else None
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.JoinedStr):
            return self.fstring(stmt.value, stmt.lineno)
        if isinstance(stmt, ast.If):
            return self.if_chain(stmt, scope)
        if isinstance(stmt, ast.Match):
            return self.match(stmt, scope)
        if isinstance(stmt, ast.Pass):
            return None
        raise self.error(stmt.lineno, f"unsupported statement `{_snippet(stmt)}` "
                                      f"({type(stmt).__name__}): a @prompt body may only hold "
                                      "string literals, f-strings, if, match and pass")

    def fstring(self, node: ast.JoinedStr, line: int) -> _Literal | None:
        pieces: list[Union[str, _Hole]] = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                pieces.append(value.value)
                continue
            assert isinstance(value, ast.FormattedValue)
            hole = "{" + _snippet(value.value) + "}"
            if not isinstance(value.value, ast.Name):
                raise self.error(line, f"f-string hole {hole} must be a bare parameter name")
            name = value.value.id
            if name not in self.params:
                raise self.error(line, f"f-string hole {hole}: {name!r} is not a parameter of "
                                       f"{self.func.__name__}")
            if value.conversion not in (-1, ord("s")):
                raise self.error(line, f"f-string hole {hole}: only str() conversion is allowed "
                                       f"(the slot is filled with str({name}))")
            pieces.append(_Hole(name, self.slot_length(name, value.format_spec, line), line))
        if not any(isinstance(p, _Hole) or p.strip() for p in pieces):
            return None
        return _Literal(pieces, line)

    def slot_length(self, name: str, spec: ast.expr | None, line: int) -> int:
        if spec is None:
            return self.lengths.get(name, self.param_length)
        parts = spec.values if isinstance(spec, ast.JoinedStr) else []
        text = parts[0].value if len(parts) == 1 and isinstance(parts[0], ast.Constant) else None
        if not isinstance(text, str) or not text.isdigit() or int(text) <= 0:
            raise self.error(line, f"f-string hole {{{name}:...}}: the format spec is the slot "
                                   f"length in tokens and must be a positive integer, e.g. "
                                   f"{{{name}:12}}")
        return int(text)

    # -- conditions

    def condition(self, expr: ast.expr, line: int) -> _Test:
        where = _Where(self.file, line, _snippet(expr))
        if isinstance(expr, ast.Name):
            return _Truth(self.parameter(expr, line, "condition"), where)
        if isinstance(expr, ast.UnaryOp) and isinstance(expr.op, ast.Not):
            return _Not(self.condition(expr.operand, line))
        if isinstance(expr, ast.Compare) and len(expr.ops) == 1 and type(expr.ops[0]) in _OPS:
            op, left, right = type(expr.ops[0]), expr.left, expr.comparators[0]
            ok, literal = _literal_value(right)
            if not (ok and isinstance(left, ast.Name)):
                ok, literal = _literal_value(left)
                left, op = right, _FLIP.get(op, op)
            if ok and isinstance(left, ast.Name):
                param = self.parameter(left, line, "condition")
                kind = _kind(literal)
                if op in (ast.Is, ast.IsNot) and kind not in ("None", "bool"):
                    raise self.error(line, f"condition `{where.source}`: `is` only compares "
                                           "with None, True or False")
                if op in (ast.Lt, ast.LtE, ast.Gt, ast.GtE) and kind not in ("number", "str"):
                    raise self.error(line, f"condition `{where.source}`: ordering needs a number "
                                           "or string literal")
                return _Compare(param, op, literal, where)
        raise self.error(line, f"unsupported condition `{where.source}`: use a parameter name "
                               "(`if flag:`), `not flag`, or a parameter compared with a literal "
                               "(`if lang == \"en\":`)")

    def parameter(self, name: ast.Name, line: int, what: str) -> str:
        if name.id not in self.params:
            raise self.error(line, f"{what} uses {name.id!r}, which is not a parameter of "
                                   f"{self.func.__name__}")
        return name.id

    def member(self, scope: _Names, base: str, line: int, stmts: list[ast.stmt],
               test: _Test) -> _Module:
        name = scope.unique(base)  # reserve before the body, which has its own scope
        return _Module(name, line, self.body(stmts), test)

    def if_chain(self, node: ast.If, scope: _Names) -> _Union:
        members, current, kind = [], node, "if"
        while True:
            test = self.condition(current.test, current.lineno)
            members.append(self.member(scope, f"{kind}-L{current.lineno}", current.lineno,
                                       current.body, test))
            rest = current.orelse
            # `elif` is an If alone in orelse starting in the same column as its `if`
            if len(rest) == 1 and isinstance(rest[0], ast.If) \
                    and rest[0].col_offset == current.col_offset:
                current, kind = rest[0], "elif"
                continue
            if rest:
                members.append(self.member(scope, f"else-L{node.lineno}", rest[0].lineno, rest,
                                           _Always()))
            return _Union(node.lineno, members)

    def match(self, node: ast.Match, scope: _Names) -> _Union:
        subject = node.subject
        where = _Where(self.file, node.lineno, _snippet(subject))
        if not isinstance(subject, ast.Name):
            raise self.error(node.lineno, f"`match {where.source}`: the subject must be a "
                                          "parameter name")
        param = self.parameter(subject, node.lineno, "match")
        members, kinds = [], set()
        for case in node.cases:
            line = case.pattern.lineno
            if case.guard is not None:
                raise self.error(line, f"case guard `if {_snippet(case.guard)}` is not supported")
            values, wildcard = self.pattern(case.pattern, line)
            kinds |= {_kind(v) for v in values}
            labels = [_label(v) for v in values] + (["default"] if wildcard else [])
            members.append(self.member(scope, f"case-{'-'.join(labels)}-L{line}", line,
                                       case.body, _Case(param, values, wildcard)))
        return _Union(node.lineno, members, _KindCheck(param, kinds, where))

    def pattern(self, pat: ast.pattern, line: int) -> tuple[list[Any], bool]:
        if isinstance(pat, ast.MatchValue):
            ok, value = _literal_value(pat.value)
            if ok:
                return [value], False
        elif isinstance(pat, ast.MatchSingleton):
            return [pat.value], False
        elif isinstance(pat, ast.MatchAs) and pat.pattern is None and pat.name is None:
            return [], True
        elif isinstance(pat, ast.MatchOr):
            values, wildcard = [], False
            for alt in pat.patterns:
                more, wild = self.pattern(alt, line)
                values += more
                wildcard = wildcard or wild
            return values, wildcard
        raise self.error(line, f"unsupported case pattern `{_snippet(pat)}`: use int, str, bool "
                               "or None literals (alternatives with |) or _")


# ------------------------------------------------------------------ PML text

# Text goes at column 0 and tags are indented: the parser dedents each text run by its common
# indent, and a run that starts right after an inline <parameter/> has no indent of its own, so
# indenting text would leak the indentation into the prompt.


def _render_literal(lit: _Literal) -> str:
    out = []
    for piece in lit.pieces:
        if isinstance(piece, _Hole):
            out.append(f"<parameter name={escape_attr(piece.slot)} length=\"{piece.length}\"/>")
        else:
            out.append(escape_text(piece))
    return "".join(out)


def _render_items(items: list[_Item], depth: int, out: list[str], file: str | None) -> None:
    pad = "  " * depth
    for item in items:
        if isinstance(item, _Literal):
            try:
                out.append(_render_literal(item))
            except PMLError as exc:
                raise CompileError(exc.message, file, item.line) from exc
        elif isinstance(item, _Union):
            out.append(f"{pad}<union scaffold={escape_attr(item.members[0].name)}>")
            _render_items(item.members, depth + 1, out, file)
            out.append(f"{pad}</union>")
        elif not item.body:
            out.append(f"{pad}<module name={escape_attr(item.name)}/>")
        else:
            out.append(f"{pad}<module name={escape_attr(item.name)}>")
            _render_items(item.body, depth + 1, out, file)
            out.append(f"{pad}</module>")


def _render_schema(name: str, items: list[_Item], file: str | None) -> str:
    out = [f"<schema name={escape_attr(name)}>"]
    _render_items(items, 1, out, file)
    out.append("</schema>")
    return "\n".join(out) + "\n"


@dataclass
class _Selection:
    name: str
    args: dict[str, str]
    children: list["_Selection"] = field(default_factory=list)


def _render_selections(sels: list[_Selection], depth: int, out: list[str]) -> None:
    pad = "  " * depth
    for s in sels:
        attrs = "".join(f" {k}={escape_attr(v)}" for k, v in s.args.items())
        if not s.children:
            out.append(f"{pad}<{s.name}{attrs}/>")
            continue
        out.append(f"{pad}<{s.name}{attrs}>")
        _render_selections(s.children, depth + 1, out)
        out.append(f"{pad}</{s.name}>")


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
        compiler = _Compiler(func, param_length, dict(lengths or {}))
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
        self._schema_text = _render_schema(self.schema_name, self._items, self._file)

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
        _render_selections(sels, 1, out)
        out.append("</prompt>")
        return CompiledPrompt(self.schema_name, selected, arguments, self._schema_text,
                              "\n".join(out) + "\n")

    def _select(self, items: list[_Item], values: dict[str, Any], path: ModulePath,
                selected: list[ModulePath], arguments: dict[ModulePath, dict[str, str]]
                ) -> list[_Selection]:
        sels = []
        for item in items:
            chosen: _Module | None = None
            if isinstance(item, _Module):
                chosen = item
            elif isinstance(item, _Union):
                if item.check is not None:
                    item.check(values)
                chosen = next((m for m in item.members if m.test and m.test.evaluate(values)),
                              None)
            if chosen is None:
                continue
            here = path + (chosen.name,)
            selected.append(here)
            args = {p.slot: self._argument(p, values) for lit in chosen.body
                    if isinstance(lit, _Literal) for p in lit.pieces if isinstance(p, _Hole)}
            if args:
                arguments[here] = args
            sels.append(_Selection(chosen.name, args,
                                   self._select(chosen.body, values, here, selected, arguments)))
        return sels

    def _argument(self, hole: _Hole, values: dict[str, Any]) -> str:
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
