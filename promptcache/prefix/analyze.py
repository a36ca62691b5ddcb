"""What would prefix caching save on a batch of prompts? Answered from tokens alone, no model.

Every prompt is tokenised and pushed through a :class:`~.radix.RadixTree` in order: the longest
prefix already seen is what automatic prefix caching would have reused (assuming nothing is
evicted), and the tree's edge lengths give the tokens stored once all prompts are cached.

CLI (wired as ``promptcache analyze``)::

    promptcache analyze FILE.jsonl [--tokenizer NAME] [--field KEY] [--json]
                                   [--no-generation-prompt]

FILE.jsonl holds one prompt per line, either
  * an object with a ``"prompt"`` string: ``{"prompt": "You are a helpful..."}``;
  * an object with a ``"messages"`` list of ``{"role", "content"}`` dicts (chat), rendered with
    the tokenizer's chat template (plus the generation prompt, as when served);
  * a bare JSON string.
``--field KEY`` reads the prompt (a string or a messages list) from ``KEY`` instead. Blank lines
are skipped. The tokenizer defaults to the project's default model (SmolLM2).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence, TextIO, Union

from ..fsutil import json_lines
from .radix import RadixTree

Messages = Sequence[dict]
PromptLike = Union[str, Messages]
DEFAULT_TOKENIZER = "smollm2"


class Tokenizer(Protocol):
    """The slice of a transformers tokenizer this module uses."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(self, conversation: Messages, tokenize: bool = ...,
                            add_generation_prompt: bool = ...) -> Any: ...


@dataclass
class AnalysisReport:
    """Totals over the batch; ``per_prompt`` holds ``(tokens, reused_tokens)`` in serving order."""

    prompts: int
    total_tokens: int
    unique_tokens: int
    saved_tokens: int
    tree_nodes: int
    per_prompt: list[tuple[int, int]] = field(default_factory=list, repr=False)

    @property
    def dedup_ratio(self) -> float:
        """Tokens in the batch per token a radix tree stores (1.0: nothing shared)."""
        return self.total_tokens / self.unique_tokens if self.unique_tokens else 1.0

    @property
    def computed_tokens(self) -> int:
        """Tokens still prefilled when prompts are served in order with prefix caching."""
        return self.total_tokens - self.saved_tokens

    @property
    def saved_fraction(self) -> float:
        return self.saved_tokens / self.total_tokens if self.total_tokens else 0.0

    @property
    def prompts_with_hit(self) -> int:
        return sum(1 for _, reused in self.per_prompt if reused)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["per_prompt"]
        out.update(dedup_ratio=self.dedup_ratio, computed_tokens=self.computed_tokens,
                   saved_fraction=self.saved_fraction, prompts_with_hit=self.prompts_with_hit)
        return out

    def table(self) -> str:
        rows = [
            ("prompts", f"{self.prompts:,}"),
            ("prompts reusing a cached prefix", f"{self.prompts_with_hit:,}"),
            ("total tokens", f"{self.total_tokens:,}"),
            ("unique tokens (radix tree)", f"{self.unique_tokens:,}"),
            ("dedup ratio (total / unique)", f"{self.dedup_ratio:.2f}x"),
            ("tokens saved by prefix caching",
             f"{self.saved_tokens:,} ({self.saved_fraction:.1%})"),
            ("tokens still computed", f"{self.computed_tokens:,}"),
            ("radix tree nodes", f"{self.tree_nodes:,}"),
        ]
        width = max(len(name) for name, _ in rows)
        vwidth = max(len(v) for _, v in rows)
        rule = "-" * (width + vwidth + 3)
        lines = ["Prefix caching analysis", rule]
        lines += [f"{name:<{width}}   {value:>{vwidth}}" for name, value in rows]
        lines.append(rule)
        return "\n".join(lines)


