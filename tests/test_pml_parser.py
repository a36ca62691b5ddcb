"""Parser unit tests: every schema/prompt construct, and every error with the line it names."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from promptcache.pml.errors import PMLError, PMLSyntaxError, PromptError, SchemaError
from promptcache.pml.escape import escape_attr, escape_text
from promptcache.pml.model import Module, Parameter, RoleBlock, Text, UnionBlock
from promptcache.pml.parser import (MAX_PARAMETER_LENGTH, RESERVED_NAMES, load_prompt, load_schema,
                                    parse_prompt, parse_schema)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def schema(body: str, **kw):
    return parse_schema(textwrap.dedent(body), file="s.xml", **kw)


def prompt(body: str):
    return parse_prompt(textwrap.dedent(body), file="p.xml")


def error(cls, fn, body, **kw) -> PMLError:
    with pytest.raises(cls) as info:
        fn(body, **kw)
    return info.value


# ---------------------------------------------------------------- schema constructs


def test_full_schema_structure_and_locations():
    s = schema("""\
        <schema name="default">
          <module name="preface">
            Some text:
            <parameter name="p" length="5" scaffold=" [later] "/>
            <module name="nested">Nested</module>
            <system>
              <union scaffold="a">
                <module name="a">A.</module>
                <module name="b" cache="false">B <parameter name="msg" length="3"/></module>
              </union>
            </system>
          </module>
        </schema>
        """)
    assert s.name == "default" and s.file == "s.xml"
    assert s.root.name == "default" and s.root.loc.line == 1
    (preface,) = s.root.children
    assert isinstance(preface, Module) and preface.loc.line == 2 and preface.cache
    kinds = [type(c).__name__ for c in preface.children]
    assert kinds == ["Text", "Text", "Parameter", "Text", "Module", "RoleBlock"]
    text, sep1, param, sep2, nested, role = preface.children
    assert text.text == "Some text:" and text.loc.line == 3
    assert sep1.text == "\n" and sep1.loc.line == 4
    assert param == Parameter("p", 5, "[later]", param.loc) and param.loc.line == 4
    assert nested.name == "nested" and nested.children[0].text == "Nested" and nested.loc.line == 5
    assert role.role == "system" and not role.open and role.loc.line == 6
    (union,) = role.children
    assert isinstance(union, UnionBlock) and union.scaffold == "a" and union.loc.line == 7
    a, b = union.members
    assert (a.name, a.cache, a.loc.line) == ("a", True, 8)
    assert (b.name, b.cache, b.loc.line) == ("b", False, 9)
    assert [type(c).__name__ for c in b.children] == ["Text", "Text", "Parameter"]
    assert b.children[0].text == "B" and b.children[1].text == " " and b.children[2].length == 3
    assert all(n.loc.file == "s.xml" for n in (preface, text, param, nested, role, union, a, b))


def test_text_at_root_roles_at_root_and_in_modules():
    s = schema("""\
        <schema name="r">
          Intro.
          <user>Hi <module name="m">M</module></user>
          <module name="wrap"><assistant>Ok.</assistant></module>
        </schema>""")
    intro, user, wrap = s.root.children
    assert intro.text == "Intro."
    assert isinstance(user, RoleBlock) and user.role == "user"
    assert [c.text if isinstance(c, Text) else c.name for c in user.children] == ["Hi", " ", "m"]
    assert isinstance(wrap.children[0], RoleBlock) and wrap.children[0].role == "assistant"


def test_comments_are_ignored():
    s = schema("""\
        <schema name="c"><!-- a comment -->
          <module name="m">x<!-- inside -->y</module>
          <!-- <module name="m">duplicate inside a comment is fine</module> -->
        </schema>""")
    (m,) = s.root.children
    assert m.children[0].text == "xy"


def test_union_members_and_scaffold_optional():
    s = schema("""\
        <schema name="u"><union>
            <module name="x">X</module>

            <module name="y">Y</module>
        </union></schema>""")
    (u,) = s.root.children
    # issue 18: without the attribute the first member is the scaffold (the paper's default)
    assert u.scaffold == "x" and [m.name for m in u.members] == ["x", "y"]


def test_parameter_inside_role_inside_module():
    s = schema("""\
        <schema name="p"><module name="m"><user>Go to <parameter name="city" length="4"/>.</user></module></schema>""")
    role = s.root.children[0].children[0]
    assert [type(c).__name__ for c in role.children] == ["Text", "Text", "Parameter", "Text"]


def test_cache_and_open_values_case_insensitive():
    s = schema("""<schema name="b"><module name="m" cache=" FALSE ">x</module><user open="True">q</user></schema>""")
    assert s.root.children[0].cache is False and s.root.children[1].open is True


def test_reserved_names_constant_matches_brief():
    assert RESERVED_NAMES == {"system", "user", "assistant", "module", "union", "parameter", "schema",
                              "prompt"}


# ---------------------------------------------------------------- src= includes


def test_src_include_relative_to_schema_folder(tmp_path: Path):
    (tmp_path / "inc").mkdir()
    (tmp_path / "inc" / "code.py").write_text("\n    def f():\n        return 1 < 2\n\n", encoding="utf-8")
    path = tmp_path / "s.xml"
    path.write_text('<schema name="s">\n<module name="code" src="inc/code.py"/>\n</schema>')
    s = load_schema(path)
    (m,) = s.root.children
    assert m.children == [Text("def f():\n    return 1 < 2", m.children[0].loc)]
    assert m.children[0].loc.line == 2 and s.file == str(path)


def test_src_include_with_base_dir_and_preserve(tmp_path: Path):
    (tmp_path / "doc.txt").write_text("  keep\r\n  me  \n", encoding="utf-8")
    s = parse_schema('<schema name="s"><module name="d" src="doc.txt" xml:space="preserve">\n</module></schema>',
                     base_dir=tmp_path)
    assert s.root.children[0].children[0].text == "  keep\n  me  \n"


def test_src_missing_file_names_the_module_line(tmp_path: Path):
    e = error(SchemaError, parse_schema, '<schema name="s">\n\n<module name="d" src="nope.txt"/></schema>',
              file="s.xml", base_dir=tmp_path)
    assert e.line == 3 and "nope.txt" in e.message and e.file == "s.xml"


def test_src_directory_and_non_utf8(tmp_path: Path):
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    e = error(SchemaError, parse_schema, '<schema name="s"><module name="d" src="bin.txt"/></schema>',
              base_dir=tmp_path)
    assert "UTF-8" in e.message and e.line == 1
    e = error(SchemaError, parse_schema, '<schema name="s">\n<module name="d" src="."/></schema>',
              base_dir=tmp_path)
    assert e.line == 2


@pytest.mark.parametrize("content", ["text", "<module name='x'/>", "<!-- c --> x"])
def test_src_module_must_be_empty(tmp_path: Path, content: str):
    (tmp_path / "a.txt").write_text("a")
    e = error(SchemaError, parse_schema,
              f'<schema name="s">\n<module name="d" src="a.txt">{content}</module></schema>', base_dir=tmp_path)
    assert e.line == 2 and "src=" in e.message


def test_src_module_may_hold_whitespace_and_comments(tmp_path: Path):
    (tmp_path / "a.txt").write_text("a")
    s = parse_schema('<schema name="s"><module name="d" src="a.txt">\n  <!-- c -->\n</module></schema>',
                     base_dir=tmp_path)
    assert s.root.children[0].children[0].text == "a"


def test_empty_src_file_gives_empty_module(tmp_path: Path):
    (tmp_path / "e.txt").write_text("  \n")
    s = parse_schema('<schema name="s"><module name="d" src="e.txt"/></schema>', base_dir=tmp_path)
    assert s.root.children[0].children == []


# ---------------------------------------------------------------- open roles


def test_open_role_last_in_schema():
    s = schema("""\
        <schema name="qa">
          <system>Answer.</system>
          <user open="true">Read this:
            <module name="doc">The document.</module>
          </user>
          <!-- trailing comment is fine -->
        </schema>""")
    user = s.root.children[-1]
    assert user.open and user.children[-1].name == "doc"


def test_open_role_under_preserve_drops_trailing_whitespace():
    s = parse_schema('<schema name="qa" xml:space="preserve"><m-x/></schema>'.replace(
        "<m-x/>", '<module name="m"> <user open="true">x</user>\n</module>\n'))
    m = s.root.children[0]
    assert [type(c).__name__ for c in m.children] == ["Text", "RoleBlock"]
    assert len(s.root.children) == 1  # the whitespace after the module is dropped too


def test_open_role_nested_in_last_module_is_fine():
    s = schema("""<schema name="qa"><module name="m"><user open="true">x</user>  </module>\n</schema>""")
    assert s.root.children[0].children[0].open


@pytest.mark.parametrize("after, needle", [
    ('<module name="later">x</module>', "<module> on line 5"),
    ("trailing text", "text follows"),
    ("<assistant>no</assistant>", "<assistant> on line 5"),
])
def test_open_role_followed_by_content_is_rejected(after: str, needle: str):
    e = error(SchemaError, parse_schema,
              f'<schema name="qa">\n<module name="m">\n<user open="true">x</user>\n</module>\n{after}\n</schema>')
    assert e.line == 3 and needle in e.message


def test_open_role_inside_union_member_is_rejected():
    e = error(SchemaError, parse_schema,
              '<schema name="qa"><module name="m"><union>\n<module name="a">a</module>\n'
              '<module name="b"><user open="true">x</user></module></union></module></schema>')
    assert e.line == 3 and "union" in e.message


# ---------------------------------------------------------------- schema errors (with lines)


SCHEMA_ERRORS = [
    # (document, line, fragment of the message)
    ('<schema>\n</schema>', 1, 'name="..."'),
    ('<schema name="  "/>', 1, "empty"),
    ('<prompt schema="x"/>', 1, "must be <schema>"),
    ('<schema name="s" version="2"/>', 1, "unknown attribute 'version'"),
    ('<schema name="s">\n<modul name="m"/></schema>', 2, "unknown element <modul>"),
    ('<schema name="s">\n<module/></schema>', 2, 'name="..."'),
    ('<schema name="s">\n<module name="m" cached="no"/></schema>', 2, "unknown attribute 'cached'"),
    ('<schema name="s">\n<module name="m" cache="maybe"/></schema>', 2, "cache must be"),
    ('<schema name="s">\n<module name="m"/>\n<module name="m"/></schema>', 3, "first defined on line 2"),
    ('<schema name="s">\n<module name="m"/>\n<union><module name="m"/></union></schema>', 3, "duplicate"),
    ('<schema name="s">\n<union><module name="m"/></union>\n<module name="m"/></schema>', 3, "duplicate"),
    ('<schema name="s">\n<module name="m"/>\n<user><module name="m"/></user></schema>', 3, "duplicate"),
    ('<schema name="s"><module name="p">\n<module name="m"/>\n<system><union>\n<module name="m"/></union></system>'
     '</module></schema>', 4, "duplicate"),
    ('<schema name="s">\n<module name="user"/></schema>', 2, "reserved"),
    ('<schema name="s">\n<module name="prompt"/></schema>', 2, "reserved"),
    ('<schema name="s">\n<module name="1abc"/></schema>', 2, "not a valid PML name"),
    ('<schema name="s">\n<module name="a b"/></schema>', 2, "not a valid PML name"),
    ('<schema name="s">\n<union>\n</union></schema>', 2, "at least one"),
    ('<schema name="s">\n<union>\n<module name="a"/>\nstray\n</union></schema>', 4, "text is not allowed"),
    ('<schema name="s">\n<union>stray<module name="a"/></union></schema>', 2, "text is not allowed"),
    ('<schema name="s"><union>\n<module name="a"/>\n<parameter name="p" length="1"/></union></schema>', 3,
     "only <module>"),
    ('<schema name="s"><union>\n<user/></union></schema>', 2, "only <module>"),
    ('<schema name="s">\n<union scaffold="c"><module name="a"/></union></schema>', 2, "not one of its members"),
    ('<schema name="s">\n<union bogus="1"><module name="a"/></union></schema>', 2, "unknown attribute"),
    ('<schema name="s">\n<parameter name="p" length="3"/></schema>', 2, "inside a <module>"),
    ('<schema name="s">\n<user><parameter name="p" length="3"/></user></schema>', 2, "inside a <module>"),
    ('<schema name="s"><module name="m">\n<parameter length="3"/></module></schema>', 2, 'name="..."'),
    ('<schema name="s"><module name="m">\n<parameter name="p"/></module></schema>', 2, 'length="..."'),
    ('<schema name="s"><module name="m">\n<parameter name="p" length="0"/></module></schema>', 2, "positive"),
    ('<schema name="s"><module name="m">\n<parameter name="p" length="-2"/></module></schema>', 2, "positive"),
    ('<schema name="s"><module name="m">\n<parameter name="p" length="2.5"/></module></schema>', 2, "positive"),
    ('<schema name="s"><module name="m">\n<parameter name="p" length="ten"/></module></schema>', 2, "positive"),
    (f'<schema name="s"><module name="m">\n<parameter name="p" length="{MAX_PARAMETER_LENGTH + 1}"/>'
     '</module></schema>', 2, "maximum"),
    ('<schema name="s"><module name="m">\n<parameter name="p" length="2">x</parameter></module></schema>', 2,
     "cannot have content"),
    ('<schema name="s"><module name="m">\n<parameter name="p" length="2"><module name="q"/></parameter>'
     '</module></schema>', 2, "cannot have content"),
    ('<schema name="s"><module name="m">\n<parameter name="p" length="2" size="3"/></module></schema>', 2,
     "unknown attribute 'size'"),
    ('<schema name="s"><module name="m">\n<parameter name="p" length="2" xml:space="preserve"/></module>'
     '</schema>', 2, "unknown attribute 'xml:space'"),
    ('<schema name="s"><module name="m">\n<parameter name="p" length="2"/>\n<user><parameter name="p" '
     'length="2"/></user></module></schema>', 3, "first defined on line 2"),
    ('<schema name="s">\n<user>\n<system>x</system></user></schema>', 3, "do not nest"),
    ('<schema name="s">\n<user><module name="m">\n<assistant>x</assistant></module></user></schema>', 3,
     "do not nest"),
    ('<schema name="s">\n<user open="yes">x</user></schema>', 2, "open must be"),
    ('<schema name="s">\n<user role="x">x</user></schema>', 2, "unknown attribute 'role'"),
    ('<schema name="s">\n<module name="m" xml:space="keep"/></schema>', 2, "xml:space"),
    ('<schema name="s" xmlns:x="urn:x">\n<x:module name="m"/></schema>', 2, "namespaced"),
    ('<schema name="s" xmlns:x="urn:x">\n<module name="m" x:cache="true"/></schema>', 2, "unknown attribute"),
]


@pytest.mark.parametrize("doc, line, fragment", SCHEMA_ERRORS)
def test_schema_errors_name_their_line(doc: str, line: int, fragment: str):
    e = error(SchemaError, parse_schema, doc, file="bad.xml")
    assert e.line == line, str(e)
    assert fragment in e.message, str(e)
    assert str(e).startswith(f"bad.xml:{line}: ")


def test_nesting_depth_is_bounded():
    depth = 70
    doc = '<schema name="s">' + "".join(f'<module name="m{i}">' for i in range(depth)) + \
          "x" + "</module>" * depth + "</schema>"
    e = error(SchemaError, parse_schema, doc)
    assert "nested more than" in e.message


# ---------------------------------------------------------------- XML-level safety


def test_malformed_xml_reports_line_and_column():
    e = error(PMLSyntaxError, parse_schema, '<schema name="s">\n<module name="m">\n</schema>', file="x.xml")
    assert (e.file, e.line) == ("x.xml", 3) and e.column is not None
    assert str(e).startswith("x.xml:3:")
    assert not re.search(r"line \d+, column \d+$", e.message)  # lxml's own suffix is removed


@pytest.mark.parametrize("doc", ["", "   ", "just text", "<schema name='s'>", "<a><b></a>", "\x00",
                                 '<schema name="s">&undefined;</schema>', '<schema name="s">&#1;</schema>'])
def test_malformed_inputs_raise_syntax_errors(doc: str):
    with pytest.raises(PMLSyntaxError):
        parse_schema(doc)
    with pytest.raises(PMLSyntaxError):
        parse_prompt(doc)


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<schema name="s"><module name="m">&lol3;</module></schema>
"""


