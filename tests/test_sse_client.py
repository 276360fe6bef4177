"""tests.support.sse, the one SSE reader of the tests, the bench and Molecule's checks, against the
server's own event writer (app.api.serving.sse) and real httpx responses."""

from __future__ import annotations

import httpx
import pytest

from app.api.serving import sse
from tests.support.sse import (
    IncompleteStream,
    ServerSentEvent,
    SSEDecoder,
    aiter_json,
    aiter_sse,
    delta_text,
    iter_json,
    iter_sse,
    parse_sse,
)

BODY = (
    'event: start\r\ndata: {"assistant_message_id": 7}\r\n\r\n'
    ": a comment line\n\n"
    "data: first line\ndata:second line\n\n"
    'event: done\rdata: {"status": "complete"}\r\r'
)
EVENTS = [
    ServerSentEvent("start", '{"assistant_message_id": 7}'),
    ServerSentEvent("message", "first line\nsecond line"),
    ServerSentEvent("done", '{"status": "complete"}'),
]


def test_a_whole_body_parses_names_multiline_data_comments_and_every_line_ending() -> None:
    assert parse_sse(BODY) == EVENTS
    name, data = parse_sse(BODY)[0]
    assert (name, data) == ("start", '{"assistant_message_id": 7}')
    assert parse_sse(BODY)[-1].json() == {"status": "complete"}


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 11])
def test_chunks_split_anywhere_mid_line_and_between_cr_and_lf_give_the_same_events(size: int) -> None:
    decoder = SSEDecoder()
    events = []
    for start in range(0, len(BODY), size):
        events += decoder.feed(BODY[start : start + size])
    assert events + decoder.close() == EVENTS


def test_a_chunk_ending_in_the_middle_of_a_data_line_dispatches_nothing_yet() -> None:
    decoder = SSEDecoder()
    assert decoder.feed('event: delta\ndata: {"te') == []
    assert decoder.feed('xt": "Hel"}\n') == []
    assert decoder.feed("\n") == [ServerSentEvent("delta", '{"text": "Hel"}')]


def test_unicode_line_separators_in_the_servers_text_stay_inside_one_event() -> None:
    text = "one\x85two\u2028three\u2029four\x0cfive é 日本"
    body = sse("delta", {"choices": [{"delta": {"content": text}}]}) + sse(None, "[DONE]")
    response = httpx.Response(200, content=body.encode(), headers={"content-type": "text/event-stream"})
    (chunk,) = iter_json(response)
    assert delta_text(chunk) == text


def test_the_last_event_without_its_blank_line_is_still_read_at_the_end() -> None:
    assert list(iter_sse(["data: a\n\n", "data: b"])) == [("message", "a"), ("message", "b")]


def test_iter_json_stops_at_done_and_refuses_a_stream_cut_before_it() -> None:
    body = 'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\ndata: [DONE]\n\ndata: {"late": 1}\n\n'
    assert [delta_text(chunk) for chunk in iter_json([body])] == ["Hi"]
    with pytest.raises(IncompleteStream):
        list(iter_json(['data: {"choices": []}\n\n']))
    with pytest.raises(ValueError):
        list(iter_json(["data: not json\n\n"]))


def test_delta_text_of_chunks_without_content() -> None:
    assert delta_text({"choices": [], "usage": {"completion_tokens": 3}}) == ""
    assert delta_text({"choices": [{"delta": {"role": "assistant"}}]}) == ""
    assert delta_text({"choices": [{"delta": {"content": None}, "finish_reason": "stop"}]}) == ""


async def test_the_async_readers_over_a_real_streamed_httpx_response() -> None:
    async def stream():
        for piece in ('data: {"choices": [{"delta": {"content": "a"}}]}\n', "\n", "data: [DO", "NE]\n\n"):
            yield piece.encode()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=stream(), headers={"content-type": "text/event-stream"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://zeus") as client:
        async with client.stream("GET", "/") as response:
            assert [delta_text(chunk) async for chunk in aiter_json(response)] == ["a"]
        async with client.stream("GET", "/") as response:
            assert [event.data async for event in aiter_sse(response)][-1] == "[DONE]"
