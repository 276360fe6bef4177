"""Conversations and their messages; replies stream as server-sent events.

Nothing is lost: the user's message is committed before generation starts, and the reply row
(status `streaming`) receives its partial text every ZEUS_STREAM_FLUSH_INTERVAL_S, so an instance
killed mid-reply loses at most that much. The same write reads the stop flag, so a stop sent to
any instance reaches the one streaming.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, HTTPException, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from app.api.deps import CallerDep, SessionDep, StateDep
from app.api.errors import COMMON_RESPONSES, ErrorBody
from app.api.schemas import (
    ConversationCreate,
    ConversationOut,
    ConversationRename,
    GenerationOptions,
    MessageCreate,
    MessageOut,
    RegenerateBody,
    StopOut,
)
from app.api.serving import Generation, UsageOwner, in_thread, sse, stream_response
from app.db import transaction
from app.inference.types import GenerationRequest, GenerationResult, SamplingParams
from app.models import Conversation, Message
from app.state import ZeusState
from app.telemetry.heartbeat import interrupt_orphaned_replies

log = logging.getLogger("zeus.chat")
router = APIRouter(prefix="/api/conversations", tags=["conversations"], responses=COMMON_RESPONSES)
NOT_FOUND = {404: {"model": ErrorBody, "description": "no such conversation of yours"}}
STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "events start, delta..., then done or error",
    },
    400: {"model": ErrorBody, "description": "prompt too long"},
    409: {"model": ErrorBody, "description": "a reply is already streaming"},
    429: {"model": ErrorBody, "description": "engine full; see Retry-After"},
    **NOT_FOUND,
}
TITLE_LENGTH = 60
CHAT_TEMPERATURE = 0.7
CHAT_TOP_P = 0.95


def own_conversation(db: Session, user_id: int, conversation_id: int) -> Conversation:
    conversation = db.get(Conversation, conversation_id)
    # Someone else's conversation answers exactly like a missing one: ids reveal nothing.
    if conversation is None or conversation.user_id != user_id:
        raise HTTPException(404, f"conversation {conversation_id} not found")
    return conversation


@router.get("", response_model=list[ConversationOut])
def list_conversations(caller: CallerDep, db: SessionDep) -> list[Conversation]:
    query = (
        select(Conversation)
        .where(Conversation.user_id == caller.user.id)
        .order_by(Conversation.updated_at.desc(), Conversation.id.desc())
    )
    return list(db.scalars(query))


@router.post("", response_model=ConversationOut, status_code=201)
def create_conversation(body: ConversationCreate, caller: CallerDep, db: SessionDep) -> Conversation:
    with db.begin():
        conversation = Conversation(user_id=caller.user.id, title=(body.title or "").strip())
        db.add(conversation)
        db.flush()
        db.refresh(conversation)
    return conversation


@router.patch("/{conversation_id}", response_model=ConversationOut, responses=NOT_FOUND)
def rename_conversation(
    conversation_id: int, body: ConversationRename, caller: CallerDep, db: SessionDep
) -> Conversation:
    with db.begin():
        conversation = own_conversation(db, caller.user.id, conversation_id)
        conversation.title = body.title.strip()
        conversation.updated_at = func.now()
        db.flush()
        db.refresh(conversation)
    return conversation


@router.delete("/{conversation_id}", status_code=204, response_class=Response, responses=NOT_FOUND)
def delete_conversation(conversation_id: int, caller: CallerDep, db: SessionDep, state: StateDep) -> Response:
    with db.begin():
        conversation = own_conversation(db, caller.user.id, conversation_id)
        streaming = db.scalars(
            select(Message.id).where(
                Message.conversation_id == conversation_id, Message.status == "streaming"
            )
        ).all()
        db.delete(conversation)
    for message_id in streaming:
        _stop_locally(state, message_id)
    return Response(status_code=204)


@router.get("/{conversation_id}/messages", response_model=list[MessageOut], responses=NOT_FOUND)
def list_messages(conversation_id: int, caller: CallerDep, db: SessionDep, state: StateDep) -> list[Message]:
    with db.begin():
        own_conversation(db, caller.user.id, conversation_id)
        interrupt_orphaned_replies(db, state.settings.stale_after_s, conversation_id)
        return list(
            db.scalars(select(Message).where(Message.conversation_id == conversation_id).order_by(Message.id))
        )


@router.post("/{conversation_id}/stop", response_model=StopOut, responses=NOT_FOUND)
def stop_reply(conversation_id: int, caller: CallerDep, db: SessionDep, state: StateDep) -> StopOut:
    with db.begin():
        own_conversation(db, caller.user.id, conversation_id)
        flagged = db.scalars(
            update(Message)
            .where(Message.conversation_id == conversation_id, Message.status == "streaming")
            .values(stop_requested=True)
            .returning(Message.id)
        ).all()
    for message_id in flagged:
        _stop_locally(state, message_id)
    return StopOut(stopped=bool(flagged))


def _stop_locally(state: ZeusState, message_id: int) -> None:
    local = state.local_stops.get(message_id)
    if local is not None:
        local.set()


@dataclass(frozen=True)
class _PreparedReply:
    user_message_id: int | None
    assistant_message_id: int
    history: tuple[dict[str, str], ...]
    replaced_message_id: int | None = None


def _history(db: Session, conversation_id: int, before_id: int | None = None) -> list[dict[str, str]]:
    query = select(Message).where(Message.conversation_id == conversation_id).order_by(Message.id)
    if before_id is not None:
        query = query.where(Message.id < before_id)
    turns = []
    for message in db.scalars(query):
        # Failed replies carry no text worth showing the model; partial ones (stopped,
        # interrupted) are what the user saw, so they stay in the context.
        if message.role == "assistant" and (message.status == "error" or not message.content):
            continue
        turns.append({"role": message.role, "content": message.content})
    return turns


def _refuse_when_streaming(db: Session, conversation_id: int, stale_after_s: float) -> None:
    interrupt_orphaned_replies(db, stale_after_s, conversation_id)
    streaming = db.scalar(
        select(func.count()).where(Message.conversation_id == conversation_id, Message.status == "streaming")
    )
    if streaming:
        raise HTTPException(409, "a reply is still streaming in this conversation: stop it first")


def _prepare_new_message(
    state: ZeusState, user_id: int, conversation_id: int, content: str
) -> _PreparedReply:
    with transaction(state.sessions) as db:
        conversation = own_conversation(db, user_id, conversation_id)
        _refuse_when_streaming(db, conversation_id, state.settings.stale_after_s)
        history = _history(db, conversation_id)
        user_message = Message(
            conversation_id=conversation_id, role="user", content=content, status="complete"
        )
        reply = Message(
            conversation_id=conversation_id,
            role="assistant",
            content="",
            status="streaming",
            stream_run_id=state.run_id,
        )
        db.add_all([user_message, reply])
        if not conversation.title:
            conversation.title = " ".join(content.split())[:TITLE_LENGTH]
        conversation.updated_at = func.now()
        db.flush()
        return _PreparedReply(
            user_message_id=user_message.id,
            assistant_message_id=reply.id,
            history=(*history, {"role": "user", "content": content}),
        )


def _prepare_regeneration(state: ZeusState, user_id: int, conversation_id: int) -> _PreparedReply:
    with transaction(state.sessions) as db:
        conversation = own_conversation(db, user_id, conversation_id)
        _refuse_when_streaming(db, conversation_id, state.settings.stale_after_s)
        last = db.scalar(
            select(Message)
            .where(Message.conversation_id == conversation_id)
            .order_by(Message.id.desc())
            .limit(1)
        )
        replaced = last.id if last is not None and last.role == "assistant" else None
        history = _history(db, conversation_id, before_id=replaced)
        if not history or history[-1]["role"] != "user":
            raise HTTPException(409, "nothing to regenerate: the conversation has no user message to answer")
        reply = Message(
            conversation_id=conversation_id,
            role="assistant",
            content="",
            status="streaming",
            stream_run_id=state.run_id,
        )
        db.add(reply)
        conversation.updated_at = func.now()
        db.flush()
        return _PreparedReply(
            user_message_id=None,
            assistant_message_id=reply.id,
            history=tuple(history),
            replaced_message_id=replaced,
        )


def _discard(state: ZeusState, prepared: _PreparedReply) -> None:
    """The engine refused the request: undo the rows, the client was told to try again."""
    ids = [prepared.assistant_message_id]
    if prepared.user_message_id is not None:
        ids.append(prepared.user_message_id)
    with transaction(state.sessions) as db:
        db.execute(delete(Message).where(Message.id.in_(ids)))


def _delete_replaced(state: ZeusState, message_id: int) -> None:
    with transaction(state.sessions) as db:
        db.execute(delete(Message).where(Message.id == message_id))


def _flush_partial(state: ZeusState, message_id: int, text: str) -> bool:
    """Writes the text so far; returns whether someone asked to stop this reply."""
    with transaction(state.sessions) as db:
        stop = db.scalar(
            update(Message)
            .where(Message.id == message_id, Message.status == "streaming")
            .values(content=text, updated_at=func.now())
            .returning(Message.stop_requested)
        )
        return bool(stop)


def _save_final(
    state: ZeusState,
    message_id: int,
    conversation_id: int,
    text: str,
    status: str,
    result: GenerationResult | None,
    completion_tokens: int,
) -> None:
    with transaction(state.sessions) as db:
        db.execute(
            update(Message)
            .where(Message.id == message_id)
            .values(
                content=text,
                status=status,
                finish_reason=result.finish_reason if result else "cancelled",
                error=result.error if result else None,
                prompt_tokens=result.prompt_tokens if result else None,
                completion_tokens=result.completion_tokens if result else completion_tokens,
                updated_at=func.now(),
            )
        )
        db.execute(
            update(Conversation).where(Conversation.id == conversation_id).values(updated_at=func.now())
        )


def _sampling(state: ZeusState, options: GenerationOptions | None) -> SamplingParams:
    options = options or GenerationOptions()
    if options.max_tokens is not None and options.max_tokens > state.settings.max_new_tokens:
        raise HTTPException(
            400,
            f"options.max_tokens {options.max_tokens} is over the limit of {state.settings.max_new_tokens} "
            "(ZEUS_MAX_NEW_TOKENS)",
        )
    return SamplingParams(
        max_tokens=options.max_tokens or state.settings.max_new_tokens,
        temperature=CHAT_TEMPERATURE if options.temperature is None else options.temperature,
        top_p=CHAT_TOP_P if options.top_p is None else options.top_p,
        seed=options.seed,
        ignore_eos=options.ignore_eos,
    )


async def _start_reply(
    state: ZeusState,
    caller_user_id: int,
    api_key_id: int | None,
    conversation_id: int,
    prepared: _PreparedReply,
    params: SamplingParams,
) -> StreamingResponse:
    request = GenerationRequest(
        messages=prepared.history, params=params, request_id=f"msg-{prepared.assistant_message_id}"
    )
    try:
        generation = await Generation.submit(state, [request], UsageOwner(caller_user_id, api_key_id, "chat"))
    except HTTPException:
        await in_thread(_discard, state, prepared)
        raise
    submitted_at = time.monotonic()
    if prepared.replaced_message_id is not None:
        await in_thread(_delete_replaced, state, prepared.replaced_message_id)

    async def save(finished: Generation) -> None:
        # The serving layer runs this once, however the reply ended (the client gone included).
        choice = finished.choices[0]
        await in_thread(
            _save_final,
            state,
            prepared.assistant_message_id,
            conversation_id,
            choice.text,
            finished.status,
            choice.result,
            choice.generated_tokens,
        )

    generation.on_finish(save)
    return stream_response(_reply_events(state, prepared, generation, submitted_at), generation)


async def _reply_events(
    state: ZeusState, prepared: _PreparedReply, generation: Generation, submitted_at: float
) -> AsyncIterator[str]:
    message_id = prepared.assistant_message_id
    stop = asyncio.Event()
    state.local_stops[message_id] = stop

    async def flush_and_poll() -> None:
        interval = state.settings.stream_flush_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                if await in_thread(_flush_partial, state, message_id, generation.choices[0].text):
                    stop.set()
            except Exception as error:  # a database hiccup must not end the reply
                log.warning("partial reply %s not flushed: %s", message_id, error)
            if stop.is_set():
                generation.stop()
                return

    async def wait_for_stop() -> None:
        await stop.wait()
        generation.stop()

    flusher = asyncio.create_task(flush_and_poll())
    stopper = asyncio.create_task(wait_for_stop())
    try:
        yield sse("start", {"user_message_id": prepared.user_message_id, "assistant_message_id": message_id})
        async for _, delta in generation.deltas():
            if delta.text:
                yield sse("delta", {"text": delta.text})
    finally:
        flusher.cancel()
        stopper.cancel()
        state.local_stops.pop(message_id, None)
    if generation.status == "error":
        yield sse("error", {"status": "error", "message": generation.error_message})
        return
    choice = generation.choices[0]
    result = choice.result
    yield sse(
        "done",
        {
            "status": generation.status,
            "finish_reason": result.finish_reason if result else "cancelled",
            "prompt_tokens": result.prompt_tokens if result else None,
            "completion_tokens": choice.generated_tokens,
            "ttft_ms": round(result.ttft_s * 1000, 1) if result and result.ttft_s is not None else None,
            "duration_ms": round((time.monotonic() - submitted_at) * 1000, 1),
        },
    )


@router.post("/{conversation_id}/messages", responses=STREAM_RESPONSES, response_class=StreamingResponse)
async def send_message(
    conversation_id: int, body: MessageCreate, caller: CallerDep, state: StateDep
) -> StreamingResponse:
    # Validated before anything is written: a refused option must not leave a message behind.
    params = _sampling(state, body.options)
    prepared = await in_thread(_prepare_new_message, state, caller.user.id, conversation_id, body.content)
    return await _start_reply(state, caller.user.id, caller.api_key_id, conversation_id, prepared, params)


@router.post("/{conversation_id}/regenerate", responses=STREAM_RESPONSES, response_class=StreamingResponse)
async def regenerate_reply(
    conversation_id: int, caller: CallerDep, state: StateDep, body: RegenerateBody | None = None
) -> StreamingResponse:
    params = _sampling(state, body.options if body else None)
    prepared = await in_thread(_prepare_regeneration, state, caller.user.id, conversation_id)
    return await _start_reply(state, caller.user.id, caller.api_key_id, conversation_id, prepared, params)
