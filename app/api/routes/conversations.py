"""Conversations and their messages; replies stream as server-sent events.

Each turn sends the model the conversation's system prompt, then the newest turns that fit the
prompt budget (ZEUS_MAX_INPUT_TOKENS and the model's context less the reply's max_tokens); older
turns stay stored and shown, and the conversation records where the model's memory begins. A new
message too long on its own is refused before anything is stored.

Nothing is lost: the user's message is committed before generation starts, and the reply row
(status `streaming`) receives its partial text every ZEUS_STREAM_FLUSH_INTERVAL_S, so an instance
killed mid-reply loses at most that much. The same write reads the stop flag, so a stop sent to
any instance reaches the one streaming.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session

from app.api.deps import AdminDep, CallerDep, SessionDep, StateDep
from app.api.errors import COMMON_RESPONSES, ErrorBody
from app.api.generation import (
    GuardedStreamingResponse,
    admitted_submit,
    in_thread,
    in_thread_shielded,
    record_usage,
    sse,
)
from app.api.schemas import (
    ChatDefaults,
    ConversationCreate,
    ConversationOut,
    ConversationUpdate,
    GenerationOptions,
    MessageCreate,
    MessageOut,
    RegenerateBody,
    SearchMatch,
    StopOut,
)
from app.db import transaction
from app.inference.types import GenerationRequest, GenerationResult, SamplingParams, TextDelta
from app.models import (
    MESSAGE_SEARCH_VECTOR,
    SEARCH_CONFIG,
    TITLE_SEARCH_VECTOR,
    Conversation,
    Message,
    SiteSetting,
)
from app.state import ZeusState
from app.telemetry.heartbeat import interrupt_orphaned_replies

log = logging.getLogger("zeus.chat")
router = APIRouter(prefix="/api/conversations", tags=["conversations"], responses=COMMON_RESPONSES)
admin_router = APIRouter(prefix="/api/admin", tags=["admin"], responses=COMMON_RESPONSES)
NOT_FOUND = {404: {"model": ErrorBody, "description": "no such conversation of yours"}}
REFUSED_SETTING = {
    400: {"model": ErrorBody, "description": "max_tokens over ZEUS_MAX_NEW_TOKENS, or an empty title"}
}
STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "events start, delta..., then done or error",
    },
    400: {"model": ErrorBody, "description": "message too long for the model, or a refused option"},
    409: {"model": ErrorBody, "description": "a reply is already streaming"},
    429: {"model": ErrorBody, "description": "engine full; see Retry-After"},
    **NOT_FOUND,
}
TITLE_LENGTH = 60
CHAT_TEMPERATURE = 0.7
CHAT_TOP_P = 0.95
DEFAULT_SYSTEM_PROMPT_KEY = "default_system_prompt"
SEARCH_CONVERSATIONS = 50
SEARCH_MATCHES_PER_CONVERSATION = 5
# Around the matched words of a search snippet; control characters never appear in chat text the
# page shows, so they cannot be confused with it, and the page draws them as <mark>.
MATCH_START, MATCH_END = "\x02", "\x03"
EXPORT_FORMATS = Literal["markdown", "json"]


def own_conversation(db: Session, user_id: int, conversation_id: int) -> Conversation:
    conversation = db.get(Conversation, conversation_id)
    # Someone else's conversation answers exactly like a missing one: ids reveal nothing.
    if conversation is None or conversation.user_id != user_id:
        raise HTTPException(404, f"conversation {conversation_id} not found")
    return conversation


def default_system_prompt(db: Session) -> str:
    setting = db.get(SiteSetting, DEFAULT_SYSTEM_PROMPT_KEY)
    return setting.value if setting is not None else ""


@router.get("/defaults", response_model=ChatDefaults)
def chat_defaults(caller: CallerDep, db: SessionDep) -> ChatDefaults:
    """What a new conversation starts with (set by an admin: PUT /api/admin/chat-defaults)."""
    return ChatDefaults(default_system_prompt=default_system_prompt(db))


@admin_router.put("/chat-defaults", response_model=ChatDefaults)
def set_chat_defaults(body: ChatDefaults, caller: AdminDep, db: SessionDep) -> ChatDefaults:
    """The system prompt of conversations created from now on; existing ones keep theirs."""
    with db.begin():
        setting = db.get(SiteSetting, DEFAULT_SYSTEM_PROMPT_KEY)
        if setting is None:
            db.add(SiteSetting(key=DEFAULT_SYSTEM_PROMPT_KEY, value=body.default_system_prompt))
        else:
            setting.value = body.default_system_prompt
            setting.updated_at = func.now()
    return body


@router.get("", response_model=list[ConversationOut])
def list_conversations(
    caller: CallerDep,
    db: SessionDep,
    q: Annotated[
        str | None,
        Query(
            max_length=200,
            description="search one's titles and messages (web search syntax: words, "
            '"a phrase", -not, or); each result lists its matching messages',
        ),
    ] = None,
) -> list[Conversation] | list[ConversationOut]:
    if q is not None and q.strip():
        return _search(db, caller.user.id, q.strip())
    query = (
        select(Conversation)
        .where(Conversation.user_id == caller.user.id)
        .order_by(Conversation.updated_at.desc(), Conversation.id.desc())
    )
    return list(db.scalars(query))


def _search(db: Session, user_id: int, q: str) -> list[ConversationOut]:
    """PostgreSQL full-text search; both expressions match the GIN indexes of app/models.py."""
    parameters = {"user_id": user_id, "q": q.replace("\x00", ""), "limit": SEARCH_CONVERSATIONS}
    query = f"websearch_to_tsquery('{SEARCH_CONFIG}'::regconfig, :q)"
    matching_messages = db.execute(
        text(
            f"""
            SELECT m.id, m.conversation_id, m.role,
                   ts_headline('{SEARCH_CONFIG}'::regconfig, m.content, {query},
                               'StartSel=' || chr(2) || ', StopSel=' || chr(3) ||
                               ', MaxWords=24, MinWords=8, MaxFragments=1')
            FROM messages m JOIN conversations c ON c.id = m.conversation_id
            WHERE c.user_id = :user_id AND {MESSAGE_SEARCH_VECTOR.replace("content", "m.content")} @@ {query}
            ORDER BY m.id DESC
            LIMIT 500
            """
        ),
        parameters,
    ).all()
    matches: dict[int, list[SearchMatch]] = {}
    for message_id, conversation_id, role, snippet in matching_messages:
        found = matches.setdefault(conversation_id, [])
        if len(found) < SEARCH_MATCHES_PER_CONVERSATION:
            found.insert(0, SearchMatch(message_id=message_id, role=role, snippet=snippet))
    title_ids = db.scalars(
        text(f"SELECT id FROM conversations WHERE user_id = :user_id AND {TITLE_SEARCH_VECTOR} @@ {query}"),
        parameters,
    ).all()
    ids = set(matches) | set(title_ids)
    if not ids:
        return []
    conversations = db.scalars(
        select(Conversation)
        .where(Conversation.id.in_(ids))
        .order_by(Conversation.updated_at.desc(), Conversation.id.desc())
        .limit(SEARCH_CONVERSATIONS)
    )
    results = []
    for conversation in conversations:
        result = ConversationOut.model_validate(conversation)
        result.matches = matches.get(conversation.id, [])
        results.append(result)
    return results


@router.post("", response_model=ConversationOut, status_code=201, responses=REFUSED_SETTING)
def create_conversation(
    body: ConversationCreate, caller: CallerDep, db: SessionDep, state: StateDep
) -> Conversation:
    _check_max_tokens(state, body.max_tokens)
    with db.begin():
        conversation = Conversation(
            user_id=caller.user.id,
            title=(body.title or "").strip(),
            system_prompt=body.system_prompt if body.system_prompt is not None else default_system_prompt(db),
            temperature=body.temperature,
            max_tokens=body.max_tokens,
        )
        db.add(conversation)
        db.flush()
        db.refresh(conversation)
    return conversation


@router.delete("", status_code=204, response_class=Response)
def delete_all_conversations(caller: CallerDep, db: SessionDep, state: StateDep) -> Response:
    """Deletes every conversation of the caller, with their messages; replies streaming stop."""
    with db.begin():
        streaming = db.scalars(
            select(Message.id)
            .join(Conversation, Conversation.id == Message.conversation_id)
            .where(Conversation.user_id == caller.user.id, Message.status == "streaming")
        ).all()
        db.execute(delete(Conversation).where(Conversation.user_id == caller.user.id))
    for message_id in streaming:
        _stop_locally(state, message_id)
    return Response(status_code=204)


def _check_max_tokens(state: ZeusState, max_tokens: int | None) -> None:
    if max_tokens is not None and max_tokens > state.settings.max_new_tokens:
        raise HTTPException(
            400,
            f"max_tokens {max_tokens} is over the limit of {state.settings.max_new_tokens} "
            "(ZEUS_MAX_NEW_TOKENS)",
        )


@router.patch(
    "/{conversation_id}", response_model=ConversationOut, responses={**NOT_FOUND, **REFUSED_SETTING}
)
def update_conversation(
    conversation_id: int, body: ConversationUpdate, caller: CallerDep, db: SessionDep, state: StateDep
) -> Conversation:
    """Changes the title, system prompt, temperature or max_tokens: only the fields sent."""
    _check_max_tokens(state, body.max_tokens)
    sent = body.model_fields_set
    with db.begin():
        conversation = own_conversation(db, caller.user.id, conversation_id)
        if "title" in sent:
            if body.title is None or not body.title.strip():
                raise HTTPException(400, "title must not be empty")
            conversation.title = body.title.strip()
        if "system_prompt" in sent:
            conversation.system_prompt = body.system_prompt or ""
        if "temperature" in sent:
            conversation.temperature = body.temperature
        if "max_tokens" in sent:
            conversation.max_tokens = body.max_tokens
        conversation.updated_at = func.now()
        db.flush()
        db.refresh(conversation)
    return conversation


EXPORT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/markdown": {"schema": {"type": "string"}}, "application/json": {"schema": {}}},
        "description": "the conversation as a download",
    },
    **NOT_FOUND,
}


@router.get("/{conversation_id}/export", response_class=Response, responses=EXPORT_RESPONSES)
def export_conversation(
    conversation_id: int,
    caller: CallerDep,
    db: SessionDep,
    format: Annotated[EXPORT_FORMATS, Query(description="markdown or json")] = "markdown",
) -> Response:
    """The whole conversation (every stored message, with its status) as a file to keep."""
    with db.begin():
        conversation = own_conversation(db, caller.user.id, conversation_id)
        messages = list(
            db.scalars(select(Message).where(Message.conversation_id == conversation_id).order_by(Message.id))
        )
    stem = f"zeus-conversation-{conversation_id}"
    if format == "json":
        document = {
            "id": conversation.id,
            "title": conversation.title,
            "created_at": conversation.created_at.isoformat(),
            "updated_at": conversation.updated_at.isoformat(),
            "system_prompt": conversation.system_prompt,
            "temperature": conversation.temperature,
            "max_tokens": conversation.max_tokens,
            "messages": [MessageOut.model_validate(message).model_dump(mode="json") for message in messages],
        }
        return Response(
            json.dumps(document, ensure_ascii=False, indent=2),
            media_type="application/json",
            headers={"Content-Disposition": f'attachment; filename="{stem}.json"'},
        )
    return Response(
        _markdown_export(conversation, messages),
        media_type="text/markdown; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{stem}.md"'},
    )


def _markdown_export(conversation: Conversation, messages: list[Message]) -> str:
    exported = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# {conversation.title or 'Untitled'}", "", f"_Exported from Zeus on {exported}._", ""]
    if conversation.system_prompt:
        lines += ["## System prompt", "", conversation.system_prompt, ""]
    for message in messages:
        author = "You" if message.role == "user" else "Zeus" if message.role == "assistant" else message.role
        status = "" if message.status == "complete" else f" ({message.status})"
        stamp = message.created_at.strftime("%Y-%m-%d %H:%M UTC")
        lines += [f"## {author}{status} · {stamp}", "", message.content, ""]
    return "\n".join(lines)


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
    params: SamplingParams
    # Once the engine accepted the request: messages from this id on (but the new reply) go, and
    # an edited user message takes its new text. A refused request changes neither.
    replace_from_id: int | None = None
    edited: tuple[int, str] | None = None


@dataclass(frozen=True)
class _Turn:
    message_id: int | None
    role: str
    content: str


def _history(db: Session, conversation_id: int, before_id: int | None = None) -> list[_Turn]:
    query = select(Message).where(Message.conversation_id == conversation_id).order_by(Message.id)
    if before_id is not None:
        query = query.where(Message.id < before_id)
    turns = []
    for message in db.scalars(query):
        # Failed replies carry no text worth showing the model; partial ones (stopped,
        # interrupted) are what the user saw, so they stay in the context.
        if message.role == "assistant" and (message.status == "error" or not message.content):
            continue
        turns.append(_Turn(message.id, message.role, message.content))
    return turns


def _fit_history(
    state: ZeusState, system_prompt: str, turns: list[_Turn], params: SamplingParams
) -> tuple[tuple[dict[str, str], ...], int]:
    """The messages to send: the system prompt, then the newest turns whose prompt fits the
    budget; and the index in `turns` of the oldest turn kept (0 when every turn fits).

    Budget, in tokens: ZEUS_MAX_INPUT_TOKENS, and the model's context less params.max_tokens. The
    kept history starts at a user message. Raises 400 when the last turn (the new message) does
    not fit on its own beside the system prompt, naming the limit and its size."""
    engine = state.engine
    budget = min(state.settings.max_input_tokens, max(engine.context_length - params.max_tokens, 0))
    system = ({"role": "system", "content": system_prompt},) if system_prompt.strip() else ()

    def messages_from(start: int) -> tuple[dict[str, str], ...]:
        return (*system, *({"role": turn.role, "content": turn.content} for turn in turns[start:]))

    def tokens_from(start: int) -> int:
        return engine.count_prompt_tokens(GenerationRequest(messages=messages_from(start), params=params))

    # The common case costs one count: everything fits.
    if tokens_from(0) <= budget:
        return messages_from(0), 0
    starts = [index for index, turn in enumerate(turns) if turn.role == "user" and index > 0]
    alone = len(turns) - 1
    if not starts or starts[-1] != alone:
        starts.append(alone)
    size = tokens_from(alone)
    if size > budget:
        raise HTTPException(
            400,
            f"prompt too long: {size} tokens for this message alone (with the system prompt), "
            f"the limit is {budget} tokens (ZEUS_MAX_INPUT_TOKENS {state.settings.max_input_tokens}, "
            f"the model's context {engine.context_length} less max_tokens {params.max_tokens}): "
            "shorten it or split it",
        )
    # Fewer turns, fewer tokens: the earliest start that fits, by bisection.
    low, high = 0, len(starts) - 1
    while low < high:
        middle = (low + high) // 2
        if tokens_from(starts[middle]) <= budget:
            high = middle
        else:
            low = middle + 1
    start = starts[low]
    return messages_from(start), start


def _memory_start(turns: list[_Turn], start: int, new_message_id: int) -> int | None:
    """What the conversation records as the start of the model's memory (None: all of it)."""
    if start == 0:
        return None
    return turns[start].message_id or new_message_id


