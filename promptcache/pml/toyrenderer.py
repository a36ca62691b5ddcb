"""A model-free :class:`~.layout.TokenRenderer`: words, spaces and punctuation as tokens.

Lets tests (and ``promptcache validate --toy-tokenizer``) lay out schemas without loading any
tokenizer, with token counts a person can predict: ``"Hello, world"`` is 4 tokens
(``Hello`` ``,`` `` `` ``world``). Ids are assigned on first sight, so they are stable within one
renderer. Not a real tokenizer: never use it for inference.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"\w+|\s|[^\w\s]")

PAD, BOS, ROLE_OPEN, ROLE_CLOSE, GEN = 0, 1, 2, 3, 4


class ToyRenderer:
    """Word-level ids; role markers are ``[ROLE_OPEN, role-id]`` and ``[ROLE_CLOSE]``."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def _id(self, piece: str) -> int:
        if piece not in self.vocab:
            self.vocab[piece] = 100 + len(self.vocab)
        return self.vocab[piece]

    def encode(self, text: str) -> list[int]:
        return [self._id(t) for t in _TOKEN.findall(text)]

    def decode(self, ids: list[int]) -> str:
        inverse = {v: k for k, v in self.vocab.items()}
        return "".join(inverse.get(i, f"<{i}>") for i in ids)

    def bos(self) -> list[int]:
        return [BOS]

    def role_open(self, role: str, first: bool) -> list[int]:
        return [ROLE_OPEN, self._id(f"<{role}>")]

    def role_close(self, role: str) -> list[int]:
        return [ROLE_CLOSE]

    def generation_prompt(self) -> list[int]:
        return [GEN, self._id("<assistant>")]

    def pad_id(self) -> int:
        return PAD
