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
