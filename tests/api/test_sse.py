"""Server-sent events survive clients that split lines the way Python's str.splitlines() does."""

from __future__ import annotations

import json

import httpx

from app.api.serving import sse


def test_text_with_unicode_line_separators_stays_one_event_line() -> None:
    # NEL, LINE SEPARATOR and PARAGRAPH SEPARATOR break lines for str.splitlines() and httpx's
    # iter_lines(), but not for SSE; a model's text may contain any of them.
    text = "one\x85two\u2028three\u2029four\x0cfive é 日本"
    event = sse("delta", {"choices": [{"delta": {"content": text}}]})
    response = httpx.Response(200, content=event.encode(), headers={"content-type": "text/event-stream"})

    lines = [line for line in response.iter_lines() if line]
    assert lines[0] == "event: delta"
    assert len(lines) == 2, lines
    assert json.loads(lines[1].removeprefix("data: "))["choices"][0]["delta"]["content"] == text
    # Everything else stays as it was: readable UTF-8, not \\u escapes.
    assert "é 日本" in lines[1]
