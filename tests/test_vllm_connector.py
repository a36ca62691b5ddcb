"""promptcache inside vLLM (issue 16): render (request side) and PromptCacheConnector on a real vLLM.

The request-side tests need only promptcache and the default model. The connector tests run vLLM
(a CPU build in its own venv: $PROMPTCACHE_VLLM_PYTHON, default ~/.cache/promptcache/vllm-venv)
in ONE subprocess shared by the module (promptcache/integrations/vllm_driver.py); they are skipped
with the reason when that venv or the converted model folder is absent. The store is filled by
``promptcache encode`` in another process, so the vLLM process answers from entries it never
computed (issue 16, test 2, without the TTFT comparison, which is left to the benchmark).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from promptcache.integrations.vllm import KeyContext, render, supplied_tokens  # works without vLLM
from promptcache.integrations.vllm_driver import DriverProcess, first_token_kl
from promptcache.loading import converted_dir
from promptcache.roles import ChatRenderer

try:
    from redis_fixture import REDIS_BIN, RedisServer
except ImportError:  # run from the repository root as a package
    from tests.redis_fixture import REDIS_BIN, RedisServer

REPO = Path(__file__).resolve().parents[1]
VLLM_PY = Path(os.environ.get("PROMPTCACHE_VLLM_PYTHON",
                              Path.home() / ".cache/promptcache/vllm-venv/bin/python"))
MODEL_DIR = converted_dir("smollm2")
BLOCK = 32

DOC_A = ("The lighthouse on Gull Point was built in 1871 from granite quarried on the island. Its lamp "
         "burned whale oil until 1902, then kerosene, and was electrified in 1938. The last keeper, "
         "Margaret Doyle, left in 1967 when the light was automated. ") * 2
DOC_B = ("The island ferry leaves the harbour at seven every morning and returns at six in the evening. "
         "In winter it runs only on weekdays, and storms cancel about one crossing in ten. ") * 2
SCHEMA = f"""<schema name="island">
  <system>You answer questions about Gull Island using only the documents below.
    <module name="lighthouse">{DOC_A}</module>
    <module name="ferry">{DOC_B}</module>
  </system>
  <user><module name="question"><parameter name="q" length="40"/></module></user>
</schema>"""
PROMPT = ('<prompt schema="island"><lighthouse/><ferry/>'
          '<question q="When was the light automated?"/></prompt>')
SCHEMA2 = SCHEMA.replace('name="island"', 'name="harbour"').replace("lighthouse", "harbourmaster")
PROMPT2 = PROMPT.replace("island", "harbour").replace("lighthouse", "harbourmaster")
LIB_DOCS = {
    "apples": "Apple orchards cover the valley floor; the harvest starts in September and the cider press "
              "runs until the first frost. Most trees are Bramleys planted after the flood of 1953. ",
    "boats": "The harbour keeps forty moorings. Fishing boats land crab and lobster on Tuesdays, and the "
             "lifeboat station, opened in 1889, launches about thirty times a year. ",
    "castle": "The castle on the ridge was begun in 1270, besieged twice in the civil war, and slighted in "
              "1648; its keep still stands to the second floor and the chapel has been restored. ",
    "mill": "The tide mill on the creek ground flour for two hundred years. Its wheel turns on the ebb, "
            "and the museum inside shows the millstones and the miller's ledgers from 1790 onwards. ",
}
LIB_SCHEMA = ('<schema name="lib"><system>Answer from the documents below only.'
              + "".join(f'<module name="{k}">{v * 2}</module>' for k, v in LIB_DOCS.items())
              + '</system><user><module name="question"><parameter name="q" length="40"/></module></user></schema>')
# Non-prefix selections (issue 16, test 3): subsets, and neighbours never seen side by side.
LIB_PROMPTS = [('<prompt schema="lib"><apples/><boats/><castle/><mill/><question q="When was the castle begun?"/>'
                '</prompt>'),
               '<prompt schema="lib"><mill/><apples/><question q="What does the mill grind?"/></prompt>',
               '<prompt schema="lib"><castle/><boats/><question q="When did the lifeboat station open?"/></prompt>',
               '<prompt schema="lib"><mill/><question q="When does the wheel turn?"/></prompt>']
LIB_KL_BOUND = 1.0  # nats; promptcache's own independent policy averages 0.24 on LongBench (README)
UNION_SCHEMA = """<schema name="u">
  <system>Pick one.
    <module name="pick"><union scaffold="short">
      <module name="short">A short member.</module>
      <module name="long">A much longer member with many more words in it than the short one.</module>
    </union></module>
    <module name="after">Text after the union.</module>
  </system>
  <user>Go.</user>
