"""Synthetic multi-passage tasks (eval/synthetic.py) and the TUNE / HELD-OUT split (issue 18, item 1)."""

from __future__ import annotations

import json
import re

import pytest

from eval.data import default_data_dir, load_task, split_passages
from eval.metrics import score_sample
from eval.runner import resolve_tasks
from eval.schemas import module_texts
from eval.synthetic import SPLITS, VARIANTS, in_split, split_of
from eval.tasks import SYNTHETIC_PASSAGES, TASK_NAMES, get_task

DATA = default_data_dir()
needs_data = pytest.mark.skipif(not (DATA / "hotpotqa.jsonl").is_file()
                                or not (DATA / "passage_retrieval_en.jsonl").is_file(),
                                reason="longbench-mini not present")
SYNTHETIC = ["synthetic_qa", "synthetic_retrieval"]


def _row(i: int, answer: str, paragraphs: int = 10) -> dict:
    """A passage_retrieval_en-like row whose paragraph ``i`` text names its sample."""
    ctx = "\n\n".join(f"Paragraph {k}: " + " ".join(f"s{i}p{k}w{w}" for w in range(100))
                      for k in range(1, paragraphs + 1))
    return {"_id": f"passage_retrieval_en-{i}", "input": f"abstract {i}", "context": ctx, "answers": [answer]}


def test_issue18_item1_synthetic_tasks_are_named_but_not_in_all():
    assert set(SYNTHETIC).isdisjoint(TASK_NAMES)  # "all" means the LongBench tasks
    for name in SYNTHETIC:
        assert get_task(name).multi_doc and get_task(name).name == name


def test_issue18_item1_retrieval_answer_follows_the_gold_paragraph(tmp_path):
    rows = [_row(i, f"Paragraph {1 + i % 10}") for i in range(15)]
    (tmp_path / "passage_retrieval_en.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = load_task("synthetic_retrieval", tmp_path)
    assert len(samples) == 15 * VARIANTS
    for s in samples:
        src = int(s.extra["source_id"].rsplit("-", 1)[1])
        passages = split_passages("synthetic_retrieval", s.context)
        assert len(passages) == SYNTHETIC_PASSAGES
        k = int(re.findall(r"\d+", s.answers[0])[0])
        # the answer names the one paragraph taken from the source's gold paragraph
        gold = f"s{src}p{1 + src % 10}w0"
        assert [gold in p for p in passages].count(True) == 1 and gold in passages[k - 1]
        # distractors: other samples of the same split only
        names = set(re.findall(r"s(\d+)p", s.context))
        split = split_of("synthetic_retrieval", s)
        assert {f"passage_retrieval_en-{n}" for n in names} <= set(SPLITS["passage_retrieval_en"][split])
        assert sum(p.count(f"s{src}p") > 0 for p in passages) == 1
        assert score_sample("synthetic_retrieval", s.answers[0], s.answers, None) == 1.0
    # deterministic, and the variants differ
    again = load_task("synthetic_retrieval", tmp_path)
    assert [s.context for s in again] == [s.context for s in samples]
    assert samples[0].context != samples[1].context


@needs_data
@pytest.mark.parametrize("task", SYNTHETIC)
def test_issue18_item1_real_synthetic_samples(task):
    samples = load_task(task, DATA)
    assert samples
    for s in samples:
        assert len(module_texts(task, s.context, split=True)) == SYNTHETIC_PASSAGES
        assert "".join(split_passages(task, s.context)) == s.context
    if task == "synthetic_qa":  # the answer text is in the context (yes/no answers: a named title)
        assert sum(any(a.lower() in s.context.lower() for a in s.answers) for s in samples) >= len(samples) - 4


@needs_data
@pytest.mark.parametrize("task", ["hotpotqa", "passage_retrieval_en"] + SYNTHETIC)
def test_issue18_item1_splits_are_disjoint_and_cover_longbench_mini(task):
    samples = load_task(task, DATA)
    tune, held = in_split(task, samples, "tune"), in_split(task, samples, "heldout")
    assert tune and held
    assert {s.id for s in tune}.isdisjoint({s.id for s in held})
    assert len(tune) + len(held) == len(samples)  # every longbench-mini sample is in one split


def test_issue18_item1_bad_split_and_missing_source(tmp_path):
    from eval.data import EvalDataError
    with pytest.raises(EvalDataError, match="unknown split"):
        in_split("hotpotqa", [], "test")
    from eval.runner import UserError
    with pytest.raises(UserError, match="passage_retrieval_en.jsonl"):
        resolve_tasks("synthetic_retrieval", tmp_path)


def test_issue18_item1_eval_acc_split_filters_before_the_limit(tmp_path):
    import eval_acc
    rows = [_row(i, f"Paragraph {1 + i % 10}") for i in range(15)]
    (tmp_path / "passage_retrieval_en.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    held = eval_acc.load_split(["passage_retrieval_en", "synthetic_retrieval"], tmp_path, "heldout", 3)
    assert [s.id for s in held["passage_retrieval_en"]] == [f"passage_retrieval_en-{i}" for i in (7, 8, 9)]
    assert [s.extra["source_id"] for s in held["synthetic_retrieval"]] == ["passage_retrieval_en-7"] * 2 + [
        "passage_retrieval_en-8"]
    tune = eval_acc.load_split(["passage_retrieval_en"], tmp_path, "tune", None)
    assert len(tune["passage_retrieval_en"]) == 7
    assert eval_acc.parse_args(["--split", "heldout"]).split == "heldout"


def test_issue18_item4_cpu_ttft_columns():
    from eval.report import sweep_summary
    base = {"dataset": "lcc", "answers": ["x"], "all_classes": None, "pred_cached": "x", "pred_baseline": "x",
            "identical": True, "first_token_kl": 0.0, "ttft_ms_baseline": 100.0, "cached_tokens": 10,
            "ttft_cpu_ms_baseline": 80.0}
    recs = [dict(base, recompute="none", ttft_ms_cached=10.0, ttft_cpu_ms_cached=8.0, first_token_kl=0.2),
            dict(base, recompute="auto:1.3", ttft_ms_cached=30.0, ttft_cpu_ms_cached=10.0, first_token_kl=0.05)]
    overall, _ = sweep_summary(recs, ["none", "auto:1.3"])
    auto = overall[1]
    assert auto["cpu_ttft_vs_none"] == pytest.approx(10.0 / 8.0) and auto["ttft_vs_none"] == pytest.approx(3.0)
    assert auto["cpu_baseline_vs_ttft"] == pytest.approx(8.0) and auto["kl_gap_recovered_pct"] == pytest.approx(75.0)
