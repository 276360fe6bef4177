"""The OpenAI-compatible API, driven by the official `openai` client (streaming included)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.api.conftest import Member, Zeus


@pytest.fixture
def client(zeus: Zeus, analyst: Member) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{zeus.base_url}/api/v1", api_key=analyst.api_key, max_retries=0)


async def test_models_lists_the_served_model(client: openai.AsyncOpenAI, zeus: Zeus) -> None:
    models = await client.models.list()
    assert [model.id for model in models.data] == [zeus.engine.model_name]


async def test_completion_not_streamed(client: openai.AsyncOpenAI, zeus: Zeus) -> None:
    completion = await client.chat.completions.create(
        model=zeus.engine.model_name,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2 plus 2?"},
        ],
        max_tokens=16,
        temperature=0,
        seed=1,
    )
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 16 and completion.usage.prompt_tokens > 0
    assert (
        completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    # Greedy decoding is deterministic: the same question gives the same answer.
    again = await client.chat.completions.create(
        model=zeus.engine.model_name,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2 plus 2?"},
        ],
        max_tokens=16,
        temperature=0,
    )
    assert again.choices[0].message.content == choice.message.content


async def test_completion_streamed_with_usage_and_ignore_eos(client: openai.AsyncOpenAI, zeus: Zeus) -> None:
    stream = await client.chat.completions.create(
        model=zeus.engine.model_name,
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    texts, finish_reasons, usage = [], [], None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        texts.append(chunk.choices[0].delta.content or "")
        finish_reasons.append(chunk.choices[0].finish_reason)
    assert "".join(texts)
    assert finish_reasons[-1] == "length" and set(finish_reasons[:-1]) == {None}
    assert usage is not None and usage.completion_tokens == 40


async def test_stop_strings_and_content_parts(client: openai.AsyncOpenAI, zeus: Zeus) -> None:
    free = await client.chat.completions.create(
        model=zeus.engine.model_name,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        max_tokens=30,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    text = free.choices[0].message.content
    assert len(text) > 3
    stop = text[2:4]
    stopped = await client.chat.completions.create(
        model=zeus.engine.model_name,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        max_tokens=30,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].message.content
    assert text.startswith(stopped.choices[0].message.content)


async def test_session_cookie_works_too(zeus: Zeus, analyst: Member) -> None:
    async with zeus.logged_in(analyst) as session:
        models = await session.get("/api/v1/models")
        assert models.status_code == 200


async def test_errors_use_openais_shape(client: openai.AsyncOpenAI, zeus: Zeus) -> None:
    with pytest.raises(openai.NotFoundError) as unknown_model:
        await client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "hi"}])
    assert "gpt-17" in unknown_model.value.message
    with pytest.raises(openai.BadRequestError) as too_many:
        await client.chat.completions.create(
            model=zeus.engine.model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=10_000
        )
    assert "10000" in too_many.value.message
    with pytest.raises(openai.BadRequestError) as bad_role:
        await client.chat.completions.create(
            model=zeus.engine.model_name, messages=[{"role": "wizard", "content": "x"}]
        )
    assert bad_role.value.body["param"] == "messages[0].role"
    anonymous = openai.AsyncOpenAI(base_url=f"{zeus.base_url}/api/v1", api_key="zk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await anonymous.models.list()
    async with httpx.AsyncClient(base_url=zeus.base_url) as raw:
        body = (await raw.get("/api/v1/models")).json()
    assert body["error"]["code"] == "invalid_api_key" and body["error"]["message"]


async def test_usage_is_recorded_per_user(zeus: Zeus, admin: Member) -> None:
    member = zeus.member()
    client = openai.AsyncOpenAI(base_url=f"{zeus.base_url}/api/v1", api_key=member.api_key, max_retries=0)
    for _ in range(2):
        await client.chat.completions.create(
            model=zeus.engine.model_name,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            extra_body={"ignore_eos": True},
        )
    async with zeus.client(headers=admin.bearer) as admin_client:
        rows = (await admin_client.get("/api/admin/usage", params={"days": 1})).json()
    mine = [row for row in rows if row["email"] == member.email]
    assert len(mine) == 1 and mine[0]["requests"] == 2 and mine[0]["completion_tokens"] == 10
