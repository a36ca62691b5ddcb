"""The ``@prompt`` compiler's AST walk (:mod:`promptcache.compiler`): a function's source to the
intermediate representation of :mod:`.compiler_ir`, with errors naming the real source line.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from typing import Any, Callable, Union

from .compiler_ir import (FLIP, OPS, Always, Case, Compare, CompileError, Hole, Item, KindCheck, Literal,
                          ModuleItem, Not, Test, Truth, UnionItem, Where, value_kind)

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


def _assign_slots(body: list[Item]) -> None:
    """Name the parameters of one module: ``city``, then ``city-2`` for a repeated hole."""
    seen: dict[str, int] = {}
    for item in body:
        if isinstance(item, Literal):
            for piece in item.pieces:
                if isinstance(piece, Hole):
                    seen[piece.param] = seen.get(piece.param, 0) + 1
                    n = seen[piece.param]
                    piece.slot = piece.param if n == 1 else f"{piece.param}-{n}"


class FunctionCompiler:
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

    def compile(self) -> list[Item]:
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

    def root(self, stmts: list[ast.stmt]) -> list[Item]:
        """Top level: parameters are illegal outside modules, so wrap runs that hold holes."""
        scope, items, run = _Names(), [], []  # type: ignore[var-annotated]

        def flush() -> None:
            if any(isinstance(p, Hole) for lit in run for p in lit.pieces):
                wrapper = ModuleItem(scope.unique(f"text-L{run[0].line}"), run[0].line, list(run))
                _assign_slots(wrapper.body)
                items.append(wrapper)
            else:
                items.extend(run)
            run.clear()

        for stmt in stmts:
            item = self.statement(stmt, scope)
            if isinstance(item, Literal):
                run.append(item)
            elif item is not None:
                flush()
                items.append(item)
        flush()
        return items

    def body(self, stmts: list[ast.stmt]) -> list[Item]:
        """A branch body: its own module scope, so holes and nested unions are legal directly."""
        scope = _Names()
        items = [item for stmt in stmts if (item := self.statement(stmt, scope)) is not None]
        _assign_slots(items)
        return items

    def statement(self, stmt: ast.stmt, scope: _Names) -> Item | None:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) \
                and isinstance(stmt.value.value, str):
            text = stmt.value.value
            return Literal([text], stmt.lineno) if text.strip() else None
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

    def fstring(self, node: ast.JoinedStr, line: int) -> Literal | None:
        pieces: list[Union[str, Hole]] = []
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
            pieces.append(Hole(name, self.slot_length(name, value.format_spec, line), line))
        if not any(isinstance(p, Hole) or p.strip() for p in pieces):
            return None
        return Literal(pieces, line)

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

    def condition(self, expr: ast.expr, line: int) -> Test:
        where = Where(self.file, line, _snippet(expr))
        if isinstance(expr, ast.Name):
            return Truth(self.parameter(expr, line, "condition"), where)
        if isinstance(expr, ast.UnaryOp) and isinstance(expr.op, ast.Not):
            return Not(self.condition(expr.operand, line))
        if isinstance(expr, ast.Compare) and len(expr.ops) == 1 and type(expr.ops[0]) in OPS:
            op, left, right = type(expr.ops[0]), expr.left, expr.comparators[0]
            ok, literal = _literal_value(right)
            if not (ok and isinstance(left, ast.Name)):
                ok, literal = _literal_value(left)
                left, op = right, FLIP.get(op, op)
            if ok and isinstance(left, ast.Name):
                param = self.parameter(left, line, "condition")
                kind = value_kind(literal)
                if op in (ast.Is, ast.IsNot) and kind not in ("None", "bool"):
                    raise self.error(line, f"condition `{where.source}`: `is` only compares "
                                           "with None, True or False")
                if op in (ast.Lt, ast.LtE, ast.Gt, ast.GtE) and kind not in ("number", "str"):
                    raise self.error(line, f"condition `{where.source}`: ordering needs a number "
                                           "or string literal")
                return Compare(param, op, literal, where)
        raise self.error(line, f"unsupported condition `{where.source}`: use a parameter name "
                               "(`if flag:`), `not flag`, or a parameter compared with a literal "
                               "(`if lang == \"en\":`)")

    def parameter(self, name: ast.Name, line: int, what: str) -> str:
        if name.id not in self.params:
            raise self.error(line, f"{what} uses {name.id!r}, which is not a parameter of "
                                   f"{self.func.__name__}")
        return name.id

    def member(self, scope: _Names, base: str, line: int, stmts: list[ast.stmt],
               test: Test) -> ModuleItem:
        name = scope.unique(base)  # reserve before the body, which has its own scope
        return ModuleItem(name, line, self.body(stmts), test)

    def if_chain(self, node: ast.If, scope: _Names) -> UnionItem:
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
                                           Always()))
            return UnionItem(node.lineno, members)

    def match(self, node: ast.Match, scope: _Names) -> UnionItem:
        subject = node.subject
        where = Where(self.file, node.lineno, _snippet(subject))
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
            kinds |= {value_kind(v) for v in values}
            labels = [_label(v) for v in values] + (["default"] if wildcard else [])
            members.append(self.member(scope, f"case-{'-'.join(labels)}-L{line}", line,
                                       case.body, Case(param, values, wildcard)))
        return UnionItem(node.lineno, members, KindCheck(param, kinds, where))

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
