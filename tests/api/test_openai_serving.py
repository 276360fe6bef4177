"""Tool calls forced by tool_choice (required, or one named function): the JSON schema the engine
is constrained with and the parsing of its output, as vLLM's server does it. The engine side
(structured decoding, the model's own tool-call parser for tool_choice auto) runs on engine vllm
and is tested with it; the built-in engine refuses tools (tests/api/routes/test_openai_conformance.py)."""

from __future__ import annotations

import json

import pytest

from app.api.errors import ApiError
from app.api.openai_protocol import ChatCompletionRequest
from app.api.openai_serving import ToolMode
from app.inference.contract import EngineCapabilities, EngineInfo

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CLOCK = {"type": "function", "function": {"name": "clock"}}


def info(tools: bool = True, structured: bool = True) -> EngineInfo:
    return EngineInfo(
        kind="vllm" if tools else "builtin",
        model_name="m",
        device="cpu",
        dtype="float32",
        quantization=None,
        tensor_parallel_size=1,
        max_model_len=2048,
        max_input_tokens=1024,
        max_new_tokens=256,
        capabilities=EngineCapabilities(structured_output=structured, tools=tools),
    )


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "Weather in Oslo?"}], **fields}
    )


def test_a_named_function_is_forced_by_its_parameters_schema() -> None:
    body = request(tools=[WEATHER, CLOCK], tool_choice={"type": "function", "function": {"name": "weather"}})
    mode = ToolMode(body, info())
    assert mode.forced and json.loads(mode.structured().json_schema) == WEATHER["function"]["parameters"]
    content, calls = mode.calls(None, '{"city": "Oslo"}', None)
    assert content is None and [(call.name, call.arguments) for call in calls] == [
        ("weather", '{"city": "Oslo"}')
    ]
    assert calls[0].id.startswith("call_")


def test_required_is_forced_by_a_list_of_calls() -> None:
    body = request(tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False)
    mode = ToolMode(body, info())
    schema = json.loads(mode.structured().json_schema)
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    names = [variant["properties"]["name"]["enum"] for variant in schema["items"]["anyOf"]]
    assert names == [["weather"], ["clock"]]
    content, calls = mode.calls(None, '[{"name": "clock", "parameters": {}}]', None)
    assert content is None and [(call.name, json.loads(call.arguments)) for call in calls] == [("clock", {})]
    # Output that does not parse is returned as text, not as a made-up call.
    assert mode.calls(None, "not json", None) == ("not json", [])


def test_auto_and_none() -> None:
    assert ToolMode(request(tools=[WEATHER]), info()).choice == "auto"
    quiet = ToolMode(request(tools=[WEATHER], tool_choice="none"), info())
    assert not quiet.active and quiet.calls(None, "plain", None) == ("plain", [])
    assert ToolMode(request(), info(tools=False)).choice == "none"


def test_what_the_engine_cannot_do_is_refused_by_name() -> None:
    with pytest.raises(ApiError) as no_tools:
        ToolMode(request(tools=[WEATHER]), info(tools=False))
    assert no_tools.value.param == "tools" and "vllm" in str(no_tools.value.detail)
    with pytest.raises(ApiError) as not_forceable:
        ToolMode(request(tools=[WEATHER], tool_choice="required"), info(structured=False))
    assert not_forceable.value.param == "tool_choice"
    follow_up = request(
        messages=[
            {"role": "user", "content": "Weather?"},
            {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
        ]
    )
    with pytest.raises(ApiError) as tool_message:
        ToolMode(follow_up, info(tools=False))
    assert tool_message.value.param == "messages[1]"
