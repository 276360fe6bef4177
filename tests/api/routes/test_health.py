"""Health, Prometheus metrics, the instance header and heartbeats."""

from __future__ import annotations

import asyncio

import httpx
from sqlalchemy import text

from app.db import transaction
from tests.api.conftest import Member, Zeus


async def test_health_reports_model_db_queue_and_in_flight(zeus: Zeus) -> None:
    async with zeus.client() as client:
        response = await client.get("/api/health")
    assert response.status_code == 200
    body = response.json()
    assert body == {
        "status": "ok",
        "instance": zeus.state.instance_name,
        "model": zeus.engine.model_name,
        "device": "cpu",
        "engine": {
            "kind": "builtin",
            "dtype": zeus.engine.info().dtype,
            "quantization": None,
            "tensor_parallel_size": 1,
            "max_model_len": zeus.engine.context_length,
            "kv_cache_usage": None,
            "prefix_cache_hit_rate": None,
        },
        "db": "ok",
        "queue": {"running": 0, "queued": 0, "max_batch_size": 4, "max_queue": 4},
        "in_flight": 0,
    }
    assert response.headers["x-zeus-instance"] == zeus.state.instance_name


async def test_every_response_names_the_instance(zeus: Zeus) -> None:
    async with zeus.client() as client:
        for response in [
            await client.get("/api/auth/me"),
            await client.get("/nowhere"),
            await client.get("/metrics"),
            await client.post("/api/auth/login", content=b"{"),
        ]:
            assert response.headers["x-zeus-instance"] == zeus.state.instance_name


def completion_body(zeus: Zeus, max_tokens: int, stream: bool) -> dict[str, object]:
    return {
        "model": zeus.engine.model_name,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }


async def test_in_flight_counts_open_streams(zeus: Zeus, analyst: Member) -> None:
    body = completion_body(zeus, max_tokens=60, stream=True)
    async with (
        zeus.client(headers=analyst.bearer) as client,
        client.stream("POST", "/api/v1/chat/completions", json=body) as response,
    ):
        async for _ in response.aiter_lines():
            health = (await client.get("/api/health")).json()
            assert health["in_flight"] == 1
            break
    await asyncio.sleep(0.2)
    async with zeus.client() as client:
        assert (await client.get("/api/health")).json()["in_flight"] == 0


def metric_samples(text_body: str) -> dict[str, float]:
    samples = {}
    for line in text_body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def test_metrics_use_vllm_names(zeus: Zeus, analyst: Member) -> None:
    async with zeus.client(headers=analyst.bearer) as client:
        before = metric_samples((await client.get("/metrics")).text)
        for stream in (False, True):
            response = await client.post(
                "/api/v1/chat/completions", json=completion_body(zeus, max_tokens=8, stream=stream)
            )
            assert response.status_code == 200
        await client.get("/api/conversations/0/messages")
        text_body = (await client.get("/metrics")).text
    samples = metric_samples(text_body)

    def added(name: str) -> float:
        return samples[name] - before.get(name, 0.0)

    model = f'model_name="{zeus.engine.model_name}"'
    # Each generation counted exactly once, whichever way it was answered (the engine's hooks),
    # under vLLM's names and its model_name label.
    assert added(f"vllm:generation_tokens_total{{{model}}}") == 16
    assert added(f'vllm:request_success_total{{finished_reason="length",{model}}}') == 2
    for histogram in (
        "vllm:time_to_first_token_seconds",
        "vllm:request_time_per_output_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:request_prefill_time_seconds",
        "vllm:request_decode_time_seconds",
    ):
        assert added(f"{histogram}_count{{{model}}}") == 2, histogram
    # One inter-token gap per token after each generation's first.
    assert added(f"vllm:inter_token_latency_seconds_count{{{model}}}") == 14
    assert added(f"vllm:iteration_tokens_total_sum{{{model}}}") == 16
    assert added(f"zeus:iteration_duration_seconds_count{{{model}}}") >= 8
    assert samples[f"vllm:num_requests_running{{{model}}}"] == 0
    assert samples[f"vllm:num_requests_waiting{{{model}}}"] == 0
    assert samples[f"zeus:max_queue{{{model}}}"] == 4
    assert not any(name.startswith("zeus:request_errors_total") and value for name, value in samples.items())
    assert (
        samples['zeus_http_requests_total{method="POST",route="/api/v1/chat/completions",status="200"}'] >= 1
    )
    assert (
        samples[
            'zeus_http_requests_total{method="GET",route="/api/conversations/{conversation_id}/messages",'
            'status="404"}'
        ]
        == 1
    )
    assert "zeus_http_requests_in_progress" in samples


async def test_heartbeat_rows_and_samples(zeus: Zeus) -> None:
    await asyncio.sleep(2.5 * zeus.state.settings.heartbeat_interval_s)
    with transaction(zeus.state.sessions) as db:
        row = db.execute(
            text(
                "SELECT host, port, pid, model, device, run_id, now() - last_heartbeat AS age, rss_bytes "
                "FROM instances WHERE name = :name"
            ),
            {"name": zeus.state.instance_name},
        ).one()
        samples = db.execute(
            text("SELECT count(*) FROM instance_samples WHERE instance_name = :name"),
            {"name": zeus.state.instance_name},
        ).scalar()
    assert row.run_id == zeus.state.run_id and row.model == zeus.engine.model_name and row.rss_bytes > 0
    assert row.age.total_seconds() < 3 * zeus.state.settings.heartbeat_interval_s
    assert samples >= 2


async def test_openapi_and_docs_are_served(zeus: Zeus) -> None:
    async with httpx.AsyncClient(base_url=zeus.base_url) as client:
        schema = (await client.get("/openapi.json")).json()
    assert schema["info"]["title"] == "Zeus" and "/api/v1/chat/completions" in schema["paths"]
