"""Fuzzing the parser: whatever the input, only PMLError (or success) may come out, quickly.

Inputs are the example files mutated (byte flips, truncation, deletions, random tag insertion,
entity/DOCTYPE injection) plus generated tag soup. A parsed schema is also laid out with the toy
renderer, since the layout must not fail with anything but a PMLError either.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promptcache.pml.errors import PMLError, PMLSyntaxError
from promptcache.pml.layout import build_layout
from promptcache.pml.parser import parse_prompt, parse_schema
from promptcache.pml.toyrenderer import ToyRenderer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# Small documents keep every example fast: the big code example is cut to its first 3 KB.
SOURCES = [p.read_bytes()[:3000] for p in sorted(EXAMPLES.glob("*.xml"))]
assert len(SOURCES) >= 10

SNIPPETS = [
    b"<module name='m'>", b"</module>", b"<union>", b"</union>", b"<union scaffold='zz'>",
    b"<parameter name='p' length='3'/>", b"<parameter name='p' length='99999999999999'/>",
    b"<user open='true'>", b"</user>", b"<system>", b"<assistant/>", b"<schema name='x'>", b"<prompt>",
    b"<![CDATA[", b"]]>", b"<!--", b"-->", b"<?pi x?>", b"&amp;", b"&lt;", b"&#0;", b"&#x10FFFF;", b"&lol;",
    b"&", b"<", b">", b"\x00", b"\xff\xfe", b"\xef\xbb\xbf", b"\r\n", b"xml:space='preserve'",
    b"<!DOCTYPE schema [<!ENTITY lol 'lol'><!ENTITY lol2 '&lol;&lol;&lol;&lol;'>]>",
    b"<!DOCTYPE x SYSTEM 'file:///etc/passwd'>", b"<!ENTITY e SYSTEM 'http://example.com/'>",
    b"<?xml version='1.0' encoding='utf-16'?>", b"<?xml version='1.0' encoding='bogus'?>",
    b"<x:module xmlns:x='urn:x' name='n'/>", b"src='document_qa.txt'", b"src='/'", b"src='..'",
    b"cache='maybe'", b"<module name='user'/>", b"<module name='dup'/><module name='dup'/>",
]


def check(data: bytes | str) -> None:
    """Parse as schema and as prompt; anything but success or PMLError is a bug."""
    try:
        schema = parse_schema(data, file="fuzz.xml", base_dir=EXAMPLES)
    except PMLError:
        pass
    else:
        try:
            build_layout(schema, ToyRenderer())
        except PMLError:
            pass
    try:
        parse_prompt(data, file="fuzz.prompt.xml")
    except PMLError:
        pass


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SOURCES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "duplicate"]))
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            i = min(pos, len(data) - 1)
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.sampled_from(SNIPPETS))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 40))]
        elif op == "duplicate":
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 200))]
    return bytes(data)


FUZZ = settings(max_examples=250, deadline=5000, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)


@FUZZ
@given(mutated())
def test_mutated_examples_raise_only_pml_errors(data: bytes):
    check(data)
    check(data.decode("utf-8", errors="replace"))


TAGS = st.sampled_from(["schema", "prompt", "module", "union", "parameter", "system", "user", "assistant",
                        "m1", "a.b", "x"])
ATTRS = st.sampled_from(["name", "length", "scaffold", "cache", "open", "src", "schema", "xml:space", "p"])
VALUES = st.sampled_from(["a", "m1", "user", "3", "0", "-1", "true", "false", "preserve", "", " x ", "a.txt"])


@st.composite
def tag_soup(draw) -> str:
    parts = []
    for _ in range(draw(st.integers(0, 25))):
        kind = draw(st.integers(0, 4))
        tag = draw(TAGS)
        attrs = "".join(f' {k}="{v}"' for k, v in draw(st.dictionaries(ATTRS, VALUES, max_size=3)).items())
        if kind == 0:
            parts.append(f"<{tag}{attrs}>")
        elif kind == 1:
            parts.append(f"</{tag}>")
        elif kind == 2:
            parts.append(f"<{tag}{attrs}/>")
        elif kind == 3:
            parts.append(draw(st.text(st.sampled_from("ab <&>]\n\t;#x"), max_size=8)))
        else:
            parts.append(draw(st.sampled_from(["<![CDATA[x<y]]>", "<!-- c -->", "&amp;", "&#65;"])))
    root = draw(st.sampled_from(['<schema name="s">', '<prompt schema="s">']))
    end = "</schema>" if "schema" in root[:8] else "</prompt>"
    return root + "".join(parts) + end


@FUZZ
@given(tag_soup())
def test_tag_soup_raises_only_pml_errors(doc: str):
    check(doc)


@settings(max_examples=150, deadline=5000, derandomize=True)
@given(st.text(max_size=200))
def test_arbitrary_text_raises_only_pml_errors(doc: str):
    check(doc)
    check(doc.encode("utf-8", errors="surrogatepass"))


@pytest.mark.parametrize("n", [10, 30])
def test_entity_expansion_attacks_are_refused_fast(n: int):
    defs = "".join(f'<!ENTITY e{i} "{("&e%d;" % (i - 1)) * 10 if i else "ha"}">' for i in range(n))
    doc = f'<!DOCTYPE schema [{defs}]><schema name="s"><module name="m">&e{n - 1};</module></schema>'
    with pytest.raises(PMLSyntaxError):
        parse_schema(doc)
    with pytest.raises(PMLSyntaxError):
        parse_schema(doc.encode("utf-16"))  # the prolog check also sees through another encoding


def test_deeply_nested_xml_is_rejected_not_recursed():
    doc = '<schema name="s">' + "<module name='m'>" * 3000 + "</module>" * 3000 + "</schema>"
    with pytest.raises(PMLError):
        parse_schema(doc)
    doc = '<prompt schema="s">' + "<a>" * 3000 + "</a>" * 3000 + "</prompt>"
    with pytest.raises(PMLError):
        parse_prompt(doc)
