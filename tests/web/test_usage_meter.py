"""The token budget on the chat page (js/usage-meter.js) in chromium against the real app: the
user sees their use and budget, the meter follows a reply, and an exhausted budget is explained
with its reset time when a message is refused."""

from __future__ import annotations

import re
import uuid

import pytest
from playwright.sync_api import expect

from tests.support.live_server import LiveServer
from tests.web.helpers import api_client, save_screenshot, set_generation_options, sign_in

pytestmark = pytest.mark.browser


def test_budget_is_shown_and_an_exhausted_one_says_when_it_resets(
    new_session, web_server: LiveServer
) -> None:
    account = web_server.create_account(f"budget-{uuid.uuid4().hex[:6]}@example.com", "analyst")
    with api_client(web_server, web_server.admin) as admin:
        user_id = next(
            user["id"] for user in admin.get("/api/admin/users").json() if user["email"] == account.email
        )
        # Room for exactly one short reply: its prompt alone is a few dozen tokens.
        changed = admin.patch(f"/api/admin/users/{user_id}/limits", json={"daily_token_budget": 40})
        assert changed.status_code == 200, changed.text
    session = new_session()
    page = session.page
    sign_in(page, web_server, account)
    meter = page.locator("#usage-meter")
    expect(meter).to_be_visible()
    expect(meter).to_have_text(re.compile(r"^Tokens: 0 / 40 today · 0 this month$"))
    expect(meter).to_have_attribute("data-state", "ok")

    set_generation_options(page, max_tokens=8, ignore_eos=True)
    page.get_by_label("Message", exact=True).fill("Hello there, how are you today?")
    page.get_by_label("Message", exact=True).press("Enter")
    expect(page.locator(".message--assistant[data-status=complete]")).to_have_count(1, timeout=30_000)
    # The reply's tokens (prompt + 8) used the budget up: the meter says so once the reply ends.
    expect(meter).to_have_attribute("data-state", "exhausted")
    expect(meter).to_contain_text("budget used up, resets")
    with api_client(web_server, account) as client:
        usage = client.get("/api/auth/me/usage").json()
    day = next(item for item in usage["budgets"] if item["period"] == "day")
    assert day["used"] >= 40 and day["budget"] == 40
    expect(meter).to_contain_text(f"{day['used']} / 40 today")

    with page.expect_response(re.compile(r"/api/conversations/\d+/messages$")) as refused:
        page.get_by_label("Message", exact=True).fill("One more?")
        page.get_by_label("Message", exact=True).press("Enter")
    assert refused.value.status == 429
    notice = page.locator("#notice")
    expect(notice).to_contain_text("daily token budget is used up")
    expect(notice).to_contain_text(re.compile(r"resets at \d{4}-\d\d-\d\d 00:00 UTC"))
    save_screenshot(page, "budget-exhausted")
    session.watch.assert_clean()
