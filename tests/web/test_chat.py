"""The chat page in chromium against the real app (tiny model, PostgreSQL): sign-in, streaming,
stop, regenerate, conversations, error messages and XSS."""

from __future__ import annotations

import re
import uuid

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.support.live_server import LiveServer
from tests.web.helpers import (
    LONG_REPLY_OPTIONS,
    LONG_REPLY_TOKENS,
    BrowserSession,
    api_client,
    busy_engine,
    engine_queue,
    save_screenshot,
    set_generation_options,
    sign_in,
    store_message,
    wait_for_engine,
    wait_for_server_status,
)

pytestmark = pytest.mark.browser

XSS_PAYLOADS = (
    "<img src=x onerror=\"window.__xss='img';alert('img')\">",
    "<script>window.__xss='script';alert('script')</script>",
    "<svg onload=\"window.__xss='svg'\"></svg>",
    "[link](javascript:window.__xss='link')",
)


@pytest.fixture
def chat(new_session, web_server: LiveServer) -> BrowserSession:
    session = new_session()
    sign_in(session.page, web_server, web_server.analyst)
    expect(session.page.locator("#chat-view")).to_be_visible()
    yield session
    session.watch.assert_clean()


def current_conversation_id(page: Page) -> int:
    match = re.search(r"#c/(\d+)$", page.url)
    assert match, f"no conversation in the address: {page.url}"
    return int(match.group(1))


def send(page: Page, text: str) -> None:
    page.get_by_label("Message", exact=True).fill(text)
    page.get_by_label("Message", exact=True).press("Enter")


def last_reply(page: Page):
    return page.locator(".message--assistant").last


def wait_for_replies(page: Page, count: int) -> None:
    """Until `count` replies are on the page and none is streaming any more."""
    settled = page.locator(".message--assistant:not([data-status=streaming])")
    expect(settled).to_have_count(count, timeout=30_000)
    expect(page.get_by_role("button", name="Send")).to_be_visible()


def test_wrong_password_is_explained_then_sign_in_works(new_session, web_server: LiveServer) -> None:
    session = new_session()
    page = session.page
    page.goto(web_server.base_url)
    page.get_by_label("Email").fill(web_server.analyst.email)
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Sign in").click()

    expect(page.get_by_role("alert")).to_have_text("Wrong email or password.")

    page.get_by_label("Password").fill(web_server.analyst.password)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#user-email")).to_have_text(web_server.analyst.email)
    expect(page.get_by_role("link", name="Admin")).to_be_hidden()

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    page.reload()
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    session.watch.assert_clean()


def test_too_many_failed_sign_ins_say_when_to_retry(new_session, web_server: LiveServer) -> None:
    account = web_server.create_account(f"throttled-{uuid.uuid4().hex[:6]}@example.com", "analyst")
    wrong = {"email": account.email, "password": "wrong password"}
    statuses = [
        httpx.post(f"{web_server.base_url}/api/auth/login", json=wrong).status_code for _ in range(10)
    ]
    assert statuses == [401] * 10
    session = new_session()
    page = session.page
    page.goto(web_server.base_url)

    with page.expect_response("**/api/auth/login") as refused:
        page.get_by_label("Email").fill(account.email)
        page.get_by_label("Password").fill(account.password)
        page.get_by_role("button", name="Sign in").click()

    assert refused.value.status == 429
    retry_after = int(refused.value.headers["retry-after"])
    expect(page.get_by_role("alert")).to_contain_text(f"Retry in {retry_after} s.")
    expect(page.locator("#chat-view")).to_be_hidden()
    session.watch.assert_clean()


