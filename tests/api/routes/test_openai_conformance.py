"""OpenAI API conformance: what clients send is accepted, what Zeus cannot do is refused with a 400
naming the field, and errors come back as OpenAI's error object. Driven by the official `openai`
client where it can send the request, by raw JSON where it cannot (explicit nulls, bad types).
Each example of issue 14's "Why" is one test here (nginx's own 413 page is nginx's suite's).

The effects of penalties, logit_bias and logprobs are checked end to end on the built-in
engine's batched sampler; the wire format and the mapping into SamplingParams also in
tests/api/test_openai_protocol.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
import pytest_asyncio
from sqlalchemy import select

from app.db import transaction
from app.inference.types import GenerationRequest
from app.models import Usage
from tests.api.conftest import Member, Zeus, parse_sse, serve_in_process, settings_for_tests


@pytest.fixture
def client(zeus: Zeus, analyst: Member) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{zeus.base_url}/api/v1", api_key=analyst.api_key, max_retries=0)


@pytest_asyncio.fixture
async def raw(zeus: Zeus, analyst: Member) -> AsyncIterator[httpx.AsyncClient]:
    async with zeus.client(headers=analyst.bearer) as client:
        yield client


def body(zeus: Zeus, **fields) -> dict:
    return {
        "model": zeus.engine.model_name,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 8,
        **fields,
    }


def error_of(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# ----- the examples of the issue ---------------------------------------------------------------------


async def test_one_stop_string_longer_than_the_list_limit(client: openai.AsyncOpenAI, zeus: Zeus) -> None:
    completion = await client.chat.completions.create(
        model=zeus.engine.model_name,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=8,
        stop="END OF THE ANSWER, THANKS",
    )
    assert completion.choices[0].finish_reason in ("stop", "length")


async def test_explicit_nulls_are_accepted(raw: httpx.AsyncClient, zeus: Zeus) -> None:
    nulls = dict.fromkeys(
        [
            "n", "stream", "stream_options", "temperature", "top_p", "seed", "stop", "frequency_penalty",
            "presence_penalty", "logit_bias", "logprobs", "top_logprobs", "max_completion_tokens", "user",
            "response_format", "tools", "tool_choice", "parallel_tool_calls", "store", "metadata",
            "service_tier", "modalities", "audio", "prediction", "reasoning_effort", "web_search_options",
            "top_k", "min_p", "repetition_penalty", "ignore_eos",
        ]
    )  # fmt: skip
    response = await raw.post("/api/v1/chat/completions", json=body(zeus, **nulls))
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion" and len(response.json()["choices"]) == 1


async def test_seed_over_the_whole_64_bit_range(raw: httpx.AsyncClient, zeus: Zeus) -> None:
    for seed in (-1, -(2**63), 2**64 - 1):
        response = await raw.post("/api/v1/chat/completions", json=body(zeus, seed=seed, max_tokens=4))
        assert response.status_code == 200, (seed, response.text)
    seeded = [
        (await raw.post("/api/v1/chat/completions", json=body(zeus, seed=-7, temperature=1.0))).json()
        for _ in range(2)
    ]
    assert seeded[0]["choices"][0]["message"] == seeded[1]["choices"][0]["message"]
    assert (
        error_of(await raw.post("/api/v1/chat/completions", json=body(zeus, seed=2**64)))["param"] == "seed"
    )


async def test_response_format_json_is_refused_by_the_builtin_engine(
    client: openai.AsyncOpenAI, zeus: Zeus
) -> None:
    assert not zeus.engine.info().capabilities.structured_output
    for response_format in (
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}},
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(
                model=zeus.engine.model_name,
                messages=[{"role": "user", "content": "Reply in JSON"}],
                response_format=response_format,
            )
        assert refused.value.body["param"] == "response_format"
        assert "vllm" in refused.value.message and "builtin" in refused.value.message
    plain = await client.chat.completions.create(
        model=zeus.engine.model_name,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        response_format={"type": "text"},
    )
    assert plain.choices[0].message.content is not None


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


async def test_tools_are_refused_by_the_builtin_engine_naming_tools(
    client: openai.AsyncOpenAI, zeus: Zeus
) -> None:
    assert not zeus.engine.info().capabilities.tools
    for tool_choice in ("required", "auto", {"type": "function", "function": {"name": "get_weather"}}):
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(
                model=zeus.engine.model_name,
                messages=[{"role": "user", "content": "Weather in Oslo?"}],
                tools=[WEATHER_TOOL],
                tool_choice=tool_choice,
            )
        assert refused.value.body["param"] == "tools" and "vllm" in refused.value.message
    # The follow-up turn carrying the tool's result is understood, and refused by name (not 422).
    with pytest.raises(openai.BadRequestError) as follow_up:
        await client.chat.completions.create(
            model=zeus.engine.model_name,
            messages=[
                {"role": "user", "content": "Weather in Oslo?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "-3 C and snow"},
            ],
        )
    assert follow_up.value.body["param"] == "messages[1].tool_calls"


async def test_validation_errors_are_400_for_openais_clients(client: openai.AsyncOpenAI, zeus: Zeus) -> None:
    with pytest.raises(openai.BadRequestError) as bad_role:
        await client.chat.completions.create(
            model=zeus.engine.model_name, messages=[{"role": "wizard", "content": "x"}]
        )
    error = bad_role.value.body
    assert error["param"] == "messages[0].role" and error["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as bad_range:
        await client.chat.completions.create(
            model=zeus.engine.model_name, messages=[{"role": "user", "content": "x"}], temperature=3
        )
    assert bad_range.value.body["param"] == "temperature" and bad_range.value.body["code"] == "invalid_value"


async def test_prompt_over_the_limit_says_context_length_exceeded(
    client: openai.AsyncOpenAI, zeus: Zeus
) -> None:
    with pytest.raises(openai.BadRequestError) as too_long:
        await client.chat.completions.create(
            model=zeus.engine.model_name, messages=[{"role": "user", "content": "word " * 2000}]
        )
    error = too_long.value.body
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "maximum context length" in error["message"] and "512" in error["message"]


# ----- the rest of the reference ------------------------------------------------------------------------


async def test_unknown_fields_are_refused_as_openai_does(raw: httpx.AsyncClient, zeus: Zeus) -> None:
    error = error_of(await raw.post("/api/v1/chat/completions", json=body(zeus, max_token=5)))
    assert error == {
        "message": "Unrecognized request argument supplied: max_token",
        "type": "invalid_request_error",
        "param": "max_token",
        "code": "unknown_parameter",
    }


async def test_malformed_json_is_400(raw: httpx.AsyncClient) -> None:
    response = await raw.post(
        "/api/v1/chat/completions", content=b"{oops", headers={"Content-Type": "application/json"}
    )
    assert "not valid JSON" in error_of(response)["message"]


async def test_unsupported_features_are_refused_by_name(raw: httpx.AsyncClient, zeus: Zeus) -> None:
    for field, value in [("store", True), ("audio", {"voice": "alloy", "format": "wav"}), ("n", 9)]:
        assert (
            error_of(await raw.post("/api/v1/chat/completions", json=body(zeus, **{field: value})))["param"]
            == field
        )


async def test_max_completion_tokens_and_its_limit(client: openai.AsyncOpenAI, zeus: Zeus) -> None:
    completion = await client.chat.completions.create(
        model=zeus.engine.model_name,
        messages=[{"role": "user", "content": "Tell me a story"}],
        max_completion_tokens=6,
        extra_body={"ignore_eos": True},
    )
    assert completion.usage.completion_tokens == 6 and completion.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as over:
        await client.chat.completions.create(
            model=zeus.engine.model_name,
            messages=[{"role": "user", "content": "x"}],
            max_completion_tokens=10_000,
        )
    assert over.value.body["param"] == "max_completion_tokens" and "64" in over.value.message


async def test_n_choices_with_seeds(client: openai.AsyncOpenAI, zeus: Zeus) -> None:
    async def ask():
        return await client.chat.completions.create(
            model=zeus.engine.model_name,
            messages=[{"role": "user", "content": "Tell me a story"}],
            max_tokens=12,
            n=3,
            seed=5,
            temperature=1.0,
            user="user-123",
        )

    first, second = await ask(), await ask()
    assert [choice.index for choice in first.choices] == [0, 1, 2]
    texts = [choice.message.content for choice in first.choices]
    assert texts == [choice.message.content for choice in second.choices]  # seeded: repeatable
    assert len(set(texts)) > 1  # seed + i: the choices differ
    assert first.usage.completion_tokens >= 3 and all(texts)
    single = await client.chat.completions.create(
        model=zeus.engine.model_name, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=12
    )
    assert first.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once


async def test_n_choices_streamed(client: openai.AsyncOpenAI, zeus: Zeus) -> None:
    stream = await client.chat.completions.create(
        model=zeus.engine.model_name,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    finish = {}
    texts = {0: "", 1: ""}
    usage = None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            continue
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert finish == {0: "length", 1: "length"} and all(texts.values())
    assert usage is not None and usage.completion_tokens == 10


async def test_logprobs_in_openais_shape(client: openai.AsyncOpenAI, zeus: Zeus) -> None:
    completion = await client.chat.completions.create(
        model=zeus.engine.model_name,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and isinstance(logprobs.content, list)
    without = await client.chat.completions.create(
        model=zeus.engine.model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert without.choices[0].logprobs is None


async def test_logprobs_values_come_from_the_engine(client: openai.AsyncOpenAI, zeus: Zeus) -> None:
    completion = await client.chat.completions.create(
        model=zeus.engine.model_name,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    entries = completion.choices[0].logprobs.content
    assert len(entries) == 5
    # Special tokens (the tiny model's random weights write some) have a logprob entry of their
    # own but no text in the content, as vLLM answers.
    special = set(zeus.engine.tokenizer.all_special_tokens)
    spoken = "".join(entry.token for entry in entries if entry.token not in special)
    assert spoken == completion.choices[0].message.content
    for entry in entries:
        assert entry.logprob <= 0 and bytes(entry.bytes).decode() == entry.token
        assert len(entry.top_logprobs) == 2
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].token == entry.token


async def test_logit_bias_forces_a_token(raw: httpx.AsyncClient, zeus: Zeus) -> None:
    token_id = zeus.engine.tokenizer("the", add_special_tokens=False)["input_ids"][0]
    token = zeus.engine.tokenizer.decode([token_id])
    response = await raw.post(
        "/api/v1/chat/completions",
        json=body(zeus, max_tokens=4, temperature=0, ignore_eos=True, logit_bias={str(token_id): 100}),
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == token * 4


async def test_presence_penalty_changes_a_greedy_answer(raw: httpx.AsyncClient, zeus: Zeus) -> None:
    plain = body(zeus, max_tokens=30, temperature=0, ignore_eos=True)
    answers = [
        (await raw.post("/api/v1/chat/completions", json={**plain, **extra})).json()["choices"][0]["message"][
            "content"
        ]
        for extra in ({}, {"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"repetition_penalty": 2.0})
    ]
    assert answers[0] not in answers[1:], answers


async def test_penalties_min_p_top_k_are_accepted(raw: httpx.AsyncClient, zeus: Zeus) -> None:
    response = await raw.post(
        "/api/v1/chat/completions",
        json=body(
            zeus,
            presence_penalty=0.5,
            frequency_penalty=0.5,
            repetition_penalty=1.1,
            min_p=0.1,
            top_k=5,
            logit_bias={"3": -100},
        ),
    )
    assert response.status_code == 200, response.text


async def test_retrieve_a_model(client: openai.AsyncOpenAI, zeus: Zeus) -> None:
    model = await client.models.retrieve(zeus.engine.model_name)
    assert model.id == zeus.engine.model_name and model.object == "model"
    with pytest.raises(openai.NotFoundError) as missing:
        await client.models.retrieve("gpt-17")
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "hi"}])
    assert unknown.value.body["code"] == "model_not_found"


async def test_legacy_completions(client: openai.AsyncOpenAI, zeus: Zeus) -> None:
    completion = await client.completions.create(
        model=zeus.engine.model_name, prompt="Once upon a time", max_tokens=6, extra_body={"ignore_eos": True}
    )
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 6
    echoed = await client.completions.create(
        model=zeus.engine.model_name, prompt=["A", "B"], max_tokens=3, n=2, echo=True, temperature=0
    )
    assert [choice.index for choice in echoed.choices] == [0, 1, 2, 3]
    assert [choice.text[:1] for choice in echoed.choices] == ["A", "A", "B", "B"]
    default = await client.completions.create(
        model=zeus.engine.model_name, prompt="x", extra_body={"ignore_eos": True}
    )
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for this endpoint
    with pytest.raises(openai.BadRequestError) as tokens:
        await client.completions.create(model=zeus.engine.model_name, prompt=[1, 2, 3])
    assert tokens.value.body["param"] == "prompt"


async def test_legacy_completions_streamed(client: openai.AsyncOpenAI, zeus: Zeus) -> None:
    stream = await client.completions.create(
        model=zeus.engine.model_name,
        prompt="Once upon a time",
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    texts, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            continue
        texts.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(texts) and finish == "length" and usage.completion_tokens == 5


async def test_streamed_chunks_are_openais(raw: httpx.AsyncClient, zeus: Zeus) -> None:
    response = await raw.post(
        "/api/v1/chat/completions", json=body(zeus, stream=True, max_tokens=3, ignore_eos=True)
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [data for _, data in parse_sse(response.text)]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(data) for data in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(chunk["object"] == "chat.completion.chunk" and "usage" not in chunk for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_head_wherever_get_is_served(raw: httpx.AsyncClient, zeus: Zeus) -> None:
    for path in ("/api/v1/models", f"/api/v1/models/{zeus.engine.model_name}", "/api/health"):
        got, head = await raw.get(path), await raw.head(path)
        assert head.status_code == got.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]


async def test_errors_carry_openais_codes(zeus: Zeus) -> None:
    async with zeus.client(headers={"Authorization": "Bearer zk-wrong"}) as stranger:
        error = error_of(await stranger.get("/api/v1/models"), 401)
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    async with zeus.client() as anonymous:
        assert error_of(await anonymous.get("/api/v1/nowhere"), 404)["type"] == "invalid_request_error"


async def test_cors_is_off_by_default(raw: httpx.AsyncClient) -> None:
    preflight = await raw.options(
        "/api/v1/chat/completions",
        headers={"Origin": "https://app.example.org", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers


@pytest_asyncio.fixture(scope="module")
async def configured(database_url: str, tiny_model_path: Path) -> AsyncIterator[Zeus]:
    """A server with CORS on, and prompts allowed up to nearly the model's context (2048)."""
    settings = settings_for_tests(
        database_url, tiny_model_path, cors_origins="https://app.example.org", max_input_tokens=2040
    )
    async for server in serve_in_process(settings):
        yield server


