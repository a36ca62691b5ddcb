"""analyze(): prefix-sharing numbers on hand-checked batches, and the analyze CLI on JSONL."""

from __future__ import annotations

import io
import json
import sys
import types

import pytest

from promptcache.prefix.analyze import (AnalysisReport, PromptFileError, analyze, analyze_main,
                                        read_prompts, tokenize_prompt)


class WhitespaceTokenizer:
    """Word-level fake: ids handed out on first sight; BOS (id 0) only with special tokens."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {"<s>": 0}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]
        return ([0] if add_special_tokens else []) + ids

    def apply_chat_template(self, conversation, tokenize=True, add_generation_prompt=False):
        assert tokenize is False
        text = "<s> " + " ".join(f"<|{m['role']}|> {m['content']} <|end|>" for m in conversation)
        return text + (" <|assistant|>" if add_generation_prompt else "")


PLAIN = ["a b c d", "a b c e f", "x y", "a b c d"]
SYSTEM = {"role": "system", "content": "be nice"}
CHATS = [[SYSTEM, {"role": "user", "content": "hi"}],
         [SYSTEM, {"role": "user", "content": "yo there"}]]


def test_plain_prompts_hand_checked():
    # token ids: [0 a b c d] [0 a b c e f] [0 x y] [0 a b c d]
    # tree edges: (0) (a b c) (d) (e f) (x y) -> 9 unique tokens in 5 nodes
    # reused in order: 0, 4 (0 a b c), 1 (0), 5 (whole repeat)
    r = analyze(PLAIN, WhitespaceTokenizer())
    assert (r.prompts, r.total_tokens, r.unique_tokens, r.saved_tokens, r.tree_nodes) == (
        4, 19, 9, 10, 5)
    assert r.per_prompt == [(5, 0), (6, 4), (3, 1), (5, 5)]
    assert r.dedup_ratio == pytest.approx(19 / 9)
    assert r.computed_tokens == 9 and r.saved_fraction == pytest.approx(10 / 19)
    assert r.prompts_with_hit == 3


def test_chat_prompts_use_the_template_without_extra_special_tokens():
    tok = WhitespaceTokenizer()
    ids = tokenize_prompt(CHATS[0], tok)
    assert len(ids) == 9 and ids[0] == 0 and ids.count(0) == 1  # template's <s>, no 2nd BOS
    # 9 and 10 tokens sharing "<s> <|system|> be nice <|end|> <|user|>" (6)
    r = analyze(CHATS, tok)
    assert (r.total_tokens, r.unique_tokens, r.saved_tokens) == (19, 13, 6)
    r2 = analyze(CHATS, WhitespaceTokenizer(), add_generation_prompt=False)
    assert (r2.total_tokens, r2.unique_tokens, r2.saved_tokens) == (17, 11, 6)


def test_order_matters_for_savings_not_for_unique_tokens():
    forward = analyze(["a b", "a b c"], WhitespaceTokenizer())
    backward = analyze(["a b c", "a b"], WhitespaceTokenizer())
    assert forward.unique_tokens == backward.unique_tokens == 4
    assert (forward.saved_tokens, backward.saved_tokens) == (3, 3)
    assert analyze(["a b c", "x"], WhitespaceTokenizer()).saved_tokens == 1  # the BOS


def test_empty_batch_and_bad_prompt_types():
    r = analyze([], WhitespaceTokenizer())
    assert (r.prompts, r.total_tokens, r.dedup_ratio, r.saved_fraction) == (0, 0, 1.0, 0.0)
    with pytest.raises(TypeError, match="string or a list of message dicts"):
        analyze([42], WhitespaceTokenizer())


def test_table_and_dict_show_the_numbers():
    r = analyze(PLAIN, WhitespaceTokenizer())
    table = r.table()
    for needle in ("prompts", "19", "dedup ratio", "2.11x", "10 (52.6%)"):
        assert needle in table
    d = r.as_dict()
    assert d["saved_tokens"] == 10 and "per_prompt" not in d and d["dedup_ratio"] == 19 / 9


# ------------------------------------------------------------------------------- CLI


def write_jsonl(path, items, raw_lines=()):
    lines = [json.dumps(i) for i in items] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_cli_reads_prompts_and_messages_and_prints_the_table(tmp_path):
    f = write_jsonl(tmp_path / "batch.jsonl",
                    [{"prompt": p} for p in PLAIN[:2]] + [{"messages": CHATS[0]}, "x y"],
                    raw_lines=["", "   "])
    seen = []

    def loader(name):
        seen.append(name)
        return WhitespaceTokenizer()

    out = io.StringIO()
    assert analyze_main([f, "--tokenizer", "fake-tok"], load_tokenizer=loader, out=out) == 0
    assert seen == ["fake-tok"]
    expected = analyze(PLAIN[:2] + [CHATS[0], "x y"], WhitespaceTokenizer())
    assert out.getvalue().strip() == expected.table()

    out = io.StringIO()
    assert analyze_main([f, "--json"], load_tokenizer=lambda n: WhitespaceTokenizer(), out=out) == 0
    assert json.loads(out.getvalue()) == json.loads(json.dumps(expected.as_dict()))


def test_cli_field_option_and_generation_prompt_flag(tmp_path):
    f = write_jsonl(tmp_path / "b.jsonl", [{"text": p, "prompt": "ignored"} for p in PLAIN]
                    + [{"text": CHATS[1]}])
    out = io.StringIO()
    rc = analyze_main([f, "--field", "text", "--json", "--no-generation-prompt"],
                      load_tokenizer=lambda n: WhitespaceTokenizer(), out=out)
    got = json.loads(out.getvalue())
    want = analyze(PLAIN + [CHATS[1]], WhitespaceTokenizer(), add_generation_prompt=False)
    assert rc == 0 and got["total_tokens"] == want.total_tokens == 19 + 9
    assert got["saved_tokens"] == want.saved_tokens


def test_cli_reports_bad_input_with_file_and_line(tmp_path, capsys):
    loader = lambda n: WhitespaceTokenizer()  # noqa: E731
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "a"}\n{not json}\n', encoding="utf-8")
    assert analyze_main([str(bad_json)], load_tokenizer=loader) == 2
    assert f"{bad_json}:2: not valid JSON" in capsys.readouterr().err

    no_field = write_jsonl(tmp_path / "nf.jsonl", [{"prompt": "a"}, {"other": "b"}])
    assert analyze_main([no_field], load_tokenizer=loader) == 2
    assert "nf.jsonl:2: no 'prompt' or 'messages' field" in capsys.readouterr().err

    assert analyze_main([str(tmp_path / "missing.jsonl")], load_tokenizer=loader) == 2
    assert "cannot read" in capsys.readouterr().err

    with pytest.raises(PromptFileError, match="must be a string or a list"):
        read_prompts(write_jsonl(tmp_path / "x.jsonl", [{"messages": [{"role": "user"}]}]))
    with pytest.raises(PromptFileError, match="expected an object or a string"):
        read_prompts(write_jsonl(tmp_path / "y.jsonl", [[1, 2]]))


def test_cli_tokenizer_load_failure_is_exit_2(tmp_path, capsys):
    """Issue 12 item 15: exit 2 like every CLI failure (was 1), one line, the prefix not doubled."""
    def loader(name):
        raise RuntimeError("no such model")

    f = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "a"}])
    assert analyze_main([f, "--tokenizer", "nope"], load_tokenizer=loader) == 2
    assert capsys.readouterr().err == "promptcache analyze: cannot load tokenizer 'nope': no such model\n"

    def project_loader(name):  # the project's loader already says "cannot load tokenizer ..."
        raise RuntimeError(f"cannot load tokenizer {name!r}: no such folder\n(second line)")

    assert analyze_main([f, "--tokenizer", "/nonexistent"], load_tokenizer=project_loader) == 2
    err = capsys.readouterr().err
    assert err == "promptcache analyze: cannot load tokenizer '/nonexistent': no such folder (second line)\n"


def test_cli_defaults_to_the_project_tokenizer_loaded_lazily(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("promptcache.loading")
    fake.load_tokenizer = lambda name: calls.append(name) or WhitespaceTokenizer()
    monkeypatch.setitem(sys.modules, "promptcache.loading", fake)
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a b"}])
    assert analyze_main([f], out=io.StringIO()) == 0
    assert calls == ["smollm2"]


def test_report_is_a_plain_dataclass():
    r = AnalysisReport(prompts=1, total_tokens=3, unique_tokens=3, saved_tokens=0, tree_nodes=1)
    assert r.dedup_ratio == 1.0 and r.prompts_with_hit == 0