</schema>"""


@pytest.fixture(scope="module")
def tokenizer():
    from promptcache import load_tokenizer

    return load_tokenizer("smollm2")


def _keys(tokenizer) -> KeyContext:
    """A key context without a model (the fingerprint is a placeholder): enough for layout tests."""
    return KeyContext(ChatRenderer(tokenizer), "0" * 64, "float32")


def test_issue16_render_default_path_supplies_every_module(tokenizer):
    """Default path, no unions: the supplied run is the system text and both modules, up to the
    parameter slot (computed); the token ids are the prompt in position order."""
    ids, params = render(PROMPT, SCHEMA, keys=_keys(tokenizer))
    spans = params["promptcache"]["spans"]
    assert [s["module"] for s in spans if s["module"]] == ["lighthouse", "ferry"]
    n = supplied_tokens(params)
    assert n == sum(s["length"] for s in spans) and 200 < n < len(ids)
    assert [s["start"] for s in spans] == [sum(s["length"] for s in spans[:k]) for k in range(len(spans))]
    assert tokenizer.decode(ids).count("Gull Point") == 2 and "automated?" in tokenizer.decode(ids[n:])


def test_issue16_render_stops_at_union_gap_and_foreign_context(tokenizer):
    """The scaffold (short) member leaves a position gap before ``after``: the run ends there.
    The long member closes the gap, but ``after`` was encoded after the scaffold member: the run
    ends there too (its KV saw tokens the prompt lacks)."""
    k = _keys(tokenizer)
    for member in ("short", "long"):
        _, params = render(f'<prompt schema="u"><pick><{member}/></pick><after/></prompt>', UNION_SCHEMA, keys=k)
        assert [s["module"] for s in params["promptcache"]["spans"]] == ["", f"pick/{member}"], member


def test_issue16_render_store_marks_missing_entries(tokenizer, tmp_path):
    """With a store, spans the store lacks are marked (the connector saves them) and supply nothing."""
    from promptcache.store import open_store

    _, params = render(PROMPT, SCHEMA, keys=_keys(tokenizer), store=open_store(str(tmp_path / "s")))
    spans = params["promptcache"]["spans"]
    assert spans and all(s["stored"] is False for s in spans)
    assert supplied_tokens(params) == 0


def test_issue16_import_promptcache_never_imports_vllm():
    """vLLM stays optional: importing promptcache (and its engine) loads no vllm module."""
    code = ("import sys, promptcache, promptcache.engine, promptcache.integrations; "
            "print(any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules))")
    py = str(VLLM_PY) if VLLM_PY.exists() else sys.executable
    out = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------- real vLLM

@pytest.fixture(scope="module")
def vllm_setup(tmp_path_factory):
    """Store filled by ``promptcache encode`` (another process), request rendered here, one vLLM."""
    if not VLLM_PY.exists():
        pytest.skip(f"no vLLM venv at {VLLM_PY} (build it as in docs/vllm.md, or set PROMPTCACHE_VLLM_PYTHON)")
    if not (MODEL_DIR / "config.json").exists():
        pytest.skip(f"no converted model folder at {MODEL_DIR} (run promptcache once to convert it)")
    from promptcache import load_model

    tmp = tmp_path_factory.mktemp("vllm")
    log, schema_file = tmp / "connector.log", tmp / "island.xml"
    redis = _redis_for_vllm(tmp)
    store = redis.url if redis is not None else tmp / "store"  # Redis: issue 16, test 4
    schema_file.write_text(SCHEMA)
    _encode(schema_file, store)
    (tmp / "lib.xml").write_text(LIB_SCHEMA)
    _encode(tmp / "lib.xml", store, "independent")
    model, tok = load_model("smollm2", device="cpu")
    keys = KeyContext.from_model(model, tok)
    lib_keys = KeyContext.from_model(model, tok, "independent")
    ids, params = render(PROMPT, SCHEMA, keys=keys, store=str(store))
    ids2, params2 = render(PROMPT2, SCHEMA2, keys=keys, store=str(store))  # not encoded: vLLM saves it
    del model
    driver = DriverProcess(VLLM_PY, MODEL_DIR, store, log, block_size=BLOCK, extra=["--max-logprobs", "-1"])
    try:
        assert driver.read(300).get("ready")
        yield {"ids": ids, "params": params, "ids2": ids2, "params2": params2, "driver": driver, "log": log,
               "lib_keys": lib_keys, "keys": keys, "redis": redis is not None,
               "store": store, "tmp": tmp, "fingerprint": keys.model}
    finally:
        driver.close()
        if redis is not None:
            redis.stop()


def _redis_for_vllm(tmp: Path) -> "RedisServer | None":
    """A loopback redis-server for the module's store when redis-server is installed and the vLLM
    venv has redis-py (its recipe installs it); else ``None`` (a directory store, test 4 skipped)."""
    if REDIS_BIN is None:
        return None
    probe = subprocess.run([str(VLLM_PY), "-c", "import redis"], capture_output=True, timeout=120)
    if probe.returncode != 0:
        return None
    return RedisServer(tmp / "redis").start()


@pytest.fixture(scope="module")
def checked_engine(vllm_setup):
    """A second vLLM process on the same store, with ``model_fingerprint`` set (keys checked)."""
    s = vllm_setup
    log = s["tmp"] / "checked.log"
    drv = DriverProcess(VLLM_PY, MODEL_DIR, s["store"], log, block_size=BLOCK,
                        extra=["--model-fingerprint", s["fingerprint"]])
    try:
        assert drv.read(300).get("ready")
        yield drv, log
    finally:
        drv.close()


def _encode(schema_file: Path, store: Path | str, encoding: str = "scaffold") -> None:
    """``promptcache encode`` in its own process (the store another process filled)."""
    enc = subprocess.run([sys.executable, "-m", "promptcache", "encode", str(schema_file), "--store", str(store),
                          "--model", "smollm2", "--device", "cpu", "--threads", "1", "--json",
                          "--encoding", encoding],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert enc.returncode == 0, enc.stderr[-2000:]


def _log(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_issue16_item1_default_path_identical_greedy_text(vllm_setup):
    """Default-path PML prompt: the connector supplies every stored module's tokens (whole blocks,
    never the last token), vLLM counts exactly those as cached, and greedy text is identical."""
    s = vllm_setup
    ids, params, drv = s["ids"], s["params"], s["driver"]
    supplied = supplied_tokens(params)
    assert supplied > 2 * BLOCK, params  # keys agree with `promptcache encode`: the store has them
    expect = min(supplied, len(ids) - 1) // BLOCK * BLOCK
    before = len(_log(s["log"]))
    with_pc = drv.ask(ids, params)
    plain = drv.ask(ids, None)
    loaded = [r for r in _log(s["log"])[before:] if r["event"] == "loaded"]
    assert [r["tokens"] for r in loaded] == [expect]
    assert with_pc["num_cached_tokens"] == expect and plain["num_cached_tokens"] == 0
    assert with_pc["token_ids"] == plain["token_ids"], (with_pc["text"], plain["text"])
    print(f"\nsupplied {expect}/{len(ids)} tokens; text {with_pc['text']!r}; "
          f"wall {with_pc['wall_ms']:.0f} ms with the connector, {plain['wall_ms']:.0f} ms without")


def test_issue16_item1_loaded_kv_is_what_vllm_attends_to(vllm_setup):
    """Control: the same spans pointing at an entry whose values are scaled change the answer, so
    the identical text above comes from the loaded KV, not from vLLM recomputing the tokens."""
    from promptcache.store import CacheEntry, open_store
    from promptcache.runtime.kv import ModuleKV

    s = vllm_setup
    store = open_store(str(s["store"]), create=False)
    params = json.loads(json.dumps(s["params"]))
    span = params["promptcache"]["spans"][1]  # the lighthouse module
    entry = store.get(span["key"])
    poisoned = CacheEntry(ModuleKV(entry.kv.keys, [v * -3.0 for v in entry.kv.values]), dict(entry.meta))
    key = "poisoned-" + span["key"][:32]
    assert store.put(key, poisoned)
    span["key"] = key
    before = len(_log(s["log"]))
    good = s["driver"].ask(s["ids"], s["params"])
    # Issue 16 item 3 (TTFT): entries loaded by the test above come from the host LRU, not the store.
    loaded = [r for r in _log(s["log"])[before:] if r["event"] == "loaded"]
    assert [r["host_hits"] for r in loaded] == [len(s["params"]["promptcache"]["spans"])]
    bad = s["driver"].ask(s["ids"], params)
    assert bad["num_cached_tokens"] == good["num_cached_tokens"] > 0
    assert bad["token_ids"] != good["token_ids"]


def test_issue16_item1_mismatched_tokens_supply_nothing(vllm_setup):
    """Params rendered for another prompt: the span's token digest fails, nothing is loaded."""
    s = vllm_setup
    ids = list(s["ids"])
    ids[5] = (ids[5] + 1) % 1000 + 1
    out = s["driver"].ask(ids, s["params"], max_tokens=2)
    assert out["num_cached_tokens"] == 0


