"""Tests for the @prompt compiler: schema/prompt structure, branch selection, parameters, stable
names and errors that name the right source line.

Functions whose line numbers matter are written to a temporary module file, with ``# <-`` marking
the line an error must name, so the expected line is read from the source instead of hard-coded.
"""

from __future__ import annotations

import importlib.util
import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from lxml import etree

from promptcache.compiler import (DEFAULT_PARAM_LENGTH, ArgumentTypeError, CompileError, prompt,
                                  schema_name_for)
from promptcache.pml.binding import bind
from promptcache.pml.errors import PMLError
from promptcache.pml.layout import build_layout
from promptcache.pml.model import Module, Parameter, Text, UnionBlock
from promptcache.pml.parser import parse_prompt, parse_schema
from promptcache.pml.toyrenderer import ToyRenderer

ROOT = Path(__file__).resolve().parents[1]
_counter = itertools.count()


def load(tmp_path: Path, source: str):
    """Write ``source`` as a fresh module, import it; return (module, file, line marked ``# <-``)."""
    source = textwrap.dedent(source)
    name = f"compiled_mod_{next(_counter)}"
    path = tmp_path / f"{name}.py"
    path.write_text(source, encoding="utf-8")
    marked = [i for i, line in enumerate(source.splitlines(), 1) if "# <-" in line]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    return module, spec, str(path), (marked[0] if marked else None)


def exec_module(module, spec) -> None:
    spec.loader.exec_module(module)


def compile_error(tmp_path: Path, source: str) -> tuple[CompileError, str, int]:
    """Import a module whose @prompt function must fail to compile; return the error."""
    module, spec, file, line = load(tmp_path, source)
    with pytest.raises(CompileError) as info:
        exec_module(module, spec)
    return info.value, file, line


def assert_names(err: PMLError, file: str, line: int) -> None:
    assert err.line == line, str(err)
    assert err.file == file
    assert str(err).startswith(f"{file}:{line}: ")


def xml(text: str) -> etree._Element:
    return etree.fromstring(text.encode("utf-8"))


def prompt_paths(prompt_text: str) -> list[tuple[str, ...]]:
    """Selected module paths read back from the prompt XML (document order)."""
    out: list[tuple[str, ...]] = []

    def walk(el: etree._Element, path: tuple[str, ...]) -> None:
        for child in el:
            here = path + (child.tag,)
            out.append(here)
            walk(child, here)

    walk(xml(prompt_text), ())
    return out


# ------------------------------------------------------------------ the running example


@prompt
def assistant(flag: bool, item: int, city: str):
    "You are a helpful assistant."
    if flag:
        "Be brief."
        "Use bullet points."
    else:
        "Be thorough."
        "Explain every step."
        if city == "Paris":
            "Mention the Louvre."
    match item:
        case 1:
            "Item one."
            if not flag:
                f"Item one without flag, near {city:8}."
        case 2 | 3:
            "Item two or three."
    f"Plan a trip to {city:12}."
    "Answer the user."


LINE = assistant.__wrapped__.__code__.co_firstlineno  # the @prompt line


def L(offset: int) -> int:
    """Real line of the statement ``offset`` lines below ``@prompt`` in ``assistant``."""
    return LINE + offset


def test_schema_structure_and_scaffolds():
    root = xml(assistant.get_schema())
    assert root.tag == "schema" and root.get("name") == schema_name_for(assistant.__wrapped__)
    assert root.text.strip() == "You are a helpful assistant."
    unions = root.findall("union")
    assert [[m.get("name") for m in u.findall("module")] for u in unions] == [
        [f"if-L{L(3)}", f"else-L{L(3)}"], [f"case-1-L{L(12)}", f"case-2-3-L{L(16)}"]]
    assert [u.get("scaffold") for u in unions] == [f"if-L{L(3)}", f"case-1-L{L(12)}"]
    # the unconditional f-string run (and the literal after it) is wrapped so its parameter is legal
    wrapper = root.find(f"module[@name='text-L{L(18)}']")
    assert wrapper is not None
    assert "".join(wrapper.itertext()).split() == ["Plan", "a", "trip", "to", ".", "Answer",
                                                   "the", "user."]
    assert wrapper.find("parameter").attrib == {"name": "city", "length": "12"}
    assert not root.xpath("/schema/parameter")  # no parameter outside a module


def test_else_body_keeps_all_statements_and_nested_if():
    root = xml(assistant.get_schema())
    else_module = root.find(f"union/module[@name='else-L{L(3)}']")
    assert else_module.text.split("\n")[1:3] == ["Be thorough.", "Explain every step."]
    nested = else_module.findall("union/module")
    assert [m.get("name") for m in nested] == [f"if-L{L(9)}"]
    assert nested[0].text.strip() == "Mention the Louvre."


