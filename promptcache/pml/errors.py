"""One exception family for everything PML can reject, each carrying where it happened.

Every user-facing failure of the PML layer is a :class:`PMLError` (or a subclass), so callers
and the CLI can catch one type and print ``FILE:LINE: message``.
"""

from __future__ import annotations


class PMLError(Exception):
    """A PML document (schema or prompt) was rejected.

    ``file``/``line``/``column`` locate the cause when known; ``str(err)`` is ``FILE:LINE: msg``.
    """

    def __init__(self, message: str, file: str | None = None, line: int | None = None,
                 column: int | None = None) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.column = column
        super().__init__(self.location_prefix() + message)

    def location_prefix(self) -> str:
        if self.file is None and self.line is None:
            return ""
        where = self.file or "<string>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return where + ": "


class PMLSyntaxError(PMLError):
    """Malformed XML, or a forbidden construct such as a DOCTYPE or an entity declaration."""


class SchemaError(PMLError):
    """A well-formed document that is not a valid schema (duplicate names, bad attributes...)."""


class PromptError(PMLError):
    """A prompt that does not fit its schema (unknown module, two union members, bad argument...)."""