def tokenize_prompt(prompt: PromptLike, tokenizer: Tokenizer,
                    add_generation_prompt: bool = True) -> list[int]:
    """Token ids the model would prefill for ``prompt`` (a string or a chat message list).

    Chat lists are rendered to text by the tokenizer's template and then encoded without extra
    special tokens: the template already writes them.
    """
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
        text = tokenizer.apply_chat_template(list(prompt), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
        return list(tokenizer.encode(text, add_special_tokens=False))
    raise TypeError(f"a prompt is a string or a list of message dicts, got {type(prompt).__name__}")


def analyze(prompts: Iterable[PromptLike], tokenizer: Tokenizer, *,
            add_generation_prompt: bool = True) -> AnalysisReport:
    """Tokenise ``prompts`` and measure their prefix sharing, serving them in the given order."""
    tree = RadixTree()
    per_prompt: list[tuple[int, int]] = []
    for prompt in prompts:
        ids = tokenize_prompt(prompt, tokenizer, add_generation_prompt)
        reused = tree.match_prefix(ids).length
        tree.insert(ids)
        per_prompt.append((len(ids), reused))
    return AnalysisReport(
        prompts=len(per_prompt), total_tokens=sum(n for n, _ in per_prompt),
        unique_tokens=tree.tokens_held, saved_tokens=sum(r for _, r in per_prompt),
        tree_nodes=tree.node_count, per_prompt=per_prompt)


class PromptFileError(ValueError):
    """A JSONL line that holds no usable prompt; the message names the file and line."""


def read_prompts(path: str | Path, field_name: str | None = None) -> list[PromptLike]:
    """Prompts from a JSONL file (format in the module docstring)."""
    with json_lines(path, PromptFileError) as lines:
        return [_prompt_of(item, field_name, where) for where, item in lines]


def _prompt_of(item: Any, field_name: str | None, where: str) -> PromptLike:
    if isinstance(item, str):
        return item
    if not isinstance(item, dict):
        raise PromptFileError(f"{where}: expected an object or a string, got {type(item).__name__}")
    keys = [field_name] if field_name else ["prompt", "messages"]
    for key in keys:
        if key in item:
            value = item[key]
            if isinstance(value, str):
                return value
            if isinstance(value, list) and all(
                    isinstance(m, dict) and "role" in m and "content" in m for m in value):
                return value
            raise PromptFileError(f"{where}: field {key!r} must be a string or a list of "
                                  "{role, content} messages")
    wanted = " or ".join(repr(k) for k in keys)
    raise PromptFileError(f"{where}: no {wanted} field")


def _default_loader(name: str) -> Tokenizer:
    from promptcache.loading import load_tokenizer  # heavy (torch, transformers): import late

    return load_tokenizer(name)


def analyze_main(argv: Sequence[str] | None = None, *,
                 load_tokenizer: Callable[[str], Tokenizer] | None = None,
                 out: TextIO | None = None) -> int:
    """``promptcache analyze`` entry point; returns the exit status.

    0: report printed; 2: unreadable or malformed input, or a tokenizer that cannot be loaded
    (one line on stderr, like every other CLI failure).

    ``load_tokenizer`` maps ``--tokenizer NAME`` to a tokenizer (default: the project's loader);
    tests inject a fake one.
    """
    out = out or sys.stdout
    ap = argparse.ArgumentParser(
        prog="promptcache analyze",
        description="Estimate what automatic prefix caching saves on a JSONL batch of prompts "
                    "(tokenizer only, no model run).")
    ap.add_argument("file", help='JSONL: one {"prompt": str} or {"messages": [...]} per line')
    ap.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                    help="model name or path whose tokenizer to use "
                         f"(default: {DEFAULT_TOKENIZER})")
    ap.add_argument("--field", default=None,
                    help="read each prompt from this key instead of 'prompt'/'messages'")
    ap.add_argument("--no-generation-prompt", action="store_true",
                    help="render chat prompts without the assistant generation prompt")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)

    try:
        prompts = read_prompts(args.file, args.field)
    except OSError as err:
        print(f"promptcache analyze: cannot read {args.file}: {err.strerror or err}",
              file=sys.stderr)
        return 2
    except PromptFileError as err:
        print(f"promptcache analyze: {err}", file=sys.stderr)
        return 2
    try:
        tokenizer = (load_tokenizer or _default_loader)(args.tokenizer)
    except (OSError, ValueError, RuntimeError) as err:  # ModelLoadError is a RuntimeError
        message = " ".join(str(err).split())  # one line
        if not message.startswith("cannot load"):  # the loader's own message already says so
            message = f"cannot load tokenizer {args.tokenizer!r}: {message}"
        print(f"promptcache analyze: {message}", file=sys.stderr)
        return 2
    report = analyze(prompts, tokenizer, add_generation_prompt=not args.no_generation_prompt)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2), file=out)
    else:
        print(report.table(), file=out)
    return 0
