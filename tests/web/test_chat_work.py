"""The chat page for real work, in chromium against the real app (tiny model, PostgreSQL): a long
conversation that continues, per-conversation settings, edit and resend, regenerate any reply,
search, export, copy a reply, delete all, math and code through the whole stack, and the account
page (password change, API keys)."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.support.live_server import LiveServer
from tests.web.helpers import (
    BrowserSession,
    api_client,
    save_screenshot,
    set_generation_options,
    sign_in,
    store_message,
    wait_for_server_status,
)

pytestmark = pytest.mark.browser


@pytest.fixture
def chat(new_session, web_server: LiveServer) -> BrowserSession:
    session = new_session()
    sign_in(session.page, web_server, web_server.analyst)
    expect(session.page.locator("#chat-view")).to_be_visible()
    yield session
    session.watch.assert_clean()


def send(page: Page, text: str) -> None:
    page.get_by_label("Message", exact=True).fill(text)
    page.get_by_label("Message", exact=True).press("Enter")


def wait_for_replies(page: Page, count: int) -> None:
    settled = page.locator(".message--assistant:not([data-status=streaming])")
    expect(settled).to_have_count(count, timeout=30_000)
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()


def current_conversation_id(page: Page) -> int:
    match = re.search(r"#c/(\d+)$", page.url)
    assert match, f"no conversation in the address: {page.url}"
    return int(match.group(1))


def stored_conversation(server: LiveServer, title: str, turns: list[tuple[str, str]]) -> int:
    with api_client(server, server.analyst) as client:
        conversation_id = client.post("/api/conversations", json={"title": title}).json()["id"]
    for role, content in turns:
        store_message(server, conversation_id, role, content, "complete")
    return conversation_id


def test_a_long_conversation_continues_and_marks_the_models_memory(
    chat: BrowserSession, web_server: LiveServer
) -> None:
    page = chat.page
    paragraph = "The quarterly figures for the northern region rose again this month. " * 2
    turns = [
        (role, f"{'Question' if role == 'user' else 'Answer'} {index}: {paragraph}")
        for index in range(14)
        for role in ("user", "assistant")
    ]
    conversation_id = stored_conversation(web_server, "Long analysis", turns)
    page.goto(f"{web_server.base_url}/#c/{conversation_id}")
    expect(page.locator(".message")).to_have_count(len(turns))

    send(page, "Summarise the figures.")
    wait_for_replies(page, 15)

    expect(page.locator(".message--assistant").last).to_have_attribute("data-status", "complete")
    marker = page.locator(".memory-marker")
    expect(marker).to_contain_text("The model's memory of this conversation begins here")
    # Every message is still shown, the oldest above the marker.
    expect(page.locator(".message")).to_have_count(len(turns) + 2)
    expect(page.locator(".message").first).to_contain_text("Question 0")
    # The marker sits before a user message, and survives a reload (the server keeps it).
    expect(page.locator(".memory-marker + .message")).to_have_attribute("data-role", "user")
    page.reload()
    expect(page.locator(".memory-marker")).to_have_count(1)
    page.locator(".memory-marker").scroll_into_view_if_needed()
    save_screenshot(page, "chat-memory", docs_name="chat-memory")

    # And once more: the conversation never dead-ends.
    send(page, "And the southern region?")
    wait_for_replies(page, 16)
    expect(page.locator(".message--assistant").last).to_have_attribute("data-status", "complete")


def test_the_system_prompt_is_kept_and_sent_with_every_turn(
    chat: BrowserSession, web_server: LiveServer
) -> None:
    page = chat.page
    send(page, "Name a colour.")
    wait_for_replies(page, 1)
    plain_id = current_conversation_id(page)

    page.get_by_role("button", name="New chat").click()
    page.get_by_role("button", name="Settings").click()
    page.get_by_label("System prompt").fill("You are a pirate. Answer every question as a pirate would. " * 4)
    page.get_by_label("Temperature").fill("0")
    page.get_by_role("button", name="Save settings").click()
    expect(page.locator("#settings-status")).to_contain_text("Saved")
    save_screenshot(page, "chat-settings", docs_name="chat-settings")
    send(page, "Name a colour.")
    wait_for_replies(page, 1)
    prompted_id = current_conversation_id(page)

    plain = wait_for_server_status(web_server, web_server.analyst, plain_id)[-1]
    prompted = wait_for_server_status(web_server, web_server.analyst, prompted_id)[-1]
    # The model read the system prompt (about 60 more prompt tokens), at the chosen temperature.
    assert prompted["prompt_tokens"] > plain["prompt_tokens"] + 40
    page.reload()
    page.get_by_role("button", name="Settings").click()
    expect(page.get_by_label("System prompt")).to_have_value(re.compile("^You are a pirate"))
    expect(page.get_by_label("Temperature")).to_have_value("0")


def test_edit_an_earlier_message_and_resend(chat: BrowserSession, web_server: LiveServer) -> None:
    page = chat.page
    set_generation_options(page, temperature=0, max_tokens=8)
    send(page, "What is the capital of France?")
    wait_for_replies(page, 1)
    send(page, "And of Spain?")
    wait_for_replies(page, 2)
    conversation_id = current_conversation_id(page)

    page.locator(".message--user").first.get_by_role("button", name="Edit message").click()
    page.get_by_label("Edited message").fill("What is the capital of Italy?")
    page.get_by_role("button", name="Save and resend").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("The 3 messages after it will be deleted")
    dialog.get_by_role("button", name="Replace and resend").click()

    wait_for_replies(page, 1)
    expect(page.locator(".message--user .message__body")).to_have_text(["What is the capital of Italy?"])
    stored = wait_for_server_status(web_server, web_server.analyst, conversation_id)
    assert [(m["role"], m["content"]) for m in stored if m["role"] == "user"] == [
        ("user", "What is the capital of Italy?")
    ]
    assert len(stored) == 2


def test_regenerate_an_earlier_reply(chat: BrowserSession, web_server: LiveServer) -> None:
    page = chat.page
    send(page, "Say one word.")
    wait_for_replies(page, 1)
    send(page, "Say two words.")
    wait_for_replies(page, 2)
    conversation_id = current_conversation_id(page)
    first_reply = page.locator(".message--assistant").first
    old_id = first_reply.get_attribute("data-message-id")

    first_reply.get_by_role("button", name="Regenerate this reply").click()
    page.get_by_role("dialog").get_by_role("button", name="Replace and regenerate").click()

    wait_for_replies(page, 1)
    expect(page.locator(".message")).to_have_count(2)
    stored = wait_for_server_status(web_server, web_server.analyst, conversation_id)
    assert [m["content"] for m in stored if m["role"] == "user"] == ["Say one word."]
    assert str(stored[1]["id"]) != old_id


def test_search_finds_a_message_and_opens_it(chat: BrowserSession, web_server: LiveServer) -> None:
    page = chat.page
    word = f"kumquat{uuid.uuid4().hex[:6]}"
    filler = [("user", f"filler question {index}") for index in range(20)]
    conversation_id = stored_conversation(
        web_server,
        "Fruit trade",
        [*filler, ("user", "Which fruit?"), ("assistant", f"The {word} harvest doubled in **2025**.")],
    )
    page.reload()

    page.get_by_label("Search conversations").fill(word)

    result = page.locator(".search-result")
    # Generous: on a loaded 2-core CI machine the debounced query took over 5 s once.
    expect(result).to_have_count(1, timeout=20_000)
    expect(result.locator("mark")).to_have_text(word)
    expect(result).to_contain_text("Fruit trade")
    save_screenshot(page, "chat-search", docs_name="chat-search")
    result.click()
    assert current_conversation_id(page) == conversation_id
    found = page.locator(".message--found")
    expect(found).to_contain_text(word)
    expect(found).to_be_in_viewport()
    # A word nobody wrote finds nothing, and says so.
    page.get_by_label("Search conversations").fill("nonexistentwordzz")
    expect(page.locator("#search-results")).to_contain_text("Nothing found")


def test_export_downloads_markdown_and_json(chat: BrowserSession, web_server: LiveServer) -> None:
    page = chat.page
    conversation_id = stored_conversation(
        web_server, "Export test", [("user", "What is 2+2?"), ("assistant", "It is **4**.")]
    )
    page.goto(f"{web_server.base_url}/#c/{conversation_id}")
    expect(page.locator(".message")).to_have_count(2)

    with page.expect_download() as markdown_download:
        page.get_by_role("link", name="Export Markdown").click()
    with page.expect_download() as json_download:
        page.get_by_role("link", name="Export JSON").click()

    markdown = markdown_download.value
    assert markdown.suggested_filename == f"zeus-conversation-{conversation_id}.md"
    text = Path(markdown.path()).read_text(encoding="utf-8")
    assert text.startswith("# Export test") and "It is **4**." in text
    document = json.loads(Path(json_download.value.path()).read_text(encoding="utf-8"))
    assert json_download.value.suggested_filename == f"zeus-conversation-{conversation_id}.json"
    assert [m["content"] for m in document["messages"]] == ["What is 2+2?", "It is **4**."]


def test_copy_a_whole_reply(chat: BrowserSession, web_server: LiveServer) -> None:
    page = chat.page
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    reply = "# Result\n\n- one\n- two\n\n```python\nprint(1)\n```\n\n$x^2$"
    conversation_id = stored_conversation(web_server, "Copy", [("user", "List"), ("assistant", reply)])
    page.goto(f"{web_server.base_url}/#c/{conversation_id}")

    button = page.locator(".message--assistant").get_by_role("button", name="Copy reply")
    button.click()

    expect(button).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == reply


def test_math_code_and_renderer_payloads_through_the_whole_stack(
    chat: BrowserSession, web_server: LiveServer
) -> None:
    page = chat.page
    reply = (
        "Euler: $e^{i\\pi}+1=0$\n\n$$\\sum_{k=1}^n k = \\frac{n(n+1)}{2}$$\n\n"
        "```rust\nfn f<'a>(x: &'a str) -> &'a str { x }\n```\n\n"
        "| a | b |\n|--:|---|\n| 1 | 2 |\n\n"
        "$\\href{javascript:window.__xss=1}{click}$ [x](javascript:window.__xss=1) "
        "[y](data:text/html,<script>window.__xss=1</script>) <svg onload=window.__xss=1>"
    )
    conversation_id = stored_conversation(web_server, "Math", [("user", "Show me"), ("assistant", reply)])
    page.goto(f"{web_server.base_url}/#c/{conversation_id}")

    body = page.locator(".message--assistant .message__body")
    expect(body.locator(".katex")).to_have_count(3)
    expect(body.locator(".katex-display")).to_have_count(1)
    expect(body.locator(".hljs-symbol").first).to_have_text("'a")
    expect(body.locator("th").first).to_have_css("text-align", "right")
    assert body.locator("a[href^='javascript'], a[href^='data'], svg:not(.katex svg)").count() == 0
    page.wait_for_timeout(200)
    assert page.evaluate("window.__xss") is None
    save_screenshot(page, "chat-math", docs_name="chat-math")


def test_delete_all_conversations(new_session, web_server: LiveServer) -> None:
    session = new_session()
    page = session.page
    account = web_server.create_account(f"cleaner-{uuid.uuid4().hex[:6]}@example.com", "analyst")
    sign_in(page, web_server, account)
    for question in ("First topic", "Second topic"):
        page.get_by_role("button", name="New chat").click()
        send(page, question)
        wait_for_replies(page, 1)
    expect(page.locator(".conversation")).to_have_count(2)

    page.get_by_role("button", name="Delete all conversations").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("All 2 conversations")
    dialog.get_by_role("button", name="Delete all").click()

    expect(page.locator(".conversation")).to_have_count(0)
    page.reload()
    expect(page.locator(".empty-hint")).to_have_text("No conversations yet.")
    session.watch.assert_clean()


def test_password_change_ends_the_other_session(new_session, web_server: LiveServer) -> None:
    account = web_server.create_account(f"changer-{uuid.uuid4().hex[:6]}@example.com", "analyst")
    here = new_session()
    elsewhere = new_session()
    sign_in(here.page, web_server, account)
    sign_in(elsewhere.page, web_server, account)
    page = here.page

    page.get_by_role("link", name="Account").click()
    page.get_by_label("Current password").fill("not my password")
    page.get_by_label("New password", exact=True).fill("a brand new password")
    page.get_by_label("Repeat the new password").fill("a brand new password")
    page.get_by_role("button", name="Change password").click()
    expect(page.locator("#password-message")).to_contain_text("the current password is wrong")
    page.get_by_label("Current password").fill(account.password)
    page.get_by_role("button", name="Change password").click()
    expect(page.locator("#password-message")).to_contain_text("Password changed")

    elsewhere.page.reload()
    expect(elsewhere.page.locator("#login-view")).to_be_visible()
    page.goto(f"{web_server.base_url}/")
    expect(page.locator("#chat-view")).to_be_visible()
    elsewhere.page.locator("#login-form").get_by_label("Email").fill(account.email)
    elsewhere.page.locator("#login-form").get_by_label("Password").fill("a brand new password")
    elsewhere.page.get_by_role("button", name="Sign in").click()
    expect(elsewhere.page.locator("#chat-view")).to_be_visible()
    here.watch.assert_clean()


def test_api_key_page_creates_shows_once_and_revokes(new_session, web_server: LiveServer) -> None:
    account = web_server.create_account(f"keys-{uuid.uuid4().hex[:6]}@example.com", "analyst")
    session = new_session()
    page = session.page
    sign_in(page, web_server, account, path="/account.html")
    page.goto(f"{web_server.base_url}/account.html")

    page.get_by_label("Name of the new key").fill("my notebook")
    page.get_by_role("button", name="Create key").click()

    expect(page.locator("#key-created")).to_be_visible()
    secret = page.locator("#key-secret").inner_text()
    assert len(secret) > 20
    row = page.locator("#keys-table tbody tr", has_text="my notebook")
    expect(row).to_contain_text("Active")
    expect(row).to_contain_text("never")
    assert secret not in row.inner_text()
    response = httpx.get(f"{web_server.base_url}/api/auth/me", headers={"Authorization": f"Bearer {secret}"})
    assert response.status_code == 200 and response.json()["email"] == account.email
    page.reload()
    # Shown once: gone after a reload; the list now says when it was last used.
    expect(page.locator("#key-created")).to_be_hidden()
    expect(row).not_to_contain_text("never")
    save_screenshot(page, "account", docs_name="account")

    row.get_by_role("button", name="Revoke “my notebook”").click()
    page.get_by_role("dialog").get_by_role("button", name="Revoke").click()
    expect(row).to_contain_text("Revoked")
    response = httpx.get(f"{web_server.base_url}/api/auth/me", headers={"Authorization": f"Bearer {secret}"})
    assert response.status_code == 401
    session.watch.assert_clean()


def test_admin_sets_the_default_system_prompt(new_session, web_server: LiveServer) -> None:
    session = new_session()
    page = session.page
    sign_in(page, web_server, web_server.admin, path="/admin.html")
    prompt = "Answer in British English and cite your sources."
    page.get_by_label("Default system prompt for new conversations").fill(prompt)
    page.get_by_role("button", name="Save default").click()
    expect(page.locator("#chat-defaults-status")).to_contain_text("Saved")
    try:
        page.goto(f"{web_server.base_url}/")
        page.get_by_role("button", name="Settings").click()
        expect(page.get_by_label("System prompt")).to_have_value(prompt)
        send(page, "Hello")
        wait_for_replies(page, 1)
        with api_client(web_server, web_server.admin) as client:
            created = client.get("/api/conversations").json()[0]
        assert created["system_prompt"] == prompt
    finally:
        with api_client(web_server, web_server.admin) as client:
            client.put("/api/admin/chat-defaults", json={"default_system_prompt": ""})
    session.watch.assert_clean()


def test_the_admins_unsaved_default_prompt_survives_a_late_load_and_a_panel_switch(
    new_session, web_server: LiveServer
) -> None:
    """The stored default arriving after the admin started typing, or loaded again when the
    System panel is shown again, never replaces the typing (it did, and Save saved the old one)."""
    with api_client(web_server, web_server.admin) as client:
        client.put(
            "/api/admin/chat-defaults", json={"default_system_prompt": "Stored before."}
        ).raise_for_status()
    session = new_session()
    page = session.page
    held = []
    page.route("**/api/conversations/defaults", lambda route: held.append(route))
    try:
        sign_in(page, web_server, web_server.admin, path="/admin.html")
        field = page.get_by_label("Default system prompt for new conversations")
        expect(field).to_be_visible()
        for _ in range(100):
            if held:
                break
            page.wait_for_timeout(50)
        assert held, "the form did not ask for the stored default"
        typed = "Typed before the stored one arrived."
        field.fill(typed)
        with page.expect_response("**/api/conversations/defaults"):
            held.pop().continue_()
        page.unroute("**/api/conversations/defaults")
        expect(field).to_have_value(typed)
        page.get_by_role("tab", name="Users").click()
        page.get_by_role("tab", name="System").click()
        expect(field).to_be_visible()
        page.wait_for_timeout(300)
        expect(field).to_have_value(typed)
        page.get_by_role("button", name="Save default").click()
        expect(page.locator("#chat-defaults-status")).to_contain_text("Saved")
        with api_client(web_server, web_server.admin) as client:
            stored = client.get("/api/conversations/defaults").json()["default_system_prompt"]
        assert stored == typed
        # Once saved, showing the panel again reads the stored value (another admin's change).
        with api_client(web_server, web_server.admin) as client:
            client.put("/api/admin/chat-defaults", json={"default_system_prompt": "Changed elsewhere."})
        page.get_by_role("tab", name="Users").click()
        page.get_by_role("tab", name="System").click()
        expect(field).to_have_value("Changed elsewhere.")
    finally:
        with api_client(web_server, web_server.admin) as client:
            client.put("/api/admin/chat-defaults", json={"default_system_prompt": ""})
    session.watch.assert_clean()
