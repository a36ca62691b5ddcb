"""Role markers (``<system>``, ``<user>``, ``<assistant>``) rendered as the model's own tokens.

Markers are derived from the tokenizer's chat template by rendering small conversations whose
contents are sentinel strings and cutting the text around them, so no template string is written by
hand. Templates that inject text on their own (e.g. a default system prompt when the conversation
does not start with one) are reproduced: the first role's opening marker is cut from a conversation
that starts with that role. For tokenizers without a template, :data:`GENERIC_ROLES` (or the model
family's own markers, passed as ``fallback``) are used; see docs/engine.md.

Special tokens (issue 12, item 1): text, whether a schema's or a prompt's, is tokenized literally
(:meth:`ChatRenderer.encode`, ``split_special_tokens=True``), so the text ``<|im_end|>`` never becomes
the control token. Special tokens come only from the role markers, the BOS and the generation prompt,
i.e. from PML role tags and the chat template (:meth:`ChatRenderer.encode_trusted`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

SENTINEL = "\u2063PCX{}\u2063"  # invisible separator + tag: never produced by a template itself

# THE generic plain-text markers, for tokenizers without a chat template whose model family has
# no markers of its own (Falcon, MPT, and renderers made without an adapter): role -> (open,
# close), plus the text that asks the model to answer. One newline ends a turn, the dialogue
# format of Falcon's instruct checkpoints (``promptcache.models`` adapters default to this table).
GENERIC_ROLES: dict[str, Any] = {
    "system": ("System: ", "\n"),
    "user": ("User: ", "\n"),
    "assistant": ("Assistant: ", "\n"),
    "generation": "Assistant:",
}


@dataclass
class RoleMarkers:
    """Marker strings: opening per role (first turn of a conversation and later turns), closing per role."""

    open_first: dict[str, str]
    open_later: dict[str, str]
    close: dict[str, str]
    generation: str
    from_template: bool


def _split(text: str, sentinel: str) -> tuple[str, str]:
    if text.count(sentinel) != 1:
        raise ValueError("sentinel not rendered exactly once")
    before, after = text.split(sentinel)
    return before, after


def derive_markers(tokenizer, fallback: dict[str, Any] | None = None) -> RoleMarkers:
    """Cut role markers out of ``tokenizer``'s chat template; fall back to plain markers without one."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        try:
            return _markers_from_template(tokenizer)
        except Exception:  # noqa: BLE001 - any template that refuses our probes falls back below
            pass
    roles = fallback or GENERIC_ROLES
    opens = {r: roles[r][0] for r in ("system", "user", "assistant")}
    closes = {r: roles[r][1] for r in ("system", "user", "assistant")}
    return RoleMarkers(dict(opens), dict(opens), closes, roles["generation"], from_template=False)


def _markers_from_template(tokenizer) -> RoleMarkers:
    def render(messages: list[dict], gen: bool = False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    s = [SENTINEL.format(i) for i in range(4)]
    open_first, open_later, close = {}, {}, {}
    for role in ("system", "user", "assistant"):
        open_first[role], close[role] = _split(render([{"role": role, "content": s[1]}]), s[1])
    # Later turns: the text a template appends for one more message of this role.
    history = {
        "system": [{"role": "user", "content": s[0]}, {"role": "assistant", "content": s[2]}],
        "user": [{"role": "system", "content": s[0]}],
        "assistant": [{"role": "system", "content": s[0]}, {"role": "user", "content": s[2]}],
    }
    for role, base in history.items():
        try:
            full, prefix = render(base + [{"role": role, "content": s[1]}]), render(base)
            if not full.startswith(prefix):
                raise ValueError("template is not append-only")
            open_later[role], close_later = _split(full[len(prefix):], s[1])
            close[role] = close_later
        except Exception:  # noqa: BLE001 - e.g. templates that reject a system turn after others
            open_later[role] = open_first[role]
    base = history["assistant"]
    with_gen, without = render(base, gen=True), render(base)
    generation = with_gen[len(without):] if with_gen.startswith(without) else ""
    return RoleMarkers(open_first, open_later, close, generation, from_template=True)


class SpecialTokenInjection(ValueError):
    """Literal text came out of the tokenizer as a control token (a tokenizer ignoring the flag)."""


def control_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokenizer's special tokens that steer the model (all but ``unk``).

    ``unk`` is left out: it stands for text the vocabulary lacks, not for a control token.
    """
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids |= {int(i) for i, tok in decoder.items() if getattr(tok, "special", False)}
    ids.discard(getattr(tokenizer, "unk_token_id", None))
    return frozenset(ids)


def encode_literal(tokenizer, text: str, add_special_tokens: bool = False,
                   controls: frozenset[int] | None = None) -> list[int]:
    """Token ids of ``text`` in which no special-token text becomes a special token.

    ``add_special_tokens=True`` lets the tokenizer add its own BOS/EOS around the text (plain-text
    prompts): those, and only those, may appear, as often as the tokenizer adds them to ``""``.
    """
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens,
                         split_special_tokens=True)["input_ids"])
    allowed = Counter(tokenizer("", add_special_tokens=True)["input_ids"]) if add_special_tokens else Counter()
    controls = control_token_ids(tokenizer) if controls is None else controls
    extra = Counter(i for i in ids if i in controls) - allowed
    if extra:
        raise SpecialTokenInjection(
            f"the tokenizer turned text into special token(s) {sorted(extra)} despite "
            f"split_special_tokens=True (text starts {text[:60]!r}); refusing to serve it")
    return ids


class ChatRenderer:
    """Implements the layout's ``TokenRenderer`` protocol with a Hugging Face tokenizer.

    :meth:`encode` is for text (schema and prompt alike: never a special token);
    :meth:`encode_trusted` only for the markers cut from the chat template.
    """

    def __init__(self, tokenizer, fallback_roles: dict[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
        self.markers = derive_markers(tokenizer, fallback_roles)
        self._bos = self._default_bos()
        self._cache: dict[str, list[int]] = {}
        self.controls = control_token_ids(tokenizer)

    def _default_bos(self) -> list[int]:
        """BOS when the tokenizer itself adds one to plain text (Llama 2 style), else nothing."""
        bos_id = getattr(self.tokenizer, "bos_token_id", None)
        if bos_id is None:
            return []
        ids = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        return [bos_id] if ids and ids[0] == bos_id else []

    def encode(self, text: str) -> list[int]:
        """Ids of literal text: ``<|im_start|>`` written in text stays characters, never a control token."""
        if not text:
            return []
        return encode_literal(self.tokenizer, text, controls=self.controls)

    def encode_trusted(self, text: str) -> list[int]:
        """Ids of template text (role markers): its special-token text becomes special tokens."""
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _marker(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.encode_trusted(text)
        return self._cache[text]

    def bos(self) -> list[int]:
        return list(self._bos)

    def role_open(self, role: str, first: bool) -> list[int]:
        text = (self.markers.open_first if first else self.markers.open_later)[role]
        ids = self._marker(text)
        if first and self._bos and ids[:1] == self._bos:
            ids = ids[1:]  # the template's own BOS is already the layout's first token
        return list(ids)

    def role_close(self, role: str) -> list[int]:
        return list(self._marker(self.markers.close[role]))

    def generation_prompt(self) -> list[int]:
        return list(self._marker(self.markers.generation))

    def pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.unk_token_id, tok.pad_token_id, tok.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