def test_reply_streams_in_and_survives_a_reload(chat: BrowserSession, web_server: LiveServer) -> None:
    page = chat.page
    # Long enough to span many 40 ms redraws even where the model writes fast: 300 tokens took
    # under two redraws on a quiet CI machine, so the page had nothing to draw in between.
    set_generation_options(page, **LONG_REPLY_OPTIONS)
    # Every text length the reply passes through on screen, as the browser renders it.
    page.evaluate(
        """() => {
            window.__replyLengths = [];
            new MutationObserver(() => {
                const body = document.querySelector('.message--assistant:last-of-type .message__body');
                const length = body ? body.textContent.length : 0;
                const seen = window.__replyLengths;
                if (length && seen[seen.length - 1] !== length) seen.push(length);
            }).observe(document.getElementById('messages-inner'),
                       {childList: true, subtree: true, characterData: true});
        }"""
    )

    send(page, "What is the capital of France?")

    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    expect(last_reply(page)).to_have_attribute("data-status", "complete", timeout=30_000)
    lengths = page.evaluate("window.__replyLengths")
    assert len(lengths) >= 5, f"the reply appeared in {len(lengths)} steps, not token by token: {lengths}"
    assert lengths == sorted(lengths), f"the reply text shrank while streaming: {lengths}"
    expect(last_reply(page).locator(".message__stats")).to_contain_text(f"{LONG_REPLY_TOKENS} tokens")

    conversation_id = current_conversation_id(page)
    stored = wait_for_server_status(web_server, web_server.analyst, conversation_id)
    assert [(message["role"], message["status"]) for message in stored] == [
        ("user", "complete"),
        ("assistant", "complete"),
    ]
    assert stored[1]["completion_tokens"] == LONG_REPLY_TOKENS
    reply_id = last_reply(page).get_attribute("data-message-id")
    assert reply_id == str(stored[1]["id"])

    page.reload()

    expect(page.locator("#conversation-title")).to_have_text("What is the capital of France?")
    expect(page.locator(".message--user .message__body")).to_have_text("What is the capital of France?")
    expect(last_reply(page)).to_have_attribute("data-message-id", reply_id)
    expect(last_reply(page)).to_have_attribute("data-status", "complete")
    assert last_reply(page).locator(".message__body").inner_text().strip() != ""
    expect(page.locator(".conversation[data-current=true]")).to_have_count(1)


def test_stop_cancels_the_generation_on_the_server(chat: BrowserSession, web_server: LiveServer) -> None:
    page = chat.page
    set_generation_options(page, **LONG_REPLY_OPTIONS)

    send(page, "Tell me everything about bonds.")
    reply_body = last_reply(page).locator(".message__body")
    expect(reply_body).not_to_have_text("", timeout=15_000)
    assert engine_queue(web_server)["running"] == 1
    page.get_by_role("button", name="Stop").click()

    expect(last_reply(page)).to_have_attribute("data-status", "stopped")
    expect(last_reply(page).locator(".badge")).to_have_text("Stopped")
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    stored = wait_for_server_status(web_server, web_server.analyst, current_conversation_id(page))
    reply = stored[-1]
    assert reply["role"] == "assistant"
    assert reply["status"] == "stopped"
    assert 0 < reply["completion_tokens"] < LONG_REPLY_TOKENS
    assert reply["content"], "the partial reply is kept"
    # The engine's slot is free again: nothing keeps generating the other ~4000 tokens.
    wait_for_engine(web_server, lambda queue: queue["running"] == 0 and queue["queued"] == 0, timeout_s=5)

    page.reload()
    expect(last_reply(page)).to_have_attribute("data-status", "stopped")
    expect(last_reply(page).locator(".badge")).to_have_text("Stopped")


def test_regenerate_replaces_the_last_reply(chat: BrowserSession, web_server: LiveServer) -> None:
    page = chat.page
    send(page, "What colour is the sky?")
    wait_for_replies(page, 1)
    first_reply_id = last_reply(page).get_attribute("data-message-id")

    page.get_by_role("button", name="Regenerate", exact=True).click()

    new_reply = page.locator(f".message--assistant:not([data-message-id='{first_reply_id}'])")
    expect(new_reply).to_have_attribute("data-status", "complete", timeout=30_000)
    expect(page.locator(".message--assistant")).to_have_count(1)
    new_reply_id = last_reply(page).get_attribute("data-message-id")
    assert new_reply_id != first_reply_id
    stored = wait_for_server_status(web_server, web_server.analyst, current_conversation_id(page))
    assert [message["role"] for message in stored] == ["user", "assistant"]
    assert str(stored[1]["id"]) == new_reply_id


def test_enter_sends_and_shift_enter_adds_a_line(chat: BrowserSession) -> None:
    page = chat.page
    prompt = page.get_by_label("Message", exact=True)
    prompt.click()
    prompt.press_sequentially("first line")
    prompt.press("Shift+Enter")
    prompt.press_sequentially("second line")

    expect(prompt).to_have_value("first line\nsecond line")
    expect(page.locator(".message")).to_have_count(0)

    prompt.press("Enter")

    expect(page.locator(".message--user .message__body")).to_have_text("first line\nsecond line")
    expect(prompt).to_have_value("")
    wait_for_replies(page, 1)


