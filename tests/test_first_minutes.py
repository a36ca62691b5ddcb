"""Issue 13: what a new user hits in the first minutes of a fresh clone (no model run here).

The checks that need the real model (progress lines and one thread in ``demo.py --json``, prompt
errors before encoding) are in test_e2e_default_model.py; the CLI failures in test_cli_failures.py.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest

import promptcache.loading as loading
from promptcache.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
README = (ROOT / "README.md").read_text()


def readme_text() -> str:
    """The README as one line of prose: no backticks, whitespace collapsed."""
    return " ".join(README.replace("`", "").split())


# ---------------------------------------------------------------- item 1: threads


def test_issue13_item1_demo_and_cli_default_to_one_thread():
    import demo
    from promptcache.cli import build_parser

    assert demo.parse_args([]).threads == 1
    assert demo.parse_args(["--threads", "0"]).threads == 0
    args = build_parser().parse_args(["encode", "x.xml", "--store", "s"])
    assert args.threads == 1
    assert build_parser().parse_args(["encode", "x.xml", "--store", "s", "--threads", "2"]).threads == 2
    import eval_acc

    assert eval_acc.parse_args([]).threads == 1  # the eval scripts share the rule (eval.runner)


def test_issue13_item1_set_threads_zero_keeps_torchs_choice():
    import torch

    before = torch.get_num_threads()
    try:
        loading.set_threads(1)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        loading.set_threads(0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_issue13_item1_readme_says_threads_in_its_first_lines():
    head = "\n".join(README.splitlines()[:30])
    assert "--threads" in head


# ---------------------------------------------------------------- item 3: validate prints the error only


def test_issue13_item3_validate_prints_only_the_prompt_error(tmp_path, capsys):
    bad = tmp_path / "bad.prompt.xml"
    bad.write_text((EXAMPLES / "persona.prompt.xml").read_text().replace("<seaside/>", "<seasid/>"))
    rc = cli_main(["validate", str(EXAMPLES / "persona.xml"), "--prompt", str(bad), "--toy-tokenizer"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""  # no layout table before the error
    assert f"{bad}:" in err and "seasid" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- item 4: offline model names


@pytest.fixture
def fresh_probe():
    """The hub probe's per-process answer forgotten before and after (tests may patch the name)."""
    probe = loading.hub_reachable
    probe.cache_clear()
    yield
    probe.cache_clear()


def assert_lists_known_names(err: BaseException, name: str) -> None:
    text = str(err)
    assert repr(name) in text and "smollm2" in text and "gemma3-270m" in text, text
    assert "\n" not in text


def test_issue13_item4_unknown_name_fails_at_once_offline(monkeypatch, fresh_probe):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "hub_reachable", lambda *a: pytest.fail("probed the hub while offline"))
    t0 = time.perf_counter()
    with pytest.raises(loading.ModelLoadError) as err:
        loading.load_model("nosuchmodel", device="cpu")
    assert time.perf_counter() - t0 < 5
    assert_lists_known_names(err.value, "nosuchmodel")
    assert "HF_HUB_OFFLINE" in str(err.value)


def test_issue13_item4_unknown_name_fails_at_once_without_network(monkeypatch, fresh_probe):
    """No offline variable, but the hub does not answer: one short probe, then the error."""
    import socket

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with socket.socket() as s:  # a port nobody listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(loading, "_hub_address", lambda: ("127.0.0.1", port))
    t0 = time.perf_counter()
    with pytest.raises(loading.ModelLoadError) as err:
        loading.load_model("nosuchmodel", device="cpu")
    assert time.perf_counter() - t0 < 10
    assert_lists_known_names(err.value, "nosuchmodel")
    assert "not reachable" in str(err.value)


def test_issue13_item4_missing_folder_is_named_without_asking_the_hub(monkeypatch, tmp_path, fresh_probe):
    monkeypatch.setattr(loading, "hub_reachable", lambda *a: pytest.fail("probed the hub for a path"))
    with pytest.raises(loading.ModelLoadError, match="no such folder") as err:
        loading.resolve(str(tmp_path / "no-model"))
    assert_lists_known_names(err.value, str(tmp_path / "no-model"))


def test_issue13_item4_cached_hub_id_loads_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "_cached_snapshot", lambda repo: str(tmp_path) if repo == "org/m" else None)
    assert loading.resolve("org/m") == str(tmp_path)


# ---------------------------------------------------------------- item 5: eval data and --help


@pytest.mark.parametrize("script", ["eval.py", "eval_acc.py"])
def test_issue13_item5_help_does_not_import_torch(script):
    code = (f"import runpy, sys; sys.argv = [{script!r}, '--help']\n"
            f"try:\n    runpy.run_path({script!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout[-500:]
    assert "--data-dir" in proc.stdout


@pytest.mark.parametrize("script", ["eval.py", "eval_acc.py"])
def test_issue13_item5_missing_data_says_how_to_provide_it(script, tmp_path, monkeypatch):
    monkeypatch.delenv("PROMPTCACHE_LONGBENCH_DIR", raising=False)
    missing = tmp_path / "nowhere"
    proc = subprocess.run([sys.executable, str(ROOT / script), "--data-dir", str(missing)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = proc.stderr
    for fragment in (str(missing), "--data-dir", "PROMPTCACHE_LONGBENCH_DIR", "<task>.jsonl", "LongBench",
                     "_id, input, context, answers"):
        assert fragment in err, err


def test_issue13_item5_readme_and_help_agree_on_the_default_data_dir():
    from eval import runner

    assert runner.DATA_DIR_HELP in readme_text()
    help_text = " ".join(subprocess.run([sys.executable, "eval.py", "--help"], cwd=ROOT, capture_output=True,
                                        text=True, timeout=120).stdout.split())
    assert runner.DATA_DIR_HELP in help_text


# ---------------------------------------------------------------- items 6, 7: make test


def test_issue13_items6_7_make_test_sets_up_redis_and_prints_slowest_tests():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^test:(.*)\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, "no test target"
    assert "redis" in recipe.group(1).split(), "make test does not depend on the redis set-up"
    assert "--durations=15" in recipe.group(2)
    redis = re.search(r"^redis:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert redis and "apt-get install" in redis.group(1) and "skip" in redis.group(1)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


# ---------------------------------------------------------------- item 8: small things


def test_issue13_item8_demo_help_has_no_none_defaults():
    import demo

    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        demo.parse_args(["--help"])
    text = " ".join(out.getvalue().split())
    assert "(default: None)" not in text and "(default: [])" not in text
    assert "cuda if available" in text


def test_issue13_item8_store_help_has_no_rst_backticks(capsys):
    assert cli_main(["store", "--help"]) == 0
    assert "``" not in capsys.readouterr().out


def test_issue13_item8_readme_gives_the_oracle_difference_of_the_real_model():
    text = readme_text()
    assert "2e-6" in text and "4e-5" in text
