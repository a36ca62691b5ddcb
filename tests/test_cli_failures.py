"""Every CLI failure is exit status 2 and one clear line on stderr, no traceback (issue 12 items 10, 15).

None of these loads a model: each failure is detected before that.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from promptcache.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@no_cuda
def test_issue12_item10_encode_device_cuda_without_cuda(tmp_path, capsys):
    store = tmp_path / "store"
    rc = cli_main(["encode", str(EXAMPLES / "persona.xml"), "--store", str(store), "--device", "cuda"])
    line = one_line(capsys.readouterr().err)
    assert rc == 2
    assert line.startswith("promptcache encode: ") and "CUDA is not available" in line
    assert not store.exists()  # refused before anything was created


@no_cuda
def test_issue12_item10_demo_device_cuda_without_cuda():
    proc = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--device", "cuda:1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "CUDA is not available" in one_line(proc.stderr)


@pytest.mark.parametrize("store", ["", "  "])
def test_issue12_item15_encode_refuses_an_empty_store(tmp_path, monkeypatch, capsys, store):
    monkeypatch.chdir(tmp_path)
    rc = cli_main(["encode", str(EXAMPLES / "persona.xml"), "--store", store])
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and "--store is empty" in line
    assert list(tmp_path.iterdir()) == []  # no store made in the current folder


def test_issue12_item15_demo_refuses_an_empty_store(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--store", ""], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--store is empty" in one_line(proc.stderr)
    assert list(tmp_path.iterdir()) == []


def test_issue12_item15_analyze_missing_tokenizer_is_exit_2_one_line(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "promptcache", "analyze", str(prompts), "--tokenizer",
                           "/nonexistent"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    line = one_line(proc.stderr)
    assert proc.returncode == 2
    assert line.count("cannot load tokenizer") == 1 and "'/nonexistent'" in line and "no such folder" in line


def test_encode_unknown_model_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = cli_main(["encode", str(EXAMPLES / "persona.xml"), "--store", str(tmp_path / "s"), "--model",
                   "nosuchmodel", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "Traceback" not in "".join(err)
    assert err[-1].startswith("promptcache encode: cannot load model 'nosuchmodel'") and "smollm2" in err[-1]
    assert all(line.startswith("promptcache encode: ") for line in err)  # progress lines, then the error


def test_encode_threads_must_be_a_whole_number(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["encode", "x.xml", "--store", "s", "--threads", "-1"])
    assert exit_.value.code == 2
    assert "argument --threads: expected a whole number >= 0, got '-1'" in capsys.readouterr().err
