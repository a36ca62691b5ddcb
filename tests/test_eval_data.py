"""LongBench task registry, data loading, passages, truncation and per-sample PML documents."""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import pytest
from lxml import etree

from eval.data import (
    EvalDataError, Sample, available_tasks, default_data_dir, load_task, split_passages,
    truncate_middle,
)
from eval.schemas import (
    reference_prompt, sample_answers, sample_question_text, sample_to_pml, schema_name,
)
from eval.tasks import TASK_NAMES, TASKS, UnknownTaskError, get_task
from promptcache.pml.binding import bind
from promptcache.pml.layout import build_layout
from promptcache.pml.parser import parse_prompt, parse_schema

DATA_DIR = default_data_dir()
PRESENT = available_tasks(DATA_DIR)
needs_data = pytest.mark.skipif(not PRESENT, reason=f"no longbench-mini files in {DATA_DIR}")

ENGLISH_TASKS = ["narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique",
                 "gov_report", "qmsum", "multi_news", "trec", "triviaqa", "samsum", "passage_count",
                 "passage_retrieval_en", "lcc", "repobench-p"]


# ---------------------------------------------------------------- task registry


def test_all_sixteen_tasks_resolve():
    assert sorted(TASK_NAMES) == sorted(ENGLISH_TASKS)
    for name in ENGLISH_TASKS:
        assert get_task(name).name == name


def test_unknown_task_lists_known_ones():
    with pytest.raises(UnknownTaskError) as err:
        get_task("narrative_qa")
    assert "narrative_qa" in str(err.value) and "narrativeqa" in str(err.value)
    assert isinstance(err.value, EvalDataError)


def test_templates_are_longbench_s():
    # sha256 of json.dumps({task: template}, sort_keys=True) over LongBench's
    # config/dataset2prompt.json (English v1 tasks): guards against an accidental edit.
    blob = json.dumps({n: s.template for n, s in TASKS.items()}, sort_keys=True).encode()
    assert hashlib.sha256(blob).hexdigest() == \
        "1a91047176a71d1a714ab3c3a690cfec75d24e6448f39e0eed4667aa76552400"


def test_generation_lengths_metrics_and_flags():
    maxlen = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32,
              "2wikimqa": 32, "musique": 32, "gov_report": 512, "qmsum": 512, "multi_news": 512,
              "trec": 64, "triviaqa": 32, "samsum": 128, "passage_count": 32,
              "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64}
    assert {n: s.max_new_tokens for n, s in TASKS.items()} == maxlen
    assert {n for n, s in TASKS.items() if not s.chat} == {"trec", "triviaqa", "samsum", "lcc",
                                                            "repobench-p"}
    assert {n for n, s in TASKS.items() if s.multi_doc} == {"hotpotqa", "2wikimqa", "musique",
                                                             "passage_retrieval_en", "passage_count"}
    assert {n for n, s in TASKS.items() if s.first_line_only} == {"trec", "triviaqa", "samsum"}
    assert TASKS["trec"].metric == "classification" and TASKS["lcc"].metric == "code_sim"
    assert TASKS["passage_count"].metric == "count" and TASKS["gov_report"].metric == "rouge"


@pytest.mark.parametrize("name", ENGLISH_TASKS)
def test_template_split_reassembles(name):
    spec = get_task(name)
    ctx, question = "CTX {x} <&>", "Q? {y}"
    expected = spec.template.format(context=ctx, input=question)
    assert spec.render(ctx, question) == expected
    assert spec.prefix + ctx + spec.question(question) == expected
    assert "{context}" not in spec.prefix + spec.middle + spec.suffix
    assert "{input}" not in spec.prefix + spec.middle + spec.suffix


def test_template_parts_examples():
    lcc = get_task("lcc")
    assert (lcc.prefix, lcc.middle, lcc.suffix) == ("Please complete the code given below. \n",
                                                    "Next line of code:\n", "")
    assert not lcc.uses_input and lcc.question("ignored") == "Next line of code:\n"
    trec = get_task("trec")
    assert (trec.middle, trec.suffix) == ("\n", "")


# ---------------------------------------------------------------- loading


