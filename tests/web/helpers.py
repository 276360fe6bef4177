"""Helpers for the browser tests: what a page did behind the user's back, screenshots, and
actions on the server itself (API calls as a user, engine state, database rows)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import BrowserContext, ConsoleMessage, Dialog, Page, Route, expect
from sqlalchemy import create_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from app.db import database_url as normalised_database_url
from app.models import Message
from tests.support.live_server import Account, LiveServer

REPO_ROOT = Path(__file__).resolve().parents[2]
STATIC_DIR = REPO_ROOT / "app" / "static"
SCREENSHOT_DIR = REPO_ROOT / "test-output" / "web"
DOCS_SCREENSHOT_DIR = REPO_ROOT / "docs" / "screenshots"
DESKTOP = {"width": 1280, "height": 800}
# Long enough that Stop has something to interrupt (the tiny model writes a few hundred tokens/s
# here) and that two such replies keep the engine busy while a test provokes a 429; short enough
# that prompt + reply fit the tiny model's 2048-token context with ZEUS_MAX_INPUT_TOKENS=512.
LONG_REPLY_TOKENS = 1400
LONG_REPLY_OPTIONS = {"ignore_eos": True, "max_tokens": LONG_REPLY_TOKENS}


@dataclass
class PageWatch:
    """What a page did that a user would not see: uncaught errors, dialogs, CSP refusals."""

    page_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    csp_violations: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        if "Content Security Policy" in message.text:
            self.csp_violations.append(message.text)
        else:
            self.console_errors.append(message.text)

    def on_dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def assert_clean(self) -> None:
        assert self.page_errors == [], f"uncaught errors in the page: {self.page_errors}"
        assert self.dialogs == [], f"unexpected dialogs (alert/confirm/prompt): {self.dialogs}"
        assert self.csp_violations == [], f"Content-Security-Policy refused something: {self.csp_violations}"


@dataclass
class BrowserSession:
    context: BrowserContext
    page: Page
    watch: PageWatch


def save_screenshot(page: Page, name: str, *, docs_name: str | None = None) -> Path:
    """Writes test-output/web/NAME.png on every run. With ZEUS_UPDATE_SCREENSHOTS=1, a screenshot
    that has a docs_name also replaces docs/screenshots/DOCS_NAME.png (the README's pictures)."""
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOT_DIR / f"{name}.png"
    page.screenshot(path=str(path))
    if docs_name and os.environ.get("ZEUS_UPDATE_SCREENSHOTS") == "1":
        DOCS_SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_SCREENSHOT_DIR / f"{docs_name}.png")
    return path


def api_client(server: LiveServer, account: Account) -> httpx.Client:
    """httpx on the server as `account`, with its API key (the conversation routes accept it too)."""
    return httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {account.api_key}"}, timeout=30
    )


def sign_in(page: Page, server: LiveServer, account: Account, path: str = "/") -> None:
    page.goto(f"{server.base_url}{path}")
    form = page.locator("#login-form")
    form.get_by_label("Email").fill(account.email)
    form.get_by_label("Password").fill(account.password)
    form.get_by_role("button", name="Sign in").click()
    expect(page.locator("#login-view")).to_be_hidden()


def set_generation_options(page: Page, **options: Any) -> None:
    """Adds generation options (docs/architecture.md) to the page's own POSTs of messages.

    The page never sends options; tests do, e.g. ignore_eos with max_tokens for a reply long enough
    to press Stop in (the tiny model otherwise answers in about ten tokens, over in 50 ms). The
    request still goes to the real server and the real stream comes back untouched."""

    def add_options(route: Route) -> None:
        if route.request.method != "POST":
            route.continue_()
            return
        body = route.request.post_data_json
        body["options"] = options
        route.continue_(post_data=json.dumps(body))

    page.route("**/api/conversations/*/messages", add_options)


def wait_for_server_status(
    server: LiveServer, account: Account, conversation_id: int, timeout_s: float = 15.0
) -> list[dict[str, Any]]:
    """The conversation's messages once no reply is streaming any more (the server's own record)."""
    deadline = time.monotonic() + timeout_s
    with api_client(server, account) as client:
        while True:
            response = client.get(f"/api/conversations/{conversation_id}/messages")
            assert response.status_code == 200, response.text
            messages = response.json()
            if all(message["status"] != "streaming" for message in messages):
                return messages
            assert time.monotonic() < deadline, f"a reply is still streaming after {timeout_s} s: {messages}"
            time.sleep(0.2)


def engine_queue(server: LiveServer) -> dict[str, int]:
    response = httpx.get(f"{server.base_url}/api/health", timeout=10)
    return response.json()["queue"]


def wait_for_engine(
    server: LiveServer, predicate: Callable[[dict[str, int]], bool], timeout_s: float = 15.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate(queue := engine_queue(server)):
        assert time.monotonic() < deadline, f"engine queue never reached the expected state: {queue}"
        time.sleep(0.1)


@contextmanager
def busy_engine(server: LiveServer, account: Account) -> Iterator[None]:
    """Fills the engine (one long reply running, one waiting) through the API, then stops both."""
    conversation_ids: list[int] = []
    threads: list[threading.Thread] = []
    with api_client(server, account) as client:
        for _ in range(2):
            conversation_ids.append(client.post("/api/conversations", json={"title": "load"}).json()["id"])

    def hold(conversation_id: int) -> None:
        with (
            api_client(server, account) as client,
            client.stream(
                "POST",
                f"/api/conversations/{conversation_id}/messages",
                json={"content": "Keep going.", "options": LONG_REPLY_OPTIONS},
                timeout=120,
            ) as response,
        ):
            for _ in response.iter_bytes():
                pass

    for started, conversation_id in enumerate(conversation_ids, start=1):
        thread = threading.Thread(target=hold, args=(conversation_id,), daemon=True)
        thread.start()
        threads.append(thread)
        # One after the other, so that the first runs and the second waits.
        wait_for_engine(server, lambda queue, count=started: queue["running"] + queue["queued"] >= count)
    try:
        yield
    finally:
        with api_client(server, account) as client:
            for conversation_id in conversation_ids:
                client.post(f"/api/conversations/{conversation_id}/stop")
        for thread in threads:
            thread.join(timeout=30)
        wait_for_engine(server, lambda queue: queue["running"] == 0 and queue["queued"] == 0)


def store_message(server: LiveServer, conversation_id: int, role: str, content: str, status: str) -> int:
    """A message row written straight to the database: the way to get exact text into a model
    reply (the model itself cannot be made to write a given HTML payload)."""
    engine = create_engine(normalised_database_url(server.env["ZEUS_DATABASE_URL"]), poolclass=NullPool)
    try:
        with Session(engine) as session, session.begin():
            message = Message(conversation_id=conversation_id, role=role, content=content, status=status)
            session.add(message)
            session.flush()
            return message.id
    finally:
        engine.dispose()
