"""The package's import graph has no cycle (imports inside functions included).

Every module of ``promptcache`` is parsed (``ast``, nothing is imported); each ``import`` and
``from ... import`` that names a module of the package, at any depth in the file, is an edge.
``from .x import name`` is an edge to ``x.name`` when that is a module, else to ``x``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import promptcache

PACKAGE = Path(promptcache.__file__).resolve().parent


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    mods = modules(root)
    top = root.name
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in mods else stem for a in node.names]
            for t in targets:
                while t and t not in mods and t.startswith(top):  # `import a.b.c` of a name inside a module
                    t = t.rpartition(".")[0]
                if t in mods and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle_inside_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_sees_imports_inside_functions(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "engine.py").write_text("from .sub.glue import Runner\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "glue.py").write_text("def f():\n    from ..engine import Result\n")
    assert find_cycle(import_graph(pkg)) == ["pkg.engine", "pkg.sub.glue", "pkg.engine"]


def test_lower_layers_do_not_import_upper_ones():
    """No upward import: runtime/ and models/ know nothing of the layers above them, and nothing
    below the engine facade imports it."""
    rules = {
        ("promptcache.runtime", "promptcache.models"): ("promptcache.engine", "promptcache.modules",
                                                        "promptcache.recompute", "promptcache.prefix"),
        ("promptcache.recompute", "promptcache.prefix", "promptcache.modules", "promptcache.plan",
         "promptcache.results"): ("promptcache.engine",),
    }
    for name, deps in import_graph().items():
        for lower, upper in rules.items():
            if name.startswith(lower):
                bad = sorted(d for d in deps if d.startswith(upper))
                assert not bad, f"{name} imports {bad}"


def private_imports(files: list[Path], packages: tuple[str, ...] = ("promptcache", "eval", "benchmarks")
                    ) -> list[str]:
    """``file:line name`` for each ``from <package>... import _name`` (a private name) in ``files``."""
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in packages:
                found += [f"{path.name}:{node.lineno} {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_issue14_tests_and_benchmarks_import_no_private_names():
    """Tests, benchmarks and the scripts use public names only (issue 14: nothing outside a module
    or class uses its private members; a name a test needs gets a public name)."""
    repo = PACKAGE.parent
    files = [*sorted((repo / "tests").glob("*.py")), *sorted((repo / "benchmarks").glob("*.py")),
             *(p for p in (repo / "demo.py", repo / "eval.py", repo / "eval_acc.py") if p.exists())]
    assert private_imports(files) == []


def test_the_private_import_finder_sees_one(tmp_path):
    bad = tmp_path / "t.py"
    bad.write_text("from promptcache.prefix.radix import RadixTree, _common_len\nfrom os import _exit\n")
    assert private_imports([bad]) == ["t.py:1 promptcache.prefix.radix._common_len"]