def test_conversations_new_rename_delete_newest_first(chat: BrowserSession, web_server: LiveServer) -> None:
    page = chat.page
    send(page, "alpha question")
    wait_for_replies(page, 1)
    alpha_id = current_conversation_id(page)
    page.get_by_role("button", name="New chat").click()
    expect(page.locator(".message")).to_have_count(0)
    send(page, "beta question")
    wait_for_replies(page, 1)

    titles = page.locator(".conversation__title")
    expect(titles.nth(0)).to_have_text("beta question")
    expect(titles.nth(1)).to_have_text("alpha question")

    page.get_by_role("button", name="Rename “beta question”").click()
    page.get_by_label("New title").fill("Renamed chat")
    page.get_by_label("New title").press("Enter")
    expect(titles.nth(0)).to_have_text("Renamed chat")
    expect(page.locator("#conversation-title")).to_have_text("Renamed chat")

    page.get_by_role("button", name="Delete “alpha question”").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("alpha question")
    dialog.get_by_role("button", name="Delete").click()
    expect(page.get_by_text("alpha question")).to_have_count(0)

    with api_client(web_server, web_server.analyst) as client:
        listed = {
            conversation["id"]: conversation["title"]
            for conversation in client.get("/api/conversations").json()
        }
        assert listed.get(current_conversation_id(page)) == "Renamed chat"
        assert alpha_id not in listed
        assert client.get(f"/api/conversations/{alpha_id}/messages").status_code == 404


def test_busy_server_says_when_to_retry(chat: BrowserSession, web_server: LiveServer) -> None:
    page = chat.page
    with busy_engine(web_server, web_server.analyst):
        with page.expect_response(re.compile(r"/api/conversations/\d+/messages$")) as refused:
            send(page, "Are you there?")
        assert refused.value.status == 429
        retry_after = int(refused.value.headers["retry-after"])

        notice = page.locator("#notice")
        expect(notice).to_contain_text("Zeus is busy right now")
        expect(notice).to_contain_text(f"Retry in {retry_after} s.")
        expect(page.locator(".message")).to_have_count(0)
        expect(page.get_by_label("Message", exact=True)).to_have_value("Are you there?")
        expect(notice.get_by_role("button", name=re.compile(r"^Retry in \d+ s$"))).to_be_disabled()

    # The countdown ends with a usable Retry, which sends the kept text once the engine has room.
    retry = notice.get_by_role("button", name="Retry", exact=True)
    expect(retry).to_be_enabled(timeout=(retry_after + 5) * 1000)
    retry.click()
    expect(page.locator(".message--user .message__body")).to_have_text("Are you there?")
    wait_for_replies(page, 1)
    expect(last_reply(page)).to_have_attribute("data-status", "complete")


def test_too_long_message_names_the_limit(chat: BrowserSession, web_server: LiveServer) -> None:
    page = chat.page
    limit = web_server.env["ZEUS_MAX_INPUT_TOKENS"]
    long_text = "market report " * 600

    send(page, long_text)

    notice = page.locator("#notice")
    expect(notice).to_contain_text("Message not sent")
    expect(notice).to_contain_text(f"the limit is {limit} tokens")
    expect(page.locator(".message")).to_have_count(0)
    expect(page.get_by_label("Message", exact=True)).to_have_value(long_text)


def test_lost_connection_offers_a_retry(chat: BrowserSession) -> None:
    page = chat.page
    page.context.set_offline(True)

    send(page, "Hello while offline")

    notice = page.locator("#notice")
    expect(notice).to_contain_text("Lost connection to the server")
    page.context.set_offline(False)
    notice.get_by_role("button", name="Retry").click()
    expect(page.locator(".message--user .message__body")).to_have_text("Hello while offline")
    wait_for_replies(page, 1)
    expect(last_reply(page)).to_have_attribute("data-status", "complete")


def test_html_in_a_user_message_is_inert(chat: BrowserSession, web_server: LiveServer) -> None:
    page = chat.page
    payload = "\n".join(XSS_PAYLOADS)

    send(page, payload)
    wait_for_replies(page, 1)

    expect(page.locator(".message--user .message__body")).to_have_text(payload)
    assert page.locator("#messages img, #messages script, #messages svg:not(.message svg)").count() == 0
    assert page.locator("main img:not([src='/favicon.svg']), main script").count() == 0
    assert page.evaluate("window.__xss") is None
    page.reload()
    expect(page.locator(".message--user .message__body")).to_have_text(payload)
    expect(page.locator(".conversation__title").first).to_contain_text("<img src=x")
    assert page.locator("#messages img, #messages script").count() == 0
    assert page.evaluate("window.__xss") is None


