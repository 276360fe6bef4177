"""The OpenAI-compatible endpoints' logic: a request body (openai_protocol) becomes engine
requests, checked against what the running engine can do; the shared lifecycle (serving.py)
runs them; the results become OpenAI's responses or chunks.

Where the engine decides: `engine.info().capabilities` says whether `response_format`
(structured output) and `tools` can be honoured; a request that needs what the engine lacks is
refused with a 400 naming the field and the engine that has it.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.api.deps import Caller
from app.api.errors import ApiError, openai_error
from app.api.openai_protocol import (
    LEGACY_DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    NamedToolChoice,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    SamplingFields,
    ToolMessage,
    chat_logprobs,
    completion_logprobs,
    refuse,
    seed_for_choice,
)
from app.api.serving import ChoiceState, Generation, UsageOwner, sse, stream_response
from app.inference.contract import EngineInfo, ToolCall, ToolStreamDelta
from app.inference.types import EngineError, GenerationRequest, SamplingParams, StructuredOutput
from app.state import ZeusState

log = logging.getLogger("zeus.openai")
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}


def check_model(state: ZeusState, model: str) -> None:
    if model != state.engine.model_name:
        raise ApiError(
            404,
            f"The model `{model}` does not exist: this server serves `{state.engine.model_name}` "
            "(GET /api/v1/models)",
            param="model",
            code="model_not_found",
        )


def _max_tokens(state: ZeusState, requested: int | None, default: int, param: str) -> int:
    limit = state.settings.max_new_tokens
    if requested is not None and requested > limit:
        raise refuse(
            param,
            f"{param} {requested} is over this server's limit of {limit} (ZEUS_MAX_NEW_TOKENS)",
            "invalid_value",
        )
    return requested or min(default, limit)


def _fit_default(state: ZeusState, request: GenerationRequest, default: int) -> int:
    """Without max_tokens, a reply may use what the context leaves after the prompt (up to the
    default), as vLLM's default does: clients that never set it (LangChain's ChatOpenAI) must not
    be refused a long conversation that still fits."""
    try:
        prompt_tokens = state.engine.count_prompt_tokens(request)
    except EngineError:
        return default  # submit() names the problem
    return max(1, min(default, state.engine.context_length - prompt_tokens))


def _check_common(state: ZeusState, body: SamplingFields, prompts: int) -> None:
    check_model(state, body.model)
    limit = state.settings.max_n
    if body.choices_per_prompt * prompts > limit:
        raise refuse(
            "n",
            f"n is {body.choices_per_prompt}"
            + (f" for each of {prompts} prompts" if prompts > 1 else "")
            + f": at most {limit} choices per request on this server (ZEUS_MAX_N)",
            "invalid_value",
        )
    if body.user or getattr(body, "safety_identifier", None):
        # OpenAI's end-user ids exist for abuse monitoring: here, the log is where they go.
        log.info(
            "request for user=%s safety_identifier=%s", body.user, getattr(body, "safety_identifier", None)
        )


def _owner(caller: Caller) -> UsageOwner:
    return UsageOwner(user_id=caller.user.id, api_key_id=caller.api_key_id, source="openai")


def _usage(generation: Generation) -> dict[str, int]:
    prompt, completion = generation.prompt_tokens, generation.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _fingerprint(info: EngineInfo) -> str:
    return f"zeus-{info.kind}"


def _failed(generation: Generation) -> bool:
    return generation.status == "error"


# ----- chat completions -----------------------------------------------------------------------


class ToolMode:
    """How tool calls come out of this request: not at all, parsed by the engine's parser from
    free text ("auto"), or forced by a JSON schema ("required", or one named function) and
    parsed here, as vLLM does for tool_choice required and named."""

    def __init__(self, body: ChatCompletionRequest, info: EngineInfo) -> None:
        self.body = body
        self.choice = body.tool_choice if body.tools else "none"
        if body.tools and body.tool_choice is None:
            self.choice = "auto"
        capabilities = info.capabilities
        if body.uses_tools() and not capabilities.tools:
            param = "tools" if body.tools else self._tool_message_param()
            raise refuse(
                param,
                f"{param}: the {info.kind} engine of this deployment cannot call tools; "
                "engine vllm (ZEUS_ENGINE=vllm) parses tool calls for the model's family",
            )
        if self.forced and not capabilities.structured_output:
            raise refuse(
                "tool_choice",
                f"tool_choice {self._choice_text()}: the {info.kind} engine cannot force a tool call "
                "(it needs structured output); send tool_choice auto",
            )

    def _tool_message_param(self) -> str:
        for index, message in enumerate(self.body.messages):
            if isinstance(message, ToolMessage):
                return f"messages[{index}]"
            if getattr(message, "tool_calls", None):
                return f"messages[{index}].tool_calls"
        return "messages"

    def _choice_text(self) -> str:
        choice = self.choice
        return f"`{choice.function.name}`" if isinstance(choice, NamedToolChoice) else str(choice)

    @property
    def forced(self) -> bool:
        return self.choice == "required" or isinstance(self.choice, NamedToolChoice)

    @property
    def active(self) -> bool:
        return self.choice != "none"

    def structured(self) -> StructuredOutput | None:
        if isinstance(self.choice, NamedToolChoice):
            tool = next(t for t in self.body.tools or () if t.function.name == self.choice.function.name)
            return StructuredOutput(json_schema=json.dumps(tool.function.parameters or {"type": "object"}))
        if self.choice == "required":
            variants = [
                {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "enum": [tool.function.name]},
                        "parameters": tool.function.parameters or {"type": "object"},
                    },
                    "required": ["name", "parameters"],
                }
                for tool in self.body.tools or ()
            ]
            schema = {"type": "array", "minItems": 1, "items": {"anyOf": variants}}
            if self.body.parallel_tool_calls is False:
                schema["maxItems"] = 1
            return StructuredOutput(json_schema=json.dumps(schema))
        return None

    @property
    def stream_choice(self) -> str:
        """The engine's name for this mode's streaming parser (Engine.tool_call_stream)."""
        if isinstance(self.choice, NamedToolChoice):
            return f"function:{self.choice.function.name}"
        return "required" if self.choice == "required" else "auto"

    def calls(
        self, state: ZeusState, text: str, request: GenerationRequest
    ) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a finished reply."""
        if not self.active:
            return text, []
        if isinstance(self.choice, NamedToolChoice):
            return None, [ToolCall(id=_call_id(), name=self.choice.function.name, arguments=text)]
        if self.choice == "required":
            try:
                items = json.loads(text)
                calls = [
                    ToolCall(id=_call_id(), name=item["name"], arguments=json.dumps(item["parameters"]))
                    for item in items
                ]
            except (ValueError, TypeError, KeyError) as error:
                log.warning("forced tool call output did not parse: %s", error)
                return text, []
            return None, calls
        extraction = state.engine.extract_tool_calls(text, request)
        calls = list(extraction.tool_calls)
        if self.body.parallel_tool_calls is False:
            calls = calls[:1]
        return extraction.content, calls


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _tool_calls_json(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [
        {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        for call in calls
    ]


def _tool_stream_delta(parsed: ToolStreamDelta | None, tools: ToolMode) -> dict[str, Any]:
    """A parser's delta as an OpenAI chunk's delta ({} when it carries nothing to send)."""
    if parsed is None:
        return {}
    out: dict[str, Any] = {}
    if parsed.content:
        out["content"] = parsed.content
    calls = []
    for call in parsed.tool_calls:
        if tools.body.parallel_tool_calls is False and call.index > 0:
            continue  # as the non-streamed reply: one call only
        item: dict[str, Any] = {"index": call.index}
        if call.id is not None:
            item["id"] = call.id
            item["type"] = "function"
        function = {}
        if call.name is not None:
            function["name"] = call.name
        if call.arguments is not None:
            function["arguments"] = call.arguments
        if function:
            item["function"] = function
        calls.append(item)
    if calls:
        out["tool_calls"] = calls
    return out


def _response_format(body: ChatCompletionRequest, info: EngineInfo) -> StructuredOutput | None:
    response_format = body.response_format
    if not isinstance(response_format, ResponseFormatJsonObject | ResponseFormatJsonSchema):
        return None
    if not info.capabilities.structured_output:
        raise refuse(
            "response_format",
            f"response_format {response_format.type}: the {info.kind} engine of this deployment cannot "
            "constrain its output to JSON; engine vllm (ZEUS_ENGINE=vllm) does. Send "
            '{"type": "text"} or leave response_format out',
        )
    if isinstance(response_format, ResponseFormatJsonObject):
        return StructuredOutput(json_object=True)
    schema = response_format.json_schema.json_schema or {"type": "object"}
    return StructuredOutput(json_schema=json.dumps(schema))


async def create_chat_completion(
    body: ChatCompletionRequest, caller: Caller, state: ZeusState, request: Request
) -> JSONResponse | StreamingResponse:
    body.check_supported()
    _check_common(state, body, prompts=1)
    info = state.engine.info()
    tools = ToolMode(body, info)
    structured = _response_format(body, info)
    if tools.forced:
        if structured is not None:
            raise refuse("response_format", "response_format cannot be combined with a forced tool_choice")
        structured = tools.structured()
    logprobs = body.logprobs_count
    if logprobs is not None and logprobs > info.capabilities.max_top_logprobs:
        raise refuse(
            "top_logprobs",
            f"top_logprobs {logprobs}: the {info.kind} engine returns at most "
            f"{info.capabilities.max_top_logprobs}",
            "invalid_value",
        )
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    max_tokens = _max_tokens(state, body.requested_max_tokens, state.settings.max_new_tokens, param)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    messages = tuple(message.engine_message() for message in body.messages)
    tool_definitions = (
        tuple(tool.model_dump(exclude_none=True) for tool in body.tools) if body.tools else None
    )
    if body.requested_max_tokens is None:
        max_tokens = _fit_default(
            state, GenerationRequest(messages=messages, tools=tool_definitions), max_tokens
        )
    requests = []
    for index in range(body.choices_per_prompt):
        params = body.sampling_params(max_tokens=max_tokens, logprobs=logprobs, structured=structured)
        params = _with_seed(params, seed_for_choice(body.seed, index))
        requests.append(
            GenerationRequest(
                messages=messages,
                params=params,
                request_id=f"{completion_id}-{index}",
                tools=tool_definitions,
            )
        )
    generation = await Generation.submit(state, requests, _owner(caller))
    created = int(time.time())
    if body.stream:
        events = _chat_chunks(state, body, generation, requests, tools, completion_id, created, info)
        return stream_response(events, generation)
    await generation.collect(request)
    if _failed(generation):
        raise ApiError(500, generation.error_message)
    choices = []
    for choice, engine_request in zip(generation.choices, requests, strict=True):
        content, calls = tools.calls(state, choice.text, engine_request)
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            message["tool_calls"] = _tool_calls_json(calls)
        choices.append(
            {
                "index": choice.index,
                "message": message,
                "finish_reason": "tool_calls" if calls else _finish_reason(choice),
                "logprobs": {"content": chat_logprobs(choice.logprobs, logprobs)}
                if logprobs is not None
                else None,
            }
        )
    return JSONResponse(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": choices,
            "usage": _usage(generation),
            "system_fingerprint": _fingerprint(info),
            "service_tier": "default",
        }
    )


def _with_seed(params: SamplingParams, seed: int | None) -> SamplingParams:
    return replace(params, seed=seed)


def _finish_reason(choice: ChoiceState) -> str:
    if choice.result is None:
        return "abort"
    return FINISH_REASONS.get(choice.result.finish_reason, choice.result.finish_reason)


async def _chat_chunks(
    state: ZeusState,
    body: ChatCompletionRequest,
    generation: Generation,
    requests: list[GenerationRequest],
    tools: ToolMode,
    completion_id: str,
    created: int,
    info: EngineInfo,
) -> AsyncIterator[str]:
    include_usage = body.include_usage
    logprobs = body.logprobs_count
    fingerprint = _fingerprint(info)

    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> str:
        payload: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, **extra}],
        }
        if include_usage:
            payload["usage"] = None
        return sse(None, payload)

    def entries(items: list[Any]) -> dict[str, Any] | None:
        return {"content": chat_logprobs(tuple(items), logprobs)} if logprobs is not None else None

    # With tools, each choice's text goes through the engine's streaming tool-call parser (vLLM's):
    # content passes on, a tool call goes out as OpenAI streams one (its index, id, type and name
    # first, then its arguments in fragments). Logprobs of text the parser holds back travel
    # with the next chunk that is sent.
    parsers = (
        [state.engine.tool_call_stream(engine_request, tools.stream_choice) for engine_request in requests]
        if tools.active
        else []
    )
    held: list[list[Any]] = [[] for _ in requests]
    called = [False] * len(requests)
    for choice in generation.choices:
        yield chunk(choice.index, {"role": "assistant", "content": ""}, logprobs=None)
    async for index, delta in generation.deltas():
        if not tools.active:
            if delta.text or delta.logprobs:
                yield chunk(index, {"content": delta.text}, logprobs=entries(list(delta.logprobs)))
            continue
        held[index].extend(delta.logprobs)
        parsed = parsers[index].feed(delta)
        out = _tool_stream_delta(parsed, tools)
        if out:
            called[index] = called[index] or "tool_calls" in out
            yield chunk(index, out, logprobs=entries(held[index]))
            held[index] = []
    if _failed(generation):
        yield sse(None, openai_error(500, generation.error_message))
        yield sse(None, "[DONE]")
        return
    for choice in generation.choices:
        finish_reason = _finish_reason(choice)
        if tools.active:
            out = _tool_stream_delta(parsers[choice.index].finish(), tools)
            if out or held[choice.index]:
                called[choice.index] = called[choice.index] or "tool_calls" in out
                yield chunk(choice.index, out, logprobs=entries(held[choice.index]))
            # As vLLM: a reply that streamed a tool call and ended by itself ends with
            # "tool_calls" (one cut by max_tokens keeps "length").
            if called[choice.index] and finish_reason == "stop":
                finish_reason = "tool_calls"
        yield chunk(choice.index, {}, finish_reason, logprobs=None)
    if include_usage:
        payload = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "system_fingerprint": fingerprint,
            "choices": [],
            "usage": _usage(generation),
        }
        yield sse(None, payload)
    yield sse(None, "[DONE]")