def test_issue16_item2_save_side_fills_the_store_with_promptcache_keys(vllm_setup):
    """A prompt whose modules the store lacks: vLLM computes them and the connector saves them
    under promptcache's content keys (the same keys, and the same values to float rounding, as
    ``promptcache encode`` writes); the next request loads them, with identical greedy text."""
    from promptcache.store import open_store

    s = vllm_setup
    ids, params, drv = s["ids2"], s["params2"], s["driver"]
    spans = params["promptcache"]["spans"]
    missing = [sp for sp in spans if not sp["stored"]]
    # The leading system text is the same content in both schemas: one shared entry, stored.
    assert spans[0]["stored"] and {"harbourmaster", "ferry"} <= {sp["module"] for sp in missing}
    assert supplied_tokens(params) < BLOCK
    before = len(_log(s["log"]))
    first = drv.ask(ids, params)
    saved = [r for r in _log(s["log"])[before:] if r["event"] == "saved"]
    assert first["num_cached_tokens"] == 0
    assert sorted(r["key"] for r in saved) == sorted(sp["key"] for sp in missing) and all(r["ok"] for r in saved)
    second = drv.ask(ids, params)
    total = sum(sp["length"] for sp in spans)
    assert second["num_cached_tokens"] == min(total, len(ids) - 1) // BLOCK * BLOCK > 0
    assert second["token_ids"] == first["token_ids"]
    # The same keys and values as promptcache's own encoding of the schema.
    ref_dir = s["tmp"] / "ref-store"
    schema_file = s["tmp"] / "harbour.xml"
    schema_file.write_text(SCHEMA2)
    _encode(schema_file, ref_dir)
    ours, ref = open_store(str(s["store"]), create=False), open_store(str(ref_dir), create=False)
    worst = 0.0
    for sp in spans:
        a, b = ours.get(sp["key"]), ref.get(sp["key"])
        assert a is not None and b is not None, sp["module"]
        assert {k: a.meta[k] for k in ("model", "dtype", "policy", "positions", "offset")} == \
            {k: b.meta[k] for k in ("model", "dtype", "policy", "positions", "offset")}
        for x, y in zip(a.kv.keys + a.kv.values, b.kv.keys + b.kv.values):
            assert x.shape == y.shape
            worst = max(worst, float((x - y).abs().max() / y.abs().max()))
    print(f"\nsaved {len(saved)} entries; worst relative difference to promptcache's: {worst:.2e}")
    assert worst < 1e-2