@needs_data
@pytest.mark.parametrize("name", PRESENT or ["none"])
def test_present_files_load_every_row(name):
    path = DATA_DIR / f"{name}.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    samples = load_task(name, data_dir=DATA_DIR)
    assert len(samples) == len(rows) > 0
    for sample, row in zip(samples, rows):
        assert isinstance(sample, Sample)
        assert (sample.id, sample.input, sample.context) == (row["_id"], row["input"], row["context"])
        assert sample.answers == row["answers"] and sample.length == row["length"]
        assert sample.dataset == name
        assert sample.all_classes == row["all_classes"]
    assert len({s.id for s in samples}) == len(samples)
    assert len(load_task(name, data_dir=DATA_DIR, limit=2)) == min(2, len(rows))
    if name == "trec":
        assert all(s.all_classes for s in samples)


def test_default_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PROMPTCACHE_LONGBENCH_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path


def _row(**over):
    row = {"input": "q", "context": "c", "answers": ["a"], "length": 1, "dataset": "qasper",
           "language": "en", "all_classes": None, "_id": "x1"}
    row.update(over)
    return row


def _write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_error_unknown_task(tmp_path):
    with pytest.raises(EvalDataError, match=r"unknown LongBench task 'nope'.*hotpotqa"):
        load_task("nope", data_dir=tmp_path)


def test_error_missing_file(tmp_path):
    with pytest.raises(EvalDataError, match=r"'musique'.*not found.*musique\.jsonl"):
        load_task("musique", data_dir=tmp_path)


def test_error_malformed_line_names_file_and_line(tmp_path):
    path = _write(tmp_path, "qasper", [json.dumps(_row()), '{"input": "q", oops}'])
    with pytest.raises(EvalDataError) as err:
        load_task("qasper", data_dir=tmp_path)
    assert f"{path}:2:" in str(err.value) and "not valid JSON" in str(err.value)


def test_error_missing_field_names_field_and_line(tmp_path):
    row = _row()
    del row["answers"]
    path = _write(tmp_path, "qasper", [json.dumps(_row()), "", json.dumps(row)])
    with pytest.raises(EvalDataError) as err:
        load_task("qasper", data_dir=tmp_path)
    assert f"{path}:3:" in str(err.value) and "answers" in str(err.value)


def test_error_trec_needs_all_classes_and_bad_types(tmp_path):
    _write(tmp_path, "trec", [json.dumps(_row(dataset="trec"))])
    with pytest.raises(EvalDataError, match="all_classes"):
        load_task("trec", data_dir=tmp_path)
    _write(tmp_path, "qasper", [json.dumps(_row(answers=[]))])
    with pytest.raises(EvalDataError, match="answers"):
        load_task("qasper", data_dir=tmp_path)
    _write(tmp_path, "qasper", [json.dumps(_row(context=3))])
    with pytest.raises(EvalDataError, match="context"):
        load_task("qasper", data_dir=tmp_path)
    _write(tmp_path, "qasper", ["[1, 2]"])
    with pytest.raises(EvalDataError, match="JSON object"):
        load_task("qasper", data_dir=tmp_path)


def test_optional_fields_get_defaults(tmp_path):
    row = {"input": "q", "context": "one two three", "answers": ["a"], "_id": 7}
    _write(tmp_path, "qasper", [json.dumps(row)])
    (sample,) = load_task("qasper", data_dir=tmp_path)
    assert (sample.id, sample.dataset, sample.length, sample.all_classes) == ("7", "qasper", 3, None)


def test_from_hub_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(EvalDataError, match="datasets"):
        load_task("hotpotqa", from_hub=True)


