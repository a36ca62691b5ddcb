"""Issue 17's benchmark side: benchmarks/ttft.py's fast-path columns, the llama.cpp peer,
benchmarks/dtype_first_token.py and benchmarks/gpu_check.sh.

The scripts run as subprocesses on random-weight tiny models (``--random-weights tiny``; the
character tokenizer where no model files are needed), so the numbers mean nothing: these tests check
that every column, ratio and summary is there and consistent with the rows it came from.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import llamacpp
from benchmarks.dtype_first_token import compare, round_robin, summarize
from benchmarks.ttft import Variant, parse_variants, ratio_rows

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)


def test_issue17_item1_ttft_help_lists_fastpath_flags():
    proc = run(sys.executable, "benchmarks/ttft.py", "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--fastpath", "--variants", "--peers", "--placement", "--tokenizer", "--vllm-venv"):
        assert flag in proc.stdout


def test_issue17_item1_variants_parse_and_refuse_unknown():
    assert parse_variants("bf16,bf16+compile") == [Variant("bf16", "bf16 eager", __import__("torch").bfloat16, False),
                                                   Variant("bf16c", "bf16 compiled", __import__("torch").bfloat16,
                                                           True)]
    for bad in ("bf32", "bf16+fast"):
        with pytest.raises(argparse.ArgumentTypeError, match="bad variant"):
            parse_variants(bad)


def test_issue17_item1_ratios_are_side_by_side_quotients():
    row = {"case": "persona-bench", "a_baseline_ms": 2000.0, "c_scaffold_ms": 200.0, "bf16c_a_ms": 600.0,
           "bf16c_c_ms": 80.0, "llamacpp_a_ms": 7000.0, "llamacpp_c_ms": 100.0, "vllm_a_ms": 500.0,
           "vllm_c_ms": 160.0}
    out = ratio_rows([row], "float32 eager", parse_variants("bf16+compile"), ["llamacpp", "vllm"])
    assert [o["column"] for o in out] == ["float32 eager", "bf16 compiled", "llama.cpp (prefix kept in its KV)",
                                          "vLLM CPU (prefix cache warm)"]
    fast = out[1]
    assert fast["c_over_first"] == pytest.approx(0.4)      # the <= 0.5x target
    assert fast["c_over_llamacpp"] == pytest.approx(0.8)   # below llama.cpp
    assert fast["c_over_vllm"] == pytest.approx(0.5)       # below vLLM
    assert fast["a_over_vllm_a"] == pytest.approx(1.2)     # full prefill within 1.3x of vLLM's
    assert fast["a_over_c"] == pytest.approx(7.5)          # speedup within one dtype
    assert out[0]["c_over_first"] == 1.0
    mins = {k.removesuffix("_ms") + "_min_ms": v / 2 for k, v in row.items() if k.endswith("_ms")}
    mins["bf16c_c_min_ms"] = 20.0
    low = ratio_rows([{**row, **mins}], "float32 eager", parse_variants("bf16+compile"), ["vllm"], stat="min")
    assert low[1]["c_ms"] == 20.0 and low[1]["c_over_first"] == pytest.approx(0.2)
    assert low[1]["c_over_vllm"] == pytest.approx(0.25)


@pytest.fixture(scope="module")
def tiny_ttft(tmp_path_factory) -> dict:
    """One ttft.py run on a tiny random model: the five columns plus bf16 eager and bf16 compiled."""
    out = tmp_path_factory.mktemp("ttft") / "ttft"
    proc = run(sys.executable, "benchmarks/ttft.py", "--random-weights", "tiny", "--tokenizer", "char",
               "--lengths", "48", "--no-persona", "--repeats", "1", "--threads", "1",
               "--variants", "bf16,bf16+compile", "--peers", "auto", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"stdout": proc.stdout, **json.loads(out.with_suffix(".json").read_text())}


def test_issue17_item1_ttft_tiny_run_has_bf16_and_compiled_columns(tiny_ttft):
    (row,) = tiny_ttft["rows"]
    for key in ("a_baseline_ms", "c_scaffold_ms", "e_floor_ms", "bf16_a_ms", "bf16_c_ms", "bf16c_a_ms",
                "bf16c_c_ms"):
        assert row[key] > 0, key
    assert row["bf16c_warmup_s"] > 0          # warm-up measured apart, before the timings
    assert isinstance(row["bf16_top_as_ref"], bool)
    columns = {r["column"]: r for r in tiny_ttft["ratios"] if r["stat"] == "median"}
    assert row["bf16c_c_min_ms"] <= row["bf16c_c_ms"] and len(tiny_ttft["ratios"]) == 6   # median and min tables
    assert set(columns) == {"float32 eager", "bf16 eager", "bf16 compiled"}
    assert columns["bf16 compiled"]["c_over_first"] == pytest.approx(row["bf16c_c_ms"] / row["c_scaffold_ms"])
    assert columns["bf16 eager"]["a_over_c"] == pytest.approx(row["bf16_a_ms"] / row["bf16_c_ms"])
    meta = tiny_ttft["meta"]
    compiled = next(v for v in meta["variants"] if v["variant"] == "bf16 compiled")
    assert compiled["compile_report"]["enabled"] is True
    # random weights: both peers are skipped, with the reason, never run on other weights
    assert set(meta["peers_missing"]) == {"llamacpp", "vllm"}
    assert "fast path" in tiny_ttft["stdout"]


def test_issue17_item1_peer_asked_explicitly_but_missing_is_an_error(tmp_path):
    proc = run(sys.executable, "benchmarks/ttft.py", "--random-weights", "tiny", "--tokenizer", "char",
               "--lengths", "32", "--no-persona", "--repeats", "1", "--peers", "vllm", "--out", str(tmp_path / "t"))
    assert proc.returncode != 0
    assert "--peers vllm: random weights" in proc.stderr


@pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python not installed (a benchmark peer only)")
def test_issue17_item2_llamacpp_peer_keeps_the_prefix_and_rewinds():
    from promptcache import load_model

    _, tok = load_model("smollm2")
    ids = tok("The quick brown fox jumps over the lazy dog. " * 8, add_special_tokens=False)["input_ids"]
    peer = llamacpp.LlamaCppPeer(llamacpp.gguf_for("smollm2"), n_ctx=256, threads=1)
    try:
        peer.prepare(ids[:-5], ids[-5:])
        assert peer.cached_s() > 0
        first = peer.first_token()
        assert peer.kept.n_tokens == len(ids)
        assert peer.cached_s() > 0 and peer.first_token() == first   # rewound to the prefix, same answer
        assert peer.prefill_s() > 0
        assert peer.kept.n_tokens == len(ids)                        # the full prefill used the other context
        assert 0 <= first < len(tok)
    finally:
        peer.close()


# ---------------------------------------------------------------- dtype_first_token


def test_issue17_item3_dtype_first_token_help():
    proc = run(sys.executable, "benchmarks/dtype_first_token.py", "--help")
    assert proc.returncode == 0
    for flag in ("--threads", "--limit", "--max-length", "--time-budget", "--compile"):
        assert flag in proc.stdout


def test_issue17_item3_compare_and_summary_count_changes():
    import torch

    ref = {"baseline": torch.tensor([3.0, 1.0, 0.0]), "cached": torch.tensor([3.0, 1.0, 0.0])}
    alt = {"baseline": torch.tensor([1.0, 3.0, 0.0]), "cached": torch.tensor([3.0, 1.1, 0.0])}
    rec = compare(ref, alt)
    assert rec["baseline_changed"] and not rec["cached_changed"]
    assert rec["baseline_kl"] > rec["cached_kl"] > 0
    assert rec["cache_kl_fp32"] == 0 and not rec["cache_changed_fp32"]
    assert rec["cache_changed_dtype"]   # bf16 baseline argmax 1, bf16 cached argmax 0
    recs = [{**rec, "task": "lcc"}, {**compare(ref, ref), "task": "trec"}]
    s = summarize(recs, planned=3, skipped=["x"])
    assert s["baseline_changed"] == 1 and s["baseline_changed_pct"] == 50.0 and s["cached_changed"] == 0
    assert s["baseline_kl_max"] == rec["baseline_kl"] and s["baseline_kl_mean"] == pytest.approx(rec["baseline_kl"] / 2)
    assert s["per_task"]["lcc"]["baseline_changed"] == 1 and s["per_task"]["trec"]["baseline_changed"] == 0
    assert round_robin({"a": [1, 2], "b": [3]}) == [("a", 1), ("b", 3), ("a", 2)]


def test_issue17_item3_dtype_first_token_tiny_run(tmp_path):
    out = tmp_path / "dft"
    proc = run(sys.executable, "benchmarks/dtype_first_token.py", "--random-weights", "tiny", "--limit", "1",
               "--tasks", "lcc,trec", "--max-length", "256", "--threads", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    summary = json.loads(out.with_suffix(".json").read_text())
    assert [r["task"] for r in records] == ["lcc", "trec"] and summary["samples"] == 2
    assert summary == {**summary, **summarize(records, 2, [])}   # the summary is what the records say
    assert "| baseline |" in proc.stdout and "| cached |" in proc.stdout


# ---------------------------------------------------------------- gpu_check.sh


def test_issue17_item4_gpu_check_help_and_budgeted_dry_run(tmp_path):
    """--budget 0 skips every step: the environment probe, step bookkeeping and summary still run.
    (The full --dry-run takes minutes on this CPU; it was run by hand, see docs/fastpath.md.)"""
    proc = run("bash", "benchmarks/gpu_check.sh", "--help")
    assert proc.returncode == 0 and "--dry-run" in proc.stdout
    proc = run("bash", "benchmarks/gpu_check.sh", "--dry-run", "--budget", "0", "--out", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["env"]["torch"]
    assert [s["status"] for s in summary["steps"]] == ["skipped"] * 7
    assert "skipped" in (tmp_path / "gpu_check.txt").read_text()
