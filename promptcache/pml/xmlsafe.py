"""Turn untrusted PML text into an lxml tree without letting XML's dangerous features run.

PML needs none of DTDs, entities, external resources or processing instructions, so they are
refused or dropped before they can do harm: a document with a DOCTYPE is rejected (an internal
subset is the only place entities can be declared, so billion-laughs style expansion can never
start), network access is off, and the tree size stays within libxml2's default (non-huge) limits.
Every failure becomes a :class:`PMLSyntaxError` carrying file, line and column.

Size: a document larger than its byte cap, with more than :data:`.limits.MAX_ELEMENTS` elements or
an element with more than :data:`.limits.MAX_ATTRIBUTES` attributes is refused in time linear in
its size (lxml parses in linear time; the counts are taken on the parsed tree before anything
reads an attribute, since lxml's ``attrib.items()`` is quadratic in the number of attributes).
Encodings: only character sets (codecs Python marks as text encodings, minus the few that are
transforms rather than charsets, see :data:`NOT_CHARSETS`) may be declared.
"""

from __future__ import annotations

import codecs
import re

from lxml import etree

from . import limits
from .errors import PMLError, PMLSyntaxError
from .whitespace import XML_WHITESPACE

_DECL_ENCODING = re.compile(rb"""^<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._\-]+)["']""")
_STR_DECL = re.compile(r"""^(<\?xml[^>]*?encoding\s*=\s*)(["'])[^"']*\2""")
_LXML_POSITION = re.compile(r",? line \d+, column \d+$")
#: Codecs Python calls text encodings that are not character sets a document is written in:
#: domain-name and escape transforms, and the codec that refuses everything.
NOT_CHARSETS = frozenset({"idna", "punycode", "undefined", "unicode_escape", "raw_unicode_escape",
                          "utf_7"})


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
        encoding = charset(m.group(1).decode("ascii"), file) if m else "utf-8"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PMLSyntaxError(f"the document is not valid {encoding}: {e.reason}", file, line) from None
    except (UnicodeError, LookupError, ValueError, TypeError) as e:  # a codec's own failure modes
        raise PMLSyntaxError(f"the document cannot be decoded as {encoding}: {type(e).__name__}",
                             file, 1) from None


def charset(name: str, file: str | None) -> str:
    """The codec of an XML declaration's ``encoding=``, if it names a character set."""
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError, ImportError):
        raise PMLSyntaxError(f"unknown encoding {name!r} in the XML declaration", file, 1) from None
    if not getattr(info, "_is_text_encoding", True) or info.name.replace("-", "_") in NOT_CHARSETS:
        raise PMLSyntaxError(f"encoding {name!r} in the XML declaration is not a character set",
                             file, 1)
    return info.name


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


def check_size(data: str | bytes, max_bytes: int, file: str | None, error: type[PMLError]) -> None:
    """Refuse a document over ``max_bytes`` (UTF-8 bytes for ``str``) before decoding it."""
    size = len(data)
    if isinstance(data, str) and size <= max_bytes < 4 * size:  # only then can UTF-8 cross the cap
        size = len(data.encode("utf-8", errors="surrogatepass"))
    if size > max_bytes:
        raise error(f"the document is larger than the limit of {max_bytes} bytes", file)


def check_counts(root: etree._Element, file: str | None, error: type[PMLError]) -> None:
    """Refuse more than MAX_ELEMENTS elements or MAX_ATTRIBUTES attributes on one element.

    One pass over the tree; ``len(el.attrib)`` walks the attribute list once (linear)."""
    max_elements, max_attributes = limits.MAX_ELEMENTS, limits.MAX_ATTRIBUTES
    for n, el in enumerate(root.iter(), 1):
        if n > max_elements:
            raise error(f"the document has more than {max_elements} elements", file, el.sourceline)
        if len(el.attrib) > max_attributes:
            raise error(f"<{el.tag}> has {len(el.attrib)} attributes, more than the limit of "
                        f"{max_attributes}", file, el.sourceline)


def attributes(el: etree._Element) -> list[tuple[str, str]]:
    """``el``'s attributes as ``(name, value)`` in document order, in linear time.

    lxml's ``el.attrib.items()`` looks each value up by name (quadratic: 50,000 attributes took
    10 s); XPath ``@*`` hands back the attribute nodes themselves."""
    return [(a.attrname, str(a)) for a in el.xpath("@*")]


def parse_xml(data: str | bytes, file: str | None, max_bytes: int | None = None,
              error: type[PMLError] = PMLSyntaxError) -> tuple[etree._Element, str]:
    """Parse a whole PML document; return its root element and the decoded source text.

    Raises PMLSyntaxError for anything that is not a well-formed, DTD-free document, and
    ``error`` for one over the limits (``max_bytes``, default :data:`.limits.MAX_DOCUMENT_BYTES`;
    :data:`.limits.MAX_ELEMENTS`; :data:`.limits.MAX_ATTRIBUTES`)."""
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, (str, bytes)):
        raise TypeError(f"a PML document is str or bytes, not {type(data).__name__}")
    check_size(data, limits.MAX_DOCUMENT_BYTES if max_bytes is None else max_bytes, file, error)
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
    check_counts(root, file, error)
    return root, text
