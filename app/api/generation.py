"""Submitting to the engine from a request: error mapping, usage rows and server-sent events,
shared by the chat routes and the OpenAI-compatible routes."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from fastapi import HTTPException
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.access import AdmittedStream, admit
from app.db import transaction
from app.inference.types import (
    EngineClosedError,
    EngineFullError,
    GenerationRequest,
    InvalidRequestError,
    PromptTooLongError,
)
from app.models import Usage
from app.state import ZeusState

log = logging.getLogger("zeus.generation")
T = TypeVar("T")


async def in_thread(function: Callable[..., T], *args: Any) -> T:
    """Runs blocking database work off the event loop."""
    return await anyio.to_thread.run_sync(function, *args)


async def in_thread_shielded(function: Callable[..., T], *args: Any) -> T:
    """For writes that must finish even when the request was cancelled (client went away)."""
    with anyio.CancelScope(shield=True):
        return await anyio.to_thread.run_sync(function, *args)


def submit(state: ZeusState, request: GenerationRequest):
    """engine.submit, with the engine's refusals turned into HTTP answers."""
    try:
        return state.engine.submit(request)
    except EngineFullError as error:
        state.metrics.rejected.labels("full").inc()
        raise HTTPException(
            429, f"server busy: {error}", {"Retry-After": str(max(1, error.retry_after_s))}
        ) from None
    except PromptTooLongError as error:
        state.metrics.rejected.labels("prompt_too_long").inc()
        raise HTTPException(
            400,
            f"prompt too long: {error.actual} tokens, the limit is {error.limit} tokens "
            "(ZEUS_MAX_INPUT_TOKENS or the model's context)",
        ) from None
    except InvalidRequestError as error:
        state.metrics.rejected.labels("invalid").inc()
        raise HTTPException(400, str(error)) from None
    except EngineClosedError as error:
        raise HTTPException(503, f"engine not accepting requests: {error}", {"Retry-After": "5"}) from None


async def admitted_submit(
    state: ZeusState, request: GenerationRequest, *, user_id: int, api_key_id: int | None
) -> AdmittedStream:
    """submit() once fair share and quotas let this caller in (app/access): 429 otherwise. The
    stream gives its admission back when it ends, is cancelled or its consumer leaves."""
    admission = await admit(state, user_id=user_id, api_key_id=api_key_id)
    return admission.start(lambda: submit(state, request))


def record_usage(
    state: ZeusState,
    *,
    user_id: int,
    api_key_id: int | None,
    source: str,
    status: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> None:
    try:
        with transaction(state.sessions) as db:
            db.add(
                Usage(
                    user_id=user_id,
                    api_key_id=api_key_id,
                    source=source,
                    status=status,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                )
            )
    except Exception as error:  # usage is bookkeeping: a database hiccup must not fail the reply
        log.warning("usage row not written: %s", error)


# Python's str.splitlines(), and so httpx's iter_lines(), also breaks lines at these characters,
# which SSE does not: left raw inside a JSON string they cut an event in two for such clients (a
# model's text can contain them). JSON allows them escaped; the decoded text is the same.
_SPLITLINES_BREAKS_ESCAPED = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(event: str | None, data: Any) -> str:
    """One server-sent event; `data` other than a string is sent as JSON on one line."""
    if isinstance(data, str):
        payload = data
    else:
        payload = json.dumps(data, ensure_ascii=False).translate(_SPLITLINES_BREAKS_ESCAPED)
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {payload}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class GuardedStreamingResponse(StreamingResponse):
    """Runs `on_close` after the response in every case. A client that leaves before the body
    generator takes its first step cancels it unstarted, and then the generator's own `finally`
    never runs: without this, its generation would hold a batch slot until max_tokens."""

    def __init__(
        self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]], **options: Any
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS, **options)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_close()