@pytest.mark.parametrize("flag,item,city,expected", [
    (True, 1, "Rome", [("if",), ("case-1",), ("text",)]),
    (False, 1, "Rome", [("else",), ("case-1",), ("case-1", "if"), ("text",)]),
    (False, 2, "Paris", [("else",), ("else", "if"), ("case-2-3",), ("text",)]),
    (True, 3, "Paris", [("if",), ("case-2-3",), ("text",)]),
    (True, 4, "Oslo", [("if",), ("text",)]),  # no case matches and no `case _`: nothing
])
def test_prompt_selects_what_the_branches_chose(flag, item, city, expected):
    r = assistant(flag, item, city)
    strip = [tuple(name.rsplit("-L", 1)[0] for name in path) for path in r.selected]
    assert strip == expected
    assert prompt_paths(r.get_prompt()) == r.selected
    root = xml(r.get_prompt())
    assert root.tag == "prompt" and root.get("schema") == r.schema_name == assistant.schema_name
    assert root.find(f"text-L{L(18)}").attrib == {"city": city}
    assert r.get_schema() == assistant.get_schema()


def test_nested_selection_carries_its_own_arguments():
    r = assistant(False, 1, "Lyon")
    inner = xml(r.get_prompt()).find(f"case-1-L{L(12)}/if-L{L(14)}")
    assert inner.attrib == {"city": "Lyon"}
    assert r.arguments[(f"case-1-L{L(12)}", f"if-L{L(14)}")] == {"city": "Lyon"}
    slot = xml(r.get_schema()).find(f".//module[@name='if-L{L(14)}']/parameter")
    assert slot.attrib == {"name": "city", "length": "8"}


def test_keyword_arguments_and_defaults():
    @prompt
    def greet(name: str, formal: bool = False):
        if formal:
            "Dear"
        f"{name}"

    wrapper = xml(greet.get_schema()).find("module").get("name")
    assert greet("Ann").selected == [(wrapper,)]
    assert greet("Ann").arguments == {(wrapper,): {"name": "Ann"}}
    assert len(greet(name="Ann", formal=True).selected) == 2
    with pytest.raises(TypeError):
        greet()  # missing argument: the usual Python TypeError from binding


# ------------------------------------------------------------------ parameters


def test_slot_lengths_spec_default_and_overrides():
    @prompt(param_length=5, lengths={"b": 24})
    def f(a: str, b: str, c: str):
        f"{a} {b} {c:3} {a!s}"

    @prompt
    def g(a: str):
        f"{a}"

    params = xml(f.get_schema()).findall(".//parameter")
    assert [(p.get("name"), p.get("length")) for p in params] == [
        ("a", "5"), ("b", "24"), ("c", "3"), ("a-2", "5")]  # a repeated hole gets its own slot
    assert xml(g.get_schema()).find(".//parameter").get("length") == str(DEFAULT_PARAM_LENGTH)
    r = f(1, 2.5, None)
    assert list(r.arguments.values()) == [{"a": "1", "b": "2.5", "c": "None", "a-2": "1"}]


def test_argument_values_are_attribute_escaped():
    @prompt
    def f(x: str):
        f"Say {x}"

    value = 'a "quoted" <tag> & a\nnewline\tand tab'
    sel = xml(f(value).get_prompt())[0]
    assert sel.get("x") == value


def test_text_is_escaped_and_round_trips():
    @prompt
    def f(x: str):
        "if a < b && c > d: print(']]>')"
        f"{x} < 3 & more"

    root = xml(f.get_schema())
    text = "".join(root.itertext())
    assert "if a < b && c > d: print(']]>')" in text
    assert "< 3 & more" in text


def test_empty_string_and_pass_produce_nothing():
    @prompt
    def f(flag: bool):
        ""
        if flag:
            pass
        else:
            ""

    root = xml(f.get_schema())
    assert not (root.text or "").strip()
    assert [len(m) + len((m.text or "").strip()) for m in root.findall("union/module")] == [0, 0]
    assert len(f(False).selected) == 1  # the (empty) else member is still the chosen one


# ------------------------------------------------------------------ conditions and match


