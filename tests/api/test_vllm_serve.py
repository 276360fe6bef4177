"""End to end with ZEUS_ENGINE=vllm: `python -m app serve` (vLLM's engine core spawned from the
server process) on SmolLM2, the official openai client streaming a reply, and /api/health and
/metrics showing the engine."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.inference.conftest import needs_vllm
from tests.support.live_server import LiveServer, start_live_server

pytestmark = [needs_vllm, pytest.mark.smollm2, pytest.mark.slow]


@pytest.fixture(scope="module")
def vllm_server(
    database_url: str, smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    server = start_live_server(
        database_url,
        smollm2_path,
        tmp_path_factory.mktemp("vllm-serve"),
        # vLLM spawns its engine core and warms the model up: about a minute on two idle cores.
        ready_timeout_s=600,
        ZEUS_ENGINE="vllm",
        ZEUS_KV_CACHE_GB="1",
        ZEUS_MAX_MODEL_LEN="1024",
        ZEUS_MAX_INPUT_TOKENS="512",
        # No torch.compile: minutes of g++ on CI's two cores otherwise.
        ZEUS_ENFORCE_EAGER="true",
    )
    try:
        server.analyst = server.create_account("vllm-analyst@example.com", "analyst")
        yield server
    finally:
        # uvicorn re-raises the SIGTERM it handled once shut down: -15 is a clean stop too.
        assert server.stop() in (0, -signal.SIGTERM), server.log()[-3000:]
        log = server.log()
        assert "Application shutdown complete" in log and "MPClient: complete" in log, log[-3000:]


def test_openai_client_streams_a_reply_from_the_vllm_engine(vllm_server: LiveServer) -> None:
    client = openai.OpenAI(
        base_url=f"{vllm_server.base_url}/api/v1", api_key=vllm_server.analyst.api_key, max_retries=0
    )
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, chunks = "", None, 0
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        elif chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
            chunks += 1
    assert "Paris" in text and chunks > 1, text
    assert usage is not None and 0 < usage.completion_tokens <= 24


def test_health_and_metrics_show_the_vllm_engine(vllm_server: LiveServer) -> None:
    health = httpx.get(f"{vllm_server.base_url}/api/health", timeout=10).json()
    assert health["status"] == "ok"
    assert health["engine"]["kind"] == "vllm" and health["engine"]["dtype"] == "bfloat16"
    assert health["engine"]["tensor_parallel_size"] == 1
    metrics = httpx.get(f"{vllm_server.base_url}/metrics", timeout=10).text
    assert "vllm:kv_cache_usage_perc{model_name=" in metrics and "zeus:prefix_cache_hit_rate" in metrics
    assert "vllm:time_to_first_token_seconds_count{model_name=" in metrics
    # The earlier test's generation: vLLM's queue time reached the same histogram as the built-in's.
    assert "vllm:request_queue_time_seconds_count" in metrics
    assert "vllm:inter_token_latency_seconds_count" in metrics
    # vLLM's counters under vLLM's names, as `bench serve --metrics-urls` reads them.
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name.startswith("vllm:prefix_cache_")
    }
    assert set(samples) == {"vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"}, samples
    assert 0 <= samples["vllm:prefix_cache_hits_total"] <= samples["vllm:prefix_cache_queries_total"]
    assert samples["vllm:prefix_cache_queries_total"] > 0
