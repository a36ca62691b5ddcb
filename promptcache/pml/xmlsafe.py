"""Turn untrusted PML text into an lxml tree without letting XML's dangerous features run.

PML needs none of DTDs, entities, external resources or processing instructions, so they are
refused or dropped before they can do harm: a document with a DOCTYPE is rejected (an internal
subset is the only place entities can be declared, so billion-laughs style expansion can never
start), network access is off, and the tree size stays within libxml2's default (non-huge) limits.
Every failure becomes a :class:`PMLSyntaxError` carrying file, line and column.
"""

from __future__ import annotations

import codecs
import re

from lxml import etree

from .errors import PMLSyntaxError
from .whitespace import XML_WHITESPACE

_DECL_ENCODING = re.compile(rb"""^<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._\-]+)["']""")
_STR_DECL = re.compile(r"""^(<\?xml[^>]*?encoding\s*=\s*)(["'])[^"']*\2""")
_LXML_POSITION = re.compile(r",? line \d+, column \d+$")


def make_parser() -> etree.XMLParser:
    """A fresh lxml parser with every resolving feature disabled (parsers are not thread-safe)."""
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                           dtd_validation=False, huge_tree=False, remove_comments=True,
                           remove_pis=True, recover=False)


def decode(data: str | bytes, file: str | None) -> str:
    """Bytes to str, honouring a BOM or an XML declaration's encoding (UTF-8 otherwise)."""
    if isinstance(data, str):
        return data
    if data.startswith(codecs.BOM_UTF8):
        data, encoding = data[len(codecs.BOM_UTF8):], "utf-8"
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    else:
        m = _DECL_ENCODING.match(data)
        encoding = m.group(1).decode("ascii") if m else "utf-8"
    try:
        return data.decode(encoding)
    except LookupError:
        raise PMLSyntaxError(f"unknown encoding {encoding!r} in the XML declaration", file, 1) from None
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PMLSyntaxError(f"the document is not valid {encoding}: {e.reason}", file, line) from None


def check_prolog(text: str, file: str | None) -> None:
    """Refuse a DOCTYPE (and with it any DTD or entity declaration) before lxml sees the text.

    Only the prolog -- whatever precedes the root element -- can hold a DOCTYPE; scanning just the
    prolog means a ``<!DOCTYPE html>`` inside a CDATA section (an HTML file as module text) is fine.
    """
    i, n = 0, len(text)
    if text.startswith("\ufeff"):
        i = 1
    while i < n:
        if text[i] in XML_WHITESPACE:
            i += 1
        elif text.startswith("<?", i):
            end = text.find("?>", i + 2)
            if end < 0:
                return  # malformed: lxml reports it
            i = end + 2
        elif text.startswith("<!--", i):
            end = text.find("-->", i + 4)
            if end < 0:
                return
            i = end + 3
        elif text.startswith("<!", i):
            line = text.count("\n", 0, i) + 1
            raise PMLSyntaxError("DOCTYPE and DTD declarations (and so entity definitions) are not "
                                 "allowed in PML", file, line, i - text.rfind("\n", 0, i))
        else:
            return


def parse_xml(data: str | bytes, file: str | None) -> tuple[etree._Element, str]:
    """Parse a whole PML document; return its root element and the decoded source text.

    Raises PMLSyntaxError for anything that is not a well-formed, DTD-free document."""
    text = decode(data, file)
    check_prolog(text, file)
    if text.startswith("\ufeff"):
        text = text[1:]
    # lxml refuses str input with an encoding declaration: feed UTF-8 bytes and say so.
    text = _STR_DECL.sub(lambda m: m.group(1) + '"UTF-8"', text, count=1)
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError as e:
        line = text.count("\n", 0, e.start) + 1
        raise PMLSyntaxError("the document contains an unpaired surrogate character", file, line) from None
    try:
        root = etree.fromstring(raw, make_parser())
    except etree.XMLSyntaxError as e:
        line, column = e.position if e.position else (None, None)
        message = _LXML_POSITION.sub("", e.msg or str(e)) or "malformed XML"
        raise PMLSyntaxError(message, file, line or None, column or None) from None
    except (etree.LxmlError, ValueError, TypeError) as e:
        raise PMLSyntaxError(f"cannot parse the document: {e}", file) from None
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise PMLSyntaxError("DOCTYPE and DTD declarations are not allowed in PML", file, 1)
    return root, text