def _refuse_when_streaming(db: Session, conversation_id: int, stale_after_s: float) -> None:
    interrupt_orphaned_replies(db, stale_after_s, conversation_id)
    streaming = db.scalar(
        select(func.count()).where(Message.conversation_id == conversation_id, Message.status == "streaming")
    )
    if streaming:
        raise HTTPException(409, "a reply is still streaming in this conversation: stop it first")


def _new_reply(db: Session, state: ZeusState, conversation: Conversation) -> Message:
    reply = Message(
        conversation_id=conversation.id,
        role="assistant",
        content="",
        status="streaming",
        stream_run_id=state.run_id,
    )
    db.add(reply)
    conversation.updated_at = func.now()
    return reply


def _prepare_new_message(
    state: ZeusState, user_id: int, conversation_id: int, content: str, options: GenerationOptions | None
) -> _PreparedReply:
    with transaction(state.sessions) as db:
        conversation = own_conversation(db, user_id, conversation_id)
        _refuse_when_streaming(db, conversation_id, state.settings.stale_after_s)
        params = _sampling(state, options, conversation)
        turns = [*_history(db, conversation_id), _Turn(None, "user", content)]
        # Fitted before anything is written: a refused message leaves no row behind.
        history, start = _fit_history(state, conversation.system_prompt, turns, params)
        user_message = Message(
            conversation_id=conversation_id, role="user", content=content, status="complete"
        )
        db.add(user_message)
        reply = _new_reply(db, state, conversation)
        if not conversation.title:
            conversation.title = " ".join(content.split())[:TITLE_LENGTH]
        db.flush()
        conversation.context_start_message_id = _memory_start(turns, start, user_message.id)
        return _PreparedReply(
            user_message_id=user_message.id,
            assistant_message_id=reply.id,
            history=history,
            params=params,
        )


