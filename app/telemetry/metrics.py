"""Prometheus metrics of one instance, named, labelled and meant as vLLM's (v1 engine), so vLLM's
dashboards and alert rules work on Zeus unchanged.

Every engine series carries `model_name` (the served model's name, as vLLM's label). Names taken
from vLLM: vllm:num_requests_running, vllm:num_requests_waiting, vllm:time_to_first_token_seconds,
vllm:inter_token_latency_seconds (per token), vllm:request_time_per_output_token_seconds (per
request), vllm:e2e_request_latency_seconds, vllm:request_queue_time_seconds,
vllm:request_prefill_time_seconds, vllm:request_decode_time_seconds,
vllm:request_inference_time_seconds, vllm:prompt_tokens_total, vllm:generation_tokens_total,
vllm:iteration_tokens_total, vllm:kv_cache_usage_perc (engines with a paged KV cache) and
vllm:request_success_total{finished_reason="stop"|"length"|"abort"}
(as vLLM, a generation that failed is no success: it counts in zeus:request_errors_total).
Zeus's own, without a vLLM counterpart: zeus:max_batch_size, zeus:max_queue, zeus:prefix_cache_hit_rate,
zeus:iteration_duration_seconds, zeus:requests_rejected_total{reason}, and the HTTP series
zeus_http_requests_total, zeus_http_request_duration_seconds, zeus_http_requests_in_progress.

The generation metrics come from the engine's observer hooks, so every generation is counted once,
whichever route started it, and time to first token is observed when the token is produced.
Source of vLLM's names: vllm/v1/metrics/loggers.py (PrometheusStatLogger).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from app.inference.types import EngineObserver, EngineStats, GenerationResult

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

    def __init__(
        self, stats: Callable[[], EngineStats | None], in_flight: Callable[[], int], model_name: str
    ) -> None:
        self._stats = stats
        self._in_flight = in_flight
        self._model_name = model_name

    def _gauge(self, name: str, documentation: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, documentation, labels=["model_name"])
        family.add_metric([self._model_name], value)
        return family

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._stats()
        if stats is not None:
            yield self._gauge("vllm:num_requests_running", "Generations in the running batch.", stats.running)
            yield self._gauge(
                "vllm:num_requests_waiting", "Generations waiting for a batch slot.", stats.queued
            )
            yield self._gauge("zeus:max_batch_size", "ZEUS_MAX_BATCH_SIZE.", stats.max_batch_size)
            # With vllm:num_requests_waiting: how close the queue is to answering 429.
            yield self._gauge("zeus:max_queue", "ZEUS_MAX_QUEUE.", stats.max_queue)
            # Engines with a paged KV cache (vLLM) report these, ratios 0..1. The usage is vLLM's
            # gauge; vLLM counts prefix-cache hits and queries instead of a rate, hence zeus:.
            if stats.kv_cache_usage is not None:
                yield self._gauge(
                    "vllm:kv_cache_usage_perc",
                    "Fraction of the KV cache in use (0..1).",
                    stats.kv_cache_usage,
                )
            if stats.prefix_cache_hit_rate is not None:
                yield self._gauge(
                    "zeus:prefix_cache_hit_rate",
                    "Prompt tokens served from the prefix cache / prompt tokens looked up, since start.",
                    stats.prefix_cache_hit_rate,
                )
            # vLLM's own counters under vLLM's own names (exposed as *_total), so that whatever reads
            # a bare vLLM server's hit rate (bench serve --workload chat, dashboards) reads Zeus's.
            # Absent where the engine has no prefix cache (the built-in engine).
            if stats.prefix_cache_queries is not None and stats.prefix_cache_hits is not None:
                yield CounterMetricFamily(
                    "vllm:prefix_cache_queries",
                    "Prefix cache queries, in terms of number of queried tokens.",
                    value=stats.prefix_cache_queries,
                )
                yield CounterMetricFamily(
                    "vllm:prefix_cache_hits",
                    "Prefix cache hits, in terms of number of cached tokens.",
                    value=stats.prefix_cache_hits,
                )
        yield GaugeMetricFamily(
            "zeus_http_requests_in_progress", "HTTP requests being answered.", value=self._in_flight()
        )


# Tokens generated by one scheduler iteration: about the running batch's size (0 for an iteration
# that only prefilled part of a long prompt).
ITERATION_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)
ITERATION_SECONDS_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class Metrics(EngineObserver):
    """The instance's registry. `model_name` labels every engine series (vLLM's label)."""

    def __init__(
        self,
        stats: Callable[[], EngineStats | None],
        in_flight: Callable[[], int],
        model_name: str = "",
    ) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(stats, in_flight, model_name))
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

        def histogram(name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(
                name, documentation, ["model_name"], buckets=buckets, registry=self.registry
            ).labels(model_name)

        def counter(name: str, documentation: str) -> Counter:
            return Counter(name, documentation, ["model_name"], registry=self.registry).labels(model_name)

        self.time_to_first_token = histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "vllm:inter_token_latency_seconds",
            "Time between consecutive tokens of a generation (one observation per token after the first).",
            TPOT_BUCKETS,
        )
        self.time_per_output_token = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Per generation: decode time / (output tokens - 1).",
            TPOT_BUCKETS,
        )
        self.e2e_latency = histogram(
            "vllm:e2e_request_latency_seconds", "Submit to last token.", LATENCY_BUCKETS
        )
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Submit to scheduled (waiting for a batch slot).",
            LATENCY_BUCKETS,
        )
        self.prefill_time = histogram(
            "vllm:request_prefill_time_seconds", "Scheduled to first token.", LATENCY_BUCKETS
        )
        self.decode_time = histogram(
            "vllm:request_decode_time_seconds", "First token to last token.", LATENCY_BUCKETS
        )
        self.inference_time = histogram(
            "vllm:request_inference_time_seconds", "Scheduled to last token.", LATENCY_BUCKETS
        )
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prefilled prompt tokens.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generated tokens.")
        self.request_success = Counter(
            "vllm:request_success",
            "Finished generations by finish reason (stop, length, abort); failed ones are not counted.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self.request_errors = counter(
            "zeus:request_errors", "Generations that failed in the engine (not in vllm:request_success)."
        )
        self.iteration_tokens = histogram(
            "vllm:iteration_tokens_total",
            "Tokens generated per scheduler iteration (one decode step of the running batch).",
            ITERATION_TOKEN_BUCKETS,
        )
        self.iteration_duration = histogram(
            "zeus:iteration_duration_seconds",
            "Wall time of one scheduler iteration: prefill of joining prompts and one decode step.",
            ITERATION_SECONDS_BUCKETS,
        )
        self.rejected = Counter(
            "zeus:requests_rejected",
            "Generations refused before starting, by reason (full: answered 429).",
            ["model_name", "reason"],
            registry=self.registry,
        )
        # First tokens produced since the last on_step: the iteration's other tokens are the ones
        # that followed an earlier token, i.e. inter-token gaps. Only the scheduler thread touches it.
        self._first_tokens_this_step = 0

    def reject(self, reason: str) -> None:
        """A generation refused before it started (full, prompt_too_long, invalid)."""
        self.rejected.labels(self.model_name, reason).inc()

    # ----- engine hooks (the scheduler thread calls them; prometheus_client is thread-safe) -----

    def on_first_token(self, ttft_s: float) -> None:
        self.time_to_first_token.observe(ttft_s)
        self._first_tokens_this_step += 1

    def on_step(self, running: int, queued: int, new_tokens: int, step_s: float) -> None:
        self.iteration_tokens.observe(new_tokens)
        self.iteration_duration.observe(step_s)
        # Each token of a running generation came one iteration after its previous one: the gap
        # is this iteration's wall time (vLLM observes the same interval per request and token).
        for _ in range(max(0, new_tokens - self._first_tokens_this_step)):
            self.inter_token_latency.observe(step_s)
        self._first_tokens_this_step = 0

    def on_request_finished(self, result: GenerationResult) -> None:
        self.prompt_tokens.inc(result.prompt_tokens)
        self.generation_tokens.inc(result.completion_tokens)
        if result.finish_reason == "error":
            self.request_errors.inc()
        else:
            reason = "abort" if result.finish_reason == "cancelled" else result.finish_reason
            self.request_success.labels(self.model_name, reason).inc()
        self.e2e_latency.observe(result.e2e_s)
        queue_s = getattr(result, "queue_s", None)
        if queue_s is not None:
            self.queue_time.observe(queue_s)
            self.inference_time.observe(result.e2e_s - queue_s)
            if result.ttft_s is not None:
                self.prefill_time.observe(max(0.0, result.ttft_s - queue_s))
        if result.ttft_s is not None:
            self.decode_time.observe(result.decode_s)
        if result.completion_tokens > 1:
            self.time_per_output_token.observe(result.decode_s / (result.completion_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
