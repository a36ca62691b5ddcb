"""Whitespace rules of PML text (docs/pml.md, "Whitespace"): dedent + strip, one separator between
pieces, separator placement, role boundaries and xml:space="preserve"."""

from __future__ import annotations

import textwrap

import pytest

from promptcache.pml.model import Module, Parameter, RoleBlock, Text, UnionBlock
from promptcache.pml.parser import parse_prompt, parse_schema
from promptcache.pml.whitespace import dedent, normalize_text, separator, split_blank


def render(nodes, pick: int = 0) -> str:
    """Concatenate a schema's text in document order (union member ``pick``; roles as [r]..[/r])."""
    out = []
    for n in nodes:
        if isinstance(n, Text):
            out.append(n.text)
        elif isinstance(n, Parameter):
            out.append("{" + n.name + "}")
        elif isinstance(n, Module):
            out.append(render(n.children, pick))
        elif isinstance(n, UnionBlock):
            out.append(render(n.members[pick].children, pick))
        elif isinstance(n, RoleBlock):
            out.append(f"[{n.role}]" + render(n.children, pick) + ("" if n.open else f"[/{n.role}]"))
    return "".join(out)


def kids(doc: str):
    return parse_schema(doc).root.children


# ---------------------------------------------------------------- helpers


def test_dedent_removes_common_indent_only():
    assert dedent("    a\n      b\n    c") == "a\n  b\nc"
    assert dedent("\ta\n\t\tb") == "a\n\tb"
    assert dedent("  a\n\tb") == "  a\n\tb"  # no common prefix between tab and spaces


def test_dedent_blank_lines_do_not_count_and_keep_extra_whitespace():
    assert dedent("    a\n\n    b") == "a\n\nb"
    assert dedent("    a\n  \n    b") == "a\n\nb"  # shorter than the prefix: emptied
    assert dedent("    a\n        \n    b") == "a\n    \nb"  # longer: keeps what is beyond the prefix


def test_dedent_first_line_after_markup_counts_as_its_source_line():
    assert dedent("Hello\n      world", first_indent="    ") == "Hello\n  world"
    assert dedent("Hello\n      world") == "Hello\n      world"  # plain dedent: first line indent 0
    assert dedent("\n    a\n      b", first_indent="") == "\na\n  b"  # blank first line: ignored


def test_normalize_and_split():
    assert normalize_text("\n    x\n      y\n  ") == "x\n  y"
    assert normalize_text(" \t\n ") == ""
    assert normalize_text("\u00a0x\u00a0") == "\u00a0x\u00a0"  # NBSP is text, not XML whitespace
    assert split_blank("  a b \n") == ("  ", "a b", " \n")
    assert split_blank(" \n ") == (" \n ", "", "")


@pytest.mark.parametrize("gap, sep", [("", ""), (" ", " "), ("\t  ", " "), ("  \n\t ", "\n"), ("\n\n\n", "\n")])
def test_separator(gap: str, sep: str):
    assert separator(gap) == sep


# ---------------------------------------------------------------- separators in schemas


def test_separator_prepended_to_following_text():
    (m,) = kids('<schema name="s"><module name="m">a<parameter name="p" length="1"/>  b\n'
                '<parameter name="q" length="1"/>\n\n  c<parameter name="r" length="1"/>d</module></schema>')
    texts = [c.text for c in m.children if isinstance(c, Text)]
    assert texts == ["a", " b", "\n", "\nc", "d"]


def test_separator_before_element_is_its_own_text_in_the_parent():
    root = kids('<schema name="s">intro\n  <module name="a">A</module> <module name="b">B</module>'
                '<module name="c">C</module></schema>')
    assert [(type(n).__name__, getattr(n, "text", getattr(n, "name", None))) for n in root] == [
        ("Text", "intro"), ("Text", "\n"), ("Module", "a"), ("Text", " "), ("Module", "b"), ("Module", "c")]
    assert root[2].children[0].text == "A"  # the separator is not inside the module


def test_separator_before_union_is_shared_by_members():
    root = kids('<schema name="s">Pick:\n<union><module name="a">A</module>\n<module name="b">B</module>'
                '</union></schema>')
    assert [getattr(n, "text", None) for n in root[:2]] == ["Pick:", "\n"]
    union = root[2]
    assert [m.children[0].text for m in union.members] == ["A", "B"]
    assert render(root, 0) == "Pick:\nA" and render(root, 1) == "Pick:\nB"


