"""Issue 18, "the demo": ``demo.py --compare`` says what differs from the baseline and why, with
the first-token KL, and names ``--recompute`` as the remedy (and uses it when given).

Cheap: ``demo.main`` takes an in-memory tiny model (no weights loaded); the explanation itself is
checked on the toy renderer, without a model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import demo
from promptcache.explain import explain_request
from promptcache.plan import encoding_contexts, make_request
from promptcache.pml.binding import bind
from promptcache.pml.layout import build_layout
from promptcache.pml.parser import load_prompt, load_schema
from promptcache.pml.toyrenderer import ToyRenderer
from single_thread import one_torch_thread  # noqa: F401  (autouse fixture)
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# The persona prompt's members that are not their union's scaffold (examples/persona*.xml); the
# last one, personality/introverted, is the scaffold, so occupation/technology is too.
PERSONA_NON_SCAFFOLD = [["age/young-adult", "middle-aged"], ["residence/seaside", "city"],
                        ["education/doctorate", "bachelor"], ["marital-status/married", "single"]]


def explain_example(name: str, policy: str = "scaffold"):
    renderer = ToyRenderer()
    layout = build_layout(load_schema(EXAMPLES / f"{name}.xml"), renderer)
    bound = bind(load_prompt(EXAMPLES / f"{name}.prompt.xml"), layout, renderer)
    contexts = encoding_contexts(layout, policy)
    return explain_request(bound, make_request(bound, contexts), contexts, policy)


# ---------------------------------------------------------------- the explanation, no model


def test_issue18_demo_explain_names_the_non_scaffold_members_of_the_persona_prompt():
    approx = explain_example("persona")
    assert [list(p) for p in approx.non_scaffold] == PERSONA_NON_SCAFFOLD
    assert not approx.exact and "age/young-adult instead of middle-aged" in approx.summary()


def test_issue18_demo_explain_document_qa_is_exact():
    for policy in ("scaffold", "independent"):
        approx = explain_example("document_qa", policy)
        assert approx.exact and approx.summary().startswith("no approximation")


def test_issue18_demo_explain_parameter_scaffolds_and_independent_encoding():
    travel = explain_example("travel")
    assert "trip:destination" in travel.lacks and not travel.non_scaffold and travel.gap_positions > 0
    independent = explain_example("persona", "independent")
    assert not independent.non_scaffold  # no cached token saw a scaffold member
    assert "occupation/technology" in independent.unseen and "independently" in independent.summary()


# ---------------------------------------------------------------- demo.main on a tiny model


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", max_position_embeddings=4096), tiny_tokenizer()  # persona: ~2.1k positions


def run_demo(tiny, capsys, *args: str) -> tuple[list[str], dict]:
    model, tokenizer = tiny
    rc = demo.main(["--compare", "--json", "--max-new-tokens", "2", "--device", "cpu", *args],
                   model=model, tokenizer=tokenizer)
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    return out, json.loads(out[-1])


def test_issue18_demo_compare_says_why_with_kl_and_the_remedy(tiny, capsys):
    out, data = run_demo(tiny, capsys)
    (why,) = [line for line in out if line.startswith("why: ")]
    assert out.index(why) == next(i for i, line in enumerate(out) if line.startswith("speedup: ")) + 1
    assert "non-scaffold union members (age/young-adult instead of middle-aged" in why
    assert f"first-token KL(baseline || cached) = {data['first_token_kl']:.3g} nats" in why
    assert "remedy: --recompute full" in why
    assert data["first_token_kl"] > 1e-4 and data["approximation"]["non_scaffold"] == PERSONA_NON_SCAFFOLD
    assert data["recompute"] == "none" and data["why"] == why[len("why: "):]


def test_issue18_demo_compare_uses_recompute(tiny, capsys):
    out, data = run_demo(tiny, capsys, "--recompute", "full")
    (why,) = [line for line in out if line.startswith("why: ")]
    assert data["recompute"] == "full" and data["cached"]["recomputed_tokens"] == data["cached"]["cached_tokens"] > 0
    assert f"--recompute full recomputed {data['cached']['recomputed_tokens']} cached tokens" in why
    assert "remedy" not in why


def test_issue18_demo_compare_exact_prompt_has_near_zero_kl(tiny, capsys):
    out, data = run_demo(tiny, capsys, "--schema", str(EXAMPLES / "document_qa.xml"),
                         "--prompt", str(EXAMPLES / "document_qa.prompt.xml"))
    assert data["approximation"]["exact"] and data["first_token_kl"] < 1e-8
    assert any(line.startswith("why: no approximation") for line in out)