def test_from_hub_uses_load_dataset(monkeypatch):
    calls = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return [_row(_id=f"h{i}", dataset=name) for i in range(3)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    samples = load_task("hotpotqa", from_hub=True, limit=2)
    assert calls == [("THUDM/LongBench", "hotpotqa", "test")]
    assert [s.id for s in samples] == ["h0", "h1"]


def test_from_hub_offline_is_a_clear_error(monkeypatch):
    def load_dataset(*_a, **_k):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(EvalDataError, match="offline"):
        load_task("hotpotqa", from_hub=True)


# ---------------------------------------------------------------- truncation


def test_truncate_middle():
    ids = list(range(10))
    assert truncate_middle(ids, 4) == [0, 1, 8, 9]
    assert truncate_middle(ids, 5) == [0, 1, 8, 9]  # half = int(5/2) = 2, as in LongBench
    assert truncate_middle(ids, 10) == ids and truncate_middle(ids, 50) == ids
    assert truncate_middle(tuple(ids), 2) == [0, 9]
    with pytest.raises(ValueError):
        truncate_middle(ids, 1)


# ---------------------------------------------------------------- passages


@needs_data
@pytest.mark.parametrize("name", [t for t in PRESENT if get_task(t).multi_doc] or ["none"])
def test_split_passages_lossless_on_real_files(name):
    word = "Passage" if name in ("hotpotqa", "2wikimqa", "musique") else "Paragraph"
    for sample in load_task(name, data_dir=DATA_DIR):
        passages = split_passages(name, sample.context)
        assert "".join(passages) == sample.context
        assert len(passages) > 1
        for i, passage in enumerate(passages, start=1):
            assert passage.startswith(f"{word} {i}:")


def test_split_passages_formats():
    ctx = "Passage 1:\nT1\nbody one\nPassage 2:\nT2\nbody two"
    assert split_passages("2wikimqa", ctx) == ["Passage 1:\nT1\nbody one\n", "Passage 2:\nT2\nbody two"]
    ctx = "Paragraph 1: aaa\n\nParagraph 2: bbb\n\nParagraph 3: ccc"
    assert split_passages("passage_count", ctx) == ["Paragraph 1: aaa\n\n", "Paragraph 2: bbb\n\n",
                                                    "Paragraph 3: ccc"]


def test_split_passages_ignores_out_of_order_headers():
    # "Passage 3:" quoted inside passage 1 is not where passage 2 starts, so it is not a boundary
    ctx = "Passage 1:\nsee\nPassage 3: below\nPassage 2:\nx\nPassage 3:\ny"
    assert split_passages("musique", ctx) == ["Passage 1:\nsee\nPassage 3: below\n",
                                              "Passage 2:\nx\n", "Passage 3:\ny"]


def test_split_passages_after_middle_truncation():
    # head ends inside passage 2, tail starts inside passage 7: the remnant is its own passage
    ctx = "Passage 1:\na\nPassage 2:\nbb" + "cc\nPassage 8:\nd\nPassage 9:\ne"
    parts = split_passages("hotpotqa", ctx)
    assert parts == ["Passage 1:\na\n", "Passage 2:\nbbcc\n", "Passage 8:\nd\n", "Passage 9:\ne"]
    parts = split_passages("hotpotqa", "tail of 3\nPassage 4:\nx")
    assert parts == ["tail of 3\n", "Passage 4:\nx"]


def test_split_passages_single_document_tasks():
    assert split_passages("narrativeqa", "Passage 1:\nx\nPassage 2:\ny") == ["Passage 1:\nx\nPassage 2:\ny"]
    assert split_passages("hotpotqa", "no headers") == ["no headers"]
    assert split_passages("hotpotqa", "") == [""]


# ---------------------------------------------------------------- PML documents

TRICKY = "def f(a, b):\n    if a < b && b > 0:  # ]]> & <tag>\n        return a\n\n  \n"


class CharRenderer:
    """Tokenizer stand-in: one token per character, role markers as out-of-range ids."""

    MARK = {"bos": 0x110000, "user": 0x110001, "end": 0x110002, "gen": 0x110003}
    NAMES = {v: f"<|{k}|>" for k, v in MARK.items()}

    def encode(self, text):
        return [ord(c) for c in text]

    def bos(self):
        return [self.MARK["bos"]]

    def role_open(self, role, first):
        assert role == "user"
        return [self.MARK["user"]]

    def role_close(self, role):
        return [self.MARK["end"]]

    def generation_prompt(self):
        return [self.MARK["gen"]]

    def pad_id(self):
        return 0

    def decode(self, ids):
        return "".join(self.NAMES.get(i) or chr(i) for i in ids)


def _render(schema_xml: str, prompt_xml: str) -> tuple[str, list[str]]:
    """Parse, lay out and bind like the engine; return the full rendered text and module names."""
    renderer = CharRenderer()
    layout = build_layout(parse_schema(schema_xml), renderer)
    bound = bind(parse_prompt(prompt_xml), layout, renderer)
    tokens = [t for seg in sorted(layout.segments, key=lambda s: s.start) for t in seg.tokens]
    modules = [path[-1] for path in layout.modules if path]
    assert bound.selected == set(layout.modules)  # every module is selected
    return renderer.decode(tokens + bound.suffix_tokens), modules


def _expected(name: str, sample: Sample, context: str | None = None) -> str:
    text = reference_prompt(name, sample, context)
    if get_task(name).chat:
        return "<|bos|><|user|>" + text + "<|end|><|gen|>"
    return "<|bos|>" + text


def _synthetic(name: str) -> Sample:
    ctx = TRICKY
    if get_task(name).multi_doc:
        word = "Passage" if name in ("hotpotqa", "2wikimqa", "musique") else "Paragraph"
        sep = ":\n" if word == "Passage" else ": "
        ctx = "".join(f"{word} {i}{sep}{TRICKY}" for i in range(1, 4))
    return Sample(id=f"{name}-s1", dataset=name, input="What is <x> & y?\n", context=ctx,
                  answers=["a"], all_classes=["Date"] if name == "trec" else None, length=3)


@pytest.mark.parametrize("name", ENGLISH_TASKS)
@pytest.mark.parametrize("split", [False, True])
def test_sample_to_pml_well_formed_and_exact(name, split):
    sample = _synthetic(name)
    schema_xml, prompt_xml = sample_to_pml(name, sample, split=split)
    schema_el, prompt_el = etree.fromstring(schema_xml), etree.fromstring(prompt_xml)
    assert schema_el.get("name") == prompt_el.get("schema") == schema_name(name, sample.id)
    modules = schema_el.findall(".//module")
    assert "".join(m.text or "" for m in modules) == sample.context  # unescaped by lxml
    assert (schema_el.find("user") is not None) == get_task(name).chat
    if split and get_task(name).multi_doc:
        assert [m.get("name") for m in modules] == ["p0", "p1", "p2"]
    else:
        assert [m.get("name") for m in modules] == ["context"]
    assert [el.tag for el in prompt_el] == [m.get("name") for m in modules]
    rendered, _ = _render(schema_xml, prompt_xml)
    assert rendered == _expected(name, sample)


def test_sample_to_pml_with_truncated_context():
    sample = _synthetic("hotpotqa")
    short = sample.context[:30] + sample.context[-40:]
    schema_xml, prompt_xml = sample_to_pml("hotpotqa", sample, context=short, split=True)
    rendered, _ = _render(schema_xml, prompt_xml)
    assert rendered == _expected("hotpotqa", sample, short)


@needs_data
@pytest.mark.parametrize("name", PRESENT or ["none"])
def test_sample_to_pml_on_real_files(name):
    split = get_task(name).multi_doc
    for sample in load_task(name, data_dir=DATA_DIR, limit=3):
        schema_xml, prompt_xml = sample_to_pml(name, sample, split=split)
        rendered, modules = _render(schema_xml, prompt_xml)
        assert rendered == _expected(name, sample)
        if split:
            assert len(modules) == len(split_passages(name, sample.context))


def test_question_and_answers_helpers():
    sample = Sample(id="1", dataset="hotpotqa", input="Who?", context="ctx", answers=["A", "B"])
    assert sample_question_text("hotpotqa", sample) == (
        "\n\nAnswer the question based on the given passages. Only give me the answer and do not "
        "output any other words.\n\nQuestion: Who?\nAnswer:")
    assert sample_answers(sample) == ["A", "B"] and sample_answers(sample) is not sample.answers


def test_schema_names_are_unique_and_safe():
    assert schema_name("qasper", "qasper-0") == "lb-qasper-qasper-0"
    assert schema_name("qasper", 'a b"<c') == "lb-qasper-a_b__c"
    assert schema_name("qasper", "1") != schema_name("qmsum", "1")
