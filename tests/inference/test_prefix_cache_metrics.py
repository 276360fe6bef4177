"""The prefix cache's counters on /metrics under vLLM's names, read the way `bench serve --workload
chat` reads a bare vLLM server's, and absent where the engine has no prefix cache."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from app.inference.types import EngineStats
from app.telemetry.metrics import Metrics
from bench.serve_bench import _scrape_prefix_cache
from tests.inference.conftest import EngineFactory


def stats(**fields: Any) -> EngineStats:
    return EngineStats(
        running=0,
        queued=0,
        max_batch_size=8,
        max_queue=4,
        requests_total=0,
        tokens_generated_total=0,
        accepting=True,
        **fields,
    )


async def scrape(metrics: Metrics) -> tuple[float, float] | None:
    """The benchmark's scrape of one instance whose /metrics is this registry's text."""

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=metrics.render())

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        return await _scrape_prefix_cache(client, ["http://instance/metrics"])


def test_vllm_prefix_cache_counters_are_read_by_the_chat_benchmark() -> None:
    metrics = Metrics(lambda: stats(prefix_cache_queries=400, prefix_cache_hits=300), lambda: 0)
    text = metrics.render().decode()
    assert "# TYPE vllm:prefix_cache_queries_total counter" in text
    assert "vllm:prefix_cache_queries_total 400.0" in text and "vllm:prefix_cache_hits_total 300.0" in text
    assert asyncio.run(scrape(metrics)) == (300.0, 400.0)


async def test_the_builtin_engine_exports_no_prefix_cache_series(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    engine_stats = engine.stats()
    assert engine_stats.prefix_cache_queries is None and engine_stats.prefix_cache_hits is None
    metrics = Metrics(engine.stats, lambda: 0)
    assert "prefix_cache" not in metrics.render().decode()
    assert await scrape(metrics) is None


def test_the_chat_benchmark_reads_the_engines_ttft_mean_from_the_histogram() -> None:
    """bench's "TTFT mean client / engine" column: the run's delta of vLLM's TTFT histogram."""
    from bench.serve_bench import _delta_ratio, _scrape

    metrics = Metrics(lambda: stats(), lambda: 0)

    async def totals() -> dict[str, float]:
        def answer(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, content=metrics.render())

        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            return await _scrape(client, ["http://a/metrics", "http://b/metrics"])

    metrics.on_first_token(5.0)  # before the run: not counted
    before = asyncio.run(totals())
    metrics.on_first_token(0.2)
    metrics.on_first_token(0.4)
    after = asyncio.run(totals())
    # Two instances answering the same registry: sums and counts double, the mean does not.
    ttft = _delta_ratio(
        before, after, "vllm:time_to_first_token_seconds_sum", "vllm:time_to_first_token_seconds_count"
    )
    assert ttft is not None and abs(ttft - 0.3) < 1e-9
    assert (
        _delta_ratio(
            before, before, "vllm:time_to_first_token_seconds_sum", "vllm:time_to_first_token_seconds_count"
        )
        is None
    )
