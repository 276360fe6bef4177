"""Browser fixtures: Debian's chromium driven by Playwright, the real app to point it at, and a
plain static server for tests of the page code alone. Helpers live in tests/web/helpers.py."""

from __future__ import annotations

import functools
import http.server
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Playwright, sync_playwright

from tests.support.databases import fresh_database
from tests.support.live_server import LiveServer, start_live_server
from tests.web.helpers import DESKTOP, LONG_REPLY_TOKENS, STATIC_DIR, BrowserSession, PageWatch

CHROMIUM = Path(os.environ.get("ZEUS_CHROMIUM", "/usr/bin/chromium"))
# The browser download step does not work offline: use the distribution's chromium, sandbox off
# because CI runs as root in a container.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def playwright_instance() -> Iterator[Playwright]:
    with sync_playwright() as playwright:
        yield playwright


@pytest.fixture(scope="session")
def browser(playwright_instance: Playwright) -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: `make system-deps` installs Debian's chromium, or set ZEUS_CHROMIUM"
        )
    browser = playwright_instance.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    yield browser
    browser.close()


@pytest.fixture
def new_session(browser: Browser) -> Iterator[Callable[..., BrowserSession]]:
    """Factory of fresh browser profiles (own cookies), each with a watched page."""
    sessions: list[BrowserSession] = []

    def make(viewport: dict[str, int] | None = None) -> BrowserSession:
        context = browser.new_context(viewport=viewport or DESKTOP, locale="en-GB", timezone_id="UTC")
        context.set_default_timeout(15_000)
        page = context.new_page()
        watch = PageWatch()
        page.on("console", watch.on_console)
        page.on("pageerror", lambda error: watch.page_errors.append(str(error)))
        page.on("dialog", watch.on_dialog)
        session = BrowserSession(context, page, watch)
        sessions.append(session)
        return session

    yield make
    for session in sessions:
        session.context.close()


class _QuietStaticHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="session")
def static_server() -> Iterator[str]:
    """app/static over HTTP (ES modules do not load from file://); for tests of the page code alone."""
    handler = functools.partial(_QuietStaticHandler, directory=str(STATIC_DIR))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def web_server(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The real app (`python -m app serve`, tests/support/live_server.py) on the tiny model, serving
    app/static at / as in development, on its own fresh database so that other suites' failed
    logins from 127.0.0.1 cannot trip the per-address throttle here.

    Limits differ from the shared live_server on purpose: one generation at a time and one waiting
    (a third request gets a real 429), and replies up to LONG_REPLY_TOKENS tokens (a real stop)."""
    with fresh_database("web") as database_url:
        server = start_live_server(
            database_url,
            tiny_model_path,
            tmp_path_factory.mktemp("web-server"),
            ZEUS_STATIC_DIR=str(STATIC_DIR),
            ZEUS_MAX_BATCH_SIZE="1",
            ZEUS_MAX_QUEUE="1",
            ZEUS_MAX_NEW_TOKENS=str(LONG_REPLY_TOKENS),
        )
        try:
            tag = uuid.uuid4().hex[:6]
            server.admin = server.create_account(f"admin-{tag}@example.com", "admin")
            server.analyst = server.create_account(f"analyst-{tag}@example.com", "analyst")
            yield server
        finally:
            server.stop()