# ----- legacy completions -----------------------------------------------------------------------


async def create_completion(
    body: CompletionRequest, caller: Caller, state: ZeusState, request: Request
) -> JSONResponse | StreamingResponse:
    body.check_supported()
    prompts = body.prompts()
    _check_common(state, body, prompts=len(prompts))
    info = state.engine.info()
    logprobs = body.logprobs
    if logprobs is not None and logprobs > info.capabilities.max_top_logprobs:
        raise refuse(
            "logprobs",
            f"logprobs {logprobs}: the {info.kind} engine returns at most "
            f"{info.capabilities.max_top_logprobs}",
            "invalid_value",
        )
    max_tokens = _max_tokens(state, body.max_tokens, LEGACY_DEFAULT_MAX_TOKENS, "max_tokens")
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    requests, groups, echoes = [], [], []
    for prompt_index, prompt in enumerate(prompts):
        for choice in range(body.choices_per_prompt):
            index = prompt_index * body.choices_per_prompt + choice
            params = body.sampling_params(max_tokens=max_tokens, logprobs=logprobs)
            requests.append(
                GenerationRequest(
                    prompt=prompt,
                    params=_with_seed(params, seed_for_choice(body.seed, choice)),
                    request_id=f"{completion_id}-{index}",
                )
            )
            groups.append(prompt_index)
            echoes.append(prompt if body.echo else "")
    generation = await Generation.submit(state, requests, _owner(caller), prompt_groups=groups)
    created = int(time.time())
    if body.stream:
        events = _completion_chunks(body, generation, echoes, completion_id, created, info)
        return stream_response(events, generation)
    await generation.collect(request)
    if _failed(generation):
        raise ApiError(500, generation.error_message)
    choices = [
        {
            "index": choice.index,
            "text": echoes[choice.index] + choice.text,
            "finish_reason": _finish_reason(choice),
            "logprobs": completion_logprobs(choice.logprobs, logprobs) if logprobs is not None else None,
        }
        for choice in generation.choices
    ]
    return JSONResponse(
        {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": choices,
            "usage": _usage(generation),
            "system_fingerprint": _fingerprint(info),
        }
    )