def _prepare_regeneration(
    state: ZeusState,
    user_id: int,
    conversation_id: int,
    message_id: int | None,
    options: GenerationOptions | None,
) -> _PreparedReply:
    with transaction(state.sessions) as db:
        conversation = own_conversation(db, user_id, conversation_id)
        _refuse_when_streaming(db, conversation_id, state.settings.stale_after_s)
        if message_id is None:
            last = db.scalar(
                select(Message)
                .where(Message.conversation_id == conversation_id)
                .order_by(Message.id.desc())
                .limit(1)
            )
            replaced = last.id if last is not None and last.role == "assistant" else None
        else:
            target = db.get(Message, message_id)
            if target is None or target.conversation_id != conversation_id or target.role != "assistant":
                raise HTTPException(404, f"no reply {message_id} in conversation {conversation_id}")
            replaced = target.id
        params = _sampling(state, options, conversation)
        turns = _history(db, conversation_id, before_id=replaced)
        if not turns or turns[-1].role != "user":
            raise HTTPException(409, "nothing to regenerate: the conversation has no user message to answer")
        history, start = _fit_history(state, conversation.system_prompt, turns, params)
        conversation.context_start_message_id = _memory_start(turns, start, 0)
        reply = _new_reply(db, state, conversation)
        db.flush()
        return _PreparedReply(
            user_message_id=None,
            assistant_message_id=reply.id,
            history=history,
            params=params,
            replace_from_id=replaced,
        )