@pytest.mark.parametrize("doc, line", [
    (BILLION_LAUGHS, 2),
    ('<!DOCTYPE schema SYSTEM "http://example.com/x.dtd">\n<schema name="s"/>', 1),
    ('<?xml version="1.0"?>\n<!-- c -->\n<!doctype schema>\n<schema name="s"/>', 3),
    ('<!DOCTYPE s [<!ENTITY x SYSTEM "file:///etc/passwd">]><schema name="s">&x;</schema>', 1),
])
def test_doctype_and_entities_are_refused(doc: str, line: int):
    for fn in (parse_schema, parse_prompt):
        e = error(PMLSyntaxError, fn, doc, file="d.xml")
        assert e.line == line and "DOCTYPE" in e.message


def test_doctype_text_inside_cdata_is_just_text():
    s = parse_schema('<schema name="s"><module name="page"><![CDATA[<!DOCTYPE html>\n<p>&amp;</p>]]>'
                     '</module></schema>')
    assert s.root.children[0].children[0].text == "<!DOCTYPE html>\n<p>&amp;</p>"


def test_encoding_declarations_in_str_and_bytes():
    s = parse_schema('<?xml version="1.0" encoding="ISO-8859-1"?>\n<schema name="s">caf\u00e9</schema>')
    assert s.root.children[0].text == "caf\u00e9"
    s = parse_schema('<?xml version="1.0" encoding="ISO-8859-1"?><schema name="s">caf\u00e9</schema>'
                     .encode("latin-1"))
    assert s.root.children[0].text == "caf\u00e9"
    s = parse_schema("\ufeff<schema name='s'>x</schema>".encode("utf-16"))
    assert s.root.children[0].text == "x"
    e = error(PMLSyntaxError, parse_schema, b'<?xml version="1.0" encoding="no-such"?><schema name="s"/>')
    assert "no-such" in e.message
    e = error(PMLSyntaxError, parse_schema, b'<schema name="s">\n\xff</schema>')
    assert e.line == 2


