"""``promptcache validate``: layout table, prompt check, FILE:LINE errors with exit status 2.

The renderer is injected (toy, word-level), so no tokenizer or model is loaded.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from promptcache.cli import EXIT_ERROR, build_parser, main
from promptcache.pml.toyrenderer import ToyRenderer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
NAMES = ["code_generation_game", "persona", "travel", "document_qa", "nested"]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv, renderer=ToyRenderer())
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("name", NAMES)
def test_validate_every_example_with_its_prompt(name: str, capsys):
    schema, prompt = EXAMPLES / f"{name}.xml", EXAMPLES / f"{name}.prompt.xml"
    rc, out, err = run(["validate", str(schema), "--prompt", str(prompt)], capsys)
    assert rc == 0, err
    assert err == ""
    lines = out.splitlines()
    assert lines[0].split()[:6] == ["name", "kind", "start", "end", "length", "cached"]
    assert any(line.startswith("total positions: ") for line in lines)
    assert lines[-1].startswith(f"prompt {prompt}: OK, schema ")


def test_validate_schema_only_shows_modules_unions_and_parameters(capsys):
    rc, out, _ = run(["validate", str(EXAMPLES / "travel.xml")], capsys)
    assert rc == 0
    assert "union" in out and "parameter" in out and "style/comfortable" in out
    assert "OK" not in out


def test_prompt_summary_names_selections_arguments_and_suffix(capsys):
    rc, out, _ = run(["validate", str(EXAMPLES / "travel.xml"), "--prompt", str(EXAMPLES / "travel.prompt.xml")],
                     capsys)
    summary = out.splitlines()[-1]
    assert rc == 0
    assert "selects 8 module(s) (trip, style, style/comfortable" in summary
    assert "5 argument(s)" in summary and summary.endswith("suffix: text")


def test_schema_error_prints_file_line_message(tmp_path: Path, capsys):
    bad = tmp_path / "bad.xml"
    bad.write_text('<schema name="s">\n<module name="a"/>\n<module name="a"/>\n</schema>')
    rc, out, err = run(["validate", str(bad)], capsys)
    assert rc == EXIT_ERROR and out == ""
    assert err.startswith(f"{bad}:3: duplicate module name 'a'")


def test_syntax_error_prints_file_line_and_column(tmp_path: Path, capsys):
    bad = tmp_path / "bad.xml"
    bad.write_text('<schema name="s">\n<module name="a">\n</schema>')
    rc, _, err = run(["validate", str(bad)], capsys)
    assert rc == EXIT_ERROR and err.startswith(f"{bad}:3:")


def test_prompt_that_does_not_fit_the_schema(tmp_path: Path, capsys):
    bad = tmp_path / "p.xml"
    bad.write_text('<prompt schema="nested">\n<company>\n<no-such-module/>\n</company>\n</prompt>')
    rc, out, err = run(["validate", str(EXAMPLES / "nested.xml"), "--prompt", str(bad)], capsys)
    assert rc == EXIT_ERROR
    assert out == ""  # issue 13 item 3: the prompt is bound before the table, so only the error shows
    assert err.startswith(f"{bad}:3: ") and "no-such-module" in err


def test_prompt_shape_error(tmp_path: Path, capsys):
    bad = tmp_path / "p.xml"
    bad.write_text('<prompt schema="persona">\n<user>hi</user>\n<age/>\n</prompt>')
    rc, _, err = run(["validate", str(EXAMPLES / "persona.xml"), "--prompt", str(bad)], capsys)
    assert rc == EXIT_ERROR and err.startswith(f"{bad}:3: selection <age>")


def test_missing_files(tmp_path: Path, capsys):
    rc, _, err = run(["validate", str(tmp_path / "none.xml")], capsys)
    assert rc == EXIT_ERROR and err.startswith(f"{tmp_path / 'none.xml'}: cannot read schema file")
    rc, _, err = run(["validate", str(EXAMPLES / "persona.xml"), "--prompt", str(tmp_path / "p.xml")], capsys)
    assert rc == EXIT_ERROR and "cannot read prompt file" in err


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "validate" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["validate", "--help"])
    out = capsys.readouterr().out
    assert "--prompt" in out and "--tokenizer" in out and "--toy-tokenizer" not in out


def test_no_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_subcommands_register_through_one_function_each():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "validate" in sub.choices


def test_toy_tokenizer_option_needs_no_model(capsys):
    rc = main(["validate", str(EXAMPLES / "document_qa.xml"), "--toy-tokenizer"])
    assert rc == 0 and "doc" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "promptcache", "validate", str(EXAMPLES / "nested.xml"),
                           "--prompt", str(EXAMPLES / "nested.prompt.xml"), "--toy-tokenizer"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout.splitlines()[-1]


def test_tokenizer_that_cannot_load_is_a_clean_error(monkeypatch, capsys):
    import promptcache.loading as loading

    def fail(name_or_path="smollm2"):
        raise loading.ModelLoadError(f"cannot load tokenizer {name_or_path!r}: not found")

    monkeypatch.setattr(loading, "load_tokenizer", fail)
    rc = main(["validate", str(EXAMPLES / "persona.xml"), "--tokenizer", "nowhere"])
    err = capsys.readouterr().err
    assert rc == EXIT_ERROR and err.strip() == "promptcache validate: cannot load tokenizer 'nowhere': not found"
