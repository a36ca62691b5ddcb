"""Bind a parsed prompt to a laid-out schema: which modules it selects, its arguments, its suffix.

This is where a prompt is checked against its schema (unknown module, two members of one union,
unknown or missing parameter, argument longer than its slot, wrong schema name); every error is a
:class:`PromptError` naming the prompt's line.

Suffix rendering: trailing plain text continues whatever turn is open (e.g. a schema's
``<user open="true">``); a ``<user>``/``<assistant>``/``<system>`` turn closes the open turn and opens
its own. At the end, when the conversation uses roles, the open turn is closed and the model's
generation prompt appended, except after an ``<assistant>`` turn, which stays open so the model
continues it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import PromptError
from .layout import Layout, ModulePath, TokenRenderer
from .model import Prompt, Selection


@dataclass
class BoundPrompt:
    """A prompt resolved against a layout, ready for planning."""

    layout: Layout
    prompt: Prompt
    selected: set[ModulePath]                           # always holds the root () and every ancestor
    arguments: dict[ModulePath, dict[str, list[int]]]   # module -> parameter -> argument token ids
    suffix_tokens: list[int]
    suffix_text: str = ""
    parameter_text: dict[ModulePath, dict[str, str]] = field(default_factory=dict)


def _err(msg: str, prompt: Prompt, line: int | None) -> PromptError:
    return PromptError(msg, prompt.file, line if line is not None else prompt.loc.line)


def _scope_name(path: ModulePath, layout: Layout) -> str:
    return "/".join(path) if path else f"schema {layout.schema.name!r}"


def bind(prompt: Prompt, layout: Layout, renderer: TokenRenderer) -> BoundPrompt:
    """Resolve ``prompt`` against ``layout``; raise :class:`PromptError` on any mismatch."""
    if prompt.schema != layout.schema.name:
        raise _err(f"prompt is for schema {prompt.schema!r}, but this schema is {layout.schema.name!r}",
                   prompt, prompt.loc.line)
    selected: set[ModulePath] = {()}
    arguments: dict[ModulePath, dict[str, list[int]]] = {}
    texts: dict[ModulePath, dict[str, str]] = {}
    union_choice: dict[int, ModulePath] = {}

    def visit(sel: Selection, scope: ModulePath) -> None:
        path = scope + (sel.name,)
        info = layout.modules.get(path)
        if info is None:
            known = sorted(p[-1] for p in layout.modules if p and p[:-1] == scope)
            hint = f" (known here: {', '.join(known)})" if known else " (this scope has no modules)"
            raise _err(f"unknown module {sel.name!r} in {_scope_name(scope, layout)}{hint}", prompt, sel.loc.line)
        if path in selected:
            raise _err(f"module {sel.name!r} is selected twice", prompt, sel.loc.line)
        if info.union is not None:
            other = union_choice.get(info.union)
            if other is not None:
                raise _err(f"modules {other[-1]!r} and {sel.name!r} are members of the same union; "
                           "select at most one", prompt, sel.loc.line)
            union_choice[info.union] = path
        selected.add(path)
        args: dict[str, list[int]] = {}
        for name, value in sel.args.items():
            slot = info.parameters.get(name)
            if slot is None:
                known = ", ".join(sorted(info.parameters)) or "none"
                raise _err(f"module {sel.name!r} has no parameter {name!r} (parameters: {known})",
                           prompt, sel.loc.line)
            ids = renderer.encode(value)
            if len(ids) > len(slot.tokens):
                raise _err(f"argument {name}={value!r} is {len(ids)} tokens, longer than its slot of "
                           f"{len(slot.tokens)}", prompt, sel.loc.line)
            args[name] = ids
        missing = sorted(set(info.parameters) - set(args))
        if missing:
            raise _err(f"module {sel.name!r} needs parameter(s) {', '.join(missing)}", prompt, sel.loc.line)
        arguments[path] = args
        texts[path] = dict(sel.args)
        for child in sel.children:
            visit(child, path)

    for sel in prompt.selections:
        visit(sel, ())
    suffix = render_suffix(prompt, layout, renderer)
    return BoundPrompt(layout, prompt, selected, arguments, suffix,
                       "".join(t.text for t in prompt.suffix), texts)


def render_suffix(prompt: Prompt, layout: Layout, renderer: TokenRenderer) -> list[int]:
    """Tokens of the prompt's trailing text and turns, closing turns and asking for an answer."""
    tokens: list[int] = []
    open_role = layout.open_role
    uses_roles = layout.uses_roles
    first_turn = not layout.uses_roles
    for turn in prompt.suffix:
        if turn.role is None:
            tokens += renderer.encode(turn.text)
            continue
        uses_roles = True
        if open_role is not None:
            tokens += renderer.role_close(open_role)
        tokens += renderer.role_open(turn.role, first_turn)
        first_turn = False
        tokens += renderer.encode(turn.text.lstrip())
        open_role = turn.role
    if uses_roles and open_role != "assistant":
        if open_role is not None:
            tokens += renderer.role_close(open_role)
        tokens += renderer.generation_prompt()
    return tokens
