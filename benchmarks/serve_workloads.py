"""The two workloads of the serving benchmark (issue 15), as request lists both servers can take.

Why a module of its own: the same :class:`Request` objects go to our server and to vLLM, so the
two can only differ in how a server is asked (a PML prompt for ours, its rendered text for vLLM),
never in which passages, questions or documents a request holds.

* modular RAG: a pool of passages from longbench-mini's hotpotqa contexts (split at their
  ``Passage N:`` headers, each cut to ``passage_tokens`` tokens); each request picks ``pick`` of
  them at random (seeded) plus one hotpotqa question, in a chat (system turn, then one user turn
  holding an instruction, the passages and the question). Ours: a PML schema with one module per
  passage inside an open user turn (encoded independently by the server, so any subset combines)
  and a PML prompt selecting the picked modules, on ``/v1/completions``; vLLM: the same system and
  user text as chat messages on ``/v1/chat/completions``, so both render the model's chat template
  (as plain completions the default model answers these prompts with an immediate end of text).
  The server splices modules in schema (position) order whatever order the prompt lists them in,
  so the vLLM text lists the passages in that same order (the order that is best for its prefix cache).
* shared document: one ~4k-token document (gov_report prose) and 20 questions, as chat messages
  (system + user: document then question) on ``/v1/chat/completions`` for both servers.

Every request of every cell carries a distinct tag in its question, so no cell can hit a full
prompt cached by an earlier cell or by the warm-up; only the shared parts (passages, document) are
reusable, which is what the benchmark measures.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import document_text
from promptcache.pml.escape import escape_text

RAG_SCHEMA = "serve-rag"
RAG_SYSTEM = "You are a helpful assistant that answers questions from the given passages."
RAG_PREAMBLE = "Answer the question using only the passages below. Reply with a short answer.\n\n"
DOC_SYSTEM = "You are a careful analyst. Answer questions about the document in one or two sentences."
DOC_QUESTIONS = [
    "What is the main subject of the document?",
    "Which organisation wrote or commissioned the report?",
    "What problem does the report identify first?",
    "What recommendation does the report make?",
    "Which agencies are mentioned?",
    "What time period does the report cover?",
    "What data sources were used?",
    "What are the key findings about costs?",
    "What risks does the report describe?",
    "Who is affected by the issues discussed?",
    "What actions have already been taken?",
    "What remains unresolved according to the report?",
    "What numbers or statistics stand out?",
    "How was the review carried out?",
    "What does the report say about oversight?",
    "What legislation is referenced?",
    "What are the main challenges for implementation?",
    "What does the report conclude?",
    "Which program is discussed in most detail?",
    "What would you ask the authors next?",
]


@dataclass
class Request:
    """One request as both servers get it: ours through ``ours``, vLLM through ``peer``.

    A ``*_kind`` is ``"completion"`` (its payload is a prompt string, PML or text) or ``"chat"``
    (its payload is a message list).
    """

    ours_kind: str
    ours: str | list[dict]
    peer_kind: str
    peer: str | list[dict]
    meta: dict = field(default_factory=dict)


def _tokenizer(model: str):
    from promptcache.loading import load_tokenizer

    return load_tokenizer(model)


def rag_passages(tokenizer, n: int, passage_tokens: int, min_tokens: int = 48) -> list[str]:
    """``n`` hotpotqa passages (file order), each cut to ``passage_tokens`` tokens and ending in a blank line.

    Passages shorter than ``min_tokens`` are skipped (headers cut off by LongBench's truncation)."""
    from eval.data import load_task, split_passages

    out: list[str] = []
    for sample in load_task("hotpotqa"):
        for text in split_passages("hotpotqa", sample.context):
            ids = tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
            if len(ids) < min_tokens:
                continue
            out.append(tokenizer.decode(ids[:passage_tokens]).strip() + "\n\n")
            if len(out) == n:
                return out
    raise ValueError(f"longbench-mini hotpotqa has only {len(out)} passages of >= {min_tokens} tokens, "
                     f"{n} asked (--passages)")


def rag_questions() -> list[str]:
    """The hotpotqa questions of longbench-mini (one per sample)."""
    from eval.data import load_task

    return [s.input.strip() for s in load_task("hotpotqa")]


def rag_schema(passages: list[str]) -> str:
    """One module ``p0``..``pN`` per passage; ``xml:space="preserve"`` keeps every text run verbatim."""
    modules = "".join(f'<module name="p{i}">{escape_text(t)}</module>' for i, t in enumerate(passages))
    return (f'<schema name="{RAG_SCHEMA}" xml:space="preserve"><system>{escape_text(RAG_SYSTEM)}</system>'
            f'<user open="true">{escape_text(RAG_PREAMBLE)}{modules}</user></schema>')


def rag_requests(passages: list[str], questions: list[str], n: int, pick: int, seed: int, tag: str) -> list[Request]:
    """``n`` requests, each ``pick`` passages in random order (seeded by ``seed`` and ``tag``) plus a question."""
    rng = random.Random(f"{seed}-rag-{tag}")
    out = []
    for i in range(n):
        chosen = rng.sample(range(len(passages)), pick)
        question = f"Question ({tag}-{i}): {rng.choice(questions)}"
        pml = (f'<prompt schema="{RAG_SCHEMA}" xml:space="preserve">' + "".join(f"<p{j}/>" for j in chosen)
               + escape_text(question) + "</prompt>")
        text = RAG_PREAMBLE + "".join(passages[j] for j in sorted(chosen)) + question
        messages = [{"role": "system", "content": RAG_SYSTEM}, {"role": "user", "content": text}]
        out.append(Request("completion", pml, "chat", messages, {"passages": chosen}))
    return out


def doc_requests(document: str, n: int, tag: str) -> list[Request]:
    """``n`` chat requests over ``document``: the 20 questions in turn, each tagged with ``tag`` and its index."""
    out = []
    for i in range(n):
        question = f"Question ({tag}-{i}): {DOC_QUESTIONS[i % len(DOC_QUESTIONS)]}"
        messages = [{"role": "system", "content": DOC_SYSTEM},
                    {"role": "user", "content": f"Document:\n{document}\n\n{question}"}]
        out.append(Request("chat", messages, "chat", messages))
    return out


@dataclass
class Workloads:
    """What the benchmark needs: the RAG schema (for our server) and request builders per cell."""

    schema_xml: str
    passages: list[str]
    questions: list[str]
    document: str
    pick: int
    seed: int

    def requests(self, workload: str, n: int, tag: str) -> list[Request]:
        """The ``n`` requests of one cell (``tag`` names the cell, e.g. ``c8`` or ``warmup``)."""
        if workload == "rag":
            return rag_requests(self.passages, self.questions, n, self.pick, self.seed, tag)
        if workload == "doc":
            return doc_requests(self.document, n, tag)
        raise ValueError(f"unknown workload {workload!r} (rag, doc)")


def build_workloads(model: str, passages: int, passage_tokens: int, pick: int, doc_tokens: int,
                    seed: int) -> Workloads:
    """Tokenize once with the model's tokenizer (token counts are the model's, not words)."""
    tok = _tokenizer(model)
    pool = rag_passages(tok, passages, passage_tokens)
    if pick > len(pool):
        raise ValueError(f"--pick {pick} is more than the {len(pool)} passages in the pool")
    return Workloads(rag_schema(pool), pool, rag_questions(), document_text(tok, doc_tokens), pick, seed)


def write_schema(work: Workloads, folder: Path) -> Path:
    """The RAG schema as a file, for ``promptcache serve --schema FILE``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{RAG_SCHEMA}.xml"
    path.write_text(work.schema_xml, encoding="utf-8")
    return path