async def test_cors_allows_the_configured_origins(configured: Zeus) -> None:
    async with configured.client() as client:
        allowed = await client.options(
            "/api/v1/chat/completions",
            headers={
                "Origin": "https://app.example.org",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example.org"
        other = await client.options(
            "/api/v1/chat/completions",
            headers={"Origin": "https://evil.example.com", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in other.headers


async def test_without_max_tokens_a_long_prompt_gets_what_the_context_leaves(configured: Zeus) -> None:
    member = configured.member()
    context = configured.engine.context_length

    def size(words: int) -> int:
        messages = ({"role": "user", "content": "word " * words},)
        return configured.engine.count_prompt_tokens(GenerationRequest(messages=messages))

    low, high = 1, 8 * context  # the most words whose prompt leaves at least 10 tokens of context
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if size(middle) <= context - 10 else (low, middle - 1)
    assert context - 20 < size(low) <= context - 10
    messages = [{"role": "user", "content": "word " * low}]
    async with configured.client(headers=member.bearer) as client:
        fitted = await client.post(
            "/api/v1/chat/completions",
            json={"model": configured.engine.model_name, "messages": messages, "ignore_eos": True},
        )
        assert fitted.status_code == 200, fitted.text
        usage = fitted.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == context
        explicit = await client.post(
            "/api/v1/chat/completions",
            json={"model": configured.engine.model_name, "messages": messages, "max_tokens": 64},
        )
        assert error_of(explicit)["code"] == "context_length_exceeded"


# ----- one lifecycle for both doors ------------------------------------------------------------------------


def usage_statuses(zeus: Zeus, member: Member) -> list[tuple[str, str]]:
    with transaction(zeus.state.sessions) as db:
        rows = db.execute(
            select(Usage.source, Usage.status).where(Usage.user_id == member.id).order_by(Usage.id)
        )
        return [(source, status) for source, status in rows]


async def wait_for_rows(zeus: Zeus, member: Member, count: int) -> list[tuple[str, str]]:
    deadline = time.monotonic() + 15
    while len(rows := usage_statuses(zeus, member)) < count:
        assert time.monotonic() < deadline, rows
        await asyncio.sleep(0.05)
    return rows


async def test_the_same_outcome_gives_the_same_usage_status_through_either_door(zeus: Zeus) -> None:
    member = zeus.member()
    async with zeus.client(headers=member.bearer) as client:
        conversation = (await client.post("/api/conversations", json={})).json()["id"]
        chat = await client.post(
            f"/api/conversations/{conversation}/messages",
            json={"content": "hi", "options": {"max_tokens": 4, "ignore_eos": True}},
        )
        assert parse_sse(chat.text)[-1][0] == "done"
        finished = await client.post(
            "/api/v1/chat/completions", json=body(zeus, max_tokens=4, ignore_eos=True)
        )
        assert finished.status_code == 200
        assert await wait_for_rows(zeus, member, 2) == [("chat", "complete"), ("openai", "complete")]
        # The client leaves mid-stream, through each door: "stopped" both times.
        async with client.stream(
            "POST", f"/api/conversations/{conversation}/messages",
            json={"content": "again", "options": {"max_tokens": 60, "ignore_eos": True}},
        ) as leaving_chat:  # fmt: skip
            async for line in leaving_chat.aiter_lines():
                if line.startswith("event: delta"):
                    break
        async with client.stream(
            "POST", "/api/v1/chat/completions", json=body(zeus, max_tokens=60, ignore_eos=True, stream=True)
        ) as leaving_openai:
            async for line in leaving_openai.aiter_lines():
                if '"content": "' in line and '"role"' not in line:
                    break
    rows = await wait_for_rows(zeus, member, 4)
    assert sorted(rows[2:]) == [("chat", "stopped"), ("openai", "stopped")]
