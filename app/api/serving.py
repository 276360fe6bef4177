"""One generation lifecycle for both doors (the chat routes and the OpenAI-compatible routes):
submit to the engine, consume the stream, classify the outcome, record usage, and handle a
client that leaves. The routes only turn what comes out into their own events.

    generation = await Generation.submit(state, requests, owner)  # ApiError (400/429/503)
    async for index, delta in generation.deltas(): ...       # streamed: merged across choices
    await generation.collect(request)                        # not streamed: watches for a disconnect
    stream_response(events, generation)                      # SSE that always closes the generation

Whatever path the request takes (finished, stopped by the user, the client gone before or after
the first byte, an engine error, an exception in the route), `finish()` runs exactly once: it
cancels what still runs, settles `status` by one rule (`usage_status`) and writes one usage row,
then runs the route's own `on_finish` hooks (the chat routes save the reply there).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.access import admit
from app.api.errors import ApiError
from app.db import transaction
from app.inference.stream import RequestStream
from app.inference.types import (
    EngineClosedError,
    EngineFullError,
    GenerationRequest,
    GenerationResult,
    InvalidRequestError,
    PromptTooLongError,
    TextDelta,
    TokenLogprob,
)
from app.models import Usage
from app.state import ZeusState

log = logging.getLogger("zeus.serving")
T = TypeVar("T")
UsageStatus = Literal["complete", "stopped", "error"]
# A non-streamed answer has no body to write into until the end: the only way to notice that its
# client left is to ask the server now and then.
DISCONNECT_POLL_S = 0.5


async def in_thread(function: Callable[..., T], *args: Any) -> T:
    """Runs blocking database work off the event loop."""
    return await anyio.to_thread.run_sync(function, *args)


async def in_thread_shielded(function: Callable[..., T], *args: Any) -> T:
    """For writes that must finish even when the request was cancelled (client went away)."""
    with anyio.CancelScope(shield=True):
        return await anyio.to_thread.run_sync(function, *args)


def usage_status(result: GenerationResult | None, *, failed: bool, stopped: bool) -> UsageStatus:
    """The one rule, for usage rows and chat replies alike: an error anywhere is "error"; a
    generation that did not run to its own end (stopped by the user, the client gone, cancelled,
    no result) is "stopped"; else "complete"."""
    if failed or (result is not None and result.finish_reason == "error"):
        return "error"
    if stopped or result is None or result.finish_reason == "cancelled":
        return "stopped"
    return "complete"


@dataclass(frozen=True)
class UsageOwner:
    """Whom the usage row is charged to, and through which door ("chat" or "openai")."""

    user_id: int
    api_key_id: int | None
    source: str


@dataclass
class ChoiceState:
    """One submission's output so far, and its final record once it ended."""

    index: int
    stream: RequestStream
    # Choices of one prompt share it: its tokens count once (legacy completions take several prompts).
    prompt_group: int = 0
    pieces: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    completion_tokens: int = 0
    result: GenerationResult | None = None

    @property
    def text(self) -> str:
        if self.result is not None and self.result.text:
            return self.result.text
        return "".join(self.pieces)

    @property
    def prompt_tokens(self) -> int:
        return self.result.prompt_tokens if self.result else self.stream.prompt_tokens

    @property
    def generated_tokens(self) -> int:
        return self.result.completion_tokens if self.result else self.completion_tokens

    def take(self, item: TextDelta | GenerationResult) -> TextDelta | None:
        if isinstance(item, GenerationResult):
            self.result = item
            return None
        self.pieces.append(item.text)
        self.logprobs.extend(item.logprobs)
        self.completion_tokens += item.token_count
        return item


