"""The load generator of the serving benchmark: streaming requests through the official ``openai`` client.

Why streaming: time to first token is only observable as the arrival of the first content chunk
(the first chunk with non-empty text; role-only and usage-only chunks do not count). The gaps
between later content chunks are the inter-token latencies (both servers send one token per chunk
with temperature 0 here; a chunk holding several tokens would show as one longer gap).
Requests of a cell run through ``concurrency`` asyncio workers; the client never retries.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field

import numpy as np

from benchmarks.serve_workloads import Request


@dataclass
class Sample:
    """What one request measured (times in seconds from sending it)."""

    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    end_s: float = 0.0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int = 0
    text: str = ""
    error: str | None = None


def _usage(sample: Sample, usage) -> None:
    sample.prompt_tokens = usage.prompt_tokens
    sample.completion_tokens = usage.completion_tokens
    details = getattr(usage, "prompt_tokens_details", None)
    sample.cached_tokens = getattr(details, "cached_tokens", None) if details is not None else None


async def send(client, model: str, kind: str, prompt, max_tokens: int) -> Sample:
    """One streamed request; ``prompt`` is the server's form of a request: PML or text (``kind`` "completion")
    or messages ("chat")."""
    sample, chunks = Sample(), 0
    t0 = last = time.perf_counter()
    common = dict(model=model, max_tokens=max_tokens, temperature=0, stream=True,
                  stream_options={"include_usage": True})
    try:
        if kind == "chat":
            stream = await client.chat.completions.create(messages=prompt, **common)
        else:
            stream = await client.completions.create(prompt=prompt, **common)
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                choice = chunk.choices[0]
                text = choice.delta.content if kind == "chat" else choice.text
                if text:
                    chunks += 1
                    sample.text += text
                    if sample.ttft_s is None:
                        sample.ttft_s = now - t0
                    else:
                        sample.gaps_s.append(now - last)
                    last = now
            if getattr(chunk, "usage", None) is not None:
                _usage(sample, chunk.usage)
    except Exception as exc:  # noqa: BLE001 - one failed request must not end the benchmark; it is counted
        sample.error = f"{type(exc).__name__}: {exc}"[:300]
    sample.end_s = time.perf_counter() - t0
    if sample.completion_tokens == 0:
        sample.completion_tokens = chunks  # a server without usage in the stream: one token per chunk
    return sample


async def run_cell(base_url: str, model: str, requests: list[Request], server: str, concurrency: int,
                   max_tokens: int, timeout_s: float) -> tuple[list[Sample], float]:
    """All ``requests`` through ``concurrency`` workers; returns the samples (in request order) and the wall time."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url + "/v1", api_key=os.environ.get("PROMPTCACHE_API_KEY", "none"),
                         max_retries=0, timeout=timeout_s)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(requests)):
        queue.put_nowait(i)
    samples: list[Sample | None] = [None] * len(requests)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            req = requests[i]
            kind, prompt = (req.ours_kind, req.ours) if server == "ours" else (req.peer_kind, req.peer)
            samples[i] = await send(client, model, kind, prompt, max_tokens)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    return [s for s in samples if s is not None], time.perf_counter() - t0


def _pct(values: list[float], q: float) -> float:
    """Percentile in ms (linear interpolation; with 20 samples p99 is close to the maximum); NaN when empty."""
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def summarize(samples: list[Sample], wall_s: float) -> dict:
    """TTFT and inter-token percentiles (ms), requests/s and output tokens/s of one cell (errors excluded)."""
    ok = [s for s in samples if s.error is None and s.ttft_s is not None]
    ttft = [s.ttft_s for s in ok]
    gaps = [g for s in ok for g in s.gaps_s]
    cached = [s.cached_tokens for s in ok if s.cached_tokens is not None]
    prompt = [s.prompt_tokens for s in ok if s.prompt_tokens is not None]
    out_tokens = sum(s.completion_tokens for s in ok)
    return {
        "requests": len(samples), "errors": sum(s.error is not None for s in samples),
        "no_text": sum(s.error is None and s.ttft_s is None for s in samples),  # ended before any text (EOS first)
        "ttft_p50_ms": _pct(ttft, 50), "ttft_p99_ms": _pct(ttft, 99),
        "itl_p50_ms": _pct(gaps, 50), "itl_p99_ms": _pct(gaps, 99),
        "req_per_s": len(ok) / wall_s if wall_s > 0 else float("nan"),
        "out_tok_per_s": out_tokens / wall_s if wall_s > 0 else float("nan"),
        "out_tokens_mean": out_tokens / len(ok) if ok else float("nan"),
        "prompt_tokens_mean": float(np.mean(prompt)) if prompt else float("nan"),
        "cached_tokens_mean": float(np.mean(cached)) if cached else float("nan"),
        "wall_s": wall_s,
        "first_error": next((s.error for s in samples if s.error), ""),
    }