def test_issue16_item1_entry_stored_at_another_offset_is_rerotated(vllm_setup):
    """An entry whose meta says it was encoded ``d`` positions later (keys rotated by ``d``, as a
    relative key allows) is rotated back on load: the same greedy text as vLLM's own prefill. A
    connector that ignored the offset would attend to keys rotated by ``d``: another answer."""
    from promptcache.modules.relocate import rotate_keys, rotation
    from promptcache.runtime.kv import ModuleKV
    from promptcache.store import CacheEntry, open_store

    s = vllm_setup
    store = open_store(str(s["store"]), create=False)
    params = json.loads(json.dumps(s["params"]))
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    theta, dim = cfg["rope_parameters"]["rope_theta"], cfg["head_dim"]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    d = 1000
    for span in params["promptcache"]["spans"][:2]:
        entry = store.get(span["key"])
        cos, sin = rotation(inv_freq, d, torch.device("cpu"))
        moved = ModuleKV([rotate_keys(k, cos, sin) for k in entry.kv.keys], entry.kv.values)
        key = "shifted-" + span["key"][:32]
        assert store.put(key, CacheEntry(moved, {**entry.meta, "offset": span["base"] + d}))
        span["key"] = key
    plain = s["driver"].ask(s["ids"], None)
    moved_back = s["driver"].ask(s["ids"], params)
    assert moved_back["num_cached_tokens"] > 0
    assert moved_back["token_ids"] == plain["token_ids"], (moved_back["text"], plain["text"])


