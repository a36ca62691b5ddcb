"""Issue 18, "the paper's <union> default": a union without ``scaffold`` stands in with its first
member (as the Prompt Cache paper's implementation does); ``scaffold=""`` asks for no scaffold.

Before the fix a union without the attribute contributed nothing to later segments' encoding
contexts, so a prompt selecting its first member was not exact on the default path.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_fixtures import make_cache
from promptcache.cli import EXIT_ERROR, main
from promptcache.modules.keys import module_keys
from promptcache.plan import encoding_contexts, stored_segments
from promptcache.pml.errors import SchemaError
from promptcache.pml.layout import Layout, build_layout
from promptcache.pml.model import UnionBlock
from promptcache.pml.parser import parse_schema
from promptcache.pml.toyrenderer import ToyRenderer
from single_thread import one_torch_thread  # noqa: F401  (autouse fixture)

TOL = 1e-4


def union_schema(attr: str = "") -> str:
    """Doc, a union whose FIRST member is the longest (no position gap when it is selected), tail.

    ``attr`` is written into the ``<union>`` tag as is (e.g. ``' scaffold=""'``)."""
    return f"""<schema name="u18">
<system>Be short.</system>
<user open="true">
<module name="doc">Some document text about caches.</module>
<union{attr}>
  <module name="first">The first member is also the longest one here.</module>
  <module name="second">Short.</module>
</union>
<module name="tail">Tail module text.</module>
</user>
</schema>"""


FIRST_PROMPT = '<prompt schema="u18"><doc/><first/><tail/> What is it?</prompt>'


def lay(doc: str) -> Layout:
    return build_layout(parse_schema(doc, file="u18.xml"), ToyRenderer())


def iter_nodes(node):
    """Every node below ``node``, depth first."""
    for child in getattr(node, "children", None) or getattr(node, "members", None) or []:
        yield child
        yield from iter_nodes(child)


def owner_segments(layout: Layout, owner: tuple[str, ...]) -> list[int]:
    return [s.index for s in layout.segments if s.owner == owner]


def tail_context_owners(layout: Layout) -> set[tuple[str, ...]]:
    """Modules whose segments the ``tail`` module attends to when encoded (scaffold policy)."""
    contexts = encoding_contexts(layout, "scaffold")
    (tail,) = owner_segments(layout, ("tail",))
    return {layout.segments[i].owner for i in contexts[tail]}


# ---------------------------------------------------------------- parsing and layout


def test_issue18_union_without_scaffold_defaults_to_first_member():
    layout = lay(union_schema())
    (u,) = layout.unions
    assert u.scaffold == 0
    (block,) = [n for n in iter_nodes(parse_schema(union_schema()).root) if isinstance(n, UnionBlock)]
    assert block.scaffold == "first"


def test_issue18_union_without_scaffold_encodes_later_segments_after_first_member():
    owners = tail_context_owners(lay(union_schema()))
    assert ("first",) in owners and ("second",) not in owners and ("doc",) in owners


@pytest.mark.parametrize("attr", [' scaffold=""', ' scaffold="  "'])
def test_issue18_explicit_empty_scaffold_keeps_no_scaffold(attr: str):
    layout = lay(union_schema(attr))
    assert layout.unions[0].scaffold is None
    owners = tail_context_owners(layout)
    assert ("first",) not in owners and ("second",) not in owners and ("doc",) in owners


def test_issue18_named_scaffold_still_wins_over_the_default():
    layout = lay(union_schema(' scaffold="second"'))
    assert layout.unions[0].scaffold == 1
    owners = tail_context_owners(layout)
    assert ("second",) in owners and ("first",) not in owners


def test_issue18_unknown_scaffold_error_names_the_no_scaffold_spelling():
    with pytest.raises(SchemaError) as info:
        parse_schema('<schema name="s">\n<union scaffold="none"><module name="a">A</module></union></schema>')
    assert info.value.line == 2 and 'scaffold=""' in info.value.message and "'none'" in info.value.message


def test_issue18_member_named_none_is_an_ordinary_scaffold():
    """The no-scaffold spelling is the empty value, so a member may be called ``none``."""
    layout = lay('<schema name="s"><union scaffold="none"><module name="x">X</module>'
                 '<module name="none">N</module></union><module name="t">T</module></schema>')
    assert layout.unions[0].scaffold == 1


def test_issue18_store_keys_follow_the_contexts_without_collision():
    """Keys hash the contexts: the tail gets a new key, segments before the union keep theirs."""
    keys = {}
    for name, attr in (("default", ""), ("none", ' scaffold=""')):
        layout = lay(union_schema(attr))
        contexts = encoding_contexts(layout, "scaffold")
        by_index = module_keys(layout, contexts, stored_segments(layout), model="fp", dtype="float32",
                               policy="scaffold", relative=False, offset_sensitive=False)
        keys[name] = ({layout.segments[i].owner: k.store_key for i, k in by_index.items()
                       if layout.segments[i].owner != ()})
    assert keys["default"][("tail",)] != keys["none"][("tail",)]
    for owner in (("doc",), ("first",), ("second",)):
        assert keys["default"][owner] == keys["none"][owner]


# ---------------------------------------------------------------- validate's layout table


def validate_table(tmp_path: Path, capsys, attr: str) -> list[str]:
    path = tmp_path / "u18.xml"
    path.write_text(union_schema(attr))
    rc = main(["validate", str(path)], renderer=ToyRenderer())
    out, err = capsys.readouterr()
    assert rc == 0, err
    return [line for line in out.splitlines() if " union " in line]


@pytest.mark.parametrize("attr, label", [("", "union (scaffold: first)"),
                                         (' scaffold="second"', "union (scaffold: second)"),
                                         (' scaffold=""', "union (no scaffold)")])
def test_issue18_validate_table_names_the_scaffold_member(tmp_path: Path, capsys, attr: str, label: str):
    (row,) = validate_table(tmp_path, capsys, attr)
    assert row.split()[0] + " " + " ".join(row.split()[1:-5]) == f"u18:{label}"


def test_issue18_validate_rejects_unknown_scaffold(tmp_path: Path, capsys):
    path = tmp_path / "bad.xml"
    path.write_text(union_schema(' scaffold="third"'))
    assert main(["validate", str(path)], renderer=ToyRenderer()) == EXIT_ERROR
    assert 'scaffold=""' in capsys.readouterr().err


# ---------------------------------------------------------------- engine: the default path is exact


@pytest.mark.parametrize("family", ["llama", "falcon-alibi"])
def test_issue18_default_path_through_unscaffolded_union_equals_baseline(family: str):
    pc = make_cache(family, "scaffold")
    pc.add_schema(union_schema())
    assert pc.plan(FIRST_PROMPT).complete
    cached = pc.next_token_logits(FIRST_PROMPT, use_cache=True)
    base = pc.next_token_logits(FIRST_PROMPT, use_cache=False)
    assert float((cached - base).abs().max()) <= TOL


def test_issue18_explicit_no_scaffold_is_not_exact_on_that_prompt():
    """``scaffold=""`` keeps the old contexts: ``tail`` was encoded without ``first``."""
    pc = make_cache("llama", "scaffold")
    pc.add_schema(union_schema(' scaffold=""'))
    cached = pc.next_token_logits(FIRST_PROMPT, use_cache=True)
    base = pc.next_token_logits(FIRST_PROMPT, use_cache=False)
    assert float((cached - base).abs().max()) > 1e-3
    assert float((cached - pc.oracle_logits(FIRST_PROMPT)).abs().max()) <= TOL