def _prepare_edit(
    state: ZeusState,
    user_id: int,
    conversation_id: int,
    message_id: int,
    content: str,
    options: GenerationOptions | None,
) -> _PreparedReply:
    with transaction(state.sessions) as db:
        conversation = own_conversation(db, user_id, conversation_id)
        _refuse_when_streaming(db, conversation_id, state.settings.stale_after_s)
        target = db.get(Message, message_id)
        if target is None or target.conversation_id != conversation_id or target.role != "user":
            raise HTTPException(404, f"no message {message_id} of yours in conversation {conversation_id}")
        params = _sampling(state, options, conversation)
        turns = [*_history(db, conversation_id, before_id=message_id), _Turn(message_id, "user", content)]
        history, start = _fit_history(state, conversation.system_prompt, turns, params)
        conversation.context_start_message_id = _memory_start(turns, start, message_id)
        reply = _new_reply(db, state, conversation)
        db.flush()
        return _PreparedReply(
            user_message_id=message_id,
            assistant_message_id=reply.id,
            history=history,
            params=params,
            replace_from_id=message_id + 1,
            edited=(message_id, content),
        )


def _discard(state: ZeusState, prepared: _PreparedReply) -> None:
    """The engine refused the request: undo the rows, the client was told to try again."""
    ids = [prepared.assistant_message_id]
    if prepared.user_message_id is not None and prepared.edited is None:
        ids.append(prepared.user_message_id)
    with transaction(state.sessions) as db:
        db.execute(delete(Message).where(Message.id.in_(ids)))