def test_html_in_a_model_reply_is_inert_and_statuses_are_labelled(
    chat: BrowserSession, web_server: LiveServer
) -> None:
    page = chat.page
    with api_client(web_server, web_server.analyst) as client:
        conversation_id = client.post("/api/conversations", json={"title": "stored replies"}).json()["id"]
    hostile_reply = (
        "Here you go:\n\n" + "\n\n".join(XSS_PAYLOADS) + "\n\n```html\n<script>alert(1)</script>\n```"
    )
    store_message(web_server, conversation_id, "user", "Show me some HTML", "complete")
    store_message(web_server, conversation_id, "assistant", hostile_reply, "complete")
    store_message(web_server, conversation_id, "user", "And again", "complete")
    store_message(web_server, conversation_id, "assistant", "Half an ans", "interrupted")
    store_message(web_server, conversation_id, "user", "Once more", "complete")
    store_message(web_server, conversation_id, "assistant", "", "error")

    page.goto(f"{web_server.base_url}/#c/{conversation_id}")

    replies = page.locator(".message--assistant")
    expect(replies).to_have_count(3)
    first = replies.nth(0).locator(".message__body")
    for payload in XSS_PAYLOADS[:3]:
        expect(first).to_contain_text(payload)
    expect(first.locator("code")).to_have_text("<script>alert(1)</script>")
    assert first.locator("img, script, svg, a[href^='javascript']").count() == 0
    assert page.evaluate("window.__xss") is None
    expect(replies.nth(1).locator(".badge")).to_have_text("Interrupted")
    expect(replies.nth(2).locator(".badge")).to_have_text("Error")
    expect(replies.nth(2)).to_contain_text("The reply failed")


def test_chat_page_on_a_narrow_window(new_session, web_server: LiveServer) -> None:
    session = new_session(viewport={"width": 390, "height": 800})
    page = session.page
    sign_in(page, web_server, web_server.analyst)

    expect(page.get_by_role("button", name="New chat")).to_be_hidden()
    page.get_by_role("button", name="Show conversations").click()
    expect(page.get_by_role("button", name="New chat")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.get_by_role("button", name="New chat")).to_be_hidden()
    send(page, "What is the capital of Japan?")
    wait_for_replies(page, 1)
    save_screenshot(page, "chat-narrow")
    session.watch.assert_clean()


def test_chat_screenshot(chat: BrowserSession) -> None:
    page = chat.page
    # Greedy decoding: the tiny model then gives the answers it was trained on, which reads better.
    set_generation_options(page, temperature=0)
    questions = ("What is the capital of Italy?", "What colour is grass?", "Say thank you in French.")
    for asked, question in enumerate(questions, start=1):
        send(page, question)
        wait_for_replies(page, asked)
    expect(page.locator(".message--assistant[data-status=complete]")).to_have_count(3)
    save_screenshot(page, "chat")


def test_a_message_sent_while_the_list_loads_keeps_its_reply(new_session, web_server: LiveServer) -> None:
    """The composer works before the conversation list arrives; the list arriving mid-reply must
    neither open the draft nor re-render the conversation over the reply that is streaming (the
    reply went blank on a loaded CI machine)."""
    session = new_session()
    page = session.page
    held = []

    def hold_the_list(route) -> None:
        if route.request.method == "GET":
            held.append(route)
        else:
            route.continue_()

    page.route(re.compile(r"/api/conversations$"), hold_the_list)
    set_generation_options(page, **LONG_REPLY_OPTIONS)
    sign_in(page, web_server, web_server.analyst)
    expect(page.locator("#chat-view")).to_be_visible()
    assert held, "the page asked for its conversation list"

    send(page, "Tell me about the list race.")
    reply_body = last_reply(page).locator(".message__body")
    expect(reply_body).not_to_have_text("", timeout=15_000)
    last_reply(page).evaluate("element => { element.dataset.watched = 'yes'; }")

    page.unroute(re.compile(r"/api/conversations$"))
    for route in held:
        route.continue_()
    expect(page.get_by_role("list", name="Conversations")).to_contain_text("Tell me about the list race.")
    expect(page.locator(".message--assistant")).to_have_count(1)
    page.get_by_role("button", name="Stop").click()

    watched = page.locator(".message--assistant[data-watched=yes]")
    expect(watched).to_have_attribute("data-status", "stopped")
    expect(page.locator(".welcome")).to_have_count(0)
    assert page.locator(".message--user").count() == 1
    session.watch.assert_clean()
