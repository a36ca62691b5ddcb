"""Every size limit of the PML layer, in one place (docs/security.md lists them).

The readers look these names up at call time (``limits.MAX_X``), so a deployment can change a
default for the whole process by assigning to this module, e.g.
``promptcache.pml.limits.MAX_PROMPT_BYTES = 4 << 20``; the functions that take a document also
accept the byte limits as keyword arguments (``parse_prompt(text, max_bytes=...)``). Each limit
is checked in time linear in the input, before any work that could grow faster than that.
"""

from __future__ import annotations

#: Largest schema document (file or text), in bytes (UTF-8 bytes for text given as ``str``).
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
#: Largest prompt document, in bytes: prompts come from untrusted users and hold selections and
#: a question, not corpora (1 MiB is about 250k tokens, beyond any supported context window).
MAX_PROMPT_BYTES = 1024 * 1024
#: Largest ``src=`` file read (a module of 16 MiB of text is far beyond any context window).
MAX_INCLUDE_BYTES = 16 * 1024 * 1024
#: Most elements in one document (schema or prompt); a 10,000-module schema fits ten times over.
MAX_ELEMENTS = 100_000
#: Most attributes on one element (a prompt passes one per parameter of a module).
MAX_ATTRIBUTES = 256
#: Deepest element nesting accepted; keeps the recursive readers and the layout far from Python's
#: recursion limit whatever the input.
MAX_DEPTH = 64
#: Upper bound of ``<parameter length=...>``: far beyond any real slot, but keeps a typo (or a
#: hostile schema) from asking the layout for billions of padding positions.
MAX_PARAMETER_LENGTH = 131072