def test_elif_chain_first_true_wins_and_later_conditions_are_not_evaluated():
    @prompt
    def f(lang: str, n: int):
        if lang == "en":
            "English"
        elif 3 < n:
            "big"
        elif n is None:
            "none"
        else:
            "other"

    names = [m.get("name").split("-L")[0] for m in xml(f.get_schema()).findall("union/module")]
    assert names == ["if", "elif", "elif", "else"]
    assert f("en", "not an int").selected[0][0].startswith("if-")  # n never looked at
    assert f("fr", 5).selected[0][0].startswith("elif-")
    assert f("fr", 1).selected[0][0].startswith("else-")
    assert f(None, 1).selected[0][0].startswith("else-")  # None == "en" is just False


def test_if_without_else_selects_nothing_when_false():
    @prompt
    def f(flag: bool):
        "a"
        if not flag:
            "b"

    assert len(xml(f.get_schema()).findall("union/module")) == 1
    assert f(True).selected == []
    assert xml(f(True).get_prompt()).getchildren() == []
    assert len(f(False).selected) == 1


def test_match_strings_bools_none_and_wildcard():
    @prompt
    def f(lang, ok):
        match lang:
            case "en" | "en-GB":
                "English"
            case None:
                "none"
            case "" | "!!":
                "odd"
            case _:
                "fallback"
        match ok:
            case True:
                "yes"

    names = [m.get("name").rsplit("-L", 1)[0] for m in xml(f.get_schema()).iter("module")]
    assert names == ["case-en-en_GB", "case-None", "case-empty-str", "case-default", "case-True"]
    assert [p[0].rsplit("-L", 1)[0] for p in f("en-GB", True).selected] == ["case-en-en_GB",
                                                                           "case-True"]
    assert [p[0].rsplit("-L", 1)[0] for p in f(None, False).selected] == ["case-None"]
    assert [p[0].rsplit("-L", 1)[0] for p in f("de", False).selected] == ["case-default"]
    assert [p[0].rsplit("-L", 1)[0] for p in f("!!", False).selected] == ["case-empty-str"]


# ------------------------------------------------------------------ names


def test_schema_name_from_module_and_qualname_and_override():
    @prompt(name="my.schema-1")
    def f():
        "x"

    @prompt
    def g():
        "x"

    assert f.schema_name == "my.schema-1" and f().schema_name == "my.schema-1"
    assert g.schema_name == f"{__name__.replace('.', '-')}-test_schema_name_from_module_and_" \
                            "qualname_and_override-locals-g"
    assert assistant.schema_name == f"{__name__.replace('.', '-')}-assistant"
    with pytest.raises(CompileError):
        prompt(name="has space")(g.__wrapped__)


def test_schema_is_stable_across_processes(tmp_path):
    (tmp_path / "stable_prompts.py").write_text(textwrap.dedent('''
        from promptcache.compiler import prompt

        @prompt
        def trip(flag: bool, city: str, kind: str):
            "Plan it."
            if flag:
                f"Go to {city:6}."
            match kind:
                case "a" | "b":
                    "A or B."
                case _:
                    "Other."
    '''))
    script = ("import stable_prompts as m; r = m.trip(True, 'Oslo', 'b'); "
              "print(m.trip.schema_name); print(r.get_schema()); print(r.get_prompt())")
    outs = []
    for seed in ("1", "2"):
        env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        outs.append(done.stdout)
    assert outs[0] == outs[1]
    assert outs[0].splitlines()[0] == "stable_prompts-trip"


def test_module_names_are_unique_in_scope():
    @prompt
    def f(a: int):
        match a:
            case 1: "x"
            case 2: "y"
        if a == 1: "p"
        else: "q"

    root = xml(f.get_schema())
    for scope in [root, *root.iter("module")]:
        names = [m.get("name") for m in scope.xpath("module | union/module")]
        assert len(names) == len(set(names))


# ------------------------------------------------------------------ compile errors name the line


@pytest.mark.parametrize("body,needle", [
    ('x = 1  # <-', "unsupported statement `x = 1`"),
    ('for i in range(3):  # <-\n    "x"', "For"),
    ('print("hi")  # <-', "unsupported statement `print('hi')`"),
    ('return "x"  # <-', "Return"),
    ('if flag:\n    "ok"\nelse:\n    y = 2  # <-', "unsupported statement"),
    ('match item:\n    case 1:\n        while flag:  # <-\n            "x"', "While"),
])
def test_unsupported_statement_names_its_line(tmp_path, body, needle):
    err, file, line = compile_error(tmp_path, f'''
        from promptcache.compiler import prompt

        @prompt
        def f(flag: bool, item: int):
            "intro"
{textwrap.indent(body, " " * 12)}
    ''')
    assert_names(err, file, line)
    assert needle in err.message


