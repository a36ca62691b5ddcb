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
from pathlib import Path
from typing import Callable

from . import limits
from .errors import PMLError, PromptError, SchemaError
from .files import FileRefused, read_bounded
from .model import Prompt, Schema
from .prompt_reader import PromptReader
from .reader import NAME_RULE, RESERVED_NAMES, is_pml_name
from .schema_reader import SchemaReader
from .xmlsafe import parse_xml

__all__ = ["parse_schema", "load_schema", "parse_prompt", "load_prompt", "is_pml_name",
           "RESERVED_NAMES", "MAX_PARAMETER_LENGTH", "MAX_DEPTH", "MAX_INCLUDE_BYTES", "NAME_RULE"]

# The defaults, for reading; to change a limit assign to promptcache.pml.limits (read at call time).
MAX_PARAMETER_LENGTH = limits.MAX_PARAMETER_LENGTH
MAX_INCLUDE_BYTES = limits.MAX_INCLUDE_BYTES
MAX_DEPTH = limits.MAX_DEPTH


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
    return SchemaReader(file, source, base, allowed).read(root)


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
    return PromptReader(file, source).read(root)


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