def _replace_later_turns(state: ZeusState, conversation_id: int, prepared: _PreparedReply) -> None:
    with transaction(state.sessions) as db:
        if prepared.edited is not None:
            message_id, content = prepared.edited
            db.execute(
                update(Message).where(Message.id == message_id).values(content=content, updated_at=func.now())
            )
        db.execute(
            delete(Message).where(
                Message.conversation_id == conversation_id,
                Message.id >= prepared.replace_from_id,
                Message.id != prepared.assistant_message_id,
            )
        )


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


def _sampling(
    state: ZeusState, options: GenerationOptions | None, conversation: Conversation
) -> SamplingParams:
    """The conversation's settings, overridden by options sent with this one message."""
    options = options or GenerationOptions()
    max_tokens = options.max_tokens or conversation.max_tokens
    if max_tokens is not None and max_tokens > state.settings.max_new_tokens:
        raise HTTPException(
            400,
            f"options.max_tokens {max_tokens} is over the limit of {state.settings.max_new_tokens} "
            "(ZEUS_MAX_NEW_TOKENS)",
        )
    temperature = options.temperature if options.temperature is not None else conversation.temperature
    return SamplingParams(
        max_tokens=max_tokens or state.settings.max_new_tokens,
        temperature=CHAT_TEMPERATURE if temperature is None else temperature,
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
) -> StreamingResponse:
    request = GenerationRequest(
        messages=prepared.history, params=prepared.params, request_id=f"msg-{prepared.assistant_message_id}"
    )
    try:
        stream = await admitted_submit(state, request, user_id=caller_user_id, api_key_id=api_key_id)
    except HTTPException:
        await in_thread(_discard, state, prepared)
        raise
    submitted_at = time.monotonic()
    if prepared.replace_from_id is not None:
        await in_thread(_replace_later_turns, state, conversation_id, prepared)
    started = asyncio.Event()
    events = _reply_events(
        state, caller_user_id, api_key_id, conversation_id, prepared, stream, submitted_at, started
    )

    async def close() -> None:
        stream.cancel()
        if not started.is_set():  # the client left first: record the outcome the generator could not
            try:
                await in_thread(
                    _save_final, state, prepared.assistant_message_id, conversation_id, "", "stopped", None, 0
                )
            except Exception as error:
                log.warning("reply %s not saved: %s", prepared.assistant_message_id, error)

    return GuardedStreamingResponse(events, close)


