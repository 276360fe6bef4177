"""End to end on the real SmolLM2-135M-Instruct: a chat turn through the web API and a streamed
completion through the official openai client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
import pytest_asyncio

from tests.api.conftest import Member, Zeus, parse_sse, serve_in_process, settings_for_tests

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]


@pytest_asyncio.fixture(scope="module")
async def zeus(database_url: str, smollm2_path: Path) -> AsyncIterator[Zeus]:
    settings = settings_for_tests(database_url, smollm2_path, max_new_tokens=48, max_input_tokens=2048)
    async for running in serve_in_process(settings):
        yield running


async def test_chat_answers_a_simple_question(zeus: Zeus, analyst: Member) -> None:
    async with zeus.logged_in(analyst) as client:
        conversation = (await client.post("/api/conversations", json={})).json()["id"]
        response = await client.post(
            f"/api/conversations/{conversation}/messages",
            json={"content": "What is the capital of France?", "options": {"temperature": 0}},
        )
        events = parse_sse(response.text)
        reply = "".join(json.loads(data)["text"] for name, data in events if name == "delta")
        assert events[-1][0] == "done" and "Paris" in reply
        stored = (await client.get(f"/api/conversations/{conversation}/messages")).json()
        assert stored[-1]["content"] == reply and stored[-1]["status"] == "complete"


async def test_openai_client_streams_from_smollm2(zeus: Zeus, analyst: Member) -> None:
    client = openai.AsyncOpenAI(base_url=f"{zeus.base_url}/api/v1", api_key=analyst.api_key, max_retries=0)
    stream = await client.chat.completions.create(
        model=zeus.engine.model_name,
        messages=[{"role": "user", "content": "Name a primary colour."}],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        elif chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text.strip() and usage is not None and 0 < usage.completion_tokens <= 24
