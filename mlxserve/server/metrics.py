"""Prometheus metrics for ``GET /metrics`` (``prometheus_client``, one registry per app)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mlxserve.chat.events import Done

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "mlxserve_requests", "HTTP requests", ["route", "status"], registry=r
        )
        self.errors = Counter("mlxserve_errors", "Errors by stable code", ["code"], registry=r)
        self.prompt_tokens = Counter(
            "mlxserve_prompt_tokens", "Prompt tokens", ["model"], registry=r
        )
        self.generated_tokens = Counter(
            "mlxserve_generated_tokens", "Generated tokens", ["model"], registry=r
        )
        self.tokens_per_second = Histogram(
            "mlxserve_generation_tokens_per_second",
            "Decode rate per request",
            ["model"],
            buckets=RATE_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "mlxserve_time_to_first_token_seconds",
            "Time to first token",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "mlxserve_queue_depth", "Requests waiting for a slot", ["model"], registry=r
        )
        self.active = Gauge(
            "mlxserve_active_requests", "Requests generating", ["model"], registry=r
        )
        self.slots = Gauge(
            "mlxserve_slots", "Sequences a loaded model serves at once", ["model"], registry=r
        )
        self.loaded_models = Gauge("mlxserve_loaded_models", "Models in memory", registry=r)
        self.model_memory = Gauge(
            "mlxserve_model_memory_bytes", "Memory a loaded model holds", ["model"], registry=r
        )
        self.prompt_cache_hits = Gauge(
            "mlxserve_prompt_cache_hits",
            "Prompts that reused a cached prefix, per tier, since the model loaded",
            ["model", "tier"],
            registry=r,
        )
        self.prompt_cache_tokens = Gauge(
            "mlxserve_prompt_cache_tokens",
            "Prompt tokens reused from the prompt cache, per tier, since the model loaded",
            ["model", "tier"],
            registry=r,
        )
        self.prompt_cache_bytes = Gauge(
            "mlxserve_prompt_cache_bytes",
            "Bytes the prompt cache holds for a loaded model, per tier",
            ["model", "tier"],
            registry=r,
        )

    def generation(self, model: str, done: Done) -> None:
        """The counters and histograms of one finished generation."""
        stats = done.stats
        self.prompt_tokens.labels(model).inc(stats.prompt_eval_count)
        self.generated_tokens.labels(model).inc(stats.eval_count)
        self.time_to_first_token.labels(model).observe(stats.time_to_first_token / 1e9)
        if stats.eval_duration > 0 and stats.eval_count > 1:
            self.tokens_per_second.labels(model).observe(
                stats.eval_count / (stats.eval_duration / 1e9)
            )

    def prompt_cache(self, model: str, stats: dict[str, Any]) -> None:
        """A loaded model's prompt-cache stats (``promptcache.PromptCache.stats``)."""
        for tier in ("live", "ram", "disk"):
            self.prompt_cache_hits.labels(model, tier).set(stats[tier]["hits"])
            self.prompt_cache_tokens.labels(model, tier).set(stats[tier]["tokens"])
            if "bytes" in stats[tier]:
                self.prompt_cache_bytes.labels(model, tier).set(stats[tier]["bytes"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