def test_processing_instructions_are_dropped():
    s = parse_schema('<schema name="s">a<?pi data?>b</schema>')
    assert s.root.children[0].text == "ab"


# ---------------------------------------------------------------- prompts


def test_prompt_selections_arguments_and_suffix():
    p = prompt("""\
        <prompt schema="default">
          <preface param-name="  test value ">
            <nested/>
            <system3 message="just a test"/>
          </preface>
          <task><task-robot-control speed="fast"/></task>
          <user>What next?</user>
          <assistant>Forward.</assistant>
          <system>Be brief.</system>
          Then some text.
        </prompt>""")
    assert p.schema == "default" and p.file == "p.xml" and p.loc.line == 1
    preface, task = p.selections
    assert preface.name == "preface" and preface.args == {"param-name": "test value"}
    assert [c.name for c in preface.children] == ["nested", "system3"]
    assert preface.children[1].args == {"message": "just a test"} and preface.children[1].loc.line == 4
    assert task.children[0].name == "task-robot-control" and task.loc.line == 6
    assert [(t.role, t.text, t.loc.line) for t in p.suffix] == [
        ("user", "What next?", 7), ("assistant", "Forward.", 8), ("system", "Be brief.", 9),
        (None, "Then some text.", 10)]


def test_prompt_suffix_separators():
    p = parse_prompt('<prompt schema="qa"><doc/>Question: why?</prompt>')
    assert [t.text for t in p.suffix] == ["Question: why?"]
    p = parse_prompt('<prompt schema="qa"><doc/> Question: why?</prompt>')
    assert [t.text for t in p.suffix] == [" Question: why?"]
    p = parse_prompt('<prompt schema="qa">\n  <doc/>\n  Question:\n    why?\n</prompt>')
    assert [t.text for t in p.suffix] == ["\nQuestion:\n  why?"]
    p = parse_prompt('<prompt schema="qa">\n  Only text\n</prompt>')
    assert [t.text for t in p.suffix] == ["Only text"]  # first piece of the prompt: no separator
    p = parse_prompt('<prompt schema="qa"><doc/>\n<user>\n   Q?\n</user>\nafter the turn</prompt>')
    assert [(t.role, t.text) for t in p.suffix] == [("user", "Q?"), (None, "after the turn")]


