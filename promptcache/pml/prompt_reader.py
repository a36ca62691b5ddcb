"""The prompt reader: a ``<prompt>`` element tree to a :class:`~.model.Prompt` (selections, then
the suffix of text and turns). Its shape only; :mod:`.binding` checks it against a schema.
Rules: :mod:`.parser`.
"""

from __future__ import annotations

from lxml import etree

from . import limits
from .errors import PromptError
from .model import ROLES, Prompt, Selection, Turn
from .reader import NAME_RULE, RESERVED_NAMES, XML_SPACE, Reader, Run, is_pml_name
from .whitespace import is_blank, separator, split_blank
from .xmlsafe import attributes


class PromptReader(Reader):
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
            if isinstance(item, Run):
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
            if isinstance(item, Run):
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
            text = self.normalize(Run(text, el.sourceline))
        return Turn(el.tag, text, self.loc(el.sourceline))
