"""Conversations: CRUD, ownership, streaming replies, stop (from another instance too),
regenerate, partial replies that survive a killed instance, and client disconnects."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest_asyncio
from sqlalchemy import text

from app.db import transaction
from tests.api.conftest import (
    Member,
    Zeus,
    insert_stale_instance,
    parse_sse,
    serve_in_process,
    settings_for_tests,
)
from tests.support.live_server import start_live_server

LONG = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0}


@pytest_asyncio.fixture(scope="module")
async def zeus(database_url: str, tiny_model_path: Path) -> AsyncIterator[Zeus]:
    # Long replies (ignore_eos) give the stop and disconnect tests time to act mid-stream.
    async for running in serve_in_process(
        settings_for_tests(database_url, tiny_model_path, max_new_tokens=1500)
    ):
        yield running


@pytest_asyncio.fixture(scope="module")
async def second_zeus(database_url: str, tiny_model_path: Path) -> AsyncIterator[Zeus]:
    """Another instance on the same database, as behind nginx."""
    async for running in serve_in_process(
        settings_for_tests(database_url, tiny_model_path, max_new_tokens=1500)
    ):
        yield running


async def new_conversation(client: httpx.AsyncClient, title: str | None = None) -> int:
    response = await client.post("/api/conversations", json={} if title is None else {"title": title})
    assert response.status_code == 201, response.text
    return response.json()["id"]


async def messages(client: httpx.AsyncClient, conversation_id: int) -> list[dict]:
    response = await client.get(f"/api/conversations/{conversation_id}/messages")
    assert response.status_code == 200, response.text
    return response.json()


async def wait_until(condition, timeout_s: float = 20.0, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(interval_s)


async def test_crud_newest_first_rename_delete(zeus: Zeus, analyst: Member) -> None:
    async with zeus.client(headers=analyst.bearer) as client:
        first = await new_conversation(client, "first")
        second = await new_conversation(client)
        listed = (await client.get("/api/conversations")).json()
        ids = [item["id"] for item in listed]
        assert ids.index(second) < ids.index(first)
        renamed = await client.patch(f"/api/conversations/{first}", json={"title": "  renamed  "})
        assert renamed.status_code == 200 and renamed.json()["title"] == "renamed"
        assert (await client.get("/api/conversations")).json()[0]["id"] == first  # touched: newest
        assert (await client.delete(f"/api/conversations/{second}")).status_code == 204
        assert second not in [item["id"] for item in (await client.get("/api/conversations")).json()]
        assert (await client.get(f"/api/conversations/{second}/messages")).status_code == 404


async def test_someone_elses_conversation_is_404_everywhere(
    zeus: Zeus, analyst: Member, other_analyst: Member, admin: Member
) -> None:
    async with zeus.client(headers=analyst.bearer) as owner:
        conversation = await new_conversation(owner, "private")
    for intruder in (other_analyst, admin):
        async with zeus.client(headers=intruder.bearer) as client:
            path = f"/api/conversations/{conversation}"
            answers = [
                await client.get(f"{path}/messages"),
                await client.patch(path, json={"title": "mine now"}),
                await client.post(f"{path}/messages", json={"content": "hello"}),
                await client.post(f"{path}/regenerate"),
                await client.post(f"{path}/stop"),
                await client.delete(path),
            ]
            assert [answer.status_code for answer in answers] == [404] * 6
            assert conversation not in [
                item["id"] for item in (await client.get("/api/conversations")).json()
            ]
    async with zeus.client(headers=analyst.bearer) as owner:
        assert (await owner.get(f"/api/conversations/{conversation}/messages")).status_code == 200


async def test_reply_streams_and_is_stored(zeus: Zeus, analyst: Member) -> None:
    async with zeus.client(headers=analyst.bearer) as client:
        conversation = await new_conversation(client)
        response = await client.post(
            f"/api/conversations/{conversation}/messages", json={"content": "What is the capital of France?"}
        )
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(response.text)
        names = [name for name, _ in events]
        assert names[0] == "start" and names[-1] == "done" and set(names[1:-1]) <= {"delta"}
        start, done = json.loads(events[0][1]), json.loads(events[-1][1])
        streamed = "".join(json.loads(data)["text"] for name, data in events if name == "delta")
        assert done["status"] == "complete" and done["finish_reason"] in ("stop", "length")
        assert done["prompt_tokens"] > 0 and done["completion_tokens"] > 0 and done["ttft_ms"] is not None
        stored = await messages(client, conversation)
        assert [(item["id"], item["role"]) for item in stored] == [
            (start["user_message_id"], "user"),
            (start["assistant_message_id"], "assistant"),
        ]
        assert stored[0]["content"] == "What is the capital of France?"
        assert stored[1]["content"] == streamed and stored[1]["status"] == "complete"
        assert stored[1]["completion_tokens"] == done["completion_tokens"]
        listed = (await client.get("/api/conversations")).json()
        assert (
            next(item for item in listed if item["id"] == conversation)["title"]
            == "What is the capital of France?"
        )
        # The next turn sees the history: its prompt is longer than the first one.
        again = parse_sse(
            (
                await client.post(
                    f"/api/conversations/{conversation}/messages", json={"content": "And of Spain?"}
                )
            ).text
        )
        assert json.loads(again[-1][1])["prompt_tokens"] > done["prompt_tokens"]


async def test_partial_reply_is_flushed_while_streaming_and_stop_from_another_instance(
    zeus: Zeus, second_zeus: Zeus, analyst: Member
) -> None:
    async with (
        zeus.client(headers=analyst.bearer) as client,
        second_zeus.client(headers=analyst.bearer) as other,
    ):
        conversation = await new_conversation(client)
        async with client.stream(
            "POST", f"/api/conversations/{conversation}/messages", json={"content": "Count", "options": LONG}
        ) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()

            async def partial_text_visible_elsewhere() -> bool:
                while True:  # keep consuming so the server is never blocked on us
                    line = await lines.__anext__()
                    if line.startswith("data:"):
                        break
                reply = (await messages(other, conversation))[-1]
                return reply["status"] == "streaming" and len(reply["content"]) > 0

            await wait_until(partial_text_visible_elsewhere)
            stop = await other.post(f"/api/conversations/{conversation}/stop")
            assert stop.status_code == 200 and stop.json() == {"stopped": True}
            rest = [line async for line in lines]
        events = parse_sse("\n".join(rest) + "\n\n")
        done = json.loads(events[-1][1])
        assert events[-1][0] == "done" and done["status"] == "stopped"
        assert done["completion_tokens"] < 1500
        reply = (await messages(client, conversation))[-1]
        assert reply["status"] == "stopped" and reply["content"]
        assert (await other.post(f"/api/conversations/{conversation}/stop")).json() == {"stopped": False}
    await wait_until(lambda: _idle(zeus))


async def _idle(zeus: Zeus) -> bool:
    stats = zeus.engine.stats()
    return stats.running == 0 and stats.queued == 0


async def test_regenerate_replaces_the_last_reply(zeus: Zeus, analyst: Member) -> None:
    async with zeus.client(headers=analyst.bearer) as client:
        conversation = await new_conversation(client)
        first = parse_sse(
            (
                await client.post(
                    f"/api/conversations/{conversation}/messages", json={"content": "Hello there"}
                )
            ).text
        )
        old_reply = json.loads(first[0][1])["assistant_message_id"]
        response = await client.post(
            f"/api/conversations/{conversation}/regenerate", json={"options": {"seed": 7, "max_tokens": 12}}
        )
        events = parse_sse(response.text)
        assert response.status_code == 200 and events[-1][0] == "done"
        start = json.loads(events[0][1])
        assert start["user_message_id"] is None and start["assistant_message_id"] != old_reply
        stored = await messages(client, conversation)
        assert [item["role"] for item in stored] == ["user", "assistant"]
        assert stored[1]["id"] == start["assistant_message_id"]
        assert stored[1]["content"] == "".join(json.loads(d)["text"] for n, d in events if n == "delta")
        empty = await new_conversation(client)
        nothing = await client.post(f"/api/conversations/{empty}/regenerate")
        assert nothing.status_code == 409 and "nothing to regenerate" in nothing.json()["detail"]


async def test_second_message_while_streaming_is_409(zeus: Zeus, analyst: Member) -> None:
    async with zeus.client(headers=analyst.bearer) as client:
        conversation = await new_conversation(client)
        async with client.stream(
            "POST", f"/api/conversations/{conversation}/messages", json={"content": "Go", "options": LONG}
        ) as response:
            assert response.status_code == 200
            busy = await client.post(f"/api/conversations/{conversation}/messages", json={"content": "again"})
            assert busy.status_code == 409 and "still streaming" in busy.json()["detail"]
            assert (await client.post(f"/api/conversations/{conversation}/stop")).json() == {"stopped": True}
            body = (await response.aread()).decode()
        assert json.loads(parse_sse(body)[-1][1])["status"] == "stopped"


async def test_client_disconnect_stops_generation_and_keeps_the_partial_reply(
    zeus: Zeus, analyst: Member
) -> None:
    async with zeus.client(headers=analyst.bearer) as client:
        conversation = await new_conversation(client)
        async with client.stream(
            "POST", f"/api/conversations/{conversation}/messages", json={"content": "Go on", "options": LONG}
        ) as response:
            seen = 0
            async for line in response.aiter_lines():
                seen += line.startswith("event: delta")
                if seen >= 5:
                    break
            assert zeus.engine.stats().running == 1
        # Leaving the block closed the connection: the slot frees within a step or two.
        await wait_until(lambda: _idle(zeus), timeout_s=10)

        async def stored_as_stopped() -> bool:
            reply = (await messages(client, conversation))[-1]
            return reply["status"] == "stopped"

        await wait_until(stored_as_stopped, timeout_s=10)
        reply = (await messages(client, conversation))[-1]
        assert reply["content"] and reply["completion_tokens"] < 1500


async def test_reply_of_a_killed_instance_keeps_its_text_and_shows_interrupted(
    zeus: Zeus, analyst: Member, database_url: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    name = "doomed:1"
    settings = {"ZEUS_INSTANCE_NAME": name, "ZEUS_MAX_NEW_TOKENS": "1500"}
    doomed = start_live_server(database_url, tiny_model_path, tmp_path, **settings)
    try:
        async with (
            httpx.AsyncClient(base_url=doomed.base_url, headers=analyst.bearer, timeout=60) as victim,
            zeus.client(headers=analyst.bearer) as survivor,
        ):
            conversation = await new_conversation(victim)
            async with victim.stream(
                "POST",
                f"/api/conversations/{conversation}/messages",
                json={"content": "Talk", "options": LONG},
            ) as response:
                lines = response.aiter_lines()

                async def flushed() -> bool:
                    await lines.__anext__()
                    return bool((await messages(survivor, conversation))[-1]["content"])

                await wait_until(flushed)
                doomed.stop(signal.SIGKILL)
            reply = (await messages(survivor, conversation))[-1]
            # Killed: the flushed text is there; the row still says streaming until the instance
            # is known dead (stale heartbeat, tested below, or restart, as systemd does here).
            assert reply["content"] and reply["status"] == "streaming"
            restart = settings_for_tests(database_url, tiny_model_path, instance_name=name)
            async for _ in serve_in_process(restart):
                reply = (await messages(survivor, conversation))[-1]
                assert reply["status"] == "interrupted" and reply["content"]
    finally:
        doomed.stop(signal.SIGKILL)


async def test_reply_of_an_instance_that_stopped_heartbeating_shows_interrupted(
    zeus: Zeus, analyst: Member
) -> None:
    async with zeus.client(headers=analyst.bearer) as client:
        conversation = await new_conversation(client)
        # What a crashed host leaves behind: a streaming row of a run whose heartbeat went stale.
        insert_stale_instance(zeus, "crashed:1", "run-crashed", "1 hour")
        with transaction(zeus.state.sessions) as db:
            db.execute(
                text(
                    "INSERT INTO messages (conversation_id, role, content, status, stream_run_id) "
                    "VALUES (:id, 'assistant', 'half a rep', 'streaming', 'run-crashed')"
                ),
                {"id": conversation},
            )
        stored = await messages(client, conversation)
        assert stored[-1]["status"] == "interrupted" and stored[-1]["content"] == "half a rep"


async def test_client_gone_right_after_sending_frees_the_slot(zeus: Zeus, analyst: Member) -> None:
    async with zeus.client(headers=analyst.bearer) as client:
        conversation = await new_conversation(client)
    body = json.dumps({"content": "Quick", "options": LONG}).encode()
    host, port = zeus.base_url.removeprefix("http://").split(":")
    _reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST /api/conversations/{conversation}/messages HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {analyst.api_key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    writer.close()  # gone before the server could send anything
    await writer.wait_closed()
    async with zeus.client(headers=analyst.bearer) as client:

        async def settled() -> bool:
            stored = await messages(client, conversation)
            return len(stored) == 2 and stored[-1]["status"] == "stopped"

        await wait_until(settled, timeout_s=15)
    await wait_until(lambda: _idle(zeus), timeout_s=10)
