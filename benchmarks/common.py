"""Helpers shared by the benchmarks: the repository root, the prompt cases, tables, CSV, threads.

Run a benchmark as a module (``python -m benchmarks.ttft``) or as a file
(``python benchmarks/ttft.py``), from the repository root.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from promptcache.pml.escape import escape_text

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Question: summarise the main point of the document above in one short sentence, please."


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads`` when given (1 is steadier on a busy machine)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def document_text(tokenizer, n_tokens: int) -> str:
    """Real prose (LongBench contexts when available), cut to ``n_tokens`` tokens."""
    source = ROOT.parent / "shared" / "longbench-mini" / "gov_report.jsonl"
    text = ""
    if source.is_file():
        for line in source.read_text(encoding="utf-8").splitlines():
            text += json.loads(line)["context"] + "\n"
    else:  # pragma: no cover - outside this workplace
        text = (ROOT / "examples" / "document_qa.txt").read_text()
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < n_tokens:
        text += "\n" + text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


def doc_case(tokenizer, n_tokens: int) -> tuple[str, str]:
    name = f"doc{n_tokens}"
    schema = (f'<schema name="{name}"><user open="true">Read the document.\n<module name="doc" xml:space="preserve">'
              f"{escape_text(document_text(tokenizer, n_tokens))}</module></user></schema>")
    prompt = f'<prompt schema="{name}"><doc/>\n{escape_text(QUESTION)}</prompt>'
    return schema, prompt


def persona_case(tokenizer, member_tokens: int = 180) -> tuple[str, str]:
    """A persona-style schema: six unions of three members (~180 tokens each), ~1.1k-token prompt."""
    prose = tokenizer(document_text(tokenizer, 18 * member_tokens + 10), add_special_tokens=False)["input_ids"]
    traits = ["age", "residence", "education", "occupation", "family", "personality"]
    parts, picks = [], []
    for u, trait in enumerate(traits):
        members = []
        for m in range(3):
            start = (u * 3 + m) * member_tokens
            text = escape_text(tokenizer.decode(prose[start:start + member_tokens]))
            members.append(f'<module name="{trait}-{m}" xml:space="preserve">{text}</module>')
        parts.append(f'<module name="{trait}"><union scaffold="{trait}-0">{"".join(members)}</union></module>')
        picks.append(f"<{trait}><{trait}-1/></{trait}>")
    schema = ('<schema name="persona-bench"><system>You are the person described below. Stay in character.\n'
              + "\n".join(parts) + "</system></schema>")
    prompt = ('<prompt schema="persona-bench">' + "".join(picks)
              + "<user>Introduce yourself in two sentences.</user></prompt>")
    return schema, prompt


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def print_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> None:
    """Right-aligned columns ``(header, key, format)``, a rule under the header (the benchmarks' tables)."""
    cells = [[h for h, _, _ in cols]] + [[f.format(r[k]) for _, k, f in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def write_csv(rows: list[dict], path: Path) -> None:
    """One CSV row per dict (the first row's keys are the header), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
