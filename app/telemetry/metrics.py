"""Prometheus metrics of one instance, named and meant as vLLM's so existing dashboards translate
(vllm:num_requests_running -> zeus:num_requests_running, and so on)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from app.inference.types import EngineStats, GenerationResult

# The *_created series double the output and no dashboard of this kind reads them.
disable_created_metrics()

# vLLM's buckets for the same histograms.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
TPOT_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


class _EngineCollector(Collector):
    """Reads the engine's numbers at scrape time, so gauges are never stale."""

    def __init__(self, stats: Callable[[], EngineStats | None], in_flight: Callable[[], int]) -> None:
        self._stats = stats
        self._in_flight = in_flight

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self._stats()
        if stats is not None:
            yield GaugeMetricFamily(
                "zeus:num_requests_running", "Generations in the running batch.", value=stats.running
            )
            yield GaugeMetricFamily(
                "zeus:num_requests_waiting", "Generations waiting for a batch slot.", value=stats.queued
            )
            yield GaugeMetricFamily("zeus:max_batch_size", "ZEUS_MAX_BATCH_SIZE.", value=stats.max_batch_size)
        yield GaugeMetricFamily(
            "zeus_http_requests_in_progress", "HTTP requests being answered.", value=self._in_flight()
        )


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats | None], in_flight: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(stats, in_flight))
        self.http_requests = Counter(
            "zeus_http_requests",
            "HTTP requests by route template, method and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "zeus_http_request_duration_seconds",
            "Time to the end of the response.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "zeus:time_to_first_token_seconds",
            "Time to first token.",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "zeus:time_per_output_token_seconds",
            "Time per output token after the first.",
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self.e2e_latency = Histogram(
            "zeus:e2e_request_latency_seconds",
            "Submit to last token.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter("zeus:prompt_tokens", "Prefilled prompt tokens.", registry=self.registry)
        self.generation_tokens = Counter(
            "zeus:generation_tokens", "Generated tokens.", registry=self.registry
        )
        self.request_success = Counter(
            "zeus:request_success",
            "Finished generations by finish reason.",
            ["finished_reason"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "zeus:requests_rejected",
            "Generations refused before starting, by reason.",
            ["reason"],
            registry=self.registry,
        )

    def observe_generation(self, result: GenerationResult, e2e_s: float) -> None:
        self.prompt_tokens.inc(result.prompt_tokens)
        self.generation_tokens.inc(result.completion_tokens)
        self.request_success.labels(result.finish_reason).inc()
        self.e2e_latency.observe(e2e_s)
        if result.ttft_s is not None:
            self.time_to_first_token.observe(result.ttft_s)
        if result.completion_tokens > 1:
            self.time_per_output_token.observe(result.decode_s / (result.completion_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
