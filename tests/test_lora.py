"""Issue 19: LoRA adapters per request, with module and prefix caches that stay correct per adapter.

Adapters are PEFT LoRA adapters made here (seeded, ``init_lora_weights=False`` so B is non-zero
and K/V change), on the q/k/v/o projections of tiny random Llama and Qwen2 models, and one small
adapter on the default model (SmolLM2-135M-Instruct). Every test skips without ``peft``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

from engine_fixtures import DEFAULT_PATH_PROMPT, DEFAULT_PATH_SCHEMA, FULL_PROMPTS, FULL_SCHEMA  # noqa: E402
from promptcache import PromptCache  # noqa: E402
from promptcache.lora import AdapterError, UnknownAdapterError  # noqa: E402
from promptcache.runtime.batch import DecodeBatch  # noqa: E402
from promptcache.store import model_fingerprint  # noqa: E402
from single_thread import one_torch_thread  # noqa: E402,F401
from tiny_models import tiny_model  # noqa: E402
from tiny_tokenizer import tiny_tokenizer  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
TOL = 2e-4      # cached vs oracle / baseline, float32 tiny models
APART = 1e-2    # logits of different adapters must differ by more than this
TEXT = "The quick brown fox jumps over the lazy dog, then naps."


def make_adapter(model, folder: Path, seed: int, r: int = 4) -> Path:
    """Save a seeded random LoRA adapter (B non-zero) for ``model``'s architecture in ``folder``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def family_adapters(request, tmp_path_factory):
    """``(family, {"a": folder, "b": folder})``: two different adapters for a tiny family."""
    family = request.param
    root = tmp_path_factory.mktemp(f"lora-{family}")
    return family, {name: make_adapter(tiny_model(family), root / name, seed)
                    for name, seed in (("a", 1), ("b", 2))}


def new_cache(family: str, adapters: dict, **kw) -> PromptCache:
    return PromptCache(tiny_model(family), tiny_tokenizer(), progress=False, adapters=adapters, **kw)


def test_issue19_item2_fingerprint_is_weights_and_config_not_name_or_folder(family_adapters, tmp_path):
    family, folders = family_adapters
    model = tiny_model(family)
    before = model_fingerprint(model)
    pc = PromptCache(model, tiny_tokenizer(), progress=False)
    pc.load_adapter("a", folders["a"])
    pc.load_adapter("b", folders["b"])
    copy = Path(shutil.copytree(folders["a"], tmp_path / "elsewhere"))
    pc.load_adapter("a-again", copy)
    lora = pc.runner.lora
    # the base keys do not move when adapters are injected (the state dict is renamed by PEFT)
    assert lora.fingerprint(None) == before
    assert lora.info("a").model_key == lora.info("a-again").model_key  # same adapter, other name/folder
    assert len({lora.fingerprint(None), lora.info("a").model_key, lora.info("b").model_key}) == 3
    assert pc.adapters() == ["a", "a-again", "b"]


def test_issue19_item1_oracle_holds_per_adapter(family_adapters):
    family, folders = family_adapters
    pc = new_cache(family, folders)
    pc.add_schema(FULL_SCHEMA)
    for adapter in (None, "a", "b"):
        for name, prompt in FULL_PROMPTS.items():
            cached = pc.next_token_logits(prompt, adapter=adapter)
            oracle = pc.oracle_logits(prompt, adapter=adapter)
            diff = float((cached - oracle).abs().max())
            assert diff < TOL, f"{family} adapter={adapter} prompt={name}: cached vs oracle {diff:.2e}"


def test_issue19_item3_three_adapters_three_logits_each_its_own_baseline(family_adapters):
    family, folders = family_adapters
    pc = new_cache(family, folders)
    pc.add_schema(DEFAULT_PATH_SCHEMA)
    firsts = {}
    for adapter in (None, "a", "b"):  # scaffold default path: cached == no-cache baseline
        cached = pc.next_token_logits(DEFAULT_PATH_PROMPT, adapter=adapter)
        baseline = pc.next_token_logits(DEFAULT_PATH_PROMPT, use_cache=False, adapter=adapter)
        assert float((cached - baseline).abs().max()) < TOL, f"{family} adapter={adapter}"
        firsts[adapter] = cached
    for x, y in ((None, "a"), (None, "b"), ("a", "b")):
        assert float((firsts[x] - firsts[y]).abs().max()) > APART, f"{family}: {x} and {y} give the same logits"


