"""OpenAI-compatible endpoints (base_url = <zeus>/api/v1): models, chat completions and legacy
completions, streamed or not. The bodies are in app/api/openai_protocol.py, the logic in
app/api/openai_serving.py; errors use OpenAI's error object (app/api/errors.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from app.api.deps import CallerDep, StateDep
from app.api.errors import OPENAI_RESPONSES
from app.api.openai_protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from app.api.openai_serving import check_model, create_chat_completion, create_completion
from app.state import ZeusState

router = APIRouter(prefix="/api/v1", tags=["openai"], responses=OPENAI_RESPONSES)
STREAMED: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "the completion; with stream: true, server-sent events ending with `data: [DONE]`",
    }
}


def _card(state: ZeusState) -> ModelCard:
    return ModelCard(
        id=state.engine.model_name,
        created=int(state.started_at.timestamp()),
        max_model_len=state.engine.context_length,
    )


@router.get("/models", response_model=ModelList)
def list_models(caller: CallerDep, state: StateDep) -> ModelList:
    return ModelList(data=[_card(state)])


@router.get("/models/{model:path}", response_model=ModelCard)
def retrieve_model(model: str, caller: CallerDep, state: StateDep) -> ModelCard:
    check_model(state, model)
    return _card(state)


@router.post("/chat/completions", response_model=ChatCompletion, responses=STREAMED)
async def chat_completions(
    body: ChatCompletionRequest, caller: CallerDep, state: StateDep, request: Request
) -> Any:
    return await create_chat_completion(body, caller, state, request)


@router.post("/completions", response_model=Completion, responses=STREAMED)
async def completions(body: CompletionRequest, caller: CallerDep, state: StateDep, request: Request) -> Any:
    return await create_completion(body, caller, state, request)