async def _reply_events(
    state: ZeusState,
    user_id: int,
    api_key_id: int | None,
    conversation_id: int,
    prepared: _PreparedReply,
    stream: Any,
    submitted_at: float,
    started: asyncio.Event,
) -> AsyncIterator[str]:
    started.set()
    message_id = prepared.assistant_message_id
    stop = asyncio.Event()
    state.local_stops[message_id] = stop
    pieces: list[str] = []
    completion_tokens = 0
    result: GenerationResult | None = None
    failure: str | None = None

    async def flush_and_poll() -> None:
        interval = state.settings.stream_flush_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                if await in_thread(_flush_partial, state, message_id, "".join(pieces)):
                    stop.set()
            except Exception as error:  # a database hiccup must not end the reply
                log.warning("partial reply %s not flushed: %s", message_id, error)
            if stop.is_set():
                stream.cancel()
                return

    async def wait_for_stop() -> None:
        await stop.wait()
        stream.cancel()

    flusher = asyncio.create_task(flush_and_poll())
    stopper = asyncio.create_task(wait_for_stop())
    try:
        yield sse("start", {"user_message_id": prepared.user_message_id, "assistant_message_id": message_id})
        async for item in stream:
            if isinstance(item, TextDelta):
                pieces.append(item.text)
                completion_tokens += item.token_count
                if item.text:
                    yield sse("delta", {"text": item.text})
            elif isinstance(item, GenerationResult):
                result = item
    except asyncio.CancelledError:
        failure = "client disconnected"
        raise
    except Exception as error:
        log.error("reply %s failed", message_id, exc_info=error)
        failure = f"generation failed: {type(error).__name__}"
    finally:
        flusher.cancel()
        stopper.cancel()
        stream.cancel()
        state.local_stops.pop(message_id, None)
        text = "".join(pieces)
        if result is not None and result.text:
            text = result.text
        if failure and failure != "client disconnected":
            status = "error"
        elif stop.is_set() or failure or result is None or result.finish_reason == "cancelled":
            status = "stopped"
        elif result.finish_reason == "error":
            status = "error"
        else:
            status = "complete"
        try:
            await in_thread_shielded(
                _save_final, state, message_id, conversation_id, text, status, result, completion_tokens
            )
        except Exception as error:  # the heartbeat sweep marks it interrupted; the text flushed so far stays
            log.warning("reply %s not saved: %s", message_id, error)
        await in_thread_shielded(
            lambda: record_usage(
                state,
                user_id=user_id,
                api_key_id=api_key_id,
                source="chat",
                status=status,
                prompt_tokens=result.prompt_tokens if result else 0,
                completion_tokens=result.completion_tokens if result else completion_tokens,
            )
        )
    if status == "error":
        message = failure or (result.error if result else None) or "generation failed"
        yield sse("error", {"status": "error", "message": message})
        return
    yield sse(
        "done",
        {
            "status": status,
            "finish_reason": result.finish_reason if result else "cancelled",
            "prompt_tokens": result.prompt_tokens if result else None,
            "completion_tokens": result.completion_tokens if result else completion_tokens,
            "ttft_ms": round(result.ttft_s * 1000, 1) if result and result.ttft_s is not None else None,
            "duration_ms": round((time.monotonic() - submitted_at) * 1000, 1),
        },
    )