def test_issue16_params_naming_another_model_fail_the_load_without_quarantine(vllm_setup):
    """Params are client input: params claiming another model make the load fail (reported to
    vLLM, which recomputes: the same answer), and the store entry stays (no quarantine)."""
    from promptcache.store import open_store

    s = vllm_setup
    params = json.loads(json.dumps(s["params"]))
    params["promptcache"]["model"] = "f" * 64
    before = len(_log(s["log"]))
    out = s["driver"].ask(s["ids"], params)
    plain = s["driver"].ask(s["ids"], None)
    assert [r["event"] for r in _log(s["log"])[before:]].count("load_failed") == 1
    assert out["token_ids"] == plain["token_ids"]
    store = open_store(str(s["store"]), create=False)
    assert all(store.contains(sp["key"]) for sp in s["params"]["promptcache"]["spans"])


def test_issue16_prefix_keys_recomputed_from_tokens_equal_render(tokenizer):
    """The keys a connector recomputes from the request's tokens equal render's (promptcache's)
    keys, and a key for other tokens or another model does not match."""
    from promptcache.integrations.vllm_render import prefix_span_keys

    k = _keys(tokenizer)
    ids, params = render(PROMPT, SCHEMA, keys=k)
    spans = params["promptcache"]["spans"]
    bounds = [(sp["start"], sp["start"] + sp["length"]) for sp in spans]
    assert prefix_span_keys(ids, bounds, model=k.model, dtype=k.dtype) == [sp["key"] for sp in spans]
    other = list(ids)
    other[20] += 1
    assert prefix_span_keys(other, bounds, model=k.model, dtype=k.dtype)[1] != spans[1]["key"]
    assert prefix_span_keys(ids, bounds, model="1" * 64, dtype=k.dtype)[0] != spans[0]["key"]


