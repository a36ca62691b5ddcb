"""Per-sample preparation: one job, turning a LongBench sample into the PML schema and prompt that
both scripts run, with the context cut LongBench's way (first and last halves of its tokens) so the
whole prompt fits ``--max-length``. Both scripts must build *the same* prompt per sample, so a
latency number and an accuracy number always describe the same tokens.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

from .cli_args import UserError
from .data import Sample, truncate_middle
from .schemas import module_texts, sample_to_pml, schema_name
from .tasks import get_task

_TRUNCATION_TRIES = 6              # re-tokenizing a decoded cut can add a token or two; retry tighter
MIN_CONTEXT_TOKENS = 32            # below this a truncated context is no test of the task or the cache


class PromptTooLong(UserError):
    """One sample's prompt cannot fit ``--max-length`` with a useful context; the scripts skip it.

    Happens when the uncached part is long (triviaqa puts the question's own passage in ``input``,
    up to ~1100 tokens): cutting the context to nothing would test neither the task nor the cache.
    Both scripts skip the same samples for the same flags and list them in their summaries.
    """


@dataclass
class PreparedSample:
    """One sample ready for the engine: its PML documents and how its context was cut."""

    task: str
    sample: Sample
    schema_xml: str
    prompt_xml: str
    schema: str                 # schema name (for remove_schema)
    modules: int                # cached context modules (1, or the passages with --split-passages)
    prompt_tokens: int          # as laid out by the engine's renderer
    context_tokens: int         # the full context, tokenized whole
    kept_context_tokens: int    # context tokens in the prompt (after truncation, as laid out)
    truncated: bool
    max_length: int
    max_new_tokens: int


def layout_prompt_tokens(renderer, schema_xml: str, prompt_xml: str) -> tuple[int, int]:
    """(prompt tokens, context-module tokens) as the engine will lay them out; no model needed."""
    from promptcache.pml.binding import bind  # noqa: PLC0415
    from promptcache.pml.layout import build_layout  # noqa: PLC0415
    from promptcache.pml.parser import parse_prompt, parse_schema  # noqa: PLC0415

    layout = build_layout(parse_schema(schema_xml), renderer)
    bound = bind(parse_prompt(prompt_xml), layout, renderer)
    context = sum(len(s.tokens) for s in layout.segments if s.owner != ())
    return layout.length + len(bound.suffix_tokens), context


def _cut_context(tokenizer, ids: list[int], budget: int) -> str:
    """LongBench's cut: keep the first and last halves of the token ids, decoding each half."""
    kept = truncate_middle(ids, budget)
    half = len(kept) // 2
    return (tokenizer.decode(kept[:half], skip_special_tokens=True)
            + tokenizer.decode(kept[half:], skip_special_tokens=True))


def prepare_sample(task: str, sample: Sample, tokenizer, renderer, max_length: int,
                   max_new_tokens: int, split: bool = False) -> PreparedSample:
    """Truncate the context so the whole prompt fits ``max_length`` tokens, then build its PML.

    The context alone is cut (LongBench cuts the whole prompt; here the template is kept intact
    and its tokens are subtracted from the budget). The cut is computed on the context tokenized
    whole; re-tokenizing the decoded text (or splitting it into passages) can change the count by a
    few tokens, so the budget is tightened until the laid-out prompt fits.
    """
    spec = get_task(task)
    schema_xml, prompt_xml = sample_to_pml(spec, sample, split=split)
    total, ctx_tokens = layout_prompt_tokens(renderer, schema_xml, prompt_xml)
    full_ids = list(tokenizer(sample.context, add_special_tokens=False)["input_ids"])
    context = sample.context
    truncated = total > max_length
    if truncated:
        overhead = total - ctx_tokens
        budget = max_length - overhead
        for _ in range(_TRUNCATION_TRIES):
            if budget < MIN_CONTEXT_TOKENS:
                raise PromptTooLong(f"{task}/{sample.id}: the prompt without its context takes {overhead} tokens, "
                                    f"leaving {max(budget, 0)} of --max-length {max_length} for the context "
                                    f"(< {MIN_CONTEXT_TOKENS})")
            context = _cut_context(tokenizer, full_ids, budget)
            schema_xml, prompt_xml = sample_to_pml(spec, sample, context=context, split=split)
            total, ctx_tokens = layout_prompt_tokens(renderer, schema_xml, prompt_xml)
            if total <= max_length:
                break
            budget -= total - max_length
        else:
            raise PromptTooLong(f"{task}/{sample.id}: could not fit the prompt into {max_length} tokens")
    return PreparedSample(
        task=spec.name, sample=sample, schema_xml=schema_xml, prompt_xml=prompt_xml,
        schema=schema_name(spec, sample.id), modules=len(module_texts(spec, context, split)),
        prompt_tokens=total, context_tokens=len(full_ids), kept_context_tokens=ctx_tokens,
        truncated=truncated, max_length=max_length, max_new_tokens=max_new_tokens)


@contextlib.contextmanager
def schema_added(pc, prepared: PreparedSample) -> Iterator[Any]:
    """Add the sample's schema, yield its EncodeReport, always remove it (flat memory)."""
    report = pc.add_schema(prepared.schema_xml)
    try:
        yield report
    finally:
        pc.remove_schema(prepared.schema)


def warm_up(pc, task: str, sample: Sample, split: bool) -> None:
    """A small cached and uncached run so the first timed sample pays no one-off costs.

    Uses the first sample cut to a few hundred tokens; if its template alone is too long for
    that, a longer cut; warming up is best effort and never fails the run.
    """
    for length in (320, 1024):
        try:
            prepared = prepare_sample(task, sample, pc.tokenizer, pc.renderer, length, 1, split)
        except UserError:
            continue
        with schema_added(pc, prepared):
            for use_cache in (True, False, True, False):
                pc.generate(prepared.prompt_xml, max_new_tokens=2, use_cache=use_cache)
        return
