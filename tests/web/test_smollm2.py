"""The chat page and dashboard with the real SmolLM2 model: a reply with markdown and code, and
the screenshots the README shows (docs/screenshots/, refreshed with ZEUS_UPDATE_SCREENSHOTS=1)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.support.databases import fresh_database
from tests.support.live_server import LiveServer, start_live_server
from tests.web.helpers import STATIC_DIR, save_screenshot, set_generation_options, sign_in

pytestmark = [pytest.mark.browser, pytest.mark.smollm2, pytest.mark.slow]

QUESTION = "How do I reverse a list in Python? Answer briefly with a short code example."


@pytest.fixture(scope="module")
def smollm2_server(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with fresh_database("websmollm2") as database_url:
        server = start_live_server(
            database_url,
            smollm2_path,
            tmp_path_factory.mktemp("smollm2-server"),
            ZEUS_STATIC_DIR=str(STATIC_DIR),
            ZEUS_MAX_INPUT_TOKENS="1024",
            ZEUS_MAX_NEW_TOKENS="300",
        )
        try:
            server.admin = server.create_account("admin@example.com", "admin", password=uuid.uuid4().hex)
            server.analyst = server.create_account(
                "analyst@example.com", "analyst", password=uuid.uuid4().hex
            )
            yield server
        finally:
            server.stop()


def test_smollm2_reply_renders_markdown_and_code(new_session, smollm2_server: LiveServer) -> None:
    chat = new_session()
    page = chat.page
    sign_in(page, smollm2_server, smollm2_server.analyst)
    # Greedy decoding, so that the reply (and the README's picture) is the same on every run.
    set_generation_options(page, temperature=0)

    page.get_by_label("Message", exact=True).fill(QUESTION)
    page.get_by_label("Message", exact=True).press("Enter")

    reply = page.locator(".message--assistant").last
    expect(reply).to_have_attribute("data-status", "complete", timeout=180_000)
    code = reply.locator(".code-block code")
    expect(code.first).to_contain_text("def ")
    assert reply.locator(".code-block .hljs-keyword").count() >= 1, "the code block is not highlighted"
    expect(reply.get_by_role("button", name="Copy python code")).to_be_visible()
    save_screenshot(page, "chat-smollm2", docs_name="chat")
    chat.watch.assert_clean()

    dashboard = new_session()
    sign_in(dashboard.page, smollm2_server, smollm2_server.admin, "/admin.html")
    row = dashboard.page.locator("#instances-table tbody tr", has_text=f":{smollm2_server.port}")
    expect(row).to_contain_text("smollm2-135m-instruct")
    save_screenshot(dashboard.page, "admin-smollm2", docs_name="admin")
    dashboard.watch.assert_clean()