def test_issue16_connector_with_fingerprint_rejects_keys_that_are_not_the_tokens(vllm_setup, checked_engine):
    """A connector given the model's fingerprint recomputes each span's key from the request's
    tokens: render's params are supplied as before; a span renamed to another (stored) key is
    not, so a client cannot make vLLM load, or save under, a key of its choosing. (A second
    engine: about a minute more.)"""
    from promptcache.store import open_store

    s = vllm_setup
    store = open_store(str(s["store"]), create=False)
    params = json.loads(json.dumps(s["params"]))
    span = params["promptcache"]["spans"][0]
    renamed = "renamed-" + span["key"][:32]
    assert store.put(renamed, store.get(span["key"]))
    span["key"] = renamed
    drv, _ = checked_engine
    good = drv.ask(s["ids"], s["params"], max_tokens=4)
    bad = drv.ask(s["ids"], params, max_tokens=4)
    assert good["num_cached_tokens"] == min(supplied_tokens(s["params"]), len(s["ids"]) - 1) // BLOCK * BLOCK > 0
    assert bad["num_cached_tokens"] == 0


def test_issue16_item4_two_vllm_processes_share_one_redis_store(vllm_setup, checked_engine):
    """Issue 16, test 4: two vLLM processes (both running) on one Redis store over loopback. A
    schema no one has encoded: the first process computes its modules and saves them to Redis; the
    second loads them (external hits = the block-aligned supplied run, nothing saved by it) and
    gives the first's greedy text."""
    s = vllm_setup
    if not s["redis"]:
        pytest.skip("no redis-server, or no redis-py in the vLLM venv: the module's store is a directory")
    schema3 = SCHEMA.replace('name="island"', 'name="pier"').replace("lighthouse", "piermaster")
    prompt3 = PROMPT.replace("island", "pier").replace("lighthouse", "piermaster")
    ids, params = render(prompt3, schema3, keys=s["keys"], store=s["store"])
    missing = [sp["key"] for sp in params["promptcache"]["spans"] if not sp["stored"]]
    assert missing and supplied_tokens(params) < BLOCK
    drv2, log2 = checked_engine
    before1, before2 = len(_log(s["log"])), len(_log(log2))
    first = s["driver"].ask(ids, params)
    assert first["num_cached_tokens"] == 0
    saved = [r["key"] for r in _log(s["log"])[before1:] if r["event"] == "saved" and r["ok"]]
    assert sorted(saved) == sorted(missing)
    _, params = render(prompt3, schema3, keys=s["keys"], store=s["store"])  # now all stored
    second = drv2.ask(ids, params)
    expect = min(supplied_tokens(params), len(ids) - 1) // BLOCK * BLOCK
    assert expect > 2 * BLOCK and second["num_cached_tokens"] == expect
    events = [r["event"] for r in _log(log2)[before2:]]
    assert events.count("loaded") == 1 and "saved" not in events
    assert second["token_ids"] == first["token_ids"], (second["text"], first["text"])


