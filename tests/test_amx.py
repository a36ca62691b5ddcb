"""Issue 17, the AMX linear kernel (promptcache.runtime.amx) behind the fast path's packed weights:
the same values as ``F.linear`` for every shape the packing pads or the kernel tiles (row tails,
column tails, column chunks, biases, 3-D and non-contiguous inputs, threads), and chosen by
``PackedLinears`` only where it runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from promptcache.runtime import amx, prepack

PROBE = torch.zeros((amx.COLUMNS, amx.COLUMNS), dtype=torch.bfloat16)
needs_amx = pytest.mark.skipif(amx.unavailable(PROBE) is not None, reason=str(amx.unavailable(PROBE)))


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.float(), w.float(), None if b is None else b.float())


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """bf16 output of an fp32 accumulation: one rounding of the exact result (plus summation order)."""
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape
    err = (got.float() - ref).abs()
    assert bool((err <= ref.abs() * 2 ** -8 + 1e-3).all()), float(err.max())


@needs_amx
@pytest.mark.parametrize("m", [1, 5, 16, 17, 32, 33, 70])
@pytest.mark.parametrize("n,k", [(32, 32), (48, 64), (100, 96), (1100, 64)])  # 1,100: three column chunks
@pytest.mark.parametrize("with_bias", [False, True])
def test_issue17_amx_linear_equals_f_linear(m, n, k, with_bias):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16) if with_bias else None
    packed = amx.pack(w)
    assert packed.blocks.shape == (-(-n // 32), k // 2, 32, 2) and packed.out_features == n
    got = amx.linear(x, packed, b)
    _close(got, _reference(x, w, b))
    # the same as oneDNN's bf16 linear to its own rounding: both accumulate in fp32
    assert float((got.float() - F.linear(x, w, b).float()).abs().max()) <= float(_reference(x, w, b).abs().max()) * 2 ** -7


@needs_amx
def test_issue17_amx_linear_takes_3d_and_strided_inputs_and_empty_ones():
    w = torch.randn(64, 96).to(torch.bfloat16)
    packed = amx.pack(w)
    x = torch.randn(2, 7, 96).to(torch.bfloat16)
    got = amx.linear(x, packed, None)
    assert got.shape == (2, 7, 64)
    _close(got, _reference(x, w, None))
    strided = torch.randn(96, 9).to(torch.bfloat16).t()  # rows 96 apart: not contiguous
    _close(amx.linear(strided, packed, None), _reference(strided, w, None))
    assert amx.linear(x[:, :0], packed, None).shape == (2, 0, 64)


@needs_amx
def test_issue17_amx_linear_threads_split_columns_to_the_same_values():
    w = torch.randn(1000, 128).to(torch.bfloat16)
    x = torch.randn(40, 128).to(torch.bfloat16)
    packed = amx.pack(w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = amx.linear(x, packed, None)
        torch.set_num_threads(2)
        two = amx.linear(x, packed, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_issue17_amx_says_why_not():
    assert "bf16" in amx.unavailable(torch.zeros(32, 32))
    assert "multiple of 32" in amx.unavailable(torch.zeros(32, 48, dtype=torch.bfloat16))


@needs_amx
def test_issue17_packed_linears_pick_amx_where_it_runs(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(64, 40), torch.nn.Linear(40, 64)).to(torch.bfloat16)
    packed = prepack.PackedLinears(model)
    report = packed.report()
    # 64 -> 40 runs on AMX; 40 -> 64 has an input width AMX does not take: oneDNN's packed kernel
    assert report["kernel"] == "amx" and report["amx_weights"] == 1 and report["onednn_weights"] == 1
    x = torch.randn(3, 64).to(torch.bfloat16)
    before = amx.calls
    with torch.no_grad():
        got = model(x)
    assert amx.calls == before + 1
    packed.remove()
    with torch.no_grad():
        assert float((got.float() - model(x).float()).abs().max()) < 0.05
    monkeypatch.setenv("PROMPTCACHE_AMX", "0")
    assert prepack.default_kernel() == "onednn"
    onednn = prepack.PackedLinears(model).report()
    assert onednn["kernel"] == "onednn" and onednn["amx_weights"] == 0 and onednn["onednn_weights"] == 2
    with pytest.raises(ValueError, match="kernel must be"):
        prepack.PackedLinears(model, kernel="fast")
