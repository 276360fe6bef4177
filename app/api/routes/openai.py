"""OpenAI-compatible endpoints (base_url = <zeus>/api/v1): models and chat completions, streamed or
not, with vLLM's `ignore_eos` and `top_k` extensions. Errors use OpenAI's error object."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from app.api.deps import CallerDep, StateDep
from app.api.errors import OPENAI_RESPONSES
from app.api.generation import (
    GuardedStreamingResponse,
    admitted_submit,
    in_thread_shielded,
    record_usage,
    sse,
)
from app.api.schemas import MAX_SEED, Text
from app.inference.types import GenerationRequest, GenerationResult, SamplingParams, TextDelta
from app.state import ZeusState

router = APIRouter(prefix="/api/v1", tags=["openai"], responses=OPENAI_RESPONSES)
ROLE_FOR_ENGINE = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
DISCONNECT_POLL_S = 0.5


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # OpenAI's clients send fields this server does not use (e.g. `user`, `logit_bias`): ignored.
    model_config = ConfigDict(extra="ignore")
    model: Text
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, description="vLLM extension; 0 or -1 disable it")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: Text | list[Text] | None = Field(default=None, max_length=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(default=False, description="vLLM extension: generate exactly max_tokens tokens")
    n: int = Field(default=1, ge=1, le=1, description="only 1 is supported")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "zeus"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage


@router.get("/models", response_model=ModelList)
def list_models(caller: CallerDep, state: StateDep) -> ModelList:
    return ModelList(
        data=[
            ModelCard(
                id=state.engine.model_name,
                created=int(state.started_at.timestamp()),
                max_model_len=state.engine.context_length,
            )
        ]
    )


def _finish_reason(result: GenerationResult | None) -> str:
    if result is None or result.finish_reason == "cancelled":
        return "abort"
    return result.finish_reason


def _generation_request(body: ChatCompletionRequest, state: ZeusState, request_id: str) -> GenerationRequest:
    if body.model != state.engine.model_name:
        raise HTTPException(
            404,
            f"The model `{body.model}` does not exist: this server serves "
            f"`{state.engine.model_name}` (GET /api/v1/models)",
        )
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    params = SamplingParams(
        max_tokens=body.max_completion_tokens or body.max_tokens or state.settings.max_new_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0),
        seed=body.seed,
        stop=tuple(item for item in stop if item),
        ignore_eos=body.ignore_eos,
    )
    messages = tuple(
        {"role": ROLE_FOR_ENGINE[message.role], "content": message.text()} for message in body.messages
    )
    return GenerationRequest(messages=messages, params=params, request_id=request_id)


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
)
async def chat_completions(
    body: ChatCompletionRequest, caller: CallerDep, state: StateDep, request: Request
) -> Any:
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    generation = _generation_request(body, state, completion_id)
    stream = await admitted_submit(state, generation, user_id=caller.user.id, api_key_id=caller.api_key_id)
    created = int(time.time())
    usage = {"user_id": caller.user.id, "api_key_id": caller.api_key_id, "source": "openai"}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _chunks(state, stream, completion_id, created, body.model, include_usage, usage)

        async def close() -> None:
            stream.cancel()

        return GuardedStreamingResponse(events, close)

    async def cancel_on_disconnect() -> None:
        # A non-streamed answer is not cancelled by the server when the client leaves: watch.
        while not await request.is_disconnected():  # noqa: ASYNC110 (polling is the only way to ask)
            await asyncio.sleep(DISCONNECT_POLL_S)
        stream.cancel()

    watcher = asyncio.create_task(cancel_on_disconnect())
    result: GenerationResult | None = None
    pieces: list[str] = []
    try:
        async for item in stream:
            if isinstance(item, TextDelta):
                pieces.append(item.text)
            elif isinstance(item, GenerationResult):
                result = item
    finally:
        watcher.cancel()
        stream.cancel()
        await _account(state, result, usage)
    if result is None or result.finish_reason == "error":
        message = (result.error if result else None) or "generation failed"
        raise HTTPException(503 if result is None else 500, message)
    answer = ChatCompletion(
        id=completion_id,
        created=created,
        model=body.model,
        choices=[
            Choice(
                message=AssistantMessage(content=result.text or "".join(pieces)),
                finish_reason=_finish_reason(result),
            )
        ],
        usage=CompletionUsage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.prompt_tokens + result.completion_tokens,
        ),
    )
    return JSONResponse(answer.model_dump())


async def _account(state: ZeusState, result: GenerationResult | None, usage: dict[str, Any]) -> None:
    status = "complete" if result and result.finish_reason in ("stop", "length") else "stopped"
    if result is not None and result.finish_reason == "error":
        status = "error"
    with contextlib.suppress(Exception):
        await in_thread_shielded(
            lambda: record_usage(
                state,
                status=status,
                prompt_tokens=result.prompt_tokens if result else 0,
                completion_tokens=result.completion_tokens if result else 0,
                **usage,
            )
        )


async def _chunks(
    state: ZeusState,
    stream: Any,
    completion_id: str,
    created: int,
    model: str,
    include_usage: bool,
    usage: dict[str, Any],
) -> AsyncIterator[str]:
    def chunk(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        }
        if include_usage:
            body["usage"] = None
        return body

    result: GenerationResult | None = None
    try:
        yield sse(None, chunk({"role": "assistant", "content": ""}))
        async for item in stream:
            if isinstance(item, TextDelta):
                if item.text:
                    yield sse(None, chunk({"content": item.text}))
            elif isinstance(item, GenerationResult):
                result = item
    finally:
        stream.cancel()
        await _account(state, result, usage)
    if result is None or result.finish_reason == "error":
        message = (result.error if result else None) or "generation failed"
        yield sse(None, {"error": {"message": message, "type": "server_error", "param": None, "code": "500"}})
    else:
        yield sse(None, chunk({}, _finish_reason(result)))
        if include_usage:
            final = {**chunk({}), "choices": []}
            final["usage"] = {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            }
            yield sse(None, final)
    yield sse(None, "[DONE]")
