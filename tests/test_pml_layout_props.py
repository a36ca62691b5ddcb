"""Layout of parsed schemas: unions, parameters, open roles; and a property test over random schemas
written as XML text (parse, compare to the generated structure, check layout invariants)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promptcache.pml.errors import SchemaError
from promptcache.pml.escape import escape_text
from promptcache.pml.layout import Layout, build_layout
from promptcache.pml.model import Module, Parameter, RoleBlock, Text, UnionBlock
from promptcache.pml.parser import parse_schema
from promptcache.pml.toyrenderer import ToyRenderer


def lay(doc: str) -> Layout:
    return build_layout(parse_schema(doc, file="s.xml"), ToyRenderer())


# ---------------------------------------------------------------- unit tests


def test_union_members_share_a_start_and_union_spans_longest_member():
    layout = lay('<schema name="s">Pick one:\n<union scaffold="b">'
                 '<module name="a">one two three</module>'          # 5 tokens
                 '<module name="b">x</module>'                      # 1 token
                 '<module name="c">a b c d e f</module>'            # 11 tokens
                 "</union> after</schema>")
    (u,) = layout.unions
    starts = {layout.modules[m].start for m in u.members}
    assert starts == {u.start}
    lengths = [layout.modules[m].end - layout.modules[m].start for m in u.members]
    assert lengths == [5, 1, 11] and u.length == 11 and u.scaffold == 1
    after = [s for s in layout.segments if s.owner == () and s.start >= u.start]
    assert after[0].start == u.start + 11  # the text after the union starts past its longest member
    assert layout.length == u.start + 11 + 2  # " after" = 2 toy tokens


def test_parameter_spans_its_length_and_holds_the_padded_scaffold():
    r = ToyRenderer()
    layout = build_layout(parse_schema(
        '<schema name="s"><module name="m">Go to <parameter name="city" length="6" scaffold="some city"/>'
        ' now <parameter name="day" length="2"/></module></schema>'), r)
    info = layout.modules[("m",)]
    city, day = info.parameters["city"], info.parameters["day"]
    assert city.kind == "parameter" and len(city.tokens) == 6 and city.tokens[:3] == r.encode("some city")
    assert city.tokens[3:] == [r.pad_id()] * 3
    assert day.tokens == [r.pad_id()] * 2
    assert day.start == city.end + len(r.encode(" now "))


def test_scaffold_longer_than_parameter_is_a_schema_error_with_its_line():
    with pytest.raises(SchemaError) as info:
        lay('<schema name="s"><module name="m">\n<parameter name="p" length="2" scaffold="a b c"/></module>'
            "</schema>")
    assert info.value.line == 2


def test_nested_union_segments_record_their_union_choices():
    layout = lay('<schema name="s"><module name="m"><union><module name="a">A<union>'
                 '<module name="a1">1</module><module name="a2">2</module></union></module>'
                 '<module name="b">B</module></union></module></schema>')
    outer, inner = layout.unions
    a2 = [s for s in layout.segments if s.owner == ("m", "a", "a2")][0]
    assert a2.union_choices == {outer.index: 0, inner.index: 1}
    assert layout.modules[("m", "a", "a1")].start == layout.modules[("m", "a", "a2")].start


def test_open_role_is_reported_and_has_no_close_marker():
    layout = lay('<schema name="qa"><user open="true">Read: <module name="doc">text</module></user></schema>')
    assert layout.open_role == "user" and layout.uses_roles
    assert not any(e.label == "</user>" for e in layout.entries)


def test_cache_false_module_is_marked_not_cacheable():
    layout = lay('<schema name="s"><module name="a" cache="false">x</module><module name="b">y</module></schema>')
    assert not layout.modules[("a",)].cache and layout.modules[("b",)].cache


# ---------------------------------------------------------------- random schemas


@dataclass
class Spec:
    """Generated structure; ``xml`` renders it, ``shape`` is what the parser must return."""

    kind: str  # text | module | union | param | role
    name: str = ""
    text: str = ""
    cache: bool = True
    length: int = 0
    scaffold: str | None = None
    children: list["Spec"] = field(default_factory=list)
    open: bool = False


WORDS = st.sampled_from(["alpha", "beta", "x<y", "a&b", "q]]>r", "gamma", "42", "done.", "if (a < b)"])
GAPS = st.sampled_from(["", " ", "\n", "\n    ", "  \n\n  ", "\t"])


class Names:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"


@st.composite
def contents(draw, names: Names, depth: int, in_module: bool, in_role: bool, max_items: int = 4):
    items: list[Spec] = []
    for _ in range(draw(st.integers(0, max_items))):
        kinds = ["text", "module"]
        if depth < 3:
            kinds.append("union")
        if in_module:
            kinds.append("param")
        if not in_role and depth < 3:
            kinds.append("role")
        kind = draw(st.sampled_from(kinds))
        if kind == "text":
            if items and items[-1].kind == "text":
                continue  # adjacent runs would merge into one
            items.append(Spec("text", text=" ".join(draw(st.lists(WORDS, min_size=1, max_size=3)))))
        elif kind == "module":
            kids = draw(contents(names, depth + 1, True, in_role, 3)) if depth < 3 else []
            items.append(Spec("module", names("m"), cache=draw(st.booleans()), children=kids))
        elif kind == "union":
            members = [Spec("module", names("u"), children=draw(contents(names, depth + 1, True, in_role, 3)))
                       for _ in range(draw(st.integers(1, 3)))]
            # the attribute as written: absent (None), explicitly no scaffold (""), or a member
            written = draw(st.one_of(st.none(), st.just(""), st.sampled_from([m.name for m in members])))
            items.append(Spec("union", scaffold=written, children=members))
        elif kind == "param":
            scaffold = draw(st.one_of(st.none(), st.sampled_from(["tbd", "city", "n"])))
            items.append(Spec("param", names("p"), length=draw(st.integers(1, 6)), scaffold=scaffold))
        else:
            role = draw(st.sampled_from(["system", "user", "assistant"]))
            items.append(Spec("role", role, children=draw(contents(names, depth + 1, in_module, True, 3))))
    return items


@st.composite
def schemas(draw):
    names = Names()
    items = draw(contents(names, 0, False, False, 5))
    if draw(st.booleans()):
        inner = draw(contents(names, 1, False, True, 3))
        items.append(Spec("role", "user", children=inner, open=True))
    gaps = draw(st.lists(GAPS, min_size=200, max_size=200))
    return items, gaps


def to_xml(items: list[Spec], gaps: list[str]) -> str:
    counter = iter(range(10**6))

    def gap() -> str:
        return gaps[next(counter) % len(gaps)]

    def render(spec: Spec) -> str:
        if spec.kind == "text":
            return escape_text(spec.text)
        if spec.kind == "param":
            sc = f' scaffold="{spec.scaffold}"' if spec.scaffold else ""
            return f'<parameter name="{spec.name}" length="{spec.length}"{sc}/>'
        body = "".join(gap() + render(c) for c in spec.children) + gap()
        if spec.kind == "module":
            return f'<module name="{spec.name}" cache="{str(spec.cache).lower()}">{body}</module>'
        if spec.kind == "union":
            sc = f' scaffold="{spec.scaffold}"' if spec.scaffold is not None else ""
            return f"<union{sc}>{body}</union>"
        op = ' open="true"' if spec.open else ""
        return f"<{spec.name}{op}>{body}</{spec.name}>"

    return '<schema name="random">' + "".join(gap() + render(c) for c in items) + gap() + "</schema>"


def shape_of_specs(items: list[Spec]) -> list:
    out = []
    for s in items:
        if s.kind == "module":
            out.append(("module", s.name, s.cache, shape_of_specs(s.children)))
        elif s.kind == "union":
            out.append(("union", _parsed_scaffold(s), [(m.name, shape_of_specs(m.children)) for m in s.children]))
        elif s.kind == "param":
            out.append(("param", s.name, s.length, s.scaffold))
        elif s.kind == "role":
            out.append(("role", s.name, s.open, shape_of_specs(s.children)))
    return out


def _parsed_scaffold(union: Spec) -> str | None:
    """What the reader makes of the written attribute (issue 18): absent -> the first member, as
    in the paper; ``scaffold=""`` -> no scaffold; a member name -> that member."""
    if union.scaffold is None:
        return union.children[0].name
    return union.scaffold or None


def shape_of_nodes(nodes) -> list:
    out = []
    for n in nodes:
        if isinstance(n, Module):
            out.append(("module", n.name, n.cache, shape_of_nodes(n.children)))
        elif isinstance(n, UnionBlock):
            out.append(("union", n.scaffold, [(m.name, shape_of_nodes(m.children)) for m in n.members]))
        elif isinstance(n, Parameter):
            out.append(("param", n.name, n.length, n.scaffold))
        elif isinstance(n, RoleBlock):
            out.append(("role", n.role, n.open, shape_of_nodes(n.children)))
    return out


def words_of_specs(items: list[Spec]) -> str:
    out = []
    for s in items:
        out.append(s.text if s.kind == "text" else words_of_specs(s.children))
    return "".join("".join(out).split())


def words_of_nodes(nodes) -> str:
    out = []
    for n in nodes:
        if isinstance(n, Text):
            out.append(n.text)
        elif isinstance(n, UnionBlock):
            out.append(words_of_nodes(n.members))
        elif isinstance(n, (Module, RoleBlock)):
            out.append(words_of_nodes(n.children))
    return "".join("".join(out).split())


def check_layout_invariants(layout: Layout) -> None:
    segs = layout.segments
    # 1. segments are disjoint unless they lie in different members of one union
    for i, a in enumerate(segs):
        assert len(a.tokens) > 0
        for b in segs[i + 1:]:
            if a.start < b.end and b.start < a.end:
                assert any(u in b.union_choices and b.union_choices[u] != m for u, m in a.union_choices.items()), \
                    (a, b)
    # 2. union members start together; a union spans its longest member
    for u in layout.unions:
        for m in u.members:
            assert layout.modules[m].start == u.start
        assert u.length == max(layout.modules[m].end - u.start for m in u.members)
        assert all(layout.modules[m].end <= u.start + u.length for m in u.members)
    # 3. modules nest inside their parent; segments inside their owner
    for path, info in layout.modules.items():
        assert info.start <= info.end
        if path:
            parent = layout.modules[path[:-1]]
            assert parent.start <= info.start and info.end <= parent.end, path
    for s in segs:
        owner = layout.modules[s.owner]
        assert owner.start <= s.start and s.end <= owner.end
        if s.kind == "parameter":
            assert owner.parameters[s.parameter] is s
    # 4. the readable entries agree with the module table, and nothing lies past the end
    for e in layout.entries:
        if e.kind == "module":
            assert (e.start, e.end) == (layout.modules[e.path].start, layout.modules[e.path].end)
    assert layout.length == max((s.end for s in segs), default=0) == layout.modules[()].end


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schemas())
def test_random_schemas_parse_to_their_structure_and_lay_out_consistently(generated):
    items, gaps = generated
    doc = to_xml(items, gaps)
    schema = parse_schema(doc)
    assert shape_of_nodes(schema.root.children) == shape_of_specs(items), doc
    assert words_of_nodes(schema.root.children) == words_of_specs(items), doc
    layout = build_layout(schema, ToyRenderer())
    check_layout_invariants(layout)
    # parameters occupy exactly their length
    for info in layout.modules.values():
        for name, seg in info.parameters.items():
            assert len(seg.tokens) == _param_length(schema.root, name)
    assert layout.open_role == ("user" if items and items[-1].open else None)


def _param_length(node, name: str) -> int:
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, Parameter) and n.name == name:
            return n.length
        stack.extend(getattr(n, "children", []) or getattr(n, "members", []))
    raise AssertionError(name)
