"""Registry of the 16 English LongBench (v1) tasks: prompt template, generation length, metric.

Why a registry: the cached engine and the baseline must build *the same* prompt LongBench builds,
and score with the same rule, so every per-task constant lives here once. The templates and
generation lengths are LongBench's own data (``config/dataset2prompt.json`` and
``config/dataset2maxlen.json`` of THUDM/LongBench); the chat-template and first-line rules come
from its ``pred.py`` and ``eval.py``.

Prompt Cache view of a template: ``prefix + {context} + middle + {input} + suffix``. The
``prefix`` (instruction preamble) is constant per task and the context is long and reusable, so
both go into the schema; ``middle + input + suffix`` is the per-request question, computed fresh.
"""

from __future__ import annotations

from dataclasses import dataclass

# Metric names, resolved to functions by eval.metrics (kept as names so this module has no deps).
QA_F1 = "qa_f1"
ROUGE = "rouge"
CLASSIFICATION = "classification"
RETRIEVAL = "retrieval"
COUNT = "count"
CODE_SIM = "code_sim"

_CONTEXT = "{context}"
_INPUT = "{input}"


@dataclass(frozen=True)
class TaskSpec:
    """One LongBench task and everything needed to prompt for it and score it.

    ``chat``: LongBench wraps the prompt in the model's chat template (False for trec, triviaqa,
    samsum, lcc, repobench-p: few-shot / completion tasks run as raw text).
    ``first_line_only``: eval.py keeps only the first line of the prediction before scoring.
    ``stop_on_newline``: pred.py also stops generation at a newline (samsum only).
    ``multi_doc``: the context is a list of numbered passages (see eval.data.split_passages).
    """

    name: str
    template: str
    max_new_tokens: int
    metric: str
    chat: bool = True
    multi_doc: bool = False
    first_line_only: bool = False
    stop_on_newline: bool = False

    def __post_init__(self) -> None:
        if self.template.count(_CONTEXT) != 1 or self.template.count(_INPUT) > 1:
            raise ValueError(f"template of {self.name!r} needs one {_CONTEXT} and at most one {_INPUT}")
        if _INPUT in self.template and self.template.index(_INPUT) < self.template.index(_CONTEXT):
            raise ValueError(f"template of {self.name!r} puts {_INPUT} before {_CONTEXT}")

    @property
    def prefix(self) -> str:
        """Template text before ``{context}``: the constant instruction preamble (cacheable)."""
        return self.template.split(_CONTEXT, 1)[0]

    @property
    def middle(self) -> str:
        """Template text between ``{context}`` and ``{input}`` (everything after, if no input)."""
        rest = self.template.split(_CONTEXT, 1)[1]
        return rest.split(_INPUT, 1)[0]

    @property
    def suffix(self) -> str:
        """Template text after ``{input}`` ("" when the template has no ``{input}``, e.g. lcc)."""
        rest = self.template.split(_CONTEXT, 1)[1]
        return rest.split(_INPUT, 1)[1] if _INPUT in rest else ""

    @property
    def uses_input(self) -> bool:
        return _INPUT in self.template

    def question(self, input_text: str) -> str:
        """The text that follows the context: ``middle + input + suffix``.

        Plain concatenation rather than ``str.format`` so braces inside ``input_text`` are literal;
        equals the tail of ``template.format(context=..., input=input_text)``.
        """
        if not self.uses_input:
            return self.middle
        return self.middle + input_text + self.suffix

    def render(self, context: str, input_text: str) -> str:
        """The full LongBench prompt (before any chat template): prefix + context + question."""
        return self.prefix + context + self.question(input_text)


_MHQA = ("Answer the question based on the given passages. Only give me the answer and do not output "
         "any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question "
         "based on the given passages. Only give me the answer and do not output any other words."
         "\n\nQuestion: {input}\nAnswer:")

_QASPER_RULES = ("as concisely as you can, using a single phrase or sentence if possible. If the "
                 "question cannot be answered based on the information in the article, write "
                 "\"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
                 "\"unanswerable\". Do not provide any explanation.")