def test_issue19_item4_module_encoded_under_a_never_served_under_b(family_adapters, tmp_path):
    family, folders = family_adapters
    store = f"memory://lora-{family}-{tmp_path.name}"
    pc = new_cache(family, folders, store=store)
    pc.add_schema(DEFAULT_PATH_SCHEMA)  # base modules: encoded, stored
    encoded_base = pc.store_report()["store_misses"]
    pc.next_token_logits(DEFAULT_PATH_PROMPT, adapter="a")
    after_a = pc.store_report()
    needed = after_a["store_misses"] - encoded_base  # the prompt's modules, encoded under a
    assert after_a["store_hits"] == 0 and 0 < needed <= encoded_base
    b_logits = pc.next_token_logits(DEFAULT_PATH_PROMPT, adapter="b")
    after_b = pc.store_report()
    assert after_b == {"store_hits": 0, "store_misses": encoded_base + 2 * needed}  # not a's, not base's
    again = pc.next_token_logits(DEFAULT_PATH_PROMPT, adapter="a")  # a's own, from the tiers
    assert pc.store_report() == after_b
    # prefix tree: a text prompt cached under a is not reused under b or the base model
    assert pc.generate(TEXT, max_new_tokens=2, adapter="a").cached_tokens == 0
    assert pc.generate(TEXT, max_new_tokens=2, adapter="a").cached_tokens > 0
    assert pc.generate(TEXT, max_new_tokens=2, adapter="b").cached_tokens == 0
    assert pc.generate(TEXT, max_new_tokens=2).cached_tokens == 0
    # another process, the same store, adapter a from another folder under another name: a's entries
    copy = Path(shutil.copytree(folders["a"], tmp_path / "a-copy"))
    pc2 = new_cache(family, {"renamed": copy, "b": folders["b"]}, store=store)
    pc2.add_schema(DEFAULT_PATH_SCHEMA)
    logits = pc2.next_token_logits(DEFAULT_PATH_PROMPT, adapter="renamed")
    assert pc2.store_report() == {"store_hits": encoded_base + needed, "store_misses": 0}
    assert float((logits - again).abs().max()) < TOL
    assert float((logits - b_logits).abs().max()) > APART


def test_issue19_item2_unloading_frees_its_cached_bytes(family_adapters):
    family, folders = family_adapters
    pc = new_cache(family, folders, store="memory://")
    pc.add_schema(DEFAULT_PATH_SCHEMA)
    for adapter in (None, "a", "b"):
        pc.next_token_logits(DEFAULT_PATH_PROMPT, adapter=adapter)
        pc.generate(TEXT, max_new_tokens=3, adapter=adapter)
    report = pc.memory_report()
    by = report["by_adapter"]
    assert all(by[n]["module_bytes"] > 0 and by[n]["prefix_bytes"] > 0 for n in ("base", "a", "b"))
    assert sum(v["module_bytes"] for v in by.values()) == report["total_bytes"]
    prefix_before = pc.prefix.bytes_by_tree()
    info = pc.unload_adapter("a")
    after = pc.memory_report()
    assert "a" not in after["by_adapter"] and pc.adapters() == ["b"]
    assert after["total_bytes"] == report["total_bytes"] - by["a"]["module_bytes"]
    assert after["by_adapter"]["b"] == by["b"] and after["by_adapter"]["base"] == by["base"]
    assert info.model_key not in pc.prefix.bytes_by_tree() and info.model_key in prefix_before
    with pytest.raises(UnknownAdapterError, match="no LoRA adapter named 'a'"):
        pc.generate(TEXT, max_new_tokens=1, adapter="a")
    # loaded again (the store kept its entries): modules come back from the store
    pc.load_adapter("a", folders["a"])
    hits = pc.store_report()["store_hits"]
    pc.next_token_logits(DEFAULT_PATH_PROMPT, adapter="a")
    assert pc.store_report()["store_hits"] > hits


@pytest.mark.parametrize("mix", [True, False], ids=["mixed-forward", "grouped"])
def test_issue19_item1_batched_decode_of_rows_under_different_adapters_equals_alone(family_adapters, mix,
                                                                                  monkeypatch):
    """Rows of base, a and b in one decode batch: PEFT's mixed forward, or (adapters that cannot
    mix, e.g. DoRA) one forward per adapter group; each row's logits equal the row decoded alone."""
    family, folders = family_adapters
    pc = new_cache(family, folders)
    monkeypatch.setattr(pc.runner.lora, "mixable", lambda: mix)
    pc.add_schema(DEFAULT_PATH_SCHEMA)
    prompts = [(DEFAULT_PATH_PROMPT, None), (DEFAULT_PATH_PROMPT, "a"), (TEXT, "b"), (TEXT, "a"), (TEXT, None)]
    with torch.inference_mode():
        alone = []
        for prompt, adapter in prompts:  # reference: each decoded alone, two steps
            req = pc.begin(prompt, adapter=adapter, insert_prefix=False)
            token = int(req.logits.argmax())
            steps = []
            for k in range(2):
                steps.append(pc.runner.forward(req.cache, [token], torch.tensor([req.next_pos + k])))
                token = int(steps[-1].argmax())
            alone.append(steps)
            req.abort()
        batch = DecodeBatch(pc.runner, max_rows=8)
        reqs = [pc.begin(p, adapter=a, insert_prefix=False) for p, a in prompts]
        rows = [batch.add(r.cache) for r in reqs]
        tokens = [int(r.logits.argmax()) for r in reqs]
        for k in range(2):
            out = batch.step([(row, tok, r.next_pos + k) for row, tok, r in zip(rows, tokens, reqs)])
            for i, logits in enumerate(out):
                diff = float((logits - alone[i][k].float()).abs().max())
                assert diff < TOL, f"row {i} ({prompts[i][1]}) step {k}: {diff:.2e}"
            tokens = [int(x.argmax()) for x in out]
        assert len(batch) == 5 and len(batch._groups) == (1 if mix else 3)
        for row in rows:
            batch.remove(row)
        for r in reqs:
            r.abort()
    assert len(batch) == 0 and list(batch._groups) == [None]  # every row in the one mixed batch


