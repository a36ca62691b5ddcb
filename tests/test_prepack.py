"""Issue 17, prepacked linear weights (promptcache.runtime.prepack): one packed copy of each CPU
bf16 weight (oneDNN's, or the AMX kernel's where the CPU has it: tests/test_amx.py), used by eager
and compiled forwards, never stale, and giving the plain ``F.linear``'s logits within bf16 rounding.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch.profiler import profile

from promptcache.engine import PromptCache
from promptcache.runtime import amx, prepack
from engine_fixtures import DEFAULT_PATH_PROMPT, DEFAULT_PATH_SCHEMA, FULL_PROMPTS, FULL_SCHEMA
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer

pytestmark = pytest.mark.skipif(prepack.supported(torch.device("cpu"), torch.bfloat16) is not None,
                                reason="oneDNN cannot prepack bf16 weights on this CPU")

BF16_TOL = 0.25  # as tests/test_compiled.py: bf16 keeps 8 bits of mantissa


def _pair(family: str) -> tuple[PromptCache, PromptCache]:
    """Two bf16 engines over copies of one seeded model: prepacked and plain."""
    model = tiny_model(family)
    packed = PromptCache(model, tiny_tokenizer(), progress=False, dtype="bf16", prepack=True)
    plain = PromptCache(copy.deepcopy(tiny_model(family)), tiny_tokenizer(), progress=False, dtype="bf16",
                        prepack=False)
    for pc in (packed, plain):
        pc.add_schema(FULL_SCHEMA)
        pc.add_schema(DEFAULT_PATH_SCHEMA)
    return packed, plain


def _ops(fn) -> dict[str, int]:
    """Ops run by ``fn``, by name; ``packed_linear_calls``: calls of the packed kernel, oneDNN's or
    AMX's (runtime/amx.py, which the profiler cannot see: counted by the module)."""
    before = amx.calls
    with profile() as prof:
        fn()
    ops = {e.key: e.count for e in prof.key_averages()}
    return ops | {"amx_calls": amx.calls - before,
                  "packed_linear_calls": ops.get("mkldnn::_linear_pointwise", 0) + amx.calls - before}


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: linears with a bias
def test_issue17_prepack_same_logits_as_plain_linears(family):
    packed, plain = _pair(family)
    assert packed.compile_report()["prepacked"]["linears"] > 0
    assert plain.compile_report()["prepacked"] is None
    worst = 0.0
    for name, prompt in {**FULL_PROMPTS, "dp": DEFAULT_PATH_PROMPT}.items():
        a, b = packed.next_token_logits(prompt), plain.next_token_logits(prompt)
        worst = max(worst, float((a - b).abs().max()))
        assert int(a.argmax()) == int(b.argmax()), name
        oracle = packed.oracle_logits(prompt)
        assert float((a - oracle).abs().max()) <= BF16_TOL, name
    base_a = packed.generate(DEFAULT_PATH_PROMPT, max_new_tokens=4, use_cache=False)
    base_b = plain.generate(DEFAULT_PATH_PROMPT, max_new_tokens=4, use_cache=False)
    assert base_a.token_ids == base_b.token_ids
    assert worst <= BF16_TOL


def test_issue17_prepack_runs_the_packed_kernel_not_aten_linear():
    packed, plain = _pair("llama")
    ops_packed = _ops(lambda: packed.next_token_logits(DEFAULT_PATH_PROMPT))
    ops_plain = _ops(lambda: plain.next_token_logits(DEFAULT_PATH_PROMPT))
    assert ops_plain.get("aten::linear", 0) > 0  # the plain engine does use F.linear (the test can fail)
    assert ops_packed.get("aten::linear", 0) == 0
    report = packed.compile_report()["prepacked"]
    # q/k/v and gate/up run as one call per group: 2 layers x 4 calls + lm_head, not 2 x 7 + 1
    assert report["groups"] == 4 and report["grouped_linears"] == 10 and report["linears"] == 15
    calls = ops_packed["packed_linear_calls"]
    assert calls == report["linears"] - report["grouped_linears"] + report["groups"]
    assert ops_packed["amx_calls"] == (calls if report["kernel"] == "amx" else 0)


def test_issue17_prepack_sees_a_weight_changed_in_place():
    packed, plain = _pair("llama")
    before = packed.generate(DEFAULT_PATH_PROMPT, max_new_tokens=0, use_cache=False).first_token_logits
    with torch.no_grad():
        for pc in (packed, plain):
            pc.model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
            pc.model.model.layers[0].self_attn.k_proj.weight.mul_(-2.0)  # a member of a packed group
            pc.model.lm_head.weight.add_(0.05)
    a = packed.generate(DEFAULT_PATH_PROMPT, max_new_tokens=0, use_cache=False).first_token_logits
    b = plain.generate(DEFAULT_PATH_PROMPT, max_new_tokens=0, use_cache=False).first_token_logits
    assert float((a - b).abs().max()) <= 1e-2
    assert float((a - before).abs().max()) > 0.1  # the change is visible at all


