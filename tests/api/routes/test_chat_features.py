"""The chat's working features on real PostgreSQL and the tiny model: history fitted to the
prompt budget, per-conversation settings and the admin default, edit and regenerate anywhere,
search, export, delete all, and changing one's own password."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest_asyncio

from app.db import transaction
from app.models import Message
from tests.api.conftest import Member, Zeus, parse_sse, serve_in_process, settings_for_tests

MAX_INPUT_TOKENS = 512  # settings_for_tests
GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest_asyncio.fixture(scope="module")
async def zeus(database_url: str, tiny_model_path: Path) -> AsyncIterator[Zeus]:
    async for running in serve_in_process(settings_for_tests(database_url, tiny_model_path)):
        yield running


async def new_conversation(client: httpx.AsyncClient, **body) -> dict:
    response = await client.post("/api/conversations", json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def converse(
    client: httpx.AsyncClient, path: str, body: dict | None = None, method: str = "POST"
) -> dict:
    """Sends, reads the whole stream, returns {event: payload} (the last payload of each kind)."""
    response = await client.request(method, path, json=body)
    assert response.status_code == 200, response.text
    return {event: json.loads(data) for event, data in parse_sse(response.text)}


async def listed(client: httpx.AsyncClient, conversation_id: int) -> dict:
    return next(
        item for item in (await client.get("/api/conversations")).json() if item["id"] == conversation_id
    )


async def messages(client: httpx.AsyncClient, conversation_id: int) -> list[dict]:
    response = await client.get(f"/api/conversations/{conversation_id}/messages")
    assert response.status_code == 200, response.text
    return response.json()


def store(zeus: Zeus, conversation_id: int, *turns: tuple[str, str]) -> list[int]:
    with transaction(zeus.state.sessions) as db:
        rows = [
            Message(conversation_id=conversation_id, role=role, content=content) for role, content in turns
        ]
        db.add_all(rows)
        db.flush()
        return [row.id for row in rows]


async def test_a_long_conversation_continues_with_its_newest_turns(zeus: Zeus, analyst: Member) -> None:
    async with zeus.client(headers=analyst.bearer) as client:
        conversation = (await new_conversation(client, title="long"))["id"]
        # About 60 tokens a turn (this tokenizer): far more history than the 512-token budget holds.
        ids = store(
            zeus,
            conversation,
            *[
                (role, f"turn {index} " + "quarterly revenue grew in the northern region " * 3)
                for index in range(12)
                for role in ("user", "assistant")
            ],
        )

        events = await converse(
            client,
            f"/api/conversations/{conversation}/messages",
            {"content": "Summarise.", "options": GREEDY},
        )

        assert events["done"]["status"] == "complete"
        assert events["done"]["prompt_tokens"] <= MAX_INPUT_TOKENS
        start = (await listed(client, conversation))["context_start_message_id"]
        # The model saw a suffix of the conversation that begins with a user turn.
        assert start in ids[2:] and ids.index(start) % 2 == 0
        assert len(await messages(client, conversation)) == len(ids) + 2  # every message kept

        # Again: the conversation never dead-ends, and the marker moves on with it.
        events = await converse(
            client, f"/api/conversations/{conversation}/messages", {"content": "And now?", "options": GREEDY}
        )
        assert events["done"]["status"] == "complete"
        assert (await listed(client, conversation))["context_start_message_id"] >= start


async def test_a_short_conversation_sends_everything(zeus: Zeus, analyst: Member) -> None:
    async with zeus.client(headers=analyst.bearer) as client:
        conversation = (await new_conversation(client))["id"]
        await converse(
            client, f"/api/conversations/{conversation}/messages", {"content": "Hi", "options": GREEDY}
        )
        assert (await listed(client, conversation))["context_start_message_id"] is None


async def test_a_message_too_long_on_its_own_is_refused_before_it_is_stored(
    zeus: Zeus, analyst: Member
) -> None:
    async with zeus.client(headers=analyst.bearer) as client:
        conversation = (await new_conversation(client))["id"]
        response = await client.post(
            f"/api/conversations/{conversation}/messages", json={"content": "market report " * 600}
        )
        assert response.status_code == 400
        detail = response.json()["detail"]
        assert detail.startswith("prompt too long: ") and "for this message alone" in detail
        assert f"the limit is {MAX_INPUT_TOKENS} tokens" in detail
        assert int(detail.split(": ")[1].split(" tokens")[0]) > MAX_INPUT_TOKENS
        assert await messages(client, conversation) == []


async def test_settings_are_kept_and_used_on_every_turn(zeus: Zeus, analyst: Member) -> None:
    async with zeus.client(headers=analyst.bearer) as client:
        plain = (await new_conversation(client))["id"]
        prompted = (await new_conversation(client))["id"]
        patched = await client.patch(
            f"/api/conversations/{prompted}",
            json={"system_prompt": "You are a terse analyst. " * 10, "temperature": 0, "max_tokens": 3},
        )
        assert patched.status_code == 200, patched.text
        assert patched.json()["temperature"] == 0 and patched.json()["max_tokens"] == 3

        body = {"content": "Name a colour.", "options": {"ignore_eos": True}}
        without = await converse(client, f"/api/conversations/{plain}/messages", body)
        with_prompt = await converse(client, f"/api/conversations/{prompted}/messages", body)

        # The system prompt is in the prompt, and the conversation's max_tokens bounds the reply.
        assert with_prompt["done"]["prompt_tokens"] > without["done"]["prompt_tokens"] + 40
        assert with_prompt["done"]["completion_tokens"] == 3
        # Per-message options still win over the conversation's settings.
        longer = await converse(
            client,
            f"/api/conversations/{prompted}/messages",
            {"content": "Again.", "options": {"ignore_eos": True, "max_tokens": 5}},
        )
        assert longer["done"]["completion_tokens"] == 5

        reset = await client.patch(f"/api/conversations/{prompted}", json={"max_tokens": None})
        assert reset.json()["max_tokens"] is None and reset.json()["temperature"] == 0
        too_many = await client.patch(f"/api/conversations/{prompted}", json={"max_tokens": 10_000})
        assert too_many.status_code == 400 and "ZEUS_MAX_NEW_TOKENS" in too_many.json()["detail"]


async def test_admin_default_system_prompt_applies_to_new_conversations(
    zeus: Zeus, admin: Member, analyst: Member
) -> None:
    async with zeus.client(headers=analyst.bearer) as client:
        before = (await new_conversation(client))["id"]
        refused = await client.put("/api/admin/chat-defaults", json={"default_system_prompt": "x"})
        assert refused.status_code == 403
    async with zeus.client(headers=admin.bearer) as client:
        response = await client.put(
            "/api/admin/chat-defaults", json={"default_system_prompt": "Cite sources."}
        )
        assert response.status_code == 200
    try:
        async with zeus.client(headers=analyst.bearer) as client:
            assert (await client.get("/api/conversations/defaults")).json() == {
                "default_system_prompt": "Cite sources."
            }
            assert (await new_conversation(client))["system_prompt"] == "Cite sources."
            assert (await new_conversation(client, system_prompt=""))["system_prompt"] == ""
            assert (await listed(client, before))["system_prompt"] == ""
    finally:
        async with zeus.client(headers=admin.bearer) as client:
            await client.put("/api/admin/chat-defaults", json={"default_system_prompt": ""})


async def test_editing_an_earlier_message_replaces_the_later_turns(zeus: Zeus, analyst: Member) -> None:
    async with zeus.client(headers=analyst.bearer) as client:
        conversation = (await new_conversation(client))["id"]
        path = f"/api/conversations/{conversation}/messages"
        first = await converse(client, path, {"content": "First question", "options": GREEDY})
        await converse(client, path, {"content": "Second question", "options": GREEDY})
        first_id = first["start"]["user_message_id"]

        edited = await converse(client, f"{path}/{first_id}", {"content": "Edited", "options": GREEDY}, "PUT")

        stored = await messages(client, conversation)
        assert [(m["role"], m["content"] if m["role"] == "user" else "") for m in stored] == [
            ("user", "Edited"),
            ("assistant", ""),
        ]
        assert stored[0]["id"] == first_id and stored[1]["id"] == edited["start"]["assistant_message_id"]
        # Only user messages can be edited, and only one's own.
        assert (await client.put(f"{path}/{stored[1]['id']}", json={"content": "x"})).status_code == 404


async def test_regenerating_an_earlier_reply_drops_what_followed(zeus: Zeus, analyst: Member) -> None:
    async with zeus.client(headers=analyst.bearer) as client:
        conversation = (await new_conversation(client))["id"]
        path = f"/api/conversations/{conversation}"
        first = await converse(client, f"{path}/messages", {"content": "One", "options": GREEDY})
        await converse(client, f"{path}/messages", {"content": "Two", "options": GREEDY})
        old_reply = first["start"]["assistant_message_id"]

        again = await converse(client, f"{path}/regenerate", {"message_id": old_reply, "options": GREEDY})

        stored = await messages(client, conversation)
        assert [m["content"] for m in stored if m["role"] == "user"] == ["One"]
        assert [m["id"] for m in stored if m["role"] == "assistant"] == [
            again["start"]["assistant_message_id"]
        ]
        missing = await client.post(f"{path}/regenerate", json={"message_id": old_reply})
        assert missing.status_code == 404


async def test_search_finds_ones_own_messages_and_titles(
    zeus: Zeus, analyst: Member, other_analyst: Member
) -> None:
    async with zeus.client(headers=analyst.bearer) as client:
        hit = (await new_conversation(client, title="Budget review"))["id"]
        miss = (await new_conversation(client, title="Other"))["id"]
        [_, wanted] = store(
            zeus, hit, ("user", "hello"), ("assistant", "The zebrafish experiments doubled output.")
        )
        store(zeus, miss, ("user", "nothing relevant here"))

        found = (await client.get("/api/conversations", params={"q": "zebrafish experiment"})).json()
        assert [item["id"] for item in found] == [hit]
        assert found[0]["matches"][0]["message_id"] == wanted
        assert "\x02zebrafish\x03" in found[0]["matches"][0]["snippet"]

        by_title = (await client.get("/api/conversations", params={"q": "budget"})).json()
        assert [item["id"] for item in by_title] == [hit] and by_title[0]["matches"] == []
        assert (await client.get("/api/conversations", params={"q": "-"})).status_code == 200
    async with zeus.client(headers=other_analyst.bearer) as client:
        assert (await client.get("/api/conversations", params={"q": "zebrafish"})).json() == []


async def test_export_as_markdown_and_json(zeus: Zeus, analyst: Member) -> None:
    async with zeus.client(headers=analyst.bearer) as client:
        conversation = (await new_conversation(client, title="Export me", system_prompt="Be brief."))["id"]
        store(zeus, conversation, ("user", "What is **2+2**?"), ("assistant", "4"))
        path = f"/api/conversations/{conversation}/export"

        markdown = await client.get(path, params={"format": "markdown"})
        document = await client.get(path, params={"format": "json"})
        wrong = await client.get(path, params={"format": "pdf"})

        assert markdown.status_code == 200 and markdown.headers["content-type"].startswith("text/markdown")
        assert f'filename="zeus-conversation-{conversation}.md"' in markdown.headers["content-disposition"]
        assert markdown.text.startswith("# Export me\n")
        assert "## System prompt\n\nBe brief." in markdown.text and "What is **2+2**?" in markdown.text
        assert document.headers["content-disposition"].startswith("attachment")
        body = document.json()
        assert body["title"] == "Export me" and body["system_prompt"] == "Be brief."
        assert [(m["role"], m["content"]) for m in body["messages"]] == [
            ("user", "What is **2+2**?"),
            ("assistant", "4"),
        ]
        assert wrong.status_code == 422


async def test_delete_all_removes_only_ones_own(zeus: Zeus, analyst: Member, other_analyst: Member) -> None:
    async with zeus.client(headers=other_analyst.bearer) as other:
        kept = (await new_conversation(other))["id"]
    mine = zeus.member()
    async with zeus.client(headers=mine.bearer) as client:
        for _ in range(3):
            await new_conversation(client)
        assert (await client.delete("/api/conversations")).status_code == 204
        assert (await client.get("/api/conversations")).json() == []
    async with zeus.client(headers=other_analyst.bearer) as other:
        assert (await other.get(f"/api/conversations/{kept}/messages")).status_code == 200


async def test_changing_the_password_ends_the_other_sessions(zeus: Zeus) -> None:
    member = zeus.member()
    async with zeus.logged_in(member) as here, zeus.logged_in(member) as elsewhere:
        wrong = await here.post(
            "/api/auth/password", json={"current_password": "not it", "new_password": "a new password"}
        )
        assert wrong.status_code == 400 and wrong.json()["detail"] == "the current password is wrong"
        short = await here.post(
            "/api/auth/password", json={"current_password": member.password, "new_password": "short"}
        )
        assert short.status_code == 422

        changed = await here.post(
            "/api/auth/password", json={"current_password": member.password, "new_password": "a new password"}
        )

        assert changed.status_code == 204
        assert (await here.get("/api/auth/me")).status_code == 200
        assert (await elsewhere.get("/api/auth/me")).status_code == 401
    async with zeus.client() as client:
        old = await client.post("/api/auth/login", json={"email": member.email, "password": member.password})
        new = await client.post("/api/auth/login", json={"email": member.email, "password": "a new password"})
        assert (old.status_code, new.status_code) == (401, 200)
