"""The OpenAI request models on their own: what each field becomes in SamplingParams, the
64-bit seed range, the shapes of logprobs, and how a bad field is named (OpenAI's `param`)."""

from __future__ import annotations

import json

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from app.api.errors import ApiError, describe_validation_errors, openai_param
from app.api.openai_protocol import (
    INT64_MIN,
    UINT64_MAX,
    ChatCompletionRequest,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    seed_for_choice,
)
from app.inference.types import SamplingParams, StructuredOutput, TokenLogprob

USER = [{"role": "user", "content": "hi"}]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **fields})


def errors_of(body: dict) -> tuple[str, str | None, str | None]:
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(body)
    return describe_validation_errors(RequestValidationError(caught.value.errors()).errors())


def test_every_sampling_field_reaches_the_engine() -> None:
    body = chat(
        temperature=0.3,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        logit_bias={"42": 100, "7": -100},
        seed=-1,
        stop="END OF THE ANSWER, THANKS",
        ignore_eos=True,
    )
    params = body.sampling_params(max_tokens=12, logprobs=3, structured=StructuredOutput(json_object=True))
    assert params == SamplingParams(
        max_tokens=12,
        temperature=0.3,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        logit_bias=((42, 100.0), (7, -100.0)),
        seed=-1,
        stop=("END OF THE ANSWER, THANKS",),
        ignore_eos=True,
        logprobs=3,
        structured=StructuredOutput(json_object=True),
    )


def test_explicit_nulls_mean_the_defaults() -> None:
    nullable = [
        "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs", "max_tokens",
        "max_completion_tokens", "n", "seed", "stop", "stream", "stream_options", "temperature", "top_p",
        "user", "response_format", "tools", "tool_choice", "parallel_tool_calls", "store", "metadata",
        "service_tier", "modalities", "audio", "prediction", "reasoning_effort", "web_search_options",
        "top_k", "min_p", "repetition_penalty", "ignore_eos", "safety_identifier", "prompt_cache_key",
    ]  # fmt: skip
    body = chat(**dict.fromkeys(nullable))
    body.check_supported()
    assert body.sampling_params(max_tokens=5, logprobs=None) == SamplingParams(max_tokens=5)
    assert body.choices_per_prompt == 1 and not body.stream and body.logprobs_count is None


def test_stop_limits_the_number_of_strings_not_their_length() -> None:
    assert chat(stop="x" * 500).stop_sequences() == ("x" * 500,)
    assert chat(stop=["a", "", "b"]).stop_sequences() == ("a", "b")
    message, param, code = errors_of({"model": "m", "messages": USER, "stop": ["s"] * 17})
    assert param == "stop" and "at most 16" in message and code == "invalid_value"


def test_seed_covers_the_whole_64_bit_range() -> None:
    for seed in (INT64_MIN, -1, 0, 2**53 + 1, UINT64_MAX):
        assert chat(seed=seed).sampling_params(max_tokens=1, logprobs=None).seed == seed
    for seed in (INT64_MIN - 1, UINT64_MAX + 1):
        assert errors_of({"model": "m", "messages": USER, "seed": seed})[1] == "seed"
    # Choice i of n uses seed + i, wrapped around the top of the range.
    assert [seed_for_choice(UINT64_MAX - 1, i) for i in range(3)] == [
        UINT64_MAX - 1,
        UINT64_MAX,
        -(2**64) + 2**64,
    ]
    assert seed_for_choice(None, 3) is None


def test_max_completion_tokens_is_max_tokens() -> None:
    assert chat(max_completion_tokens=9).requested_max_tokens == 9
    assert chat(max_tokens=7).requested_max_tokens == 7


def test_logit_bias_takes_token_ids_and_bounded_biases() -> None:
    message, param, _ = errors_of({"model": "m", "messages": USER, "logit_bias": {"hello": 3}})
    assert param == "logit_bias" and "token ids" in message
    message, param, _ = errors_of({"model": "m", "messages": USER, "logit_bias": {"5": 101}})
    assert param == "logit_bias" and "-100 to 100" in message


def test_logprobs_fields() -> None:
    assert chat(logprobs=True).logprobs_count == 0
    assert chat(logprobs=True, top_logprobs=5).logprobs_count == 5
    with pytest.raises(ApiError) as without:
        chat(top_logprobs=2).check_supported()
    assert without.value.param == "top_logprobs"
    assert errors_of({"model": "m", "messages": USER, "top_logprobs": 21})[1] == "top_logprobs"


def test_unknown_fields_are_refused_by_name() -> None:
    message, param, code = errors_of({"model": "m", "messages": USER, "max_token": 5})
    assert (message, param, code) == (
        "Unrecognized request argument supplied: max_token",
        "max_token",
        "unknown_parameter",
    )
    message, param, code = errors_of(
        {"model": "m", "messages": [{"role": "user", "content": "x", "mood": 1}]}
    )
    assert param == "messages[0].mood" and code == "unknown_parameter"