def test_issue17_prepack_is_shared_undone_and_freed():
    model = tiny_model("llama").to(torch.bfloat16)
    first = PromptCache(model, tiny_tokenizer(), progress=False, prepack=True)
    second = PromptCache(model, tiny_tokenizer(), progress=False, prepack=True)
    assert first.prepacked is second.prepacked  # one packed copy per model, not per engine
    linear = model.model.layers[0].self_attn.q_proj
    assert type(linear) is prepack.PackedLinear and linear.weight.data_ptr() in prepack._PACKED
    first.prepacked.remove()
    assert type(linear) is torch.nn.Linear and linear.weight.data_ptr() not in prepack._PACKED
    assert first.prepacked.report() | {"batch_hint": 0, "kernel": ""} == {
        "linears": 0, "groups": 0, "grouped_linears": 0, "bytes": 0, "batch_hint": 0, "kernel": "",
        "amx_weights": 0, "onednn_weights": 0}
    again = prepack.PackedLinears.of(model)
    ptrs = [m.weight.data_ptr() for m in again.modules]
    assert ptrs and all(p in prepack._PACKED for p in ptrs)
    del first, second, again, linear, model
    gc.collect()
    assert not any(p in prepack._PACKED for p in ptrs)  # a freed model leaves no packed copy


def test_issue17_prepack_default_only_on_the_fast_path_and_refused_where_unsupported():
    eager = PromptCache(tiny_model("llama"), tiny_tokenizer(), progress=False, dtype="bf16")
    assert eager.prepacked is None  # eager engines keep their memory unless asked
    with pytest.raises(ValueError, match="prepack=True: .*bf16/fp16 only"):
        PromptCache(tiny_model("llama"), tiny_tokenizer(), progress=False, prepack=True)  # float32
    fp32_fast = PromptCache(tiny_model("llama"), tiny_tokenizer(), progress=False, compile=True)
    assert fp32_fast.prepacked is None


def test_issue17_prepack_leaves_autograd_to_plain_linear():
    model = tiny_model("llama").to(torch.bfloat16)
    prepack.PackedLinears.of(model)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.enable_grad():
        loss = model(input_ids=ids).logits.float().sum()
        loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_issue17_prepack_of_a_deep_copy_packs_the_copy():
    """A deep copy of a packed model (benchmarks copy models per variant) carries the class but
    not the packed copies: packing it again must pack its own weights, not report stale ones."""
    model = tiny_model("llama").to(torch.bfloat16)
    prepack.PackedLinears.of(model)
    twin = copy.deepcopy(model)
    packed = prepack.PackedLinears.of(twin)
    assert packed.modules and all(m.weight.data_ptr() in prepack._PACKED for m in packed.modules)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, twin(input_ids=ids).logits)


def test_issue17_prepack_batched_decode_rows_equal_decoding_alone_and_plain():
    """The server's batched decode (eager, several rows in one forward) reads the packed weights
    too: each row's greedy tokens equal the row decoded alone, and the plain engine's."""
    from promptcache.runtime.batch import BatchedDecodeBatch
    from promptcache.runtime.runner import DecodeSequence

    packed, plain = _pair("llama")
    prompts = [FULL_PROMPTS[k] for k in ("default-ish", "union-gap-param", "turns")]

    def first(pc, prompt):
        state, request = pc.request(prompt)
        logits, cache, next_pos, _ = pc.prefill_cached(state, request)
        return int(logits.argmax()), cache, next_pos

    def alone(pc, prompt, steps=4):
        token, cache, pos = first(pc, prompt)
        tokens = [token]
        for k in range(steps):
            tokens.append(int(pc.runner.decode_step([DecodeSequence(cache, tokens[-1], pos + k)])[0].argmax()))
        return tokens

    with torch.inference_mode():
        batch = BatchedDecodeBatch(packed.runner, max_rows=3)
        rows = []
        for p in prompts:
            token, cache, pos = first(packed, p)
            rows.append([batch.add(cache), [token], pos])
        ops = _ops(lambda: [r[1].append(int(out.argmax())) for r, out in
                            zip(rows, batch.step([(r[0], r[1][-1], r[2]) for r in rows]))])
        for _ in range(3):
            outs = batch.step([(r[0], r[1][-1], r[2] + len(r[1]) - 1) for r in rows])
            for r, out in zip(rows, outs):
                r[1].append(int(out.argmax()))
        assert ops.get("aten::linear", 0) == 0 and ops["packed_linear_calls"] > 0
        for (_, tokens, _), p in zip(rows, prompts):
            assert tokens == alone(packed, p) == alone(plain, p), p


