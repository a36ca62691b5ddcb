"""Issue 17, compiled norms, MLPs and RoPE for long eager forwards (promptcache.runtime.fused): the
same function as the modules' own forwards (fp32 within 1e-5, bf16 within its tolerance and the same
top token), used only for inputs of LONG_ROWS tokens or more, on by default only on the CPU fast
path, only for the models it was switched on for, undone by remove().
"""

from __future__ import annotations

import pytest
import torch

from promptcache.engine import PromptCache
from promptcache.runtime import fused
from single_thread import one_torch_thread  # noqa: F401
from tiny_models import random_ids, tiny_model
from tiny_tokenizer import tiny_tokenizer

BF16_TOL = 0.25


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits[0, -1].float()


@pytest.mark.parametrize("family,dtype,tol", [("llama", torch.float32, 1e-5), ("qwen2", torch.bfloat16, BF16_TOL),
                                              ("gemma3", torch.float32, 1e-5)])
def test_issue17_fused_long_forwards_equal_the_modules_own(family, dtype, tol, monkeypatch):
    model = tiny_model(family).to(dtype)
    long_ids, short_ids = random_ids(fused.LONG_ROWS + 9), random_ids(fused.LONG_ROWS - 1)
    plain_long, plain_short = _logits(model, long_ids), _logits(model, short_ids)
    patch = fused.FusedLongForwards(model)
    assert patch.report()["modules"] > 0
    calls = []
    real = fused._compiled_forward
    monkeypatch.setattr(fused, "_compiled_forward", lambda cls: (calls.append(cls), real(cls))[1])
    got_long = _logits(model, long_ids)
    assert calls, "a long input never reached the compiled forward"
    calls.clear()
    assert torch.equal(_logits(model, short_ids), plain_short)  # short inputs: the module's own forward
    assert not calls
    assert float((got_long - plain_long).abs().max()) <= tol
    assert int(got_long.argmax()) == int(plain_long.argmax())
    patch.remove()
    assert all(not type(m).__name__.startswith("Fused") for m in model.modules())
    assert torch.equal(_logits(model, long_ids), plain_long)


def test_issue17_fused_only_on_the_cpu_fast_path_and_reported():
    eager = PromptCache(tiny_model("llama"), tiny_tokenizer(), progress=False)
    assert eager.fused is None
    model = tiny_model("llama")
    fast = PromptCache(model, tiny_tokenizer(), progress=False, compile=True)
    rep = fast.compile_report()["fused_long_forwards"]
    assert rep["modules"] == 4 * fast.num_layers + 1
    assert rep["classes"] == ["LlamaDecoderLayer", "LlamaMLP", "LlamaRMSNorm"]
    assert PromptCache(model, tiny_tokenizer(), progress=False, compile=True).fused is fast.fused  # once per model
    alibi = PromptCache(tiny_model("mpt", max_seq_len=512), tiny_tokenizer(), progress=False, compile=True)
    assert alibi.fused is None  # its forwards stay eager (warned at start)


def test_issue17_fused_compile_failure_runs_eager_warned_and_reported(monkeypatch):
    """A class whose compiled forward fails runs its own forward from then on: warned once, named in
    the report, the same logits as unfused (never a failed request)."""
    model = tiny_model("llama")
    ids = random_ids(fused.LONG_ROWS + 3)
    plain = _logits(model, ids)
    patch = fused.FusedLongForwards(model)

    def broken(cls):
        def fail(*args, **kwargs):
            raise RuntimeError("inductor says no")
        return fail

    monkeypatch.setattr(fused, "_compiled_forward", broken)
    monkeypatch.setattr(fused, "FAILED", {})
    with pytest.warns(UserWarning, match="compiled LlamaMLP forward failed .*inductor says no"):
        got = _logits(model, ids)
    assert torch.equal(got, plain)
    assert set(patch.report()["failed"]) == {"LlamaMLP", "LlamaRMSNorm"}


def test_issue17_fused_rope_only_for_long_inputs_of_fused_models():
    model, other = tiny_model("llama"), tiny_model("llama", seed=1)
    long_ids, short_ids = random_ids(fused.LONG_ROWS + 5), random_ids(fused.LONG_ROWS - 1)
    plain_long, other_long = _logits(model, long_ids), _logits(other, long_ids)
    patch = fused.FusedLongForwards(model)
    before = fused.rope_calls
    got = _logits(model, long_ids)
    assert fused.rope_calls == before + model.config.num_hidden_layers  # once per layer
    assert float((got - plain_long).abs().max()) <= 1e-5
    _logits(model, short_ids)
    assert torch.equal(_logits(other, long_ids), other_long)  # a model never switched: its own RoPE
    assert fused.rope_calls == before + model.config.num_hidden_layers
    patch.remove()
    assert torch.equal(_logits(model, long_ids), plain_long)
    assert fused.rope_calls == before + model.config.num_hidden_layers
