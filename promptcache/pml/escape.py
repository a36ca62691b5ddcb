"""Make arbitrary strings safe to embed in PML documents that programs write.

Every piece of code that builds PML text (the compiler, eval scripts, benchmarks) must pass
literal text through :func:`escape_text` and attribute values through :func:`escape_attr`, so a
``<`` or ``&`` in source code, a ``]]>`` in a document, or a newline in an argument can never change
the document's structure. Escaping protects characters, not layout: the parser still normalises
whitespace (docs/pml.md) unless the surrounding element has ``xml:space="preserve"``.
"""

from __future__ import annotations

import re

from .errors import PMLError

# Characters XML 1.0 cannot carry at all, not even as character references.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")
_CDATA_END = "]]>"


def _check(text: str) -> None:
    bad = _NOT_XML.search(text)
    if bad:
        raise PMLError(f"text contains U+{ord(bad.group()):04X} at index {bad.start()}, "
                       "which XML cannot represent")


def escape_text(text: str) -> str:
    """Return ``text`` as PML character data that parses back to exactly ``text``.

    Text without markup characters is returned unchanged. Text with ``<``/``&``/``]]>`` becomes a
    CDATA section (readable for code), each ``]]>`` split across two sections. Text containing a
    carriage return is entity-escaped instead, because XML folds raw CRs into newlines (also in
    CDATA) while ``&#13;`` survives. Raises :class:`PMLError` for characters XML cannot represent.
    """
    _check(text)
    if "\r" in text:
        return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                .replace("\r", "&#13;"))
    if "<" not in text and "&" not in text and _CDATA_END not in text:
        return text
    return "<![CDATA[" + text.replace(_CDATA_END, "]]]]><![CDATA[>") + "]]>"


def escape_attr(value: str) -> str:
    """Return ``value`` as a double-quoted PML attribute value (quotes included).

    Tabs, newlines and CRs become character references so that XML attribute-value normalisation
    (which turns them into spaces) leaves them intact.
    """
    _check(value)
    out = (value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
           .replace('"', "&quot;").replace("\t", "&#9;").replace("\n", "&#10;")
           .replace("\r", "&#13;"))
    return f'"{out}"'