def test_first_piece_of_any_container_has_no_separator():
    root = kids('<schema name="s">\n\n   <module name="m">\n   <module name="n">x</module>  y\n</module>\n'
                '<system>\n  <module name="o">o</module>\n</system></schema>')
    m, system = root
    assert isinstance(m.children[0], Module)  # no Text("\n") before the first piece
    assert m.children[1].text == " y"
    assert isinstance(system.children[0], Module) and len(system.children) == 1


def test_no_separator_around_role_tags():
    root = kids('<schema name="s">before\n<system>\n  sys\n</system>\n\n<user> u </user> after'
                '<assistant>a</assistant></schema>')
    assert render(root) == "before[system]sys[/system][user]u[/user]after[assistant]a[/assistant]"


def test_no_whitespace_means_no_separator():
    root = kids('<schema name="s">a<module name="m">b</module>c</schema>')
    assert render(root) == "abc" and len(root) == 3


def test_blank_runs_vanish_and_gaps_collapse():
    (m,) = kids('<schema name="s"><module name="m">\n   \n  <module name="a">a</module>\n  <!-- c -->\n \n'
                '  <module name="b">b</module>   </module></schema>')
    assert [type(c).__name__ for c in m.children] == ["Module", "Text", "Module"]
    assert m.children[1].text == "\n"


def test_indented_prose_renders_like_typed_text():
    doc = textwrap.dedent("""\
        <schema name="s">
          <system>
            You are a planner. Plans for
            <module name="trip">
              a trip to <parameter name="city" length="3" scaffold="x"/>
              from <parameter name="when" length="3"/>,
              for <parameter name="who" length="2"/> people.
            </module>
            Be brief.
          </system>
        </schema>""")
    assert render(kids(doc)) == ("[system]You are a planner. Plans for\na trip to {city}\nfrom {when},\n"
                                 "for {who} people.\nBe brief.[/system]")


def test_text_starting_on_the_tag_line_dedents_relative_to_that_line():
    (m,) = kids('<schema name="s">\n    <module name="m">First line,\n      second line\n        deeper\n'
                '    </module></schema>')
    assert m.children[0].text == "First line,\n  second line\n    deeper"


def test_code_in_cdata_keeps_inner_indentation():
    doc = textwrap.dedent("""\
        <schema name="s">
          <module name="code">
            <![CDATA[
            def f(xs):
                if xs and xs[0] < 3 & 1:

                    return [x for x in xs
                            if x]
                return None
            ]]>
          </module>
        </schema>""")
    (m,) = kids(doc)
    assert m.children[0].text == ("def f(xs):\n    if xs and xs[0] < 3 & 1:\n\n        return [x for x in xs\n"
                                  "                if x]\n    return None")


def test_flush_left_cdata_code_is_untouched():
    code = "class A:\n    def f(self):\n        return 1\n\n\nx = A()"
    (m,) = kids(f'<schema name="s">\n  <module name="c">\n    <![CDATA[\n{code}\n]]>\n  </module>\n</schema>')
    assert m.children[0].text == code


# ---------------------------------------------------------------- xml:space


def test_preserve_keeps_text_verbatim_inside_the_element():
    (m,) = kids('<schema name="s"><module name="m" xml:space="preserve">\n  a  <module name="n"> n </module>\n'
                '\n</module></schema>')
    assert [c.text if isinstance(c, Text) else c.name for c in m.children] == ["\n  a  ", "n", "\n\n"]
    assert m.children[1].children[0].text == " n "  # inherited by descendants


def test_preserve_can_be_switched_back_with_default():
    m, tail = kids('<schema name="s" xml:space="preserve"><module name="m" xml:space="default">\n  a  \n'
                   '</module>  tail  </schema>')
    assert m.children[0].text == "a" and tail.text == "  tail  "


def test_preserve_on_role_and_union():
    root = kids('<schema name="s"><user xml:space="preserve"> hi </user><union xml:space="preserve">\n'
                '<module name="a"> a </module>\n</union></schema>')
    assert root[0].children[0].text == " hi "
    assert root[1].members[0].children[0].text == " a "


def test_preserve_only_inside_the_element_not_its_tail():
    root = kids('<schema name="s"><module name="m" xml:space="preserve"> x </module>\n   tail   </schema>')
    assert root[1].text == "\ntail"


# ---------------------------------------------------------------- prompts


def test_prompt_turn_text_is_normalised():
    p = parse_prompt('<prompt schema="s">\n  <user>\n    Line one\n      indented\n  </user>\n</prompt>')
    assert p.suffix[0].text == "Line one\n  indented"


def test_prompt_argument_values_are_only_stripped():
    p = parse_prompt('<prompt schema="s"><m a="  two  spaces  " b=" x "/></prompt>')
    assert p.selections[0].args == {"a": "two  spaces", "b": "x"}
