"""The schema reader: a ``<schema>`` element tree to a :class:`~.model.Schema` (modules, unions,
parameters, role blocks, ``src=`` includes confined to their folder). Rules: :mod:`.parser`.
"""

from __future__ import annotations

import re
from pathlib import Path

from lxml import etree

from . import limits
from .errors import SchemaError
from .files import FileRefused, read_bounded
from .model import ROLES, Module, Node, Parameter, RoleBlock, Schema, Text, UnionBlock
from .reader import RESERVED_NAMES, Reader, Run
from .whitespace import is_blank, normalize_text, separator, split_blank

_POSITIVE_INT = re.compile(r"[0-9]+\Z")


class SchemaReader(Reader):
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
            if isinstance(item, Run):
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
                if isinstance(item, Run):
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
        scaffold = self.union_scaffold(attrs.get("scaffold"), [m.name for m in members], el)
        return UnionBlock(members, scaffold, self.loc(el.sourceline))

    def union_scaffold(self, raw: str | None, names: list[str], el: etree._Element) -> str | None:
        """The member that stands in for a union while later parts are encoded, or None.

        As in the paper's implementation, a union without ``scaffold`` uses its first member.
        ``scaffold=""`` (empty or blank) asks for no scaffold: a module name is never empty, so
        this spelling cannot collide with a member's name.
        """
        if raw is None:
            return names[0]
        scaffold = raw.strip()
        if not scaffold:
            return None
        if scaffold not in names:
            raise self.fail(f"union scaffold {scaffold!r} is not one of its members "
                            f"({', '.join(names)}); write scaffold=\"\" for no scaffold",
                            el.sourceline)
        return scaffold

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