def submit_one(state: ZeusState, request: GenerationRequest) -> RequestStream:
    """engine.submit, with the engine's refusals turned into HTTP answers."""
    try:
        return state.engine.submit(request)
    except EngineFullError as error:
        state.metrics.reject("full")
        raise ApiError(
            429,
            f"server busy: {error}",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(max(1, error.retry_after_s))},
        ) from None
    except PromptTooLongError as error:
        state.metrics.reject("prompt_too_long")
        raise ApiError(
            400,
            # "maximum context length" is the phrase clients search for when the code is missing.
            f"prompt too long: {error.actual} tokens, the limit is {error.limit} tokens "
            f"(ZEUS_MAX_INPUT_TOKENS or the model's maximum context length): {error}",
            param="messages" if request.messages is not None else "prompt",
            code="context_length_exceeded",
        ) from None
    except InvalidRequestError as error:
        state.metrics.reject("invalid")
        raise ApiError(400, str(error), param=error.param, code="invalid_value") from None
    except EngineClosedError as error:
        raise ApiError(503, f"engine not accepting requests: {error}", headers={"Retry-After": "5"}) from None


class Generation:
    """The n submissions of one request, from submit to the usage row (see the module docstring)."""

    def __init__(
        self,
        state: ZeusState,
        owner: UsageOwner,
        streams: list[RequestStream],
        prompt_groups: list[int] | None = None,
    ) -> None:
        self.state = state
        self.owner = owner
        groups = prompt_groups or [0] * len(streams)
        self.choices = [ChoiceState(index, stream, groups[index]) for index, stream in enumerate(streams)]
        self.status: UsageStatus | None = None
        # Why it failed, when an exception (not the engine's own result) ended it.
        self.failure: str | None = None
        self.stop_requested = False
        self.client_left = False
        self._finished = False
        self._finish_lock = asyncio.Lock()
        self._on_finish: list[Callable[[Generation], Awaitable[None]]] = []

    @classmethod
    async def submit(
        cls,
        state: ZeusState,
        requests: list[GenerationRequest],
        owner: UsageOwner,
        prompt_groups: list[int] | None = None,
    ) -> Generation:
        """Submits every request or none: when one is refused, those already queued are cancelled
        and the refusal is raised (an ApiError). prompt_groups[i]: which prompt request i answers
        (choices of one prompt count its tokens once). Async so that an admission step (fair
        share, quotas) may wait here before each submission."""
        streams: list[RequestStream] = []
        try:
            for request in requests:
                # Fair share and quotas (app/access): 429 over a limit; may wait, in turn with other
                # users, for a batch slot. The admission is given back when the stream ends.
                admission = await admit(state, user_id=owner.user_id, api_key_id=owner.api_key_id)
                streams.append(admission.start(lambda request=request: submit_one(state, request)))
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        return cls(state, owner, streams, prompt_groups)

    def on_finish(self, hook: Callable[[Generation], Awaitable[None]]) -> None:
        """Runs after the usage row, once, whatever ended the generation; errors are logged."""
        self._on_finish.append(hook)

    def stop(self) -> None:
        """The user asked to stop: what was generated is kept, the status is "stopped"."""
        self.stop_requested = True
        self._cancel()

    def _cancel(self) -> None:
        for choice in self.choices:
            choice.stream.cancel()

    @property
    def prompt_tokens(self) -> int:
        # The n choices of a prompt share it: counted once, as OpenAI's usage does.
        per_prompt: dict[int, int] = {}
        for choice in self.choices:
            per_prompt[choice.prompt_group] = max(
                per_prompt.get(choice.prompt_group, 0), choice.prompt_tokens
            )
        return sum(per_prompt.values())

    @property
    def completion_tokens(self) -> int:
        return sum(choice.generated_tokens for choice in self.choices)

    @property
    def error_message(self) -> str:
        for choice in self.choices:
            if choice.result is not None and choice.result.finish_reason == "error":
                return choice.result.error or "generation failed"
        return self.failure or "generation failed"

    async def deltas(self) -> AsyncIterator[tuple[int, TextDelta]]:
        """(choice index, delta) as they come, every choice interleaved; ends when all ended.
        An exception in the engine's stream ends it too (status "error", logged); the client
        leaving (cancellation) stops it. finish() has run when the iteration is over."""
        try:
            if len(self.choices) == 1:
                choice = self.choices[0]
                async for item in choice.stream:
                    delta = choice.take(item)
                    if delta is not None:
                        yield 0, delta
            else:
                async for index, item in _merged(self.choices):
                    delta = self.choices[index].take(item)
                    if delta is not None:
                        yield index, delta
        except (asyncio.CancelledError, GeneratorExit):
            self.client_left = True
            raise
        except Exception as error:
            log.error("generation %s failed", self.choices[0].stream.request_id, exc_info=error)
            self.failure = f"generation failed: {type(error).__name__}"
        finally:
            await self.finish()

    async def collect(self, request: Request | None = None) -> None:
        """Consumes every choice to its end (not streamed). With `request`, a client that leaves
        meanwhile cancels the generation instead of letting it run to max_tokens."""

        async def cancel_on_disconnect() -> None:
            assert request is not None
            while not await request.is_disconnected():  # noqa: ASYNC110 (polling is the only way to ask)
                await asyncio.sleep(DISCONNECT_POLL_S)
            self.client_left = True
            self._cancel()

        watcher = asyncio.create_task(cancel_on_disconnect()) if request is not None else None
        try:
            async for _ in self.deltas():
                pass
        finally:
            if watcher is not None:
                watcher.cancel()

    async def close(self) -> None:
        """After the response, in every case: a client that left before the body's first step
        never ran deltas(), so its generation would otherwise hold a batch slot to max_tokens."""
        if not self._finished:
            self.client_left = True
        await self.finish()

    async def finish(self) -> None:
        """Once: cancel what still runs, settle the status, write the usage row, run the hooks."""
        with anyio.CancelScope(shield=True):
            async with self._finish_lock:
                if self._finished:
                    return
                self._finished = True
                self._cancel()
                results = [choice.result for choice in self.choices]
                statuses = [
                    usage_status(
                        result,
                        failed=self.failure is not None,
                        stopped=self.stop_requested or self.client_left,
                    )
                    for result in results
                ]
                # The request's status is its worst choice's.
                self.status = next(
                    (status for status in ("error", "stopped") if status in statuses), "complete"
                )
                await in_thread(self._record_usage)
                for hook in self._on_finish:
                    try:
                        await hook(self)
                    except Exception as error:
                        log.warning("after generation %s: %s", self.choices[0].stream.request_id, error)

    def _record_usage(self) -> None:
        try:
            with transaction(self.state.sessions) as db:
                db.add(
                    Usage(
                        user_id=self.owner.user_id,
                        api_key_id=self.owner.api_key_id,
                        source=self.owner.source,
                        status=self.status,
                        prompt_tokens=self.prompt_tokens,
                        completion_tokens=self.completion_tokens,
                    )
                )
        except Exception as error:  # usage is bookkeeping: a database hiccup must not fail the reply
            log.warning("usage row not written: %s", error)


async def _merged(choices: list[ChoiceState]) -> AsyncIterator[tuple[int, TextDelta | GenerationResult]]:
    """Items of several streams as each arrives, tagged with the choice's index."""
    queue: asyncio.Queue[tuple[int, TextDelta | GenerationResult | None]] = asyncio.Queue()

    async def pump(choice: ChoiceState) -> None:
        try:
            async for item in choice.stream:
                await queue.put((choice.index, item))
        finally:
            await queue.put((choice.index, None))

    tasks = [asyncio.create_task(pump(choice)) for choice in choices]
    running = len(tasks)
    try:
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
                continue
            yield index, item
        for task in tasks:
            task.result()  # a pump's exception is the generation's failure
    finally:
        for task in tasks:
            task.cancel()


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


class GenerationStreamingResponse(StreamingResponse):
    """Server-sent events that close the generation after the response in every case (see
    Generation.close): the body generator's own `finally` does not run when the client left
    before its first step."""

    def __init__(self, content: AsyncIterator[str], generation: Generation, **options: Any) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS, **options)
        self._generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._generation.close()


def stream_response(events: AsyncIterator[str], generation: Generation) -> StreamingResponse:
    return GenerationStreamingResponse(events, generation)