def test_prompt_with_no_selections_and_no_suffix():
    p = parse_prompt('<prompt schema="s"/>')
    assert p.selections == [] and p.suffix == []
    p = parse_prompt('<prompt schema="s"><user/></prompt>')
    assert [(t.role, t.text) for t in p.suffix] == [("user", "")]


def test_prompt_preserve():
    p = parse_prompt('<prompt schema="s"><a/>\n  keep  \n<user xml:space="preserve">  two\n   lines </user>'
                     '</prompt>')
    assert [t.text for t in p.suffix] == ["\nkeep", "  two\n   lines "]
    p = parse_prompt('<prompt schema="s" xml:space="preserve"><a/>\n  keep  \n<user>  x </user></prompt>')
    assert [t.text for t in p.suffix] == ["\n  keep  \n", "  x "]


PROMPT_ERRORS = [
    ('<prompt>\n</prompt>', 1, 'schema="..."'),
    ('<prompt schema=" "/>', 1, "must name a schema"),
    ('<schema name="s"/>', 1, "must be <prompt>"),
    ('<prompt schema="s" model="x"/>', 1, "unknown attribute 'model'"),
    ('<prompt schema="s">\nhello\n<a/></prompt>', 3, "after the prompt's trailing text (line 2)"),
    ('<prompt schema="s"><a/>\n<user>q</user>\n<b/></prompt>', 3, "after the prompt's trailing <user> turn"),
    ('<prompt schema="s"><a/>\n<assistant>q</assistant>\ntext\n<b/></prompt>', 4, "must come before"),
    ('<prompt schema="s">\n<a>\ninside\n</a></prompt>', 3, "text is not allowed inside selection <a>"),
    ('<prompt schema="s"><a>\n<b>x</b></a></prompt>', 2, "inside selection <b>"),
    ('<prompt schema="s"><a>\n<user>q</user></a></prompt>', 2, "turn <user> inside selection <a>"),
    ('<prompt schema="s">\n<user>Hi <a/></user></prompt>', 2, "cannot contain elements"),
    ('<prompt schema="s">\n<user\n>Hi\n<b>x</b></user></prompt>', 4, "cannot contain elements"),
    ('<prompt schema="s">\n<user open="true">x</user></prompt>', 2, "unknown attribute 'open'"),
    ('<prompt schema="s">\n<module name="a"/></prompt>', 2, "is not a selection"),
    ('<prompt schema="s">\n<a xml:space="preserve"/></prompt>', 2, "not a parameter name"),
    ('<prompt schema="s" xmlns:x="urn:x">\n<x:a/></prompt>', 2, "namespaced"),
    ('<prompt schema="s">\n<user xml:space="x">q</user></prompt>', 2, "xml:space"),
]


