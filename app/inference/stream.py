"""The hand-off from an engine to the asyncio code that consumes one request's output.

Every engine (built-in or vLLM) returns a RequestStream from submit(): the engine delivers
TextDelta items and then exactly one GenerationResult through `_deliver` (on the event loop's
thread: engines running elsewhere hop there with `loop.call_soon_threadsafe`), and the consumer
iterates. Leaving the iteration early cancels the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from app.inference.types import GenerationResult, TextDelta


class RequestStream:
    """What submit() returns: `async for item in stream` yields TextDelta items, then one GenerationResult."""

    def __init__(self, request_id: str, prompt_tokens: int, wake_scheduler: Callable[[], None]) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self._items: asyncio.Queue[TextDelta | GenerationResult] = asyncio.Queue()
        self._wake_scheduler = wake_scheduler
        self.cancel_requested = False
        self.finished = False
        self._final: GenerationResult | None = None

    def cancel(self) -> None:
        """Stop generating; the stream still ends with a GenerationResult (finish_reason "cancelled")."""
        if not self.finished and not self.cancel_requested:
            self.cancel_requested = True
            self._wake_scheduler()

    async def aclose(self) -> None:
        self.cancel()

    def _deliver(self, item: TextDelta | GenerationResult) -> None:
        self._items.put_nowait(item)

    async def _iterate(self) -> AsyncIterator[TextDelta | GenerationResult]:
        try:
            while self._final is None:
                item = await self._items.get()
                if isinstance(item, GenerationResult):
                    self._final = item
                yield item
        finally:
            # Reached when the consumer leaves the loop early (break, exception, aclose): free the slot.
            self.cancel()

    def __aiter__(self) -> AsyncIterator[TextDelta | GenerationResult]:
        return self._iterate()

    async def result(self) -> GenerationResult:
        """Consume what is left of the stream and return the final record (again on later calls)."""
        async for _ in self:
            pass
        assert self._final is not None, "a stream always ends with a GenerationResult"
        return self._final