def test_issue17_prepack_under_lora_adapters_equals_plain(tmp_path):
    """An eager prepacked engine with LoRA adapters: PEFT wraps the packed linears, each adapter's
    first-token logits equal the plain engine's under the same adapter and differ from the base."""
    pytest.importorskip("peft")
    from test_lora import make_adapter

    folder = make_adapter(tiny_model("llama"), tmp_path / "a", seed=1)
    engines = [PromptCache(tiny_model("llama"), tiny_tokenizer(), progress=False, dtype="bf16", prepack=packed,
                           adapters={"a": folder}) for packed in (True, False)]
    logits = {}
    for pc in engines:
        pc.add_schema(DEFAULT_PATH_SCHEMA)
        for adapter in (None, "a"):
            logits[pc.prepacked is not None, adapter] = pc.next_token_logits(DEFAULT_PATH_PROMPT, adapter=adapter)
    assert engines[0].compile_report()["prepacked"]["linears"] > 0
    for adapter in (None, "a"):
        a, b = logits[True, adapter], logits[False, adapter]
        assert float((a - b).abs().max()) <= BF16_TOL and int(a.argmax()) == int(b.argmax()), adapter
    assert float((logits[True, "a"] - logits[True, None]).abs().max()) > 1e-2  # the adapter is in force


@pytest.mark.parametrize("name", ["mlp.down_proj", "mlp.up_proj"])  # packed alone, packed in a group
def test_issue17_prepack_repacks_in_place_without_piling_up_copies(name):
    """A weight written in place many times keeps ONE packed copy (the entry is repacked in place,
    not replaced while an old one stays referenced)."""
    model = tiny_model("llama").to(torch.bfloat16)
    prepack.PackedLinears.of(model)
    linear = model.model.layers[0].get_submodule(name)
    entry = prepack._PACKED[linear.weight.data_ptr()]
    ids = torch.tensor([[3, 4, 5, 6]])
    for k in range(3):
        with torch.no_grad():
            linear.weight.add_(0.01)
        with torch.inference_mode():
            model(input_ids=ids)
        assert prepack._PACKED[linear.weight.data_ptr()] is entry
        versions = entry.group.versions if isinstance(entry, prepack._Member) else (entry.version,)
        assert linear.weight._version in versions
    x = torch.randn(2, linear.in_features, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.allclose(linear(x).float(), torch.nn.functional.linear(x, linear.weight).float(), atol=1e-2)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v with biases, concatenated
def test_issue17_grouped_linears_answer_each_member_whatever_the_calls(family):
    """q/k/v (and gate/up) are packed as one weight and computed in one call for the first member
    called; the others get their slice only for the same input object, unchanged. Any other order,
    a repeated member, another input in between or the input written in place still gives each
    member its own ``F.linear``."""
    model = tiny_model(family).to(torch.bfloat16)
    packed = prepack.PackedLinears.of(model)
    assert packed.groups == 2 * len(model.model.layers)
    attn = model.model.layers[1].self_attn
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    assert isinstance(prepack._PACKED[k.weight.data_ptr()], prepack._Member)

    def plain(m, x):
        return torch.nn.functional.linear(x, m.weight, m.bias).float()

    def check(m, x):
        got = m(x)
        assert got.shape == (*x.shape[:-1], m.out_features)
        assert torch.allclose(got.float(), plain(m, x), atol=2e-2, rtol=2e-2), m

    x1 = torch.randn(1, 5, q.in_features, dtype=torch.bfloat16)
    x2 = torch.randn(1, 5, q.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        for m in (v, q, k):  # any order
            check(m, x1)
        for m in (q, q, k, v, v):  # a member twice
            check(m, x1)
        check(q, x1); check(k, x2); check(v, x1); check(k, x1)  # another input in between
        check(q, x1)
        x1.mul_(-1.0)  # written in place after q: k and v must not get the old slices
        check(k, x1); check(v, x1)
        ops = _ops(lambda: [q(x2), k(x2), v(x2)])
    assert ops["packed_linear_calls"] == 1 and ops.get("aten::linear", 0) == 0
    with torch.no_grad():
        k.bias is not None and k.bias.add_(0.5)  # a member's bias written in place: the group repacks
        k.weight.mul_(2.0)
        for m in (q, k, v):
            check(m, x2)
