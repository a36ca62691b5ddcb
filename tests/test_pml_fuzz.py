"""Fuzzing the parser: whatever the input, only PMLError (or success) may come out, quickly.

Inputs are the example files mutated (byte flips, truncation, deletions, random tag insertion,
entity/DOCTYPE injection) plus generated tag soup. A parsed schema is also laid out with the toy
renderer, since the layout must not fail with anything but a PMLError either.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promptcache.cli import Context, build_parser
from promptcache.pml.binding import bind
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


# ---------------------------------------------------------------- seeded mutations, whole pipeline
# Issue 12 ("Done when"): 3,000 mutated example documents (about 2 s) go through parse, layout, bind
# and the `validate` command; only PMLError subclasses may come out. Seeded, so a failure repeats.

PAIRS = sorted(p.name[: -len(".prompt.xml")] for p in EXAMPLES.glob("*.prompt.xml"))
SEEDED_INPUTS = 3000
HOSTILE = [
    b"<?xml version='1.0' encoding='punycode'?>", b"<?xml version='1.0' encoding='undefined'?>",
    b"<?xml version='1.0' encoding='rot13'?>", b"<?xml version='1.0' encoding='utf-7'?>",
    b"src='/etc/passwd'", b"src='../README.md'", b"src='/dev/zero'", b"src='/proc/self/environ'",
    b"<\xc2\xb2/>", b"<a\xc2\xb7b/>", b"<\xc2\xb5 x='1'/>", b" \xc2\xb9x='v'", b" a:b='v'",
    b" " + b" ".join(b"a%d='v'" % i for i in range(300)),
]


NEW_NAMES = [b"a\xc2\xb7b", b"\xc2\xb2", b"\xc2\xb5", b"user", b"module", b"x", b"caf\xc3\xa9", b"doc", b"a:b"]
NEW_VALUES = [b"", b" ", b"0", b"-1", b"99999999", b"true", b"maybe", b"/etc/passwd", b"../README.md",
              b"&lt;|im_start|&gt;system", b"preserve", b"\xc2\xb2"]
ENCODINGS = [b"utf-8", b"latin-1", b"utf-16", b"ascii", b"shift_jis", b"punycode", b"undefined", b"rot13",
             b"idna", b"utf-7", b"base64", b"bogus"]
_TAG = re.compile(rb"</?([A-Za-z_][\w.\-]*)")
_VALUE = re.compile(rb'="[^"<]*"')


def _structural(rng: random.Random, data: bytes) -> bytes:
    """A mutation that keeps the document well-formed more often: rename a tag everywhere,
    change an attribute value, insert a snippet between two tags, or declare an encoding."""
    op = rng.choice(["rename", "value", "between", "declare"])
    if op == "declare":
        return b"<?xml version='1.0' encoding='" + rng.choice(ENCODINGS) + b"'?>" + data
    if op == "rename" and (tags := list(_TAG.finditer(data))):
        old = rng.choice(tags).group(1)
        new = rng.choice(NEW_NAMES)
        return re.sub(rb"(</?)" + re.escape(old) + rb"(?=[\s/>])", lambda m: m.group(1) + new, data)
    if op == "value" and (values := list(_VALUE.finditer(data))):
        m = rng.choice(values)
        return data[: m.start()] + b'="' + rng.choice(NEW_VALUES) + b'"' + data[m.end():]
    ends = [i + 1 for i, byte in enumerate(data) if byte == ord(">")]
    pos = rng.choice(ends) if ends else 0
    return data[:pos] + rng.choice(SNIPPETS + HOSTILE) + data[pos:]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    """Half of the time 1-3 structural mutations (mostly still well-formed: reaches the readers,
    the layout and bind), else 1-4 byte-level ones mixed with structural ones."""
    if rng.random() < 0.5:
        for _ in range(rng.randint(1, 3)):
            data = _structural(rng, data)
        return data
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(["flip", "truncate", "insert", "delete", "duplicate", "structural", "structural",
                         "structural"])
        pos = rng.randint(0, len(out))
        if op == "structural":
            out = bytearray(_structural(rng, bytes(out)))
        elif op == "flip" and out:
            out[min(pos, len(out) - 1)] ^= 1 << rng.randint(0, 7)
        elif op == "truncate":
            del out[pos:]
        elif op == "insert":
            out[pos:pos] = rng.choice(SNIPPETS + HOSTILE)
        elif op == "delete":
            del out[pos:pos + rng.randint(1, 40)]
        else:
            out[pos:pos] = out[pos:pos + rng.randint(1, 200)]
    return bytes(out)


def _only_pml_errors(fn, *args):
    try:
        return fn(*args)
    except PMLError:
        return None


def _validate(schema: Path, prompt: Path) -> None:
    args = build_parser().parse_args(["validate", str(schema), "--prompt", str(prompt)])
    _only_pml_errors(args.func, args, Context(renderer=ToyRenderer()))


def test_issue12_fuzz_seeded_mutations_parse_layout_bind_validate(tmp_path: Path, capsys):
    rng = random.Random(20_12)
    renderer = ToyRenderer()
    schemas = {n: (EXAMPLES / f"{n}.xml").read_bytes() for n in PAIRS}
    prompts = {n: (EXAMPLES / f"{n}.prompt.xml").read_bytes() for n in PAIRS}
    layouts = {n: build_layout(parse_schema(schemas[n], base_dir=EXAMPLES), renderer) for n in PAIRS}
    (tmp_path / "document_qa.txt").write_bytes((EXAMPLES / "document_qa.txt").read_bytes())
    for i in range(SEEDED_INPUTS):
        name = rng.choice(PAIRS)
        if i % 2:
            prompt = _only_pml_errors(parse_prompt, _mutate(rng, prompts[name]), "fuzz.prompt.xml")
            if prompt is not None:
                _only_pml_errors(bind, prompt, layouts[name], renderer)
        else:
            data = _mutate(rng, schemas[name])
            schema = _only_pml_errors(parse_schema, data[:20000], "fuzz.xml", EXAMPLES)
            layout = schema and _only_pml_errors(build_layout, schema, renderer)
            if layout:
                prompt = parse_prompt(prompts[name])
                _only_pml_errors(bind, prompt, layout, renderer)
        if i % 20 == 0:  # the CLI's validate on files: a mutated schema with a mutated prompt
            schema_file, prompt_file = tmp_path / "s.xml", tmp_path / "p.xml"
            schema_file.write_bytes(_mutate(rng, schemas[name])[:20000])
            prompt_file.write_bytes(_mutate(rng, prompts[name]))
            _validate(schema_file, prompt_file)
            capsys.readouterr()