@pytest.mark.parametrize("doc, line, fragment", PROMPT_ERRORS)
def test_prompt_errors_name_their_line(doc: str, line: int, fragment: str):
    e = error(PromptError, parse_prompt, doc, file="bad.prompt.xml")
    assert e.line == line, str(e)
    assert fragment in e.message, str(e)
    assert str(e).startswith(f"bad.prompt.xml:{line}: ")


def test_deep_selection_nesting_is_bounded():
    doc = '<prompt schema="s">' + "<a>" * 70 + "</a>" * 70 + "</prompt>"
    assert "nested more than" in error(PromptError, parse_prompt, doc).message


def test_load_errors_are_pml_errors(tmp_path: Path):
    e = error(SchemaError, load_schema, tmp_path / "missing.xml")
    assert e.file == str(tmp_path / "missing.xml")
    e = error(PromptError, load_prompt, tmp_path / "missing.prompt.xml")
    assert "cannot read" in e.message


# ---------------------------------------------------------------- escaping


ROUND_TRIP = ["plain", "a < b && c > d", "x]]>y", "]]>", "]]]]>>", "<![CDATA[nested]]>", "tab\there",
              "cr\r\nlf", "lone\rcr", "  lead and trail  \n", "unicode \u00e9\u4e2d\U0001f600", "&amp; literal",
              ""]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_escape_text_round_trips_verbatim_under_preserve(text: str):
    s = parse_schema(f'<schema name="s" xml:space="preserve"><module name="m">{escape_text(text)}</module>'
                     "</schema>")
    got = "".join(c.text for c in s.root.children[0].children)
    assert got == text


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_escape_text_round_trips_normalised(text: str):
    from promptcache.pml.whitespace import normalize_text
    s = parse_schema(f'<schema name="s"><module name="m">\n{escape_text(text)}\n</module></schema>')
    got = "".join(c.text for c in s.root.children[0].children)
    assert got == normalize_text("\n" + text + "\n")