@router.post("/{conversation_id}/messages", responses=STREAM_RESPONSES, response_class=StreamingResponse)
async def send_message(
    conversation_id: int, body: MessageCreate, caller: CallerDep, state: StateDep
) -> StreamingResponse:
    prepared = await in_thread(
        _prepare_new_message, state, caller.user.id, conversation_id, body.content, body.options
    )
    return await _start_reply(state, caller.user.id, caller.api_key_id, conversation_id, prepared)


@router.put(
    "/{conversation_id}/messages/{message_id}", responses=STREAM_RESPONSES, response_class=StreamingResponse
)
async def edit_message(
    conversation_id: int, message_id: int, body: MessageCreate, caller: CallerDep, state: StateDep
) -> StreamingResponse:
    """Edits one of your messages and answers it again: every later message is replaced by the
    new reply (streamed like POST .../messages). A refused request changes nothing."""
    prepared = await in_thread(
        _prepare_edit, state, caller.user.id, conversation_id, message_id, body.content, body.options
    )
    return await _start_reply(state, caller.user.id, caller.api_key_id, conversation_id, prepared)


@router.post("/{conversation_id}/regenerate", responses=STREAM_RESPONSES, response_class=StreamingResponse)
async def regenerate_reply(
    conversation_id: int, caller: CallerDep, state: StateDep, body: RegenerateBody | None = None
) -> StreamingResponse:
    """Writes a reply again: the last one, or body.message_id (and every later message goes)."""
    prepared = await in_thread(
        _prepare_regeneration,
        state,
        caller.user.id,
        conversation_id,
        body.message_id if body else None,
        body.options if body else None,
    )
    return await _start_reply(state, caller.user.id, caller.api_key_id, conversation_id, prepared)
