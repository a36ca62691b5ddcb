"""PML: the Prompt Markup Language (schemas, prompts, layout)."""

from .errors import PMLError, PMLSyntaxError, PromptError, SchemaError
from .layout import Layout, Segment, TokenRenderer, build_layout
from .model import Module, Parameter, Prompt, RoleBlock, Schema, Selection, Text, Turn, UnionBlock

__all__ = [
    "PMLError", "PMLSyntaxError", "PromptError", "SchemaError", "Layout", "Segment", "TokenRenderer",
    "build_layout", "Module", "Parameter", "Prompt", "RoleBlock", "Schema", "Selection", "Text",
    "Turn", "UnionBlock",
]