@pytest.mark.parametrize("value", ["plain", 'quote " and \' apostrophe', "a < b & c", "multi\nline\ttab",
                                   "cr\r"])
def test_escape_attr_round_trips(value: str):
    p = parse_prompt(f'<prompt schema="s"><m arg={escape_attr(value)}/></prompt>')
    assert p.selections[0].args["arg"] == value.strip()


def test_escape_rejects_unrepresentable_characters():
    with pytest.raises(PMLError):
        escape_text("bell \x07")
    with pytest.raises(PMLError):
        escape_attr("nul \x00")


def test_escape_text_leaves_plain_text_alone_and_uses_cdata_for_code():
    assert escape_text("hello world") == "hello world"
    assert escape_text("if a < b:") == "<![CDATA[if a < b:]]>"


# ---------------------------------------------------------------- examples


EXAMPLE_NAMES = ["code_generation_game", "persona", "travel", "document_qa", "nested"]


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_examples_parse(name: str):
    s = load_schema(EXAMPLES / f"{name}.xml")
    p = load_prompt(EXAMPLES / f"{name}.prompt.xml")
    assert p.schema == s.name


def test_code_example_keeps_code_exact():
    s = load_schema(EXAMPLES / "code_generation_game.xml")
    modules = {}

    def walk(nodes):
        for n in nodes:
            if isinstance(n, Module):
                modules[n.name] = n
                walk(n.children)
            elif isinstance(n, RoleBlock):
                walk(n.children)

    walk(s.root.children)
    assert {"unit.py", "map.py", "player.py", "game.py", "database.py"} <= set(modules)
    code = modules["map.py"].children[0].text
    assert code.startswith("# map.py")
    assert "        return 0 <= x < self.width and 0 <= y < self.height" in code
    compile(code, "map.py", "exec")  # indentation survived: it is still valid Python
    for name in ("unit.py", "player.py", "game.py", "database.py"):
        compile(modules[name].children[0].text, name, "exec")
    assert "&" in modules["unit.py"].children[0].text


def test_persona_example_has_six_unions_with_scaffolds():
    s = load_schema(EXAMPLES / "persona.xml")
    system = s.root.children[0]
    unions = [m.children[0] for m in system.children if isinstance(m, Module)]
    assert len(unions) == 6 and all(isinstance(u, UnionBlock) and u.scaffold for u in unions)
    assert [m.name for m in system.children if isinstance(m, Module)] == [
        "age", "residence", "education", "occupation", "marital-status", "personality"]


def test_document_qa_example_uses_src_and_open_turn():
    s = load_schema(EXAMPLES / "document_qa.xml")
    user = s.root.children[-1]
    assert user.open and user.children[-1].name == "doc"
    doc_text = user.children[-1].children[0].text
    assert doc_text == (EXAMPLES / "document_qa.txt").read_text(encoding="utf-8").strip()
    assert 250 <= len(doc_text.split()) <= 400
