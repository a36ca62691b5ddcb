"""llama.cpp as a benchmark peer (``llama-cpp-python``), never a dependency of promptcache.

Two contexts over one GGUF (the weights are memory-mapped once): one keeps a prompt's prefix in its
KV cache so that each timed request computes only the suffix (the "prefix kept in its KV" row of
issue 17), the other times full prefills. Token ids come from our tokenizer; the bundled GGUF is the
file our weights were converted from, so both sides see the same ids.

Building it on this CPU: the default build crashes in its AMX kernels; this one works::

    nice -n 19 env CMAKE_BUILD_PARALLEL_LEVEL=1 CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON \\
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \\
        .venv/bin/pip install llama-cpp-python==0.3.36
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

BUILD_HINT = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF '
              '-DGGML_AMX_BF16=OFF" pip install llama-cpp-python==0.3.36')


def available() -> bool:
    """Whether ``llama_cpp`` is importable (checked without importing it: the import loads the library)."""
    return importlib.util.find_spec("llama_cpp") is not None


def gguf_for(model: str) -> Path | None:
    """The GGUF a bundled alias was converted from (``None`` for other models: pass ``--llamacpp-gguf``)."""
    from promptcache.loading import BUNDLED

    bundle = BUNDLED.get(model)
    return bundle.locate() if bundle is not None else None


class LlamaCppPeer:
    """Times llama.cpp's full prefill and its suffix forward over a kept prefix, on the same token ids."""

    name = "llama.cpp"

    def __init__(self, gguf: str | Path, n_ctx: int, threads: int = 1, n_batch: int = 512) -> None:
        from llama_cpp import Llama

        kwargs = dict(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                      n_threads_batch=threads, verbose=False)
        self.gguf = Path(gguf)
        self.kept = Llama(**kwargs)   # holds the prefix of the current prompt in its KV
        self.full = Llama(**kwargs)   # full prefills (would otherwise evict the kept prefix)
        self.prefix: list[int] = []
        self.suffix: list[int] = []
        self.ids: list[int] = []

    def prepare(self, prefix: list[int], suffix: list[int]) -> None:
        """Evaluate ``prefix`` once into the kept context (untimed): later suffix forwards reuse it."""
        self.prefix, self.suffix, self.ids = list(prefix), list(suffix), list(prefix) + list(suffix)
        self.kept.reset()
        self.kept.eval(self.prefix)

    def cached_s(self) -> float:
        """The suffix forward on the kept prefix: rewinds to the prefix (KV cells past it are dropped)."""
        self.kept.n_tokens = len(self.prefix)
        t0 = time.perf_counter()
        self.kept.eval(self.suffix)
        return time.perf_counter() - t0

    def prefill_s(self) -> float:
        """A full prefill of the whole prompt from an empty cache."""
        self.full.reset()
        t0 = time.perf_counter()
        self.full.eval(self.ids)
        return time.perf_counter() - t0

    def first_token(self) -> int:
        """Argmax of the last logits the kept context computed (the first generated token)."""
        import numpy as np

        logits = np.ctypeslib.as_array(self.kept._ctx.get_logits_ith(-1), shape=(self.kept.n_vocab(),))
        return int(np.argmax(logits))

    def info(self) -> dict:
        return {"cached_tokens": len(self.prefix), "gguf": self.gguf.name}

    def close(self) -> None:
        for llm in (self.kept, self.full):
            llm.close()