@pytest.mark.filterwarnings("ignore::SyntaxWarning")  # `item is 3` is rejected on purpose
@pytest.mark.parametrize("cond", [
    "flag and item", "item > 2 > 1", "len(flag)", "other", "flag == item", "item in (1, 2)",
    "item is 3", "flag < True",
])
def test_bad_condition_names_its_line(tmp_path, cond):
    err, file, line = compile_error(tmp_path, f'''
        from promptcache.compiler import prompt

        @prompt
        def f(flag: bool, item: int):
            "intro"
            if flag:
                "a"
            elif {cond}:  # <-
                "b"
    ''')
    assert_names(err, file, line)


@pytest.mark.parametrize("source", [
    'match item + 1:  # <-\n    case 1:\n        "x"',
    'match item:\n    case 1:\n        "x"\n    case y:  # <-\n        "y"',
    'match item:\n    case 1 if flag:  # <-\n        "x"',
    'match item:\n    case [1, 2]:  # <-\n        "x"',
    'match nobody:  # <-\n    case 1:\n        "x"',
])
def test_bad_match_names_its_line(tmp_path, source):
    err, file, line = compile_error(tmp_path, f'''
        from promptcache.compiler import prompt

        @prompt
        def f(flag: bool, item: int):
{textwrap.indent(source, " " * 12)}
    ''')
    assert_names(err, file, line)


@pytest.mark.parametrize("hole,needle", [
    ("{city.upper()}", "bare parameter name"),
    ("{city + 'x'}", "bare parameter name"),
    ("{town}", "not a parameter"),
    ("{city!r}", "str() conversion"),
    ("{city:>10}", "positive integer"),
    ("{city:0}", "positive integer"),
])
def test_bad_fstring_hole_names_its_line(tmp_path, hole, needle):
    err, file, line = compile_error(tmp_path, f'''
        from promptcache.compiler import prompt

        @prompt(
            name="multi-line-decorator",
        )
        def f(flag: bool, city: str):
            "intro"
            if flag:
                f"Visit {hole} now."  # <-
    ''')
    assert_names(err, file, line)
    assert needle in err.message


def test_indented_function_with_column_zero_string(tmp_path):
    """Dedenting fails when a multi-line string has lines at column 0; lines must still be right."""
    source = (
        "from promptcache.compiler import prompt\n"
        "\n"
        "class Box:\n"
        "    @prompt\n"
        "    def f(flag: bool):\n"
        '        """Line one\n'
        'line two at column zero"""\n'
        "        if flag:\n"
        '            "yes"\n'
        "        x = 1\n"
    )
    path = tmp_path / "column_zero.py"
    path.write_text(source)
    with pytest.raises(CompileError) as info:
        exec(compile(source, str(path), "exec"), {})
    assert_names(info.value, str(path), 10)


def test_bad_options_are_rejected():
    def f(a: str):
        f"{a}"

    with pytest.raises(CompileError, match="not a parameter"):
        prompt(lengths={"b": 3})(f)
    with pytest.raises(CompileError, match="positive"):
        prompt(param_length=0)(f)

    def g(*args):
        "x"

    with pytest.raises(CompileError, match=r"\*args"):
        prompt(g)


# ------------------------------------------------------------------ call-time type errors


CALL_TIME = '''
    from promptcache.compiler import prompt

    @prompt
    def f(flag, item, lang):
        "intro"
        if flag:  # <- flag
            "a"
        match item:  # <- item
            case 1:
                "one"
            case 2:
                if lang == "en":  # <- lang
                    "english"
'''


@pytest.mark.parametrize("args,which", [
    (("yes", 1, "en"), "flag"),
    ((1, 1, "en"), "flag"),
    ((True, "1", "en"), "item"),
    ((True, True, "en"), "item"),  # bool is not an int case
    ((False, 2, 7), "lang"),
])
def test_wrong_argument_type_names_its_line(tmp_path, args, which):
    module, spec, file, _ = load(tmp_path, CALL_TIME)
    exec_module(module, spec)
    line = next(i for i, text in enumerate(textwrap.dedent(CALL_TIME).splitlines(), 1)
                if f"# <- {which}" in text)
    with pytest.raises(ArgumentTypeError) as info:
        module.f(*args)
    assert isinstance(info.value, TypeError) and isinstance(info.value, CompileError)
    assert_names(info.value, file, line)
    assert repr(args[["flag", "item", "lang"].index(which)]) in info.value.message
    module.f(True, 2, "en")  # and the right types are fine


def test_unrepresentable_argument_names_the_hole_line(tmp_path):
    module, spec, file, line = load(tmp_path, '''
        from promptcache.compiler import prompt

        @prompt
        def f(x):
            "intro"
            f"value {x}"  # <-
    ''')
    exec_module(module, spec)
    with pytest.raises(CompileError) as info:
        module.f("bad\x00byte")
    assert_names(info.value, file, line)


