"""eval.py (latency) and eval_acc.py (accuracy) end to end on longbench-mini with the default model.

The scripts run as subprocesses (``sys.executable``) on one sample per task, prompts cut to 512
tokens and 8 generated tokens, so every run stays well under a minute on a 2-core CPU. Every
number the scripts write is checked against a recomputation from the saved file (task metrics via
eval.metrics, medians via the per-sample fields). Helper-level tests (no model) cover task
selection, the torn-line-tolerant reader, atomic writes, the KL and the tables.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eval import cli_args, numbers, outputs, prepare, setup
from eval.data import available_tasks, default_data_dir, load_task
from eval.metrics import score_sample, task_score
from eval.report import ACCURACY_COLUMNS, format_table, sweep_summary

ROOT = Path(__file__).resolve().parents[1]
DATA = default_data_dir()
NEEDED = {"hotpotqa", "lcc", "trec"}
needs_data = pytest.mark.skipif(not NEEDED <= set(available_tasks(DATA)),
                                reason=f"longbench-mini files for {sorted(NEEDED)} not in {DATA}")
FAST = ["--limit", "1", "--max-length", "512", "--max-new-tokens", "8", "--no-progress", "--threads", "1",
        "--data-dir", str(DATA)]  # one thread: on a busy machine torch's default pool stalls (issue 13)
ACC_TASKS = "hotpotqa,trec,lcc"   # lcc last: the cheapest sample to redo in the torn-line test


def run_script(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "error:" in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


# ---------------------------------------------------------------- end to end: latency


@pytest.fixture(scope="module")
def latency_run(tmp_path_factory):
    """eval.py with --split-passages over a stale output (so --overwrite is exercised too)."""
    base = tmp_path_factory.mktemp("lat")
    # hotpotqa's 2nd sample: its passages are short enough that a 512-token cut keeps 2 of them
    # (the 1st sample's cut falls inside two long passages: one module).
    data = base / "data"
    data.mkdir()
    (data / "hotpotqa.jsonl").write_text((DATA / "hotpotqa.jsonl").read_text().splitlines()[1] + "\n")
    (data / "lcc.jsonl").write_text((DATA / "lcc.jsonl").read_text().splitlines()[0] + "\n")
    out = base / "lat.jsonl"
    out.write_text("stale\n")
    proc = run_script("eval.py", "--dataset", "all", "--split-passages", "--plot", "--output", str(out),
                      "--overwrite", *FAST, "--data-dir", str(data))
    assert proc.returncode == 0, proc.stderr
    return out, proc


@needs_data
def test_latency_fields_and_summary(latency_run):
    out, proc = latency_run
    records = read_jsonl(out)
    assert [r["dataset"] for r in records] == ["hotpotqa", "lcc"]
    for r in records:
        for key in ("id", "dataset", "prompt_tokens", "cached_tokens", "ttft_ms_cached", "ttft_ms_baseline",
                    "encode_ms"):
            assert key in r, key
        assert 0 < r["cached_tokens"] < r["prompt_tokens"] <= 512
        assert r["cached_tokens"] + r["computed_tokens"] == r["prompt_tokens"]
        assert r["truncated"] and r["kept_context_tokens"] < r["context_tokens"]
        assert r["ttft_ms_cached"] > 0 and r["ttft_ms_baseline"] > 0 and r["encode_ms"] > 0
        assert r["same_first_token"] and r["first_token_kl"] < 1e-3  # scaffold + one context: exact
    summary = json.loads(outputs.derived_path(out, ".summary.json").read_text())
    by_task = {row["task"]: row for row in summary["rows"]}
    for r in records:
        row = by_task[r["dataset"]]
        assert row["ttft_ms_cached"] == pytest.approx(r["ttft_ms_cached"])
        assert row["speedup"] == pytest.approx(r["ttft_ms_baseline"] / r["ttft_ms_cached"])
    assert by_task["all"]["n"] == 2
    assert "speedup" in proc.stdout and "hotpotqa" in proc.stdout and "lcc" in proc.stdout
    png = outputs.derived_path(out, ".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| hotpotqa |" in outputs.derived_path(out, ".summary.md").read_text()


@needs_data
def test_split_passages_makes_several_cached_modules(latency_run):
    out, _ = latency_run
    hotpot = next(r for r in read_jsonl(out) if r["dataset"] == "hotpotqa")
    lcc = next(r for r in read_jsonl(out) if r["dataset"] == "lcc")
    assert hotpot["modules"] > 1 and hotpot["cached_tokens"] > 0
    assert lcc["modules"] == 1  # not a multi-document task: the flag does not apply


# ---------------------------------------------------------------- end to end: accuracy


@pytest.fixture(scope="module")
def accuracy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("acc") / "acc.jsonl"
    proc = run_script("eval_acc.py", "--tasks", ACC_TASKS, "--output", str(out), "--no-warmup", *FAST)
    assert proc.returncode == 0, proc.stderr
    return out, proc


@needs_data
def test_accuracy_fields_and_scores_recomputed(accuracy_run):
    out, proc = accuracy_run
    records = read_jsonl(out)
    assert [r["dataset"] for r in records] == ACC_TASKS.split(",")
    for r in records:
        for key in ("id", "dataset", "answers", "pred_cached", "pred_baseline", "score_cached",
                    "score_baseline", "identical", "first_token_kl"):
            assert key in r, key
        assert r["score_cached"] == score_sample(r["dataset"], r["pred_cached"], r["answers"], r["all_classes"])
        assert r["score_baseline"] == score_sample(r["dataset"], r["pred_baseline"], r["answers"],
                                                   r["all_classes"])
        assert r["identical"] == (r["pred_cached"] == r["pred_baseline"])  # greedy, exact scaffold cache
        assert 0 <= r["first_token_kl"] < 1e-3
        assert 0 < r["gen_tokens_cached"] <= 8 and r["prompt_tokens"] <= 512 and r["recompute"] == "none"
    rows = json.loads(outputs.derived_path(out, ".summary.json").read_text())["rows"]
    by_task = {row["task"]: row for row in rows}
    for r in records:
        row = by_task[r["dataset"]]
        assert row["score_cached"] == task_score(r["dataset"], [r["pred_cached"]], [r["answers"]],
                                                 [r["all_classes"]])
        assert row["score_baseline"] == task_score(r["dataset"], [r["pred_baseline"]], [r["answers"]],
                                                   [r["all_classes"]])
        assert row["delta"] == pytest.approx(row["score_cached"] - row["score_baseline"])
        assert row["identical_pct"] == 100 * r["identical"]
        assert row["mean_first_token_kl"] == pytest.approx(r["first_token_kl"])
    mean = sum(by_task[t]["score_baseline"] for t in ACC_TASKS.split(",")) / 3
    assert by_task["all"]["score_baseline"] == pytest.approx(mean, abs=0.006)
    assert format_table(rows, ACCURACY_COLUMNS).splitlines()[0] in proc.stdout
    assert "| lcc |" in outputs.derived_path(out, ".summary.md").read_text()


@needs_data
def test_resume_adds_nothing_when_done(accuracy_run):
    out, _ = accuracy_run
    before = out.read_bytes()
    proc = run_script("eval_acc.py", "--tasks", ACC_TASKS, "--output", str(out), "--no-warmup", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "nothing to do" in proc.stderr and "loading" not in proc.stderr
    assert out.read_bytes() == before
    assert "score base" in proc.stdout  # the table is still printed, from the file


@needs_data
def test_resume_redoes_a_torn_last_line(accuracy_run, tmp_path):
    out, _ = accuracy_run
    torn = tmp_path / "torn.jsonl"
    lines = out.read_text().splitlines(keepends=True)
    torn.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # killed mid-write
    proc = run_script("eval_acc.py", "--tasks", ACC_TASKS, "--output", str(torn), "--no-warmup", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "1 samples to do" in proc.stderr and "torn" in proc.stderr
    redone = read_jsonl(torn)
    assert [(r["dataset"], r["id"]) for r in redone] == [(r["dataset"], r["id"]) for r in read_jsonl(out)]
    assert redone[-1]["pred_cached"] == read_jsonl(out)[-1]["pred_cached"]  # greedy: same answer again


@needs_data
def test_resume_refuses_other_settings(accuracy_run):
    out, _ = accuracy_run
    before = out.read_bytes()
    args = [a if a != "512" else "480" for a in FAST]
    proc = run_script("eval_acc.py", "--tasks", ACC_TASKS, "--output", str(out), *args)
    assert_clean_error(proc, "other settings", "max_length")
    assert out.read_bytes() == before


@needs_data
def test_recompute_sweep_writes_its_outputs(tmp_path):
    pytest.importorskip("promptcache.recompute", reason="promptcache/recompute.py not available")
    out = tmp_path / "sweep.jsonl"
    proc = run_script("eval_acc.py", "--tasks", "lcc", "--recompute-sweep", "none,full", "--output", str(out),
                      "--no-warmup", *FAST)
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(out)
    assert [r["recompute"] for r in records] == ["none", "full"]
    none, full = records
    assert none["recomputed_tokens"] == 0 and full["recomputed_tokens"] == full["cached_tokens"] > 0
    assert none["ttft_ms_baseline"] == full["ttft_ms_baseline"]  # one baseline per sample
    assert full["first_token_kl"] < 1e-3  # full recompute equals the baseline's forward
    summary = json.loads(outputs.derived_path(out, ".summary.json").read_text())
    assert [row["policy"] for row in summary["rows"]] == ["none", "full"]
    assert summary["rows"][1]["recompute_ratio"] == pytest.approx(1.0)
    assert set(summary["per_task"]) == {"none", "full"}
    assert outputs.derived_path(out, ".sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "recomputed/cached" in proc.stdout


# ---------------------------------------------------------------- clean failures (no model loaded)


@pytest.fixture
def tiny_data(tmp_path_factory) -> Path:
    """A data folder with one made-up lcc sample: these checks must not need longbench-mini."""
    folder = tmp_path_factory.mktemp("tiny_data")
    row = {"_id": "t0", "input": "", "context": "def add(a, b):\n    return a + b\n", "answers": ["pass"],
           "all_classes": None, "length": 8}
    (folder / "lcc.jsonl").write_text(json.dumps(row) + "\n")
    return folder


@pytest.mark.parametrize("script", ["eval.py", "eval_acc.py"])
def test_refuses_to_overwrite(script, tmp_path, tiny_data):
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    if script == "eval_acc.py":  # an existing JSONL is resumed; its summary is what must not be replaced
        out = tmp_path / "fresh.jsonl"
        outputs.derived_path(out, ".summary.md").write_text("precious\n")
    proc = run_script(script, "--dataset", "lcc", "--output", str(out), *FAST, "--data-dir", str(tiny_data),
                      timeout=120)
    assert_clean_error(proc, "output exists", "--overwrite")
    assert all(p.read_text() == "precious\n" for p in tmp_path.iterdir())


@pytest.mark.parametrize("script", ["eval.py", "eval_acc.py"])
@pytest.mark.parametrize("args, message", [
    (["--dataset", "nosuchtask"], "unknown LongBench task 'nosuchtask'"),
    (["--dataset", "samsum"], "data file not found"),
    (["--dataset", "all", "--data-dir", "/nonexistent/dir"], "data directory not found"),
    (["--dataset", "lcc", "--max-length", "0"], "positive integer"),
    (["--dataset", "lcc", "--device", "quantum"], "bad --device"),
    (["--dataset", "lcc", "--max-length", "9000"], "exceeds the model's window"),
])
def test_user_errors_exit_2_without_traceback(script, args, message, tmp_path, tiny_data):
    if "--data-dir" not in args:
        args = [*args, "--data-dir", str(tiny_data)]
    proc = run_script(script, *args, "--output", str(tmp_path / "o.jsonl"), timeout=120)
    assert_clean_error(proc, message)
    assert not (tmp_path / "o.jsonl").exists()


def test_bad_recompute_policy_is_a_clean_error(tmp_path):
    proc = run_script("eval_acc.py", "--recompute-sweep", "none,bogus:3", "--output", str(tmp_path / "o.jsonl"))
    assert_clean_error(proc, "bogus:3")


def test_resume_refuses_a_foreign_file(tmp_path, tiny_data):
    out = tmp_path / "o.jsonl"
    out.write_text('{"hello": 1}\nnot json\n{"x": 2}\n')
    proc = run_script("eval_acc.py", "--dataset", "lcc", "--data-dir", str(tiny_data), "--output", str(out))
    assert_clean_error(proc, "o.jsonl:2")


# ---------------------------------------------------------------- helpers (no model)


def test_resolve_tasks(tmp_path):
    for name in ("lcc", "trec"):
        (tmp_path / f"{name}.jsonl").write_text("")
    assert cli_args.resolve_tasks("all", tmp_path) == ["trec", "lcc"]  # registry order
    assert cli_args.resolve_tasks(" lcc , trec,lcc", tmp_path) == ["lcc", "trec"]
    with pytest.raises(cli_args.UserError, match="data file not found"):
        cli_args.resolve_tasks("lcc,hotpotqa", tmp_path)
    with pytest.raises(cli_args.UserError, match="cannot be combined"):
        cli_args.resolve_tasks("all,lcc", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(cli_args.UserError, match="no LongBench task files"):
        cli_args.resolve_tasks("all", tmp_path / "empty")


def test_torn_line_reader(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": 2}\n{"a": 3, "b": "hal')
    records, dropped = outputs.read_jsonl_records(path)
    assert records == [{"a": 1}, {"a": 2}] and dropped
    assert path.read_bytes().endswith(b'"hal')  # untouched without repair
    outputs.read_jsonl_records(path, repair=True)
    assert path.read_bytes() == b'{"a": 1}\n\n{"a": 2}\n'
    path.write_bytes(b'{"a": 1}\n{"a": 2}')  # complete record, newline missing: kept and fixed
    assert outputs.read_jsonl_records(path, repair=True) == ([{"a": 1}, {"a": 2}], False)
    assert path.read_bytes() == b'{"a": 1}\n{"a": 2}\n'
    path.write_bytes(b'{"a": 1}\n[1, 2]\n{"a": 2}\n')
    with pytest.raises(cli_args.UserError, match="r.jsonl:2"):
        outputs.read_jsonl_records(path)


def test_appender_and_atomic_write(tmp_path):
    path = tmp_path / "sub" / "x.jsonl"
    with outputs.JsonlAppender(path) as out:
        out.append({"a": 1})
    with outputs.JsonlAppender(path) as out:
        out.append({"b": "é"})
    assert outputs.read_jsonl_records(path) == ([{"a": 1}, {"b": "é"}], False)

    target = tmp_path / "t.txt"
    target.write_text("old")

    def boom(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        outputs.write_atomic(target, boom)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["sub", "t.txt"]
    outputs.write_json_atomic(target, {"k": [1]})
    assert json.loads(target.read_text()) == {"k": [1]}


def test_first_token_kl():
    logits = torch.randn(50)
    assert numbers.first_token_kl(logits, logits.clone()) == pytest.approx(0.0, abs=1e-12)
    assert numbers.first_token_kl(logits, logits + 3.0) == pytest.approx(0.0, abs=1e-9)  # shift-invariant
    p = torch.tensor([0.5, 0.5]).log()
    q = torch.tensor([0.9, 0.1]).log()
    expected = 0.5 * (torch.tensor(0.5 / 0.9).log() + torch.tensor(0.5 / 0.1).log())
    assert numbers.first_token_kl(p, q) == pytest.approx(float(expected))  # KL(baseline || cached)
    assert numbers.first_token_kl(q, p) != pytest.approx(float(expected))


def test_prompt_budget_and_policies():
    assert setup.prompt_budget(8192, None, 32) == 8160
    assert setup.prompt_budget(8192, 1024, 32) == 1024
    with pytest.raises(cli_args.UserError, match="exceeds"):
        setup.prompt_budget(2048, 2040, 32)
    assert cli_args.policy_list("none, full,boundary:4") == ["none", "full", "boundary:4"]
    with pytest.raises(Exception, match="repeated"):
        cli_args.policy_list("full,full")


def test_tables_render_text_and_markdown():
    rows = [{"task": "a|b", "n": 2, "kl": 1.5e-9, "x": 3.14159, "flag": None}]
    cols = [("task", "task"), ("n", "n"), ("kl", "KL"), ("x", "x"), ("flag", "flag")]
    text = format_table(rows, cols)
    assert "1.50e-09" in text and "3.14" in text and text.splitlines()[1].startswith("----")
    md = format_table(rows, cols, markdown=True)
    assert md.splitlines()[1] == "|:---|---:|---:|---:|---:|" and "a\\|b" in md


def test_sweep_rows_compare_each_policy_with_none():
    def rec(policy, sid, kl, ttft):
        return {"id": sid, "dataset": "lcc", "recompute": policy, "answers": ["x"], "pred_cached": "x",
                "pred_baseline": "x", "identical": True, "first_token_kl": kl, "ttft_ms_cached": ttft,
                "ttft_ms_baseline": 1000.0, "cached_tokens": 100, "recomputed_tokens": 0}
    records = [rec("none", "a", 0.4, 100.0), rec("none", "b", 0.2, 100.0),
               rec("boundary:2", "a", 0.1, 120.0), rec("boundary:2", "b", 0.2, 120.0)]
    overall, per_task = sweep_summary(records, ["none", "boundary:2"])
    none, boundary = overall
    assert none["kl_gap_recovered_pct"] == pytest.approx(0) and none["ttft_vs_none"] == pytest.approx(1)
    assert boundary["kl_gap_recovered_pct"] == pytest.approx(50)   # mean KL 0.3 -> 0.15
    assert boundary["ttft_vs_none"] == pytest.approx(1.2)
    assert boundary["baseline_vs_ttft"] == pytest.approx(1000 / 120)
    assert per_task["boundary:2"][0]["kl_gap_recovered_pct"] == pytest.approx(50)
    # without a ``none`` run there is nothing to compare with
    alone, _ = sweep_summary(records[2:], ["boundary:2"])
    assert "kl_gap_recovered_pct" not in alone[0] and alone[0]["baseline_vs_ttft"] == pytest.approx(1000 / 120)


@pytest.fixture(scope="module")
def tokenizer_and_renderer():
    from promptcache.loading import load_tokenizer
    from promptcache.roles import ChatRenderer

    tokenizer = load_tokenizer("smollm2")
    return tokenizer, ChatRenderer(tokenizer)


def _module_text(schema_xml: str) -> str:
    """The context module's text as the PML parser will see it (CDATA resolved)."""
    from lxml import etree

    modules = etree.fromstring(schema_xml.encode()).findall(".//module")
    assert len(modules) == 1
    return modules[0].text


