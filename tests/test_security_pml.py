"""Issue 12, PML side: files a schema or prompt can reach, bounded reads, encodings, size limits,
one name rule. Each test is named after its item and fails on the code before the fix.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from lxml import etree

from promptcache.cli import EXIT_ERROR, main
from promptcache.pml import limits
from promptcache.pml.binding import bind
from promptcache.pml.errors import PMLError, PMLSyntaxError, PromptError, SchemaError
from promptcache.pml.layout import build_layout
from promptcache.pml.parser import is_pml_name, load_prompt, load_schema, parse_prompt, parse_schema
from promptcache.pml.toyrenderer import ToyRenderer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SECRET = "s3cret-do-not-print"


def finishes(fn, seconds: float = 5.0):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it blocks, e.g. on a FIFO."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s (blocked?)"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def schema_with_src(folder: Path, src: str, name: str = "s.xml") -> Path:
    path = folder / name
    path.write_text(f'<schema name="s">\n<module name="m" src="{src}"/>\n</schema>')
    return path


@pytest.fixture
def outside(tmp_path: Path) -> tuple[Path, Path]:
    """A schema folder, and a secret file next to (outside) it."""
    folder = tmp_path / "schemas"
    folder.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    return folder, secret


# ---------------------------------------------------------------- item 2: src= confinement


@pytest.mark.parametrize("src", ["/etc/passwd", "../secret.txt", "ABSOLUTE_SECRET", "/proc/self/environ"])
def test_issue12_item2_src_outside_the_schema_folder_is_refused(outside, src: str):
    folder, secret = outside
    src = str(secret) if src == "ABSOLUTE_SECRET" else src
    path = schema_with_src(folder, src)
    with pytest.raises(SchemaError) as info:
        finishes(lambda: load_schema(path))
    assert info.value.line == 2 and "src=" in info.value.message
    assert SECRET not in str(info.value) and "root:" not in str(info.value)


def test_issue12_item2_symlink_pointing_outside_is_refused(outside):
    folder, secret = outside
    (folder / "link.txt").symlink_to(secret)
    with pytest.raises(SchemaError, match="outside the allowed folder"):
        load_schema(schema_with_src(folder, "link.txt"))
    (folder / "dirlink").symlink_to(secret.parent)
    with pytest.raises(SchemaError, match="outside the allowed folder"):
        load_schema(schema_with_src(folder, "dirlink/secret.txt"))


def test_issue12_item2_symlink_inside_the_folder_is_fine(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "doc.txt").write_text("inside text")
    (tmp_path / "alias.txt").symlink_to(tmp_path / "sub" / "doc.txt")
    schema = load_schema(schema_with_src(tmp_path, "alias.txt"))
    assert schema.root.children[0].children[0].text == "inside text"


def test_issue12_item2_fifo_src_is_refused_quickly(tmp_path: Path):
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(SchemaError, match="FIFO"):
        finishes(lambda: load_schema(schema_with_src(tmp_path, "pipe")))


def test_issue12_item2_explicit_allowed_root_widens_the_folder(outside):
    folder, secret = outside
    path = schema_with_src(folder, "../secret.txt")
    schema = load_schema(path, allowed_root=secret.parent)
    assert schema.root.children[0].children[0].text == SECRET
    doc = path.read_text()
    assert parse_schema(doc, base_dir=folder, allowed_root=secret.parent).root.children[0].children[0].text == SECRET
    with pytest.raises(SchemaError, match="outside the allowed folder"):
        parse_schema(doc, base_dir=folder)


def test_issue12_item2_schema_text_without_base_folder_includes_nothing(tmp_path: Path, monkeypatch):
    (tmp_path / "doc.txt").write_text("current-directory file")
    monkeypatch.chdir(tmp_path)  # the old default base folder
    doc = '<schema name="s">\n\n<module name="m" src="doc.txt"/>\n</schema>'
    with pytest.raises(SchemaError, match="without a base folder") as info:
        parse_schema(doc)
    assert info.value.line == 3
    with pytest.raises(SchemaError, match="without a base folder"):
        parse_schema(doc, file=str(tmp_path / "named.xml"))  # a file name only labels errors
    assert parse_schema(doc, base_dir=tmp_path).root.children[0].children[0].text == "current-directory file"


def test_issue12_item2_validate_never_prints_a_refused_file(outside, capsys):
    folder, secret = outside
    for src in (str(secret), "../secret.txt", "/etc/passwd"):
        rc = main(["validate", str(schema_with_src(folder, src))], renderer=ToyRenderer())
        out, err = capsys.readouterr()
        assert rc == EXIT_ERROR and out == ""
        assert SECRET not in err and "root:" not in err and ":2: src=" in err
    rc = main(["validate", str(schema_with_src(folder, "../secret.txt")), "--allowed-root", str(secret.parent)],
              renderer=ToyRenderer())
    assert rc == 0


def test_issue12_item2_add_schema_takes_base_dir_and_allowed_root(outside):
    from engine_fixtures import make_cache

    folder, secret = outside
    (folder / "doc.txt").write_text("A document.")
    pc = make_cache("llama")
    doc = '<schema name="s"><module name="m" src="doc.txt"/></schema>'
    with pytest.raises(SchemaError, match="without a base folder"):
        pc.add_schema(doc)
    pc.add_schema(doc, base_dir=folder)
    with pytest.raises(SchemaError, match="outside the allowed folder"):
        pc.add_schema(schema_with_src(folder, "../secret.txt"))
    pc.add_schema(schema_with_src(folder, "../secret.txt"), allowed_root=secret.parent)
    assert pc.layout("s").schema.root.children[0].children[0].text == SECRET


# ---------------------------------------------------------------- item 3: a str is never opened


PROMPT_FILE_TEXT = '<prompt schema="t"><a/><e/> Question?</prompt>'


def test_issue12_item3_str_naming_a_file_is_plain_text_not_read(tmp_path: Path, monkeypatch):
    from engine_fixtures import FULL_SCHEMA, make_cache

    import promptcache.pml.parser as parser

    prompt_file = tmp_path / "p.prompt.xml"
    prompt_file.write_text(PROMPT_FILE_TEXT)
    pc = make_cache("llama")
    pc.add_schema(FULL_SCHEMA)
    opened: list = []
    real = parser.read_bounded
    monkeypatch.setattr(parser, "read_bounded", lambda *a, **k: opened.append(a) or real(*a, **k))
    res = pc.generate(str(prompt_file), max_new_tokens=1)
    assert opened == []
    assert res.prompt_tokens == len(pc.prefix.token_ids(str(prompt_file)))  # the path's own tokens
    assert pc.prefix_stats()["requests"] == 1  # served as plain text by prefix caching
    pc.next_token_logits(str(tmp_path / "missing.prompt.xml"))  # no error: it is text, not a path
    assert opened == []


def test_issue12_item3_plan_of_a_str_path_is_a_clear_error(tmp_path: Path):
    from engine_fixtures import FULL_SCHEMA, make_cache

    prompt_file = tmp_path / "p.prompt.xml"
    prompt_file.write_text(PROMPT_FILE_TEXT)
    pc = make_cache("llama")
    pc.add_schema(FULL_SCHEMA)
    with pytest.raises(PromptError, match="never opened as a file"):
        pc.plan(str(prompt_file))
    expected = pc.plan(PROMPT_FILE_TEXT).token_ids
    assert pc.plan(prompt_file).token_ids.tolist() == expected.tolist()  # a Path is loaded
    assert pc.plan(load_prompt(prompt_file)).token_ids.tolist() == expected.tolist()


def test_issue12_item3_load_prompt_is_exported():
    import promptcache

    assert promptcache.load_prompt is load_prompt
    assert promptcache.load_prompt(EXAMPLES / "persona.prompt.xml").schema == "persona"


# ---------------------------------------------------------------- item 8: encodings


@pytest.mark.parametrize("encoding", ["undefined", "punycode", "rot13", "rot_13", "idna", "unicode_escape",
                                      "raw-unicode-escape", "utf-7", "hex", "base64", "zlib", "no-such"])
def test_issue12_item8_bad_encoding_declarations_are_pml_syntax_errors(encoding: str):
    doc = f'<?xml version="1.0" encoding="{encoding}"?><schema name="s">x</schema>'.encode()
    with pytest.raises(PMLSyntaxError):
        parse_schema(doc)
    with pytest.raises(PMLSyntaxError):
        parse_prompt(doc.replace(b"schema name", b"prompt schema").replace(b"/schema", b"/prompt"))


def test_issue12_item8_undecodable_bytes_are_pml_syntax_errors():
    for doc in (b'<?xml version="1.0" encoding="utf-16"?><schema name="s"/>\x00',
                b'<?xml version="1.0" encoding="shift_jis"?><schema name="s">\x81</schema>',
                b"\xff\xfe<\x00s\x00c\x00"):
        with pytest.raises(PMLSyntaxError):
            parse_schema(doc)
    assert parse_schema('<?xml version="1.0" encoding="latin-1"?><schema name="s">caf\u00e9</schema>'
                        .encode("latin-1")).root.children[0].text == "caf\u00e9"


# ---------------------------------------------------------------- item 9: bounded reads


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null", "/proc/self/environ", "/"])
def test_issue12_item9_devices_and_pseudo_files_are_refused(device: str):
    if not os.path.exists(device):
        pytest.skip(f"{device} does not exist here")
    for loader, error in ((load_schema, SchemaError), (load_prompt, PromptError)):
        with pytest.raises(error, match="cannot read"):
            finishes(lambda: loader(device))


def test_issue12_item9_validate_dev_zero_exits_2(capsys):
    rc = finishes(lambda: main(["validate", "/dev/zero"], renderer=ToyRenderer()))
    assert rc == EXIT_ERROR and "not a regular file" in capsys.readouterr().err


def test_issue12_item9_fifo_schema_and_prompt_do_not_block(tmp_path: Path, capsys):
    fifo = tmp_path / "fifo.xml"
    os.mkfifo(fifo)
    with pytest.raises(SchemaError, match="FIFO"):
        finishes(lambda: load_schema(fifo))
    with pytest.raises(PromptError, match="FIFO"):
        finishes(lambda: load_prompt(fifo))
    rc = finishes(lambda: main(["validate", str(EXAMPLES / "nested.xml"), "--prompt", str(fifo)],
                               renderer=ToyRenderer()))
    assert rc == EXIT_ERROR and "FIFO" in capsys.readouterr().err


def test_issue12_item9_file_sizes_are_capped(tmp_path: Path, monkeypatch):
    big = tmp_path / "big.xml"
    big.write_text('<schema name="s">' + "x" * 5000 + "</schema>")
    monkeypatch.setattr(limits, "MAX_DOCUMENT_BYTES", 4096)
    with pytest.raises(SchemaError, match="larger than the limit of 4096"):
        load_schema(big)
    assert load_schema(big, max_bytes=10_000).name == "s"
    prompt = tmp_path / "p.xml"
    prompt.write_text('<prompt schema="s">' + "y" * 5000 + "</prompt>")
    with pytest.raises(PromptError, match="larger than the limit of 100"):
        load_prompt(prompt, max_bytes=100)
    (tmp_path / "inc.txt").write_text("z" * 300)
    monkeypatch.setattr(limits, "MAX_INCLUDE_BYTES", 200)
    with pytest.raises(SchemaError, match="larger than the limit of 200"):
        load_schema(schema_with_src(tmp_path, "inc.txt"))


# ---------------------------------------------------------------- item 11: linear, bounded parsing


def _many_attributes(n: int) -> str:
    return '<prompt schema="s"><m ' + " ".join(f'a{i}="v"' for i in range(n)) + "/></prompt>"


def test_issue12_item11_many_attributes_are_refused_fast():
    doc = _many_attributes(50_000)
    t0 = time.perf_counter()
    with pytest.raises(PromptError, match="more than the limit of"):
        parse_prompt(doc)
    assert time.perf_counter() - t0 < 1.0


def test_issue12_item11_attribute_reading_is_linear(monkeypatch):
    """With the limit lifted, 50,000 attributes parse in well under a second (was 10 s)."""
    monkeypatch.setattr(limits, "MAX_ATTRIBUTES", 10**9)
    t0 = time.perf_counter()
    prompt = parse_prompt(_many_attributes(50_000))
    assert time.perf_counter() - t0 < 2.0
    assert len(prompt.selections[0].args) == 50_000


def test_issue12_item11_element_and_byte_limits(monkeypatch):
    monkeypatch.setattr(limits, "MAX_ELEMENTS", 100)
    with pytest.raises(PromptError, match="more than 100 elements"):
        parse_prompt('<prompt schema="s">' + "<a/>" * 100 + "</prompt>")
    parse_prompt('<prompt schema="s">' + "<a/>" * 99 + "</prompt>")
    with pytest.raises(SchemaError, match="more than 100 elements"):
        parse_schema('<schema name="s">' + "<module name='m'/>" * 100 + "</schema>")
    big = '<prompt schema="s">' + "\u00e9" * (limits.MAX_PROMPT_BYTES // 2) + "</prompt>"
    with pytest.raises(PromptError, match="larger than the limit"):
        parse_prompt(big)  # fewer characters than the cap, more UTF-8 bytes
    with pytest.raises(PromptError, match="larger than the limit"):
        parse_prompt(big.encode())


# ---------------------------------------------------------------- item 16: one name rule


@pytest.mark.parametrize("name", ["\u00b2", "\u00b5", "\u00b9x", "a:b", "1a", "-a", ".a", "a b", "a\u00a0b"])
def test_issue12_item16_names_xml_cannot_select_are_refused_in_schemas(name: str):
    with pytest.raises(SchemaError, match="not a valid PML name"):
        parse_schema(f'<schema name="s"><module name="{name}"/></schema>')
    with pytest.raises(SchemaError, match="not a valid PML name"):
        parse_schema(f'<schema name="s"><module name="m"><parameter name="{name}" length="2"/></module></schema>')
    with pytest.raises(PMLError):  # and a prompt cannot name it either
        parse_prompt(f'<prompt schema="s"><{name}/></prompt>')


@pytest.mark.parametrize("name", ["a\u00b7b", "caf\u00e9", "_x", "x-1.y", "\u00c0", "\u4e2d\u6587", "a\u0300"])
def test_issue12_item16_every_declared_name_can_be_selected(name: str):
    schema = parse_schema(f'<schema name="s"><module name="{name}">T <parameter name="{name}" length="3"/>'
                          "</module></schema>")
    layout = build_layout(schema, ToyRenderer())
    bound = bind(parse_prompt(f'<prompt schema="s"><{name} {name}="v"/></prompt>'), layout, ToyRenderer())
    assert (name,) in bound.selected and bound.parameter_text[(name,)] == {name: "v"}


def _lxml_accepts(tag: str) -> bool:
    try:
        root = etree.fromstring(f"<{tag} {tag}='1'/>".encode())
    except etree.XMLSyntaxError:
        return False
    return root.tag == tag and dict(root.attrib) == {tag: "1"}


def test_issue12_item16_name_rule_agrees_with_the_xml_parser():
    """Character by character over the BMP (and a sample above it): the rule is lxml's rule."""
    points = list(range(0x20, 0x10000)) + list(range(0x10000, 0x110000, 4099))
    for cp in points:
        c = chr(cp)
        if c == ":" or 0xD800 <= cp <= 0xDFFF:
            continue
        assert is_pml_name(c) == _lxml_accepts(c), hex(cp)
        assert is_pml_name("a" + c) == _lxml_accepts("a" + c), hex(cp)
    assert not is_pml_name("a:b") and not is_pml_name("")