def test_negative_and_float_case_literals():
    @prompt
    def f(n):
        match n:
            case -1 | 2.5:
                "odd"
            case 0:
                "zero"

    names = [m.get("name").rsplit("-L", 1)[0] for m in xml(f.get_schema()).iter("module")]
    assert names == ["case-neg1-2_5", "case-0"]
    assert f(-1).selected[0][0].startswith("case-neg1-2_5")
    assert f(2.5).selected[0][0].startswith("case-neg1-2_5")
    assert f(1).selected == []


def test_unrepresentable_literal_and_unsupported_functions(tmp_path):
    err, file, line = compile_error(tmp_path, '''
        from promptcache.compiler import prompt

        @prompt
        def f():
            "fine"
            "bell \\x07"  # <-
    ''')
    assert_names(err, file, line)

    err, file, line = compile_error(tmp_path, '''
        from promptcache.compiler import prompt

        @prompt  # <-
        async def f():
            "x"
    ''')
    assert_names(err, file, line)

    namespace: dict = {}
    exec("def g():\n    'x'\n", namespace)  # no source file to read
    with pytest.raises(CompileError, match="cannot read the source"):
        prompt(namespace["g"])


# ------------------------------------------------------------------ round trip through the PML parser

def rendered(children, path, selected, args) -> str:
    """The prompt text a parsed schema yields for the selected module paths and their arguments."""
    out = []
    for child in children:
        if isinstance(child, Text):
            out.append(child.text)
        elif isinstance(child, Parameter):
            out.append(args[path][child.name])
        elif isinstance(child, Module) and path + (child.name,) in selected:
            out.append(rendered(child.children, path + (child.name,), selected, args))
        elif isinstance(child, UnionBlock):
            out.extend(rendered([m], path, selected, args) for m in child.members)
    return "".join(out)


def round_trip(r):
    """Parse and bind a call's schema and prompt; return the bound prompt."""
    schema = parse_schema(r.get_schema())
    prompt_doc = parse_prompt(r.get_prompt())
    assert schema.name == prompt_doc.schema == r.schema_name
    renderer = ToyRenderer()
    return schema, bind(prompt_doc, build_layout(schema, renderer), renderer)


@pytest.mark.parametrize("flag,item,city", list(itertools.product(
    [True, False], [1, 2, 3, 4], ["Rome", "Paris", '"Q"&<C>'])))
def test_round_trip_parses_and_binds(flag, item, city):
    r = assistant(flag, item, city)
    schema, bound = round_trip(r)
    assert bound.selected == {(), *r.selected}
    assert {k: v for k, v in bound.parameter_text.items() if v} == r.arguments
    text = rendered(schema.root.children, (), bound.selected, bound.parameter_text)
    assert text.startswith("You are a helpful assistant.\n")
    assert text.endswith(f"Plan a trip to {city}.\nAnswer the user.")
    assert ("Be brief.\nUse bullet points." in text) == flag
    assert ("Be thorough.\nExplain every step." in text) == (not flag)
    assert ("Mention the Louvre." in text) == (not flag and city == "Paris")
    assert ("Item one." in text) == (item == 1)
    assert (f"Item one without flag, near {city}." in text) == (item == 1 and not flag)
    assert ("Item two or three." in text) == (item in (2, 3))


def test_round_trip_exact_text():
    r = assistant(True, 2, "Oslo")
    schema, bound = round_trip(r)
    assert rendered(schema.root.children, (), bound.selected, bound.parameter_text) == (
        "You are a helpful assistant.\nBe brief.\nUse bullet points.\nItem two or three.\n"
        "Plan a trip to Oslo.\nAnswer the user.")


def test_round_trip_keeps_markup_characters_and_code_indentation():
    @prompt
    def f(x: str):
        "Code:\n    if a < b && c:\n        print(']]>')"
        f"{x} < 3 & {x}!"

    schema, bound = round_trip(f("y"))
    assert rendered(schema.root.children, (), bound.selected, bound.parameter_text) == (
        "Code:\n    if a < b && c:\n        print(']]>')\ny < 3 & y!")


def test_bool_is_not_an_int_case():
    """Python's match would pick `case 1` for True (True == 1); here bool and int never mix."""
    @prompt
    def f(v):
        match v:
            case 1:
                "one"
            case True:
                "true"

    assert f(True).selected[0][0].startswith("case-True-")
    assert f(1).selected[0][0].startswith("case-1-")
    assert f(1.0).selected[0][0].startswith("case-1-")