def test_issue19_item1_mixed_adapter_rows_share_one_forward(family_adapters):
    """PEFT's mixed-batch LoRA: rows of base, a and b decode in ONE forward per step."""
    family, folders = family_adapters
    pc = new_cache(family, folders)
    calls = []
    pc.runner.forward_hooks.append(calls.append)
    with torch.inference_mode():
        batch = DecodeBatch(pc.runner, max_rows=4)
        reqs = [pc.begin(TEXT, adapter=a, insert_prefix=False) for a in (None, "a", "b")]
        rows = [batch.add(r.cache) for r in reqs]
        calls.clear()
        out = batch.step([(row, int(r.logits.argmax()), r.next_pos) for row, r in zip(rows, reqs)])
        assert batch.batched and len(calls) == 1 and len(out) == 3
        assert float((out[1] - out[0]).abs().max()) > APART and float((out[2] - out[1]).abs().max()) > APART
        for r in reqs:
            r.abort()


def test_issue19_item1_errors_name_the_cause(family_adapters, tmp_path):
    family, folders = family_adapters
    pc = new_cache(family, {"a": folders["a"]})
    with pytest.raises(AdapterError, match="not allowed"):
        pc.load_adapter("base", folders["b"])
    with pytest.raises(AdapterError, match="already loaded"):
        pc.load_adapter("a", folders["b"])
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        pc.load_adapter("c", tmp_path)
    with pytest.raises(AdapterError, match="outside the allowed adapter root"):
        pc.load_adapter("c", folders["b"], allowed_root=tmp_path)
    req = pc.begin(TEXT, adapter="a")
    with pytest.raises(AdapterError, match="in use"):
        pc.unload_adapter("a")
    req.abort()
    pc.unload_adapter("a")
    assert pc.adapters() == []


def test_issue19_item1_default_model_cached_equals_baseline_per_adapter(tmp_path):
    """SmolLM2-135M-Instruct with a small seeded adapter: cached and baseline greedy texts agree."""
    from promptcache import load_model

    examples = Path(__file__).resolve().parents[1] / "examples"
    model, tokenizer = load_model("smollm2", device="cpu")
    folder = make_adapter(load_model("smollm2", device="cpu")[0], tmp_path / "small", seed=3, r=2)
    pc = PromptCache(model, tokenizer, progress=False, adapters={"small": folder})
    pc.add_schema(examples / "document_qa.xml")
    prompt = (examples / "document_qa.prompt.xml").read_text()
    texts = {}
    for adapter in (None, "small"):
        cached = pc.generate(prompt, max_new_tokens=8, adapter=adapter)
        base = pc.generate(prompt, max_new_tokens=8, use_cache=False, adapter=adapter)
        assert cached.cached_tokens > 100
        assert cached.token_ids == base.token_ids, f"adapter={adapter}: {cached.text!r} vs {base.text!r}"
        texts[adapter] = cached
    assert float((texts[None].first_token_logits - texts["small"].first_token_logits).abs().max()) > APART


def test_issue19_item2_modules_to_save_are_part_of_the_adapter(tmp_path):
    """An adapter that also trains a full copy of the embeddings (``modules_to_save``, which
    changes K/V): its copy is in the fingerprint, the base fingerprint still does not move, the
    cached path equals its baseline, and decode batches group rather than mix it."""
    from peft import LoraConfig, get_peft_model

    def save(folder: Path, embed_scale: float) -> Path:
        torch.manual_seed(5)
        peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"],
                                                                     modules_to_save=["embed_tokens"],
                                                                     init_lora_weights=False))
        with torch.no_grad():
            for name, t in peft_model.named_parameters():
                if "modules_to_save" in name:
                    t.mul_(embed_scale)
        peft_model.save_pretrained(str(folder))
        return folder

    model = tiny_model("llama")
    before = model_fingerprint(model)
    pc = PromptCache(model, tiny_tokenizer(), progress=False,
                     adapters={"m": save(tmp_path / "m", 1.0), "m2": save(tmp_path / "m2", 1.5)})
    lora = pc.runner.lora
    assert lora.fingerprint(None) == before
    assert lora.info("m").model_key != lora.info("m2").model_key  # differ only in the embedding copy
    assert not lora.mixable()
    pc.add_schema(DEFAULT_PATH_SCHEMA)
    cached = pc.next_token_logits(DEFAULT_PATH_PROMPT, adapter="m2")
    baseline = pc.next_token_logits(DEFAULT_PATH_PROMPT, use_cache=False, adapter="m2")
    assert float((cached - baseline).abs().max()) < TOL
    assert float((cached - pc.next_token_logits(DEFAULT_PATH_PROMPT, adapter="m")).abs().max()) > APART
