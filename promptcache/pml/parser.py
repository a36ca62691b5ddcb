"""PML parser: schema and prompt documents (XML) to the dataclasses of :mod:`.model`.

Schema documents
    ``<schema name=..>`` holding text, ``<module name= [cache=] [src=]>``, ``<union [scaffold=]>``,
    ``<parameter name= length= [scaffold=]/>`` and the role tags ``<system>``, ``<user>``,
    ``<assistant>`` (``open="true"`` leaves the turn open for the prompt's trailing text).
Prompt documents
    ``<prompt schema=..>`` holding selections (elements named like modules; attributes are
    parameter arguments; nested elements select inside that module), then the suffix: plain text
    and ``<system>``/``<user>``/``<assistant>`` turns. Whether the selections fit the schema is
    checked later by :mod:`.binding`; this module checks only the document's shape.

Whitespace (see docs/pml.md, "Whitespace", for examples) -- chosen so an indented document renders
like the text a person would type, while indented code keeps its inner indentation:

1. Every text run (element text, the text after an element, CDATA, an ``src=`` file) is dedented
   (longest common indent of its non-blank lines removed, measured in the source: a first line
   that follows markup counts as indented like its source line) and stripped. Blank runs vanish.
2. The whitespace between two consecutive pieces of one container (text, module, union,
   parameter, role tag) collapses to ONE separator: ``"\\n"`` if it held a newline, ``" "`` if it
   held other whitespace, ``""`` if none.
3. Placement: when the following piece is text, the separator is prepended to that
   :class:`~.model.Text`; when it is a module, union or parameter, it becomes its own
   ``Text(sep)`` just before the element, in the parent (so it belongs to the parent's cached
   segment and is the same whatever union member or module selection a prompt makes).
4. The first piece of a container (schema, module, role block) never gets a separator, nor does
   anything after the last piece.
5. No separator is placed next to a role tag (before it, or after its end): the renderer's turn
   markers already delimit turns the way the model was trained.
6. ``xml:space="preserve"`` on an element (inherited by its descendants; ``"default"`` switches
   back) disables 1-5 inside it: all text is kept verbatim, blank runs included.

Prompt suffix: plain text gets a leading separator (rule 2) only when it directly follows a
selection and the source had whitespace between them; it gets none at the very start, or after
a turn (rule 5). Turn texts never get a separator; they are normalised by rule 1. Attribute
values (arguments, scaffolds) are only stripped.

Names: module and parameter names follow ONE rule, :func:`is_pml_name` (an XML name without a
colon), in schemas and prompts alike, so every module a schema declares can be selected.

Files and trust (docs/security.md): a schema's ``src=`` resolves inside the schema's folder (or an
explicit ``allowed_root``), after resolving symlinks; a schema given as text resolves ``src=`` only
when given ``base_dir``. Every file is read through :func:`.files.read_bounded` (regular files
only, capped), and every document is bounded (:mod:`.limits`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from lxml import etree

from . import limits
from .errors import PMLError, PromptError, SchemaError
from .files import FileRefused, read_bounded
from .model import (ROLES, Location, Module, Node, Parameter, Prompt, RoleBlock, Schema, Selection,
                    Text, Turn, UnionBlock)
from .whitespace import is_blank, normalize_text, separator, split_blank
from .xmlsafe import attributes, parse_xml

__all__ = ["parse_schema", "load_schema", "parse_prompt", "load_prompt", "is_pml_name",
           "RESERVED_NAMES", "MAX_PARAMETER_LENGTH", "MAX_DEPTH", "MAX_INCLUDE_BYTES"]

XML_SPACE = "{http://www.w3.org/XML/1998/namespace}space"
#: Element names of PML itself; a module cannot take them because prompts select by element name.
RESERVED_NAMES = frozenset({"system", "user", "assistant", "module", "union", "parameter",
                            "schema", "prompt"})
# The defaults, for reading; to change a limit assign to promptcache.pml.limits (read at call time).
MAX_PARAMETER_LENGTH = limits.MAX_PARAMETER_LENGTH
MAX_INCLUDE_BYTES = limits.MAX_INCLUDE_BYTES
MAX_DEPTH = limits.MAX_DEPTH
# XML 1.0 (fifth edition) NameStartChar / NameChar without ':' (an NCName), which is what libxml2
# accepts as an element or attribute name: a prompt can write <name/> and name="..." exactly when
# the name matches. tests/test_security_pml.py checks the agreement with lxml character by character.
_START = ("A-Z_a-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u02ff\u0370-\u037d\u037f-\u1fff\u200c-\u200d"
          "\u2070-\u218f\u2c00-\u2fef\u3001-\ud7ff\uf900-\ufdcf\ufdf0-\ufffd\U00010000-\U000effff")
_NAME = re.compile(f"[{_START}][{_START}\\-.0-9\u00b7\u0300-\u036f\u203f-\u2040]*\\Z")
_POSITIVE_INT = re.compile(r"[0-9]+\Z")
NAME_RULE = ("an XML name without ':': a letter or '_' first, then letters, digits, '_', '-', '.' "
             "or '\u00b7'")


def is_pml_name(name: str) -> bool:
    """The one name rule of modules and parameters, in schemas and in prompts (an XML NCName).

    A module is selected by an element named like it and an argument is an attribute named like
    its parameter, so a name is valid exactly when it can be such an element or attribute name."""
    return bool(_NAME.match(name))


@dataclass
class _Run:
    """A raw text run of a container (element text or a child's tail) and its starting line."""

    text: str
    line: int | None


def _end_line(el: etree._Element) -> int | None:
    """Best estimate of the line holding ``el``'s end tag (lxml only records start lines)."""
    last = el
    for last in el.iter():
        pass
    if last.sourceline is None:
        return el.sourceline
    line = last.sourceline + (last.text or "").count("\n")
    node = last
    while node is not el:
        line += (node.tail or "").count("\n")
        node = node.getparent()
    return line


class _Reader:
    """Shared helpers of the schema and prompt readers: errors, attributes, raw content."""

    error: type[PMLError] = PMLError

    def __init__(self, file: str | None, source: str = "") -> None:
        self.file = file
        self.lines = source.replace("\r\n", "\n").replace("\r", "\n").split("\n")

    def fail(self, message: str, line: int | None) -> PMLError:
        return self.error(message, self.file, line)

    def loc(self, line: int | None) -> Location:
        return Location(self.file, line)

    def tag(self, el: etree._Element) -> str:
        tag = el.tag
        if not isinstance(tag, str):  # pragma: no cover - comments/PIs are removed by the parser
            raise self.fail("unexpected XML node", el.sourceline)
        if tag.startswith("{"):
            raise self.fail(f"namespaced element <{tag}> is not PML", el.sourceline)
        return tag

    def attrs(self, el: etree._Element, allowed: set[str], required: set[str] = frozenset(),
              space: bool = True) -> dict[str, str]:
        """Plain attributes of ``el``; unknown or missing ones are errors naming the line."""
        out: dict[str, str] = {}
        for key, value in attributes(el):
            if key == XML_SPACE and space:
                continue
            if key not in allowed:
                shown = "xml:space" if key == XML_SPACE else key
                expected = ", ".join(sorted(allowed | ({"xml:space"} if space else set()))) or "none"
                raise self.fail(f"unknown attribute {shown!r} on <{el.tag}> (allowed: {expected})",
                                el.sourceline)
            out[key] = value
        for key in sorted(required):
            if key not in out:
                raise self.fail(f"<{el.tag}> needs a {key}=\"...\" attribute", el.sourceline)
        return out

    def preserve(self, el: etree._Element, inherited: bool) -> bool:
        value = el.get(XML_SPACE)
        if value is None:
            return inherited
        if value == "preserve":
            return True
        if value == "default":
            return False
        raise self.fail(f'xml:space must be "preserve" or "default", not {value!r}', el.sourceline)

    def items(self, el: etree._Element) -> Iterator[_Run | etree._Element]:
        """The container's content in document order: text runs and child elements."""
        children = list(el)
        for child in children:
            if isinstance(child, etree._Entity):
                raise self.fail(f"entity reference {child.text} is not allowed in PML",
                                child.sourceline or el.sourceline)
        if el.text:
            yield _Run(el.text, self._run_line(el.text, el.sourceline, children[0] if children else None))
        for i, child in enumerate(children):
            yield child
            if child.tail:
                following = children[i + 1] if i + 1 < len(children) else None
                yield _Run(child.tail, self._run_line(child.tail, None, following, after=child))

    @staticmethod
    def _run_line(text: str, start: int | None, following: etree._Element | None,
                  after: etree._Element | None = None) -> int | None:
        if following is not None and following.sourceline:
            return following.sourceline - text.count("\n")  # exact, counted back from the next tag
        if after is not None:
            return _end_line(after)
        return start

    def normalize(self, run: _Run) -> str:
        """Rule 1 for a run: dedent (its first line indented like its source line), strip."""
        first = None
        if run.line is not None and 0 < run.line <= len(self.lines):
            line = self.lines[run.line - 1]
            first = line[: len(line) - len(line.lstrip(" \t"))]
        return normalize_text(run.text, first)

    @staticmethod
    def body_line(run: _Run) -> int | None:
        """Line where the non-blank part of ``run`` starts."""
        if run.line is None:
            return None
        lead, _, _ = split_blank(run.text)
        return run.line + lead.count("\n")

    def name(self, raw: str, el: etree._Element, what: str) -> str:
        name = raw.strip()
        if not is_pml_name(name):
            raise self.fail(f"{what} name {raw!r} is not a valid PML name ({NAME_RULE})", el.sourceline)
        return name

    @staticmethod
    def boolean(value: str | None) -> bool | None:
        if value is None:
            return None
        return {"true": True, "false": False}.get(value.strip().lower())


class _SchemaReader(_Reader):
    error = SchemaError

    def __init__(self, file: str | None, source: str, base_dir: Path | None,
                 allowed_root: Path | None = None) -> None:
        super().__init__(file, source)
        self.base_dir = base_dir
        self.allowed_root = allowed_root
        self.union_depth = 0
        self.opened = False  # an open role was read: only (ignored) whitespace may follow

    def read(self, root: etree._Element) -> Schema:
        if self.tag(root) != "schema":
            raise self.fail(f"a schema document's root element must be <schema>, not <{root.tag}>",
                            root.sourceline)
        attrs = self.attrs(root, {"name"}, {"name"})
        name = attrs["name"].strip()
        if not name:
            raise self.fail("the schema name must not be empty", root.sourceline)
        children = self.content(root, scope={}, params=None, role=None,
                                preserve=self.preserve(root, False), depth=1)
        return Schema(name, Module(name, children, True, self.loc(root.sourceline)), self.file)

    # -- containers

    def content(self, el: etree._Element, scope: dict[str, int | None],
                params: dict[str, int | None] | None, role: str | None, preserve: bool,
                depth: int) -> list[Node]:
        """Children of a schema, module or role block with the whitespace rules applied.

        ``scope`` collects module names of the enclosing module; ``params`` its parameter names
        (``None`` at the schema's top level, where parameters are not allowed).
        """
        nodes: list[Node] = []
        prev: str | None = None  # kind of the previous piece: None, "text", "element", "role"
        gap = ""
        for item in self.items(el):
            if isinstance(item, _Run):
                if preserve:
                    if self.opened:
                        continue  # nothing, not even whitespace, may follow an open turn
                    nodes.append(Text(item.text, self.loc(item.line)))
                    prev = "text"
                    continue
                lead, body, trail = split_blank(item.text)
                if not body:
                    gap += item.text
                    continue
                sep = _separator(prev, gap + lead, "text")
                nodes.append(Text(sep + self.normalize(item), self.loc(self.body_line(item))))
                prev, gap = "text", trail
            else:
                node = self.element(item, scope, params, role, preserve, depth)
                kind = "role" if isinstance(node, RoleBlock) else "element"
                sep = "" if preserve else _separator(prev, gap, kind)
                if sep:
                    nodes.append(Text(sep, self.loc(item.sourceline)))
                nodes.append(node)
                prev, gap = kind, ""
        return nodes

    def element(self, el: etree._Element, scope: dict[str, int | None],
                params: dict[str, int | None] | None, role: str | None, preserve: bool,
                depth: int) -> Node:
        tag = self.tag(el)
        if depth >= limits.MAX_DEPTH:
            raise self.fail(f"elements are nested more than {limits.MAX_DEPTH} levels deep",
                            el.sourceline)
        if tag == "module":
            return self.module(el, scope, role, preserve, depth)
        if tag == "union":
            return self.union(el, scope, role, preserve, depth)
        if tag == "parameter":
            return self.parameter(el, params)
        if tag in ROLES:
            return self.role(el, scope, params, role, preserve, depth)
        raise self.fail(f"unknown element <{tag}> (a schema may contain <module>, <union>, "
                        "<parameter>, <system>, <user>, <assistant> and text)", el.sourceline)

    def module(self, el: etree._Element, scope: dict[str, int | None], role: str | None,
               preserve: bool, depth: int) -> Module:
        attrs = self.attrs(el, {"name", "cache", "src"}, {"name"})
        name = self.name(attrs["name"], el, "module")
        if name in RESERVED_NAMES:
            raise self.fail(f"module name {name!r} is reserved (PML element names cannot be module "
                            "names, since prompts select modules by element name)", el.sourceline)
        if name in scope:
            first = scope[name]
            raise self.fail(f"duplicate module name {name!r} in this scope"
                            + (f" (first defined on line {first})" if first else ""), el.sourceline)
        scope[name] = el.sourceline
        cache = True
        if "cache" in attrs:
            cache = self.boolean(attrs["cache"])
            if cache is None:
                raise self.fail(f'cache must be "true" or "false", not {attrs["cache"]!r}',
                                el.sourceline)
        preserve = self.preserve(el, preserve)
        if "src" in attrs:
            if len(el) or not is_blank(el.text):
                raise self.fail(f"module {name!r} has src= and must then be empty (its text comes "
                                "from the file)", el.sourceline)
            text = self.include(attrs["src"], el)
            text = text if preserve else normalize_text(text)
            children: list[Node] = [Text(text, self.loc(el.sourceline))] if text else []
        else:
            children = self.content(el, scope={}, params={}, role=role, preserve=preserve,
                                    depth=depth + 1)
        return Module(name, children, cache, self.loc(el.sourceline))

    def include(self, src: str, el: etree._Element) -> str:
        """Text of an ``src=`` file (UTF-8, universal newlines), confined to the allowed root.

        The path is relative to the schema's folder; after resolving symlinks it must lie inside
        the allowed root (default: that folder), and it must be a regular file within
        MAX_INCLUDE_BYTES. Errors name the path, never the file's content."""
        rel = src.strip()
        if not rel:
            raise self.fail("src= must name a file", el.sourceline)
        if self.base_dir is None:
            raise self.fail(f"src={rel!r}: this schema was given as text without a base folder, so "
                            "it can include no file (pass base_dir=..., or load the schema from a "
                            "file with load_schema)", el.sourceline)
        path = self.resolve_include(rel, el)
        try:
            data = read_bounded(path, limits.MAX_INCLUDE_BYTES)
        except FileRefused as e:
            raise self.fail(f"src={rel!r}: cannot read {path}: {e.reason}", el.sourceline) from None
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise self.fail(f"src={rel!r}: {path} is not UTF-8 text ({e.reason})", el.sourceline) from None
        return text.replace("\r\n", "\n").replace("\r", "\n")

    def resolve_include(self, rel: str, el: etree._Element) -> Path:
        """``rel`` resolved (symlinks too) and checked to lie inside the allowed root."""
        assert self.base_dir is not None
        root = self.allowed_root if self.allowed_root is not None else self.base_dir
        try:
            root = root.resolve(strict=True)
            path = (self.base_dir / rel).resolve(strict=True)
        except (OSError, RuntimeError, ValueError) as e:  # missing, a symlink loop, a NUL byte
            reason = getattr(e, "strerror", None) or "cannot be resolved"
            raise self.fail(f"src={rel!r}: {reason}", el.sourceline) from None
        if not path.is_relative_to(root):
            raise self.fail(f"src={rel!r} resolves outside the allowed folder {root} (a schema may "
                            "include only files inside its own folder unless the caller passes "
                            "allowed_root=...)", el.sourceline)
        return path

    def union(self, el: etree._Element, scope: dict[str, int | None], role: str | None,
              preserve: bool, depth: int) -> UnionBlock:
        attrs = self.attrs(el, {"scaffold"})
        preserve = self.preserve(el, preserve)
        members: list[Module] = []
        self.union_depth += 1
        try:
            for item in self.items(el):
                if isinstance(item, _Run):
                    if not is_blank(item.text):
                        raise self.fail("text is not allowed directly inside <union> (only <module> "
                                        "members; whitespace between them is ignored)",
                                        self.body_line(item))
                    continue
                tag = self.tag(item)
                if tag != "module":
                    raise self.fail(f"<union> may contain only <module> elements, not <{tag}>",
                                    item.sourceline)
                if depth + 1 >= limits.MAX_DEPTH:
                    raise self.fail(f"elements are nested more than {limits.MAX_DEPTH} levels deep",
                                    item.sourceline)
                members.append(self.module(item, scope, role, preserve, depth + 1))
        finally:
            self.union_depth -= 1
        if not members:
            raise self.fail("<union> needs at least one <module> member", el.sourceline)
        scaffold = attrs.get("scaffold")
        if scaffold is not None:
            scaffold = scaffold.strip()
            names = [m.name for m in members]
            if scaffold not in names:
                raise self.fail(f"union scaffold {scaffold!r} is not one of its members "
                                f"({', '.join(names)})", el.sourceline)
        return UnionBlock(members, scaffold, self.loc(el.sourceline))

    def parameter(self, el: etree._Element, params: dict[str, int | None] | None) -> Parameter:
        if params is None:
            raise self.fail("<parameter> must be inside a <module> (the schema's top level takes "
                            "no arguments)", el.sourceline)
        attrs = self.attrs(el, {"name", "length", "scaffold"}, {"name", "length"}, space=False)
        name = self.name(attrs["name"], el, "parameter")
        if name in params:
            first = params[name]
            raise self.fail(f"duplicate parameter name {name!r} in this module"
                            + (f" (first defined on line {first})" if first else ""), el.sourceline)
        params[name] = el.sourceline
        raw = attrs["length"].strip()
        if not _POSITIVE_INT.match(raw) or int(raw) == 0:
            raise self.fail(f"parameter {name!r}: length must be a positive integer, not "
                            f"{attrs['length']!r}", el.sourceline)
        length = int(raw)
        if length > limits.MAX_PARAMETER_LENGTH:
            raise self.fail(f"parameter {name!r}: length={length} exceeds the maximum "
                            f"{limits.MAX_PARAMETER_LENGTH}", el.sourceline)
        if len(el) or not is_blank(el.text):
            raise self.fail(f"<parameter> {name!r} cannot have content (use scaffold=\"...\" for a "
                            "placeholder)", el.sourceline)
        scaffold = attrs.get("scaffold")
        scaffold = scaffold.strip() if scaffold is not None else None
        return Parameter(name, length, scaffold or None, self.loc(el.sourceline))

    def role(self, el: etree._Element, scope: dict[str, int | None],
             params: dict[str, int | None] | None, role: str | None, preserve: bool,
             depth: int) -> RoleBlock:
        tag = el.tag
        if role is not None:
            raise self.fail(f"<{tag}> cannot appear inside <{role}>: role tags do not nest",
                            el.sourceline)
        attrs = self.attrs(el, {"open"})
        is_open = False
        if "open" in attrs:
            flag = self.boolean(attrs["open"])
            if flag is None:
                raise self.fail(f'open must be "true" or "false", not {attrs["open"]!r}', el.sourceline)
            is_open = flag
        if is_open:
            self.check_last(el)
        children = self.content(el, scope, params, tag, self.preserve(el, preserve), depth + 1)
        self.opened = self.opened or is_open
        return RoleBlock(tag, children, is_open, self.loc(el.sourceline))

    def check_last(self, el: etree._Element) -> None:
        """An open turn continues into the prompt, so nothing of the schema may follow it."""
        if self.union_depth:
            raise self.fail(f'<{el.tag} open="true"> cannot be inside a <union> member: the turn '
                            "left open must not depend on which member a prompt selects",
                            el.sourceline)
        node = el
        while node.getparent() is not None:
            following = node.getnext()
            if following is not None:
                raise self.fail(f'<{el.tag} open="true"> must be the last element of the schema, but '
                                f"<{following.tag}> on line {following.sourceline} follows it",
                                el.sourceline)
            if not is_blank(node.tail):
                raise self.fail(f'<{el.tag} open="true"> must be the last element of the schema, but '
                                "text follows it", el.sourceline)
            node = node.getparent()


def _separator(prev: str | None, gap: str, following: str) -> str:
    """Rules 2, 4 and 5 of the module docstring."""
    if prev is None or prev == "role" or following == "role":
        return ""
    return separator(gap)


class _PromptReader(_Reader):
    error = PromptError

    def read(self, root: etree._Element) -> Prompt:
        if self.tag(root) != "prompt":
            raise self.fail(f"a prompt document's root element must be <prompt>, not <{root.tag}>",
                            root.sourceline)
        attrs = self.attrs(root, {"schema"}, {"schema"})
        schema = attrs["schema"].strip()
        if not schema:
            raise self.fail("the prompt's schema=\"...\" must name a schema", root.sourceline)
        preserve = self.preserve(root, False)
        selections: list[Selection] = []
        suffix: list[Turn] = []
        prev: str | None = None  # None, "selection", "text", "role"
        gap = ""
        for item in self.items(root):
            if isinstance(item, _Run):
                lead, body, trail = split_blank(item.text)
                if not body:
                    gap += item.text
                    continue
                if preserve:
                    text = item.text
                else:
                    sep = separator(gap + lead) if prev == "selection" else ""
                    text = sep + self.normalize(item)
                suffix.append(Turn(None, text, self.loc(self.body_line(item))))
                prev, gap = "text", trail
                continue
            tag = self.tag(item)
            if tag in ROLES:
                suffix.append(self.turn(item, preserve))
                prev = "role"
            else:
                if suffix:
                    first = suffix[0]
                    raise self.fail(f"selection <{tag}> comes after the prompt's trailing "
                                    f"{'text' if first.role is None else f'<{first.role}> turn'}"
                                    + (f" (line {first.loc.line})" if first.loc.line else "")
                                    + ": all selections must come before any text or turn",
                                    item.sourceline)
                selections.append(self.selection(item, depth=1))
                prev = "selection"
            gap = ""
        return Prompt(schema, selections, suffix, self.file, self.loc(root.sourceline))

    def selection(self, el: etree._Element, depth: int) -> Selection:
        tag = self.tag(el)
        if depth >= limits.MAX_DEPTH:
            raise self.fail(f"selections are nested more than {limits.MAX_DEPTH} levels deep",
                            el.sourceline)
        if tag in RESERVED_NAMES:
            raise self.fail(f"<{tag}> is not a selection: a prompt selects a module by an element "
                            "named like the module", el.sourceline)
        if not is_pml_name(tag):
            raise self.fail(f"<{tag}> is not a valid PML name ({NAME_RULE})", el.sourceline)
        args: dict[str, str] = {}
        for key, value in attributes(el):
            if key.startswith("{"):
                shown = "xml:space" if key == XML_SPACE else key
                raise self.fail(f"attribute {shown!r} on selection <{tag}> is not a parameter name",
                                el.sourceline)
            if not is_pml_name(key):
                raise self.fail(f"attribute {key!r} on selection <{tag}> is not a valid PML name "
                                f"({NAME_RULE})", el.sourceline)
            args[key] = value.strip()
        children: list[Selection] = []
        for item in self.items(el):
            if isinstance(item, _Run):
                if not is_blank(item.text):
                    raise self.fail(f"text is not allowed inside selection <{tag}> (selections only "
                                    "choose modules; put text after all selections)",
                                    self.body_line(item))
                continue
            child = self.tag(item)
            if child in ROLES:
                raise self.fail(f"turn <{child}> inside selection <{tag}>: turns come after all "
                                "selections, at the prompt's top level", item.sourceline)
            children.append(self.selection(item, depth + 1))
        return Selection(tag, args, children, self.loc(el.sourceline))

    def turn(self, el: etree._Element, preserve: bool) -> Turn:
        self.attrs(el, set())
        for child in el:
            raise self.fail(f"turn <{el.tag}> cannot contain elements (found <{child.tag}>); a turn "
                            "is plain text", child.sourceline)
        text = el.text or ""
        if not self.preserve(el, preserve):
            text = self.normalize(_Run(text, el.sourceline))
        return Turn(el.tag, text, self.loc(el.sourceline))


# ---------------------------------------------------------------- public API


def parse_schema(text: str | bytes, file: str | None = None,
                 base_dir: str | os.PathLike | None = None, *,
                 allowed_root: str | os.PathLike | None = None, max_bytes: int | None = None) -> Schema:
    """Parse a schema document given as text; raises PMLSyntaxError or SchemaError.

    ``file`` only names the document in errors. ``src=`` paths resolve against ``base_dir`` and
    must lie inside ``allowed_root`` (default: ``base_dir``) after resolving symlinks; without
    ``base_dir`` a schema can include no file. ``max_bytes`` defaults to
    :data:`.limits.MAX_DOCUMENT_BYTES`."""
    root, source = parse_xml(text, file, _limit(max_bytes, "MAX_DOCUMENT_BYTES"), SchemaError)
    base = Path(base_dir) if base_dir is not None else None
    allowed = Path(allowed_root) if allowed_root is not None else None
    return _SchemaReader(file, source, base, allowed).read(root)


def load_schema(path: str | os.PathLike, *, allowed_root: str | os.PathLike | None = None,
                max_bytes: int | None = None) -> Schema:
    """Read and parse a schema file; ``src=`` paths are relative to its folder and confined to
    it (or to ``allowed_root``)."""
    data = _read(path, SchemaError, "schema", _limit(max_bytes, "MAX_DOCUMENT_BYTES"))
    return parse_schema(data, file=str(path), base_dir=Path(path).parent, allowed_root=allowed_root,
                        max_bytes=len(data))


def parse_prompt(text: str | bytes, file: str | None = None, *, max_bytes: int | None = None) -> Prompt:
    """Parse a prompt document (shape only; :func:`.binding.bind` checks it against a schema).

    ``max_bytes`` defaults to :data:`.limits.MAX_PROMPT_BYTES`."""
    root, source = parse_xml(text, file, _limit(max_bytes, "MAX_PROMPT_BYTES"), PromptError)
    return _PromptReader(file, source).read(root)


def load_prompt(path: str | os.PathLike, *, max_bytes: int | None = None) -> Prompt:
    """Read and parse a prompt file: the explicit way to take a prompt from a file (the engine
    never opens a ``str``)."""
    data = _read(path, PromptError, "prompt", _limit(max_bytes, "MAX_PROMPT_BYTES"))
    return parse_prompt(data, file=str(path), max_bytes=len(data))


def _limit(value: int | None, name: str) -> int:
    """``value``, else the current default of :mod:`.limits` (read now, so it can be changed)."""
    return getattr(limits, name) if value is None else value


def _read(path: str | os.PathLike, error: Callable[..., PMLError], what: str, max_bytes: int) -> bytes:
    """A PML file's bytes through the one bounded reader; failures are ``error`` naming the file."""
    try:
        return read_bounded(path, max_bytes)
    except FileRefused as e:
        raise error(f"cannot read {what} file: {e.reason}", str(path)) from None