_SPECS = [
    TaskSpec("narrativeqa",
             "You are given a story, which can be either a novel or a movie script, and a question. "
             "Answer the question as concisely as you can, using a single phrase if possible. Do not "
             "provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the "
             "story as concisely as you can, using a single phrase if possible. Do not provide any "
             "explanation.\n\nQuestion: {input}\n\nAnswer:",
             128, QA_F1),
    TaskSpec("qasper",
             "You are given a scientific article and a question. Answer the question " + _QASPER_RULES
             + "\n\nArticle: {context}\n\n Answer the question based on the above article "
             + _QASPER_RULES + "\n\nQuestion: {input}\n\nAnswer:",
             128, QA_F1),
    TaskSpec("multifieldqa_en",
             "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
             "question based on the above text, only give me the answer and do not output any other "
             "words.\n\nQuestion: {input}\nAnswer:",
             64, QA_F1),
    TaskSpec("hotpotqa", _MHQA, 32, QA_F1, multi_doc=True),
    TaskSpec("2wikimqa", _MHQA, 32, QA_F1, multi_doc=True),
    TaskSpec("musique", _MHQA, 32, QA_F1, multi_doc=True),
    TaskSpec("gov_report",
             "You are given a report by a government agency. Write a one-page summary of the report."
             "\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
             512, ROUGE),
    TaskSpec("qmsum",
             "You are given a meeting transcript and a query containing a question or instruction. "
             "Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the "
             "query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}"
             "\nAnswer:",
             512, ROUGE),
    TaskSpec("multi_news",
             "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n"
             "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
             512, ROUGE),
    TaskSpec("trec",
             "Please determine the type of the question below. Here are some examples of questions."
             "\n\n{context}\n{input}",
             64, CLASSIFICATION, chat=False, first_line_only=True),
    TaskSpec("triviaqa",
             "Answer the question based on the given passage. Only give me the answer and do not "
             "output any other words. The following are some examples.\n\n{context}\n\n{input}",
             32, QA_F1, chat=False, first_line_only=True),
    TaskSpec("samsum",
             "Summarize the dialogue into a few short sentences. The following are some examples."
             "\n\n{context}\n\n{input}",
             128, ROUGE, chat=False, first_line_only=True, stop_on_newline=True),
    TaskSpec("passage_count",
             "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
             "Please carefully read these paragraphs and determine how many unique paragraphs there "
             "are after removing duplicates. In other words, how many non-repeating paragraphs are "
             "there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after "
             "removing duplicates. The output format should only contain the number, such as 1, 2, 3, "
             "and so on.\n\nThe final answer is: ",
             32, COUNT, multi_doc=True),
    TaskSpec("passage_retrieval_en",
             "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
             "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}"
             "\n\nPlease enter the number of the paragraph that the abstract is from. The answer "
             "format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
             32, RETRIEVAL, multi_doc=True),
    TaskSpec("lcc", "Please complete the code given below. \n{context}Next line of code:\n",
             64, CODE_SIM, chat=False),
    TaskSpec("repobench-p", "Please complete the code given below. \n{context}{input}Next line of code:\n",
             64, CODE_SIM, chat=False),
]

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in _SPECS}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)

# Synthetic multi-passage tasks built from longbench-mini (eval/synthetic.py): not LongBench tasks,
# so not in TASKS/TASK_NAMES ("all" never selects them); get_task resolves them by name.
SYNTHETIC_PASSAGES = 8  # passages per synthetic sample (the retrieval template names the count)
_SYNTHETIC_SPECS = [
    TaskSpec("synthetic_qa", _MHQA, 32, QA_F1, multi_doc=True),
    TaskSpec("synthetic_retrieval",
             f"Here are {SYNTHETIC_PASSAGES} paragraphs from Wikipedia, along with an abstract. Please "
             "determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an "
             "abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is "
             "from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe "
             "answer is: ",
             32, RETRIEVAL, multi_doc=True),
]
SYNTHETIC_TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in _SYNTHETIC_SPECS}


class EvalDataError(Exception):
    """Any eval-data problem: unknown task, missing file, malformed line, missing field.

    Defined here (the lowest eval module) so that every eval module raises the same family;
    :mod:`eval.data` re-exports it.
    """


class UnknownTaskError(EvalDataError, KeyError):
    """A task name that is not one of the 16 English LongBench tasks."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def get_task(name: str | TaskSpec) -> TaskSpec:
    """Resolve a task name (or pass a TaskSpec through); unknown names list the known ones."""
    if isinstance(name, TaskSpec):
        return name
    spec = TASKS.get(name) or SYNTHETIC_TASKS.get(name)
    if spec is None:
        raise UnknownTaskError(f"unknown LongBench task {name!r}; known tasks: {', '.join(TASK_NAMES)} "
                               f"(synthetic, eval/synthetic.py: {', '.join(SYNTHETIC_TASKS)})")
    return spec