async def _completion_chunks(
    body: CompletionRequest,
    generation: Generation,
    echoes: list[str],
    completion_id: str,
    created: int,
    info: EngineInfo,
) -> AsyncIterator[str]:
    logprobs = body.logprobs
    offsets = [len(echo) for echo in echoes]

    def chunk(index: int, text: str, finish_reason: str | None = None, entries: Any = None) -> str:
        payload: dict[str, Any] = {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "system_fingerprint": _fingerprint(info),
            "choices": [{"index": index, "text": text, "logprobs": entries, "finish_reason": finish_reason}],
        }
        if body.include_usage:
            payload["usage"] = None
        return sse(None, payload)

    for index, echo in enumerate(echoes):
        if echo:
            yield chunk(index, echo)
    async for index, delta in generation.deltas():
        if not (delta.text or delta.logprobs):
            continue
        entries = None
        if logprobs is not None:
            entries = completion_logprobs(delta.logprobs, logprobs, offsets[index])
        offsets[index] += len(delta.text)
        yield chunk(index, delta.text, entries=entries)
    if _failed(generation):
        yield sse(None, openai_error(500, generation.error_message))
        yield sse(None, "[DONE]")
        return
    for choice in generation.choices:
        yield chunk(choice.index, "", _finish_reason(choice))
    if body.include_usage:
        yield sse(
            None,
            {
                "id": completion_id,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "choices": [],
                "usage": _usage(generation),
            },
        )
    yield sse(None, "[DONE]")