def test_issue16_item3_non_prefix_selection_supplies_every_cached_module(vllm_setup):
    """Issue 16, test 3: modules encoded independently, selected in subsets whose neighbours no
    earlier request had (gaps of skipped modules closed in vLLM's sequence): the supplied run covers
    every cached module up to the question (vLLM counts exactly the block-aligned run as cached),
    entries are re-rotated to vLLM's positions, and the first-token KL to vLLM's own prefill is
    finite and below ``LIB_KL_BOUND``. Control: the same params claiming no shift (entries at their
    layout positions) give a larger KL on a prompt with a gap, so the rotation is what brings the
    answer close. KL and identical answers are printed (the benchmark reports them too)."""
    import math

    s = vllm_setup
    drv, kls, same = s["driver"], [], 0
    for k, pml in enumerate(LIB_PROMPTS):
        ids, params = render(pml, LIB_SCHEMA, keys=s["lib_keys"], store=str(s["store"]), approximate=True)
        spans = params["promptcache"]["spans"]
        picked = {m.split("/")[0] for m in (sp["module"] for sp in spans) if m}
        assert picked == {t for t in LIB_DOCS if f"<{t}/>" in pml}, (pml, picked)
        assert all(sp["stored"] for sp in spans) and supplied_tokens(params) == sum(sp["length"] for sp in spans)
        before = len(_log(s["log"]))
        got = drv.ask(ids, params, logprobs=True)
        ref = drv.ask(ids, None, logprobs=True)
        expect = min(supplied_tokens(params), len(ids) - 1) // BLOCK * BLOCK
        assert got["num_cached_tokens"] == expect > 0, (pml, got["num_cached_tokens"], expect)
        assert [r["tokens"] for r in _log(s["log"])[before:] if r["event"] == "loaded"] == [expect]
        assert not [r for r in _log(s["log"])[before:] if r["event"] == "saved"]  # approximate: never saved
        kl = first_token_kl(ref["first_logprobs"], got["first_logprobs"])
        assert math.isfinite(kl) and 0 <= kl < LIB_KL_BOUND, (pml, kl)
        kls.append(kl)
        same += got["token_ids"] == ref["token_ids"]
        if k == 1:  # <mill/><apples/>: the mill entry sits after a two-module gap in the layout
            unshifted = json.loads(json.dumps(params))
            for sp in unshifted["promptcache"]["spans"]:
                sp["position"] = sp["start"]
            bad = drv.ask(ids, unshifted, logprobs=True)
            assert first_token_kl(ref["first_logprobs"], bad["first_logprobs"]) > kl
    print(f"\nnon-prefix selections: first-token KL {[round(x, 4) for x in kls]}, "
          f"identical answers {same}/{len(LIB_PROMPTS)}")


def test_issue16_item3_render_approximate_covers_every_selected_module(tokenizer):
    """``approximate=True``: spans run contiguously in vLLM's sequence over every cached segment up
    to the question, each with its layout ``position`` (the connector re-rotates by ``start -
    position``); only the leading spans vLLM reproduces are ``exact`` (savable). The default
    (exact) render of the same prompt stops at the first gap."""
    k = KeyContext(ChatRenderer(tokenizer), "0" * 64, "float32", "independent")
    pml = LIB_PROMPTS[1]  # mill and apples: boats and castle skipped
    ids, params = render(pml, LIB_SCHEMA, keys=k, approximate=True)
    spans = params["promptcache"]["spans"]
    assert {sp["module"] for sp in spans if sp["module"]} == {"apples", "mill"}
    assert [sp["start"] for sp in spans] == [sum(x["length"] for x in spans[:j]) for j in range(len(spans))]
    mill = next(sp for sp in spans if sp["module"] == "mill")
    assert mill["position"] > mill["start"] and not mill["exact"] and spans[0]["exact"]
    assert "mill grind?" in tokenizer.decode(ids[supplied_tokens(params):])
    _, exact = render(pml, LIB_SCHEMA, keys=k)
    assert supplied_tokens(exact) < supplied_tokens(params)
    assert all(sp["exact"] and sp["position"] == sp["start"] for sp in exact["promptcache"]["spans"])


def test_issue16_item3_host_cache_is_bounded_by_bytes_and_evicts_lru():
    """The connector's host LRU keeps at most ``limit`` bytes, evicts the least recently used
    entry first, and does not keep an entry larger than the limit (it is still used once)."""
    from promptcache.integrations.vllm_cache import HostEntryCache, Prepared, parse_limit

    def item(n: int) -> Prepared:
        return Prepared({}, [], [], n)

    c = HostEntryCache(100)
    assert c.put("a", item(40)) and c.put("b", item(40))
    assert c.get("a") is not None  # a is now the most recent
    assert c.put("c", item(40))    # evicts b, not a
    assert c.get("b") is None and c.get("a") is not None and c.get("c") is not None
    assert c.used == 80 and len(c) == 2
    assert not c.put("huge", item(101)) and c.get("huge") is None and c.used == 80
    assert not HostEntryCache(0).put("a", item(1))
    assert parse_limit("2048") == 2048
    with pytest.raises(ValueError, match="host_cache_bytes"):
        parse_limit(-1)
