"""One PML schema and one prompt per LongBench sample, as XML text the PML parser loads.

Why text: the eval scripts then go through exactly the path a user's PML files take (parser,
layout, binding), and a failing sample can be dumped and replayed by hand.

Layout of a sample (template = ``prefix {context} middle {input} suffix``, see eval.tasks):

* chat tasks (all but trec, triviaqa, samsum, lcc, repobench-p)::

      <schema name="lb-TASK-ID" xml:space="preserve"><user open="true">PREFIX<module
        name="context">CONTEXT</module></user></schema>
      <prompt schema="lb-TASK-ID" xml:space="preserve"><context/>MIDDLE INPUT SUFFIX</prompt>

  The user turn is left open, so the question in the prompt continues the same turn, and the
  rendered conversation is ``chat(template.format(context=..., input=...))`` as in LongBench.
* non-chat tasks: the same without the ``<user>`` element (raw text, as LongBench runs them).
* ``split=True`` on a multi-document task: one module per passage (``p0``, ``p1``, ...;
  :func:`eval.data.split_passages`, lossless) instead of ``context``, all selected in order.

The cached part is the instruction preamble (root-module text) and the context module(s); the
question is the uncached suffix. All text goes through :func:`promptcache.pml.escape.escape_text`
(CDATA for code with ``<``/``&``), and both documents carry ``xml:space="preserve"``, so the parser
keeps every text run verbatim (no dedent, no strip, no separator insertion) and the rendered text
equals LongBench's prompt exactly.

Residual differences from LongBench (documented, not fixable here):

* The prompt parser drops a whitespace-only text run even under ``xml:space="preserve"``; the
  question text is never blank for LongBench's templates except trec with an empty ``input``
  (question ``"\\n"``), whose newline is then lost.
* Truncation: LongBench truncates the *whole* prompt (template included) in the middle; here the
  caller truncates the context (``context=`` argument), so the token budget is spent slightly
  differently, and the tokenizer sees module boundaries (text is tokenized per piece, so the
  tokens at a boundary can differ from tokenizing the joined string).
* Text that XML cannot carry at all (control characters such as U+000B) raises PMLError from
  ``escape_text``; LongBench's English data has none.
"""

from __future__ import annotations

import re
from .data import Sample, split_passages
from .tasks import TaskSpec, get_task

CONTEXT_MODULE = "context"
PASSAGE_PREFIX = "p"
_UNSAFE_NAME = re.compile(r"[^\w.\-]")


def _escapers():
    """``escape_text``/``escape_attr`` from the PML package, imported when first needed."""
    from promptcache.pml.escape import escape_attr, escape_text  # noqa: PLC0415

    return escape_text, escape_attr


def schema_name(task: str | TaskSpec, sample_id: str) -> str:
    """Unique schema name of a sample: ``lb-<task>-<id>``, unsafe characters replaced by ``_``."""
    spec = get_task(task)
    return _UNSAFE_NAME.sub("_", f"lb-{spec.name}-{sample_id}")


def module_texts(task: str | TaskSpec, context: str, split: bool = False) -> list[tuple[str, str]]:
    """(module name, text) of the context modules, in order; their texts join to ``context``."""
    spec = get_task(task)
    if split and spec.multi_doc:
        return [(f"{PASSAGE_PREFIX}{i}", text) for i, text in enumerate(split_passages(spec.name, context))]
    return [(CONTEXT_MODULE, context)]


def sample_question_text(task: str | TaskSpec, sample: Sample) -> str:
    """The uncached text after the context: template middle + ``sample.input`` + suffix."""
    return get_task(task).question(sample.input)


def sample_answers(sample: Sample) -> list[str]:
    """The reference answers of a sample (LongBench scores the best match among them)."""
    return list(sample.answers)


def reference_prompt(task: str | TaskSpec, sample: Sample, context: str | None = None) -> str:
    """LongBench's prompt text for the sample (before any chat template): the baseline's input."""
    spec = get_task(task)
    return spec.render(sample.context if context is None else context, sample.input)


def sample_to_pml(task: str | TaskSpec, sample: Sample, context: str | None = None,
                  split: bool = False) -> tuple[str, str]:
    """Return ``(schema_xml, prompt_xml)`` for one sample.

    ``context``: an already truncated context (the caller truncates by tokens); defaults to the
    sample's full context. ``split``: one module per passage for multi-document tasks (ignored
    for the others).
    """
    escape_text, escape_attr = _escapers()
    spec = get_task(task)
    ctx = sample.context if context is None else context
    name = escape_attr(schema_name(spec, sample.id))
    modules = module_texts(spec, ctx, split)

    body = escape_text(spec.prefix) + "".join(
        f'<module name="{mod}">{escape_text(text)}</module>' for mod, text in modules)
    if spec.chat:
        body = f'<user open="true">{body}</user>'
    schema_xml = f'<schema name={name} xml:space="preserve">{body}</schema>'

    selections = "".join(f"<{mod}/>" for mod, _ in modules)
    question = escape_text(sample_question_text(spec, sample))
    prompt_xml = f'<prompt schema={name} xml:space="preserve">{selections}{question}</prompt>'
    return schema_xml, prompt_xml