def test_bad_fields_are_named_as_openai_names_them() -> None:
    assert (
        errors_of({"model": "m", "messages": [{"role": "wizard", "content": "x"}]})[1] == "messages[0].role"
    )
    _, param, code = errors_of({"model": "m", "messages": [{"role": "user", "content": 5}]})
    assert param == "messages[0].content" and code == "invalid_type"
    assert errors_of({"model": "m", "messages": USER, "temperature": "hot"})[1:] == (
        "temperature",
        "invalid_type",
    )
    assert errors_of({"messages": USER})[1:] == ("model", "missing_required_parameter")
    assert openai_param(["body", "tools", 0, "function", "name"]) == "tools[0].function.name"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("store", True),
        ("service_tier", "flex"),
        ("modalities", ["text", "audio"]),
        ("metadata", {"a": "b"}),
        ("audio", {"voice": "alloy", "format": "mp3"}),
        ("prediction", {"type": "content", "content": "x"}),
        ("reasoning_effort", "high"),
        ("verbosity", "low"),
        ("web_search_options", {}),
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
    ],
)
def test_features_zeus_lacks_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ApiError) as refused:
        chat(**{field: value}).check_supported()
    assert refused.value.status_code == 400 and refused.value.param == field
    assert field in str(refused.value.detail)


def test_stream_options_need_stream() -> None:
    chat(stream=True, stream_options={"include_usage": True, "include_obfuscation": False}).check_supported()
    with pytest.raises(ApiError) as refused:
        chat(stream_options={"include_usage": True}).check_supported()
    assert refused.value.param == "stream_options"


def test_what_zeus_does_anyway_is_accepted() -> None:
    chat(
        store=False, service_tier="auto", modalities=["text"], user="u-1", parallel_tool_calls=True
    ).check_supported()


def test_message_content_as_text_parts_and_roles_for_the_template() -> None:
    body = chat(
        messages=[
            {
                "role": "developer",
                "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
            },
            {"role": "user", "content": "Weather?", "name": "ann"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "-3 C"}]},
        ]
    )
    assert [message.engine_message() for message in body.messages] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?", "name": "ann"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": {"city": "Oslo"}},
                }
            ],
        },
        {"role": "tool", "content": "-3 C", "tool_call_id": "call_1"},
    ]  # fmt: skip
    assert body.uses_tools()
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
    assert errors_of({"model": "m", "messages": [image]})[1] == "messages[0].content[0].type"


def test_a_named_tool_choice_must_name_a_tool() -> None:
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    with pytest.raises(ApiError) as unnamed:
        chat(tools=tools, tool_choice={"type": "function", "function": {"name": "clock"}}).check_supported()
    assert unnamed.value.param == "tool_choice"
    with pytest.raises(ApiError) as no_tools:
        chat(tool_choice="required").check_supported()
    assert no_tools.value.param == "tool_choice"


def test_json_schema_response_format_keeps_the_schema() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = chat(response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    assert body.response_format.json_schema.json_schema == schema
    assert json.loads(json.dumps(schema)) == schema


def test_legacy_prompts() -> None:
    def completion(**fields) -> CompletionRequest:
        return CompletionRequest.model_validate({"model": "m", **fields})

    assert completion(prompt="Once").prompts() == ["Once"]
    assert completion(prompt=["a", "b"]).prompts() == ["a", "b"]
    for refused, param in [
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
    ]:
        with pytest.raises(ApiError) as caught:
            completion(**refused).check_supported()
        assert caught.value.param == param
    completion(prompt="x", best_of=2, n=2, echo=True).check_supported()


def test_logprobs_in_openais_shapes() -> None:
    entries = [
        TokenLogprob(token_id=1, token="Hé", logprob=-0.5, top=(("Hé", -0.5), ("Ho", -1.5), ("x", -3.0))),
        TokenLogprob(token_id=2, token="!", logprob=-0.1, top=(("!", -0.1),)),
    ]
    assert chat_logprobs(entries, 2) == [
        {
            "token": "Hé",
            "logprob": -0.5,
            "bytes": [72, 195, 169],
            "top_logprobs": [
                {"token": "Hé", "logprob": -0.5, "bytes": [72, 195, 169]},
                {"token": "Ho", "logprob": -1.5, "bytes": [72, 111]},
            ],
        },
        {
            "token": "!",
            "logprob": -0.1,
            "bytes": [33],
            "top_logprobs": [{"token": "!", "logprob": -0.1, "bytes": [33]}],
        },
    ]  # fmt: skip
    assert completion_logprobs(entries, 1, offset=4) == {
        "tokens": ["Hé", "!"],
        "token_logprobs": [-0.5, -0.1],
        "top_logprobs": [{"Hé": -0.5}, {"!": -0.1}],
        "text_offset": [4, 6],
    }
