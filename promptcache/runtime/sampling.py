"""Token selection and stopping: greedy or sampled, with transformers' own logits processors."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass
class SamplingOptions:
    """Decoding options. ``temperature=0`` (default) is greedy; sampling uses ``seed`` when given."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def processors(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if not self.greedy:
            procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


class TokenChooser:
    """Picks each next token; repetition penalty sees the whole prompt plus what was generated."""

    def __init__(self, options: SamplingOptions, prompt_ids: list[int], device: torch.device) -> None:
        self.options = options
        self.procs = options.processors()
        self.history = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        self.generator = None
        if not options.greedy:
            self.generator = torch.Generator(device=device)
            if options.seed is not None:
                self.generator.manual_seed(options.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        scores = self.procs(self.history, logits.float().unsqueeze(0)) if self.procs else logits.float().unsqueeze(0)
        if self.options.greedy:
            token = int(scores.argmax(dim=-1))
        else:
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        self.history = torch.cat([self.history, self.history.new_tensor([[token]])], dim=1)
        return token


class StopChecker:
    """EOS ids and stop strings; reports the text to keep."""

    def __init__(self, eos_ids: set[int], stop: list[str], decode: Callable[[list[int]], str]) -> None:
        self.eos_ids = eos_ids
        self.stop = [s for s in stop if s]
        self.decode = decode

    def done(self, generated: list[int]) -> tuple[bool, str]:
        if generated and generated[-1] in self.eos_ids:
            return True, self.decode(generated[:-1])
        text = self.decode(generated)
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                return True, text[:at]
        return False, text


def eos_token_ids(model, tokenizer) -> set[int]:
    """EOS ids from the tokenizer and the model's generation config (chat models end turns with them)."""
    ids: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None),
                   getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids


def check_max_new_tokens(max_new_tokens: int) -> None:
    """``max_new_tokens`` must be an integer >= 0 (0: prefill only)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0 (0 = prefill only), got {max_new_tokens}")


class TokenStream:
    """One sequence's token loop after its prefill: choose, check stops, budget, text to show.

    ``next_pos`` is the position the last chosen token is fed back at (the caller advances it).
    The budget is ``max_new_tokens`` cut at the context window (``max_positions``).
    :meth:`take_text` gives the text that may be shown so far: it holds back a trailing partial
    character and any tail that could still grow into a stop string, so streamed pieces join to
    exactly :attr:`text` once :attr:`done`.
    """

    def __init__(self, options: SamplingOptions, prompt_ids: list[int], device: torch.device,
                 eos_ids: set[int], detokenize: Callable[[list[int]], str], max_new_tokens: int,
                 next_pos: int, max_positions: int | None) -> None:
        self.chooser = TokenChooser(options, prompt_ids, device)
        self.stopper = StopChecker(eos_ids, options.stop, detokenize)
        self.max_new_tokens = max_new_tokens
        self.budget = max_new_tokens
        if max_positions is not None:
            self.budget = max(0, min(max_new_tokens, max_positions - next_pos))
        self.next_pos = next_pos
        self.generated: list[int] = []
        self.text = ""
        self.shown = 0
        self.stopped = False       # EOS or a stop string
        self.done = self.budget == 0

    def push(self, logits: torch.Tensor) -> int:
        """Choose the next token from ``logits``; returns it (feed it back unless :attr:`done`)."""
        token = self.chooser(logits)
        self.generated.append(token)
        self.stopped, self.text = self.stopper.done(self.generated)
        self.done = self.stopped or len(self.generated) >= self.budget
        return token

    @property
    def window_full(self) -> bool:
        """The window, not ``max_new_tokens``, EOS or a stop string, ended generation."""
        return self.budget < self.max_new_tokens and not self.stopped

    @property
    def finish_reason(self) -> str:
        """``"stop"`` (EOS or stop string), ``"window"`` or ``"length"``."""
        return "stop" if self.stopped else "window" if self.window_full else "length"

    def _safe_end(self) -> int:
        text = self.text
        end = len(text)
        while end > self.shown and text[end - 1] == "\ufffd":  # a character still being decoded
            end -= 1
        hold = 0
        for s in self.stopper.stop:
            for k in range(min(len(s) - 1, end), hold, -1):
                if text.endswith(s[:k], 0, end):
                    hold = k
                    break
        return end - hold

    def take_text(self) -> str:
        """The text not shown yet that can be shown now (everything once :attr:`done`)."""
        end = len(self.text) if self.done else self._safe_end()
        if end <= self.shown:
            return ""
        out = self.text[self.shown:end]
        self.shown = end
        return out
