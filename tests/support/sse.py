"""The one client-side reader of server-sent events for the tests, the bench and Molecule's checks.

Parsing follows the WHATWG HTML "event stream" rules: lines end at CRLF, LF or CR (and nowhere
else: httpx's iter_lines() also breaks at U+2028, NEL and friends, which a model's text may hold),
a line starting with ":" is a comment, "event:" names the event, "data:" lines join with "\\n",
one space after the colon is dropped, and a blank line dispatches the event (an event without
data is dropped). OpenAI-style streams end with the data "[DONE]"; `iter_json`/`aiter_json` stop
there and raise `IncompleteStream` when a stream ends without it.

Molecule's verify runs on the controller with the repository root as the working directory
(`python -m pytest`), so `tests.support.sse` imports there as it does in the tests and the bench.
This module needs only the standard library (httpx responses are duck-typed).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any, NamedTuple, Protocol

DONE = "[DONE]"


class ServerSentEvent(NamedTuple):
    """One dispatched event: its name ("message" when the stream named none) and its data."""

    event: str
    data: str

    def json(self) -> Any:
        """The data parsed as JSON; json.JSONDecodeError (a ValueError) when it is not JSON."""
        return json.loads(self.data)


class IncompleteStream(Exception):
    """The stream ended (connection closed) before its `data: [DONE]`."""


class SSEDecoder:
    """Incremental parser: feed it text as it arrives, in chunks split anywhere (mid-line too)."""

    def __init__(self) -> None:
        self._buffer = ""
        self._event = ""
        self._data: list[str] = []

    def feed(self, text: str) -> list[ServerSentEvent]:
        """The events that `text` completes, in order."""
        self._buffer += text
        events = []
        while True:
            cut = _line_end(self._buffer)
            if cut is None:
                return events
            end, after = cut
            line, self._buffer = self._buffer[:end], self._buffer[after:]
            if (event := self._line(line)) is not None:
                events.append(event)

    def close(self) -> list[ServerSentEvent]:
        """At the end of the stream: a last line without its newline ends as if it had one.

        The WHATWG rules drop an event whose blank line never came; the readers here keep it
        (a server cut off mid-stream still sent that data), as the copies they replace did.
        """
        events = []
        if self._buffer:
            if (event := self._line(self._buffer)) is not None:
                events.append(event)
            self._buffer = ""
        if (event := self._line("")) is not None:
            events.append(event)
        return events

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = ServerSentEvent(self._event or "message", "\n".join(self._data))
            self._event, self._data = "", []
            return event
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)
        return None


def _line_end(buffer: str) -> tuple[int, int] | None:
    """(end of the first line, start of the next) or None while the line is unfinished."""
    for index, char in enumerate(buffer):
        if char == "\n":
            return index, index + 1
        if char == "\r":
            if index + 1 == len(buffer):
                return None  # a CRLF may be split between two chunks
            return index, index + (2 if buffer[index + 1] == "\n" else 1)
    return None


def parse_sse(text: str) -> list[ServerSentEvent]:
    """The events of a whole body (e.g. `response.text`)."""
    decoder = SSEDecoder()
    return decoder.feed(text) + decoder.close()


class _SyncText(Protocol):
    def iter_text(self) -> Iterator[str]: ...


class _AsyncText(Protocol):
    def aiter_text(self) -> AsyncIterator[str]: ...


def iter_sse(chunks: _SyncText | Iterable[str]) -> Iterator[ServerSentEvent]:
    """The events of an httpx.Response opened with `stream` (read with iter_text) or of text chunks."""
    decoder = SSEDecoder()
    for chunk in chunks.iter_text() if hasattr(chunks, "iter_text") else chunks:
        yield from decoder.feed(chunk)
    yield from decoder.close()


async def aiter_sse(response: _AsyncText) -> AsyncIterator[ServerSentEvent]:
    """The events of an httpx.Response from `AsyncClient.stream`, as they arrive."""
    decoder = SSEDecoder()
    async for chunk in response.aiter_text():
        for event in decoder.feed(chunk):
            yield event
    for event in decoder.close():
        yield event


def iter_json(chunks: _SyncText | Iterable[str]) -> Iterator[Any]:
    """The JSON data of each event up to `data: [DONE]`.

    Raises IncompleteStream when the stream ends without [DONE], json.JSONDecodeError on data that
    is not JSON.
    """
    for event in iter_sse(chunks):
        if event.data == DONE:
            return
        yield event.json()
    raise IncompleteStream("the stream ended without data: [DONE]")


async def aiter_json(response: _AsyncText) -> AsyncIterator[Any]:
    """`iter_json` of an httpx.Response from `AsyncClient.stream`."""
    async for event in aiter_sse(response):
        if event.data == DONE:
            return
        yield event.json()
    raise IncompleteStream("the stream ended without data: [DONE]")


def delta_text(chunk: dict[str, Any]) -> str:
    """The text a chat.completion.chunk adds: its choices' delta content joined ("" when none)."""
    return "".join((choice.get("delta") or {}).get("content") or "" for choice in chunk.get("choices") or [])
