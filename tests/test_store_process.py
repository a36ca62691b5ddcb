"""A new process answers from a store another process filled: no encoding forward, same logits.

The model is a tiny random Llama saved to a folder (with the tiny tokenizer), so child processes
load it through ``promptcache.load_model`` exactly like a real model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from engine_fixtures import FULL_PROMPTS, FULL_SCHEMA
from promptcache.cli import main as cli_main
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer
from single_thread import one_torch_thread  # noqa: F401  (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
PROMPT = FULL_PROMPTS["union-gap-param"]

CHILD = textwrap.dedent("""
    import json, sys, torch
    from promptcache import PromptCache, load_model
    model_dir, store, schema, prompt, out = sys.argv[1:6]
    model, tokenizer = load_model(model_dir, device="cpu")
    forwards = []
    model.register_forward_hook(lambda *a: forwards.append(1))
    pc = PromptCache(model, tokenizer, store=None if store == "-" else store, progress=False)
    rep = pc.add_schema(schema)
    encode_forwards = len(forwards)
    logits = pc.next_token_logits(open(prompt).read())
    torch.save(logits, out)
    print(json.dumps({"encode_forwards": encode_forwards, "report_forwards": rep.forwards,
                      "store_hits": rep.store_hits, "encoded": rep.encoded_segments,
                      "segments": rep.segments, **(pc.store_report() or {})}))
""")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    # Every process alike (one intra-op thread): same reductions, so bit-identical logits are expected.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=env, **kw)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def child(model_dir: Path, store: str, schema: Path, prompt: Path, out: Path) -> dict:
    res = run(["-c", CHILD, str(model_dir), store, str(schema), str(prompt), str(out)])
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_new_process_answers_from_the_store_without_encoding(model_dir, tmp_path):
    schema, prompt = tmp_path / "t.xml", tmp_path / "t.prompt.xml"
    schema.write_text(FULL_SCHEMA)
    prompt.write_text(PROMPT)
    store = tmp_path / "store"

    # 1. `promptcache encode` fills the store in its own process.
    enc = run(["-m", "promptcache", "encode", str(schema), "--store", str(store), "--model", str(model_dir),
               "--json"])
    report = json.loads(enc.stdout.strip().splitlines()[-1])
    assert report["encoded_segments"] == report["segments"] > 0 and report["forwards"] > 0

    # 2. A new process loads every module: not one model forward before the request's own.
    got = child(model_dir, str(store), schema, prompt, tmp_path / "a.pt")
    assert got["encode_forwards"] == 0 and got["report_forwards"] == 0
    assert got["store_hits"] == got["segments"] and got["encoded"] == 0
    assert got["store_misses"] == 0

    # 3. Same logits as a process that encoded the schema itself (no store).
    own = child(model_dir, "-", schema, prompt, tmp_path / "own.pt")
    assert own["encode_forwards"] > 0 and own["encoded"] == own["segments"]
    assert torch.equal(torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "own.pt"))

    # 4. The store commands see the entries.
    assert cli_main(["store", "verify", "--store", str(store)]) == 0
    assert cli_main(["store", "ls", "--store", str(store)]) == 0
    assert cli_main(["store", "stats", "--store", str(store)]) == 0


def test_cli_encode_twice_loads_the_second_time(model_dir, tmp_path, capsys):
    schema = tmp_path / "t.xml"
    schema.write_text(FULL_SCHEMA)
    store = str(tmp_path / "s")
    assert cli_main(["encode", str(schema), "--store", store, "--model", str(model_dir), "--json"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli_main(["encode", str(schema), "--store", store, "--model", str(model_dir), "--json",
                     "--encoding", "scaffold"]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["encoded_segments"] == second["loaded_segments"] == first["segments"]
    assert second["encoded_segments"] == 0 and second["forwards"] == 0
    # Another policy is another key: encoded again.
    assert cli_main(["encode", str(schema), "--store", store, "--model", str(model_dir), "--json",
                     "--encoding", "independent"]) == 0
    third = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert third["encoded_segments"] == third["segments"]
    assert cli_main(["store", "ls", "--store", store, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed) == first["segments"] + third["segments"]
    assert {e["module"] for e in listed} >= {"(root)", "a", "b1", "c", "e"}


def test_cli_encode_errors_exit_2(model_dir, tmp_path, capsys):
    schema = tmp_path / "t.xml"
    schema.write_text(FULL_SCHEMA)
    assert cli_main(["encode", str(schema), "--store", str(tmp_path / "s"), "--model",
                     str(tmp_path / "no-such-model")]) == 2
    assert "cannot load model" in capsys.readouterr().err
    bad = tmp_path / "bad.xml"
    bad.write_text("<schema name='x'><module></schema>")
    assert cli_main(["encode", str(bad), "--store", str(tmp_path / "s"), "--model", str(model_dir)]) == 2
    assert cli_main(["encode", str(schema), "--store", "nosuch://x", "--model", str(model_dir)]) == 2
    assert "cannot open store" in capsys.readouterr().err
    assert cli_main(["store", "ls", "--store", str(tmp_path / "not-a-store")]) == 2
    assert cli_main(["store"]) == 2