@needs_data
def test_prepare_sample_truncates_longbench_style(tokenizer_and_renderer):
    tokenizer, renderer = tokenizer_and_renderer
    sample = next(s for s in load_task("lcc", DATA) if "<" in s.context or "&" in s.context)
    full = prepare.prepare_sample("lcc", sample, tokenizer, renderer, 8000, 8)
    assert not full.truncated and _module_text(full.schema_xml) == sample.context
    assert "<![CDATA[" in full.schema_xml  # code with '<' or '&' is carried safely
    cut = prepare.prepare_sample("lcc", sample, tokenizer, renderer, 300, 8)
    assert cut.truncated and cut.prompt_tokens <= 300 and cut.kept_context_tokens < cut.context_tokens
    # The first and the last part of the context survive, the middle is gone.
    text = _module_text(cut.schema_xml)
    assert text.startswith(sample.context[:100]) and text.endswith(sample.context[-100:])
    assert len(text) < len(sample.context) / 2
    assert prepare.layout_prompt_tokens(renderer, cut.schema_xml, cut.prompt_xml)[0] == cut.prompt_tokens


@needs_data
def test_prepare_sample_skips_prompts_whose_question_alone_is_too_long(tokenizer_and_renderer):
    tokenizer, renderer = tokenizer_and_renderer
    sample = load_task("trec", DATA, limit=1)[0]
    with pytest.raises(prepare.PromptTooLong):
        prepare.prepare_sample("trec", sample, tokenizer, renderer, 40, 8)
