"""Prometheus metrics of the server, named after vLLM's where vLLM has one (``vllm:`` -> ``promptcache:``).

:class:`ServeMetrics` is the scheduler's ``observer`` (``on_queued``, ``on_started``,
``on_first_token``, ``on_token``, ``on_finished``; called on the engine thread, and
prometheus_client is thread-safe) and also counts what the HTTP layer refuses before a request
reaches the scheduler. Queue depth, running requests and module-cache bytes per tier are read when
``/metrics`` is scraped. Each instance has its own registry, so several apps in one process (tests)
do not collide.

Counters (the ``_total`` suffix is added by prometheus_client):
``promptcache:prompt_tokens``, ``promptcache:generation_tokens``,
``promptcache:prompt_tokens_cached`` (module and prefix tokens reused),
``promptcache:prefix_cache_queries`` / ``promptcache:prefix_cache_hits`` (in tokens, as vLLM's),
``promptcache:request_success{finished_reason}`` (stop, length, window, deadline, cancelled),
``promptcache:request_outcome{outcome}`` (every ending, errors included: stop, length, ...,
error, rejected_queue_full, invalid, unauthorized, not_found, too_large).
Histograms: ``promptcache:time_to_first_token_seconds``, ``promptcache:inter_token_latency_seconds``,
``promptcache:request_queue_time_seconds``. Gauges: ``promptcache:num_requests_waiting``,
``promptcache:num_requests_running``, ``promptcache:module_cache_bytes{tier}``,
``promptcache:adapter_cache_bytes{adapter,cache}`` (module and prefix bytes per LoRA adapter,
``base`` for none; docs/lora.md).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

log = logging.getLogger("promptcache.serve")

PREFIX = "promptcache:"
# Bucket bounds from vLLM (seconds), widened at the top for CPU prefills of long prompts.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
                 320.0, 640.0)
SUCCESS = ("stop", "length", "window", "deadline", "cancelled")


class ServeMetrics:
    """The server's metrics and the scheduler observer that feeds them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens.", registry=r)
        self.cached_tokens = Counter(PREFIX + "prompt_tokens_cached",
                                     "Prompt tokens taken from module or prefix caches.", registry=r)
        self.prefix_queries = Counter(PREFIX + "prefix_cache_queries",
                                      "Prompt tokens looked up in the caches (as vLLM: tokens).", registry=r)
        self.prefix_hits = Counter(PREFIX + "prefix_cache_hits", "Prompt tokens found in the caches.", registry=r)
        self.success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                               ["finished_reason"], registry=r)
        self.outcome = Counter(PREFIX + "request_outcome", "Requests by how they ended, errors included.",
                               ["outcome"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between generated tokens.",
                             buckets=ITL_BUCKETS, registry=r)
        self.queue_time = Histogram(PREFIX + "request_queue_time_seconds", "Time requests waited in the queue.",
                                    buckets=QUEUE_BUCKETS, registry=r)
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Requests in the queue.", registry=r)
        self.running = Gauge(PREFIX + "num_requests_running", "Requests being prefilled or decoded.", registry=r)
        self.tier_bytes = Gauge(PREFIX + "module_cache_bytes", "Module-cache bytes held per tier.",
                                ["tier"], registry=r)
        self.adapter_bytes = Gauge(PREFIX + "adapter_cache_bytes", "Cached bytes per LoRA adapter ('base': none), "
                                   "module tiers and prefix tree.", ["adapter", "cache"], registry=r)
        for reason in SUCCESS:  # present (at 0) from the start, so rates work before the first one
            self.success.labels(reason)
        self._stats: Callable[[], dict] | None = None
        self._tiers: Callable[[], dict] | None = None

    # -------------------------------------------------------------- scheduler observer

    def on_queued(self, depth: int) -> None:
        self.waiting.set(depth)

    def on_started(self, queue_s: float) -> None:
        self.queue_time.observe(max(0.0, queue_s))

    def on_first_token(self, ttft_s: float) -> None:
        self.ttft.observe(max(0.0, ttft_s))

    def on_token(self, inter_token_s: float) -> None:
        self.itl.observe(max(0.0, inter_token_s))

    def on_finished(self, outcome: str, usage: Any | None) -> None:
        self.outcome.labels(outcome).inc()
        if outcome in SUCCESS:
            self.success.labels(outcome).inc()
        if usage is not None:
            self.prompt_tokens.inc(usage.prompt_tokens)
            self.generation_tokens.inc(usage.completion_tokens)
            self.cached_tokens.inc(usage.cached_tokens)
            self.prefix_queries.inc(usage.prompt_tokens)
            self.prefix_hits.inc(usage.cached_tokens)

    # -------------------------------------------------------------- HTTP layer

    def rejected(self, outcome: str) -> None:
        """A request refused before (or instead of) the scheduler: 400, 401, 404, 413, 429, 500."""
        self.outcome.labels(outcome).inc()

    def bind(self, stats: Callable[[], dict], tiers: Callable[[], dict] | None = None) -> None:
        """Where scrape-time gauges come from: scheduler stats and module-cache tier bytes."""
        self._stats, self._tiers = stats, tiers

    def render(self) -> tuple[bytes, str]:
        """The exposition text (gauges refreshed first) and its content type."""
        self._refresh()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _refresh(self) -> None:
        try:
            if self._stats is not None:
                stats = self._stats()
                self.waiting.set(stats.get("queue_depth", 0))
                self.running.set(stats.get("running", 0))
            if self._tiers is not None:
                tiers = self._tiers()
                for tier, info in tiers.items():
                    if isinstance(info, dict) and "bytes" in info:
                        self.tier_bytes.labels(tier).set(info["bytes"])
                if isinstance(tiers.get("by_adapter"), dict):  # unloaded adapters' series go
                    self.adapter_bytes.clear()
                    for adapter, row in tiers["by_adapter"].items():
                        self.adapter_bytes.labels(adapter, "module").set(row.get("module_bytes", 0))
                        self.adapter_bytes.labels(adapter, "prefix").set(row.get("prefix_bytes", 0))
        except Exception:  # a scrape must not fail because the engine is busy; keep the last values
            log.warning("metrics: could not refresh the gauges", exc_info=True)
