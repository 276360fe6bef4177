"""Backpressure and bad input: 429 when the engine is full, 400 for a prompt over the limit,
413 over the body cap, 422 naming the field, and disconnects that free the batch slot."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest_asyncio
from sqlalchemy import func, select

from app.db import transaction
from app.models import Message
from tests.api.conftest import Member, Zeus, serve_in_process, settings_for_tests

MAX_BATCH, MAX_QUEUE = 2, 1


@pytest_asyncio.fixture(scope="module")
async def zeus(database_url: str, tiny_model_path: Path) -> AsyncIterator[Zeus]:
    settings = settings_for_tests(
        database_url,
        tiny_model_path,
        max_batch_size=MAX_BATCH,
        max_queue=MAX_QUEUE,
        max_new_tokens=1500,
        max_input_tokens=64,
        max_body_bytes=20_000,
        # The engine's own batch and queue are under test here; fair admission in front of them
        # (which holds queued requests before their response starts) has tests/api/test_access.py.
        fair_admission=False,
    )
    async for running in serve_in_process(settings):
        yield running


def long_completion(zeus: Zeus, **extra: object) -> dict:
    return {
        "model": zeus.engine.model_name,
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 1500,
        "ignore_eos": True,
        **extra,
    }


async def wait_idle(zeus: Zeus, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (stats := zeus.engine.stats()).running or stats.queued:
        assert time.monotonic() < deadline, f"engine still busy: {stats}"
        await asyncio.sleep(0.05)


async def test_engine_full_answers_429_with_retry_after(zeus: Zeus, analyst: Member) -> None:
    async with zeus.client(headers=analyst.bearer) as client:
        streams = [
            client.stream("POST", "/api/v1/chat/completions", json=long_completion(zeus, stream=True))
            for _ in range(MAX_BATCH + MAX_QUEUE)
        ]
        opened = [await stream.__aenter__() for stream in streams]
        try:
            assert [response.status_code for response in opened] == [200] * (MAX_BATCH + MAX_QUEUE)
            full = await client.post("/api/v1/chat/completions", json=long_completion(zeus))
            assert full.status_code == 429
            assert int(full.headers["retry-after"]) >= 1
            assert full.json()["error"]["type"] == "rate_limit_exceeded"
            conversation = (await client.post("/api/conversations", json={})).json()["id"]
            chat = await client.post(f"/api/conversations/{conversation}/messages", json={"content": "hi"})
            assert chat.status_code == 429 and "busy" in chat.json()["detail"]
            # Refused before generation: nothing of it is left in the conversation.
            with transaction(zeus.state.sessions) as db:
                left = db.scalar(select(func.count()).where(Message.conversation_id == conversation))
            assert left == 0
        finally:
            for stream in streams:
                await stream.__aexit__(None, None, None)
    await wait_idle(zeus)


async def test_prompt_too_long_is_400_naming_limit_and_size(zeus: Zeus, analyst: Member) -> None:
    async with zeus.client(headers=analyst.bearer) as client:
        conversation = (await client.post("/api/conversations", json={})).json()["id"]
        response = await client.post(
            f"/api/conversations/{conversation}/messages", json={"content": "word " * 200}
        )
        assert response.status_code == 400
        detail = response.json()["detail"]
        assert "prompt too long" in detail and "limit is 64 tokens" in detail
        size = int(detail.split(":")[1].split("tokens")[0])
        assert size > 64
        assert (await client.get(f"/api/conversations/{conversation}/messages")).json() == []
        openai_style = await client.post(
            "/api/v1/chat/completions",
            json={"model": zeus.engine.model_name, "messages": [{"role": "user", "content": "word " * 200}]},
        )
        assert openai_style.status_code == 400 and "64" in openai_style.json()["error"]["message"]


async def test_body_over_the_cap_is_413(zeus: Zeus, analyst: Member) -> None:
    async with zeus.client(headers=analyst.bearer) as client:
        conversation = (await client.post("/api/conversations", json={})).json()["id"]
        big = {"content": "x" * 30_000}
        response = await client.post(f"/api/conversations/{conversation}/messages", json=big)
        assert response.status_code == 413 and "20000 bytes" in response.json()["detail"]
        assert response.headers["x-zeus-instance"] == zeus.state.instance_name

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted while reading
            yield b'{"content": "'
            for _ in range(30):
                yield b"y" * 1000
            yield b'"}'

        streamed = await client.post(
            f"/api/conversations/{conversation}/messages",
            content=chunked(),
            headers={"Content-Type": "application/json"},
        )
        assert streamed.status_code == 413
        openai_style = await client.post("/api/v1/chat/completions", content=b"[" + b" " * 30_000 + b"]")
        assert openai_style.status_code == 413 and "error" in openai_style.json()


async def test_malformed_input_is_422_naming_the_field(zeus: Zeus, analyst: Member) -> None:
    async with zeus.client(headers=analyst.bearer) as client:
        conversation = (await client.post("/api/conversations", json={})).json()["id"]
        path = f"/api/conversations/{conversation}/messages"
        not_json = await client.post(
            path, content=b"{content: oops", headers={"Content-Type": "application/json"}
        )
        assert not_json.status_code == 422 and "not valid JSON" in not_json.json()["detail"]
        missing = await client.post(path, json={})
        assert missing.status_code == 422 and missing.json() == {"detail": "content: Field required"}
        wrong_type = await client.post(path, json={"content": "hi", "options": {"temperature": "hot"}})
        assert wrong_type.status_code == 422 and "options.temperature" in wrong_type.json()["detail"]
        unknown = await client.post(path, json={"content": "hi", "colour": "red"})
        assert unknown.status_code == 422 and "colour" in unknown.json()["detail"]
        bad_path = await client.get("/api/conversations/abc/messages")
        assert bad_path.status_code == 422 and "conversation_id" in bad_path.json()["detail"]
        openai_style = await client.post(
            "/api/v1/chat/completions", json={"model": zeus.engine.model_name, "messages": [], "top_p": 5}
        )
        assert openai_style.status_code == 422
        error = openai_style.json()["error"]
        assert error["param"] == "messages" and "top_p" in error["message"]


async def test_stream_disconnect_frees_the_slot(zeus: Zeus, analyst: Member) -> None:
    async with (
        zeus.client(headers=analyst.bearer) as client,
        client.stream(
            "POST", "/api/v1/chat/completions", json=long_completion(zeus, stream=True)
        ) as response,
    ):
        chunks = 0
        async for line in response.aiter_lines():
            chunks += line.startswith("data:")
            if chunks >= 5:
                break
        assert zeus.engine.stats().running == 1
    await wait_idle(zeus, timeout_s=10)


async def test_non_streamed_disconnect_frees_the_slot(zeus: Zeus, analyst: Member) -> None:
    async with zeus.client(headers=analyst.bearer) as client:
        request = asyncio.create_task(client.post("/api/v1/chat/completions", json=long_completion(zeus)))
        deadline = time.monotonic() + 10
        while zeus.engine.stats().running == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        request.cancel()  # drops the connection mid-request
    await wait_idle(zeus, timeout_s=10)
    assert zeus.engine.stats().tokens_generated_total > 0


async def test_no_stack_traces_in_error_bodies(zeus: Zeus, analyst: Member) -> None:
    async with httpx.AsyncClient(base_url=zeus.base_url, headers=analyst.bearer) as client:
        answers = [
            await client.post(
                "/api/conversations", content=b"\xff\xfe", headers={"Content-Type": "application/json"}
            ),
            await client.patch("/api/conversations/999999999999999999999", json={"title": "x"}),
            await client.post("/api/v1/chat/completions", json={"model": 5, "messages": "nope"}),
            await client.get("/api/admin/users"),
        ]
    for answer in answers:
        assert answer.status_code < 500, answer.text
        assert "Traceback" not in answer.text and 'File "' not in answer.text
        json.loads(answer.text)
