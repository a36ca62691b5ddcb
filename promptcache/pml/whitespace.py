"""Whitespace normalisation of PML text: what the source's layout whitespace turns into.

PML documents are indented for humans, but every character of a schema becomes tokens with fixed
positions, so the rules must be simple and predictable (full description: docs/pml.md):

* Each text run (element text, tail text, CDATA, an ``src=`` file) is *dedented* -- the longest
  common run of leading spaces/tabs of its non-blank lines is removed, as ``textwrap.dedent`` does
  -- and then stripped of leading and trailing XML whitespace. Runs that become empty vanish.
  Indentation is measured in the source: a run that starts right after markup on the same line
  (``<module>Hello``, the text after ``<parameter .../>``) counts its first line as indented like
  that source line. Unlike ``textwrap.dedent``, whitespace-only lines inside a run keep whatever
  they have beyond the common indent, so indented code survives exactly apart from the
  common-indent removal.
* The whitespace *between* two pieces collapses to one separator (:func:`separator`): ``"\\n"`` if
  it contained a newline, ``" "`` if it contained other whitespace, ``""`` if there was none.

Only the four XML whitespace characters (space, tab, CR, LF) count; a non-breaking space is text.
"""

from __future__ import annotations

XML_WHITESPACE = " \t\r\n"
_INDENT = " \t"


def dedent(text: str, first_indent: str | None = None) -> str:
    """Remove the longest common leading-blank prefix of the non-blank lines of ``text``.

    Blank (whitespace-only) lines do not constrain the prefix; they lose at most the prefix.
    ``first_indent``: the run's first line does not start a source line (it follows markup, as
    in ``<module>Hello`` or the text after ``<parameter .../>``); it then counts as indented
    like the source line it is on, and only the following lines are dedented.
    """
    lines = text.split("\n")
    prefix: str | None = None
    for i, line in enumerate(lines):
        body = line.lstrip(_INDENT)
        if not body.strip(XML_WHITESPACE):
            continue
        indent = first_indent if (i == 0 and first_indent is not None) else line[: len(line) - len(body)]
        if prefix is None:
            prefix = indent
        else:
            n = 0
            limit = min(len(prefix), len(indent))
            while n < limit and prefix[n] == indent[n]:
                n += 1
            prefix = prefix[:n]
        if not prefix:
            return text
    if not prefix:
        return text
    out = []
    for i, line in enumerate(lines):
        if i == 0 and first_indent is not None:
            out.append(line)
        elif line.startswith(prefix):
            out.append(line[len(prefix):])
        elif not line.strip(XML_WHITESPACE):
            out.append(line.lstrip(_INDENT))  # blank line shorter than the prefix
        else:  # pragma: no cover - every non-blank line starts with the common prefix
            out.append(line)
    return "\n".join(out)


def normalize_text(text: str, first_indent: str | None = None) -> str:
    """Dedent, then strip leading/trailing XML whitespace (the rule for every text run)."""
    return dedent(text, first_indent).strip(XML_WHITESPACE)


def split_blank(text: str) -> tuple[str, str, str]:
    """Split ``text`` into (leading whitespace, body, trailing whitespace)."""
    body = text.strip(XML_WHITESPACE)
    if not body:
        return text, "", ""
    lead = text[: len(text) - len(text.lstrip(XML_WHITESPACE))]
    trail = text[len(text.rstrip(XML_WHITESPACE)):]
    return lead, body, trail


def separator(gap: str) -> str:
    """The single separator a run of inter-piece whitespace collapses to."""
    if "\n" in gap or "\r" in gap:
        return "\n"
    return " " if gap else ""


def is_blank(text: str | None) -> bool:
    """True for ``None``, ``""`` and XML-whitespace-only strings."""
    return not text or not text.strip(XML_WHITESPACE)
