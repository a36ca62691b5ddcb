"""What the schema and prompt readers share: PML's names (:func:`is_pml_name`, the reserved element
names), raw text runs with their source lines, and :class:`Reader` (errors naming file and line,
attribute checks, ``xml:space``, content in document order, whitespace rule 1). The rules
themselves are described in :mod:`.parser`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

from lxml import etree

from .errors import PMLError
from .model import Location
from .whitespace import normalize_text, split_blank
from .xmlsafe import attributes

XML_SPACE = "{http://www.w3.org/XML/1998/namespace}space"
#: Element names of PML itself; a module cannot take them because prompts select by element name.
RESERVED_NAMES = frozenset({"system", "user", "assistant", "module", "union", "parameter",
                            "schema", "prompt"})
# XML 1.0 (fifth edition) NameStartChar / NameChar without ':' (an NCName), which is what libxml2
# accepts as an element or attribute name: a prompt can write <name/> and name="..." exactly when
# the name matches. tests/test_security_pml.py checks the agreement with lxml character by character.
_START = ("A-Z_a-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u02ff\u0370-\u037d\u037f-\u1fff\u200c-\u200d"
          "\u2070-\u218f\u2c00-\u2fef\u3001-\ud7ff\uf900-\ufdcf\ufdf0-\ufffd\U00010000-\U000effff")
_NAME = re.compile(f"[{_START}][{_START}\\-.0-9\u00b7\u0300-\u036f\u203f-\u2040]*\\Z")
NAME_RULE = ("an XML name without ':': a letter or '_' first, then letters, digits, '_', '-', '.' "
             "or '\u00b7'")


def is_pml_name(name: str) -> bool:
    """The one name rule of modules and parameters, in schemas and in prompts (an XML NCName).

    A module is selected by an element named like it and an argument is an attribute named like
    its parameter, so a name is valid exactly when it can be such an element or attribute name."""
    return bool(_NAME.match(name))


@dataclass
class Run:
    """A raw text run of a container (element text or a child's tail) and its starting line."""

    text: str
    line: int | None


def end_line(el: etree._Element) -> int | None:
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


class Reader:
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

    def items(self, el: etree._Element) -> Iterator[Run | etree._Element]:
        """The container's content in document order: text runs and child elements."""
        children = list(el)
        for child in children:
            if isinstance(child, etree._Entity):
                raise self.fail(f"entity reference {child.text} is not allowed in PML",
                                child.sourceline or el.sourceline)
        if el.text:
            yield Run(el.text, self._run_line(el.text, el.sourceline, children[0] if children else None))
        for i, child in enumerate(children):
            yield child
            if child.tail:
                following = children[i + 1] if i + 1 < len(children) else None
                yield Run(child.tail, self._run_line(child.tail, None, following, after=child))

    @staticmethod
    def _run_line(text: str, start: int | None, following: etree._Element | None,
                  after: etree._Element | None = None) -> int | None:
        if following is not None and following.sourceline:
            return following.sourceline - text.count("\n")  # exact, counted back from the next tag
        if after is not None:
            return end_line(after)
        return start

    def normalize(self, run: Run) -> str:
        """Rule 1 for a run: dedent (its first line indented like its source line), strip."""
        first = None
        if run.line is not None and 0 < run.line <= len(self.lines):
            line = self.lines[run.line - 1]
            first = line[: len(line) - len(line.lstrip(" \t"))]
        return normalize_text(run.text, first)

    @staticmethod
    def body_line(run: Run) -> int | None:
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
