"""The admin dashboard in chromium against the real app: refusal for analysts, system, usage,
users and the audit log."""

from __future__ import annotations

import re
import uuid

import httpx
import pytest
import torch
from playwright.sync_api import expect

from app.inference.loading import resolve_dtype
from tests.support.live_server import LiveServer
from tests.web.helpers import BrowserSession, api_client, save_screenshot, sign_in

pytestmark = pytest.mark.browser


@pytest.fixture
def admin(new_session, web_server: LiveServer) -> BrowserSession:
    session = new_session()
    sign_in(session.page, web_server, web_server.admin, "/admin.html")
    expect(session.page.locator("#admin-view")).to_be_visible()
    yield session
    session.watch.assert_clean()


def chat_once(server: LiveServer, text: str) -> None:
    """One real chat request by the analyst, read to the end, so that usage and samples exist."""
    with api_client(server, server.analyst) as client:
        conversation_id = client.post("/api/conversations", json={"title": "usage"}).json()["id"]
        with client.stream(
            "POST", f"/api/conversations/{conversation_id}/messages", json={"content": text}, timeout=60
        ) as response:
            assert response.status_code == 200
            assert "event: done" in response.read().decode()


def test_an_analyst_sees_admins_only_and_the_api_refuses(new_session, web_server: LiveServer) -> None:
    session = new_session()
    page = session.page
    sign_in(page, web_server, web_server.analyst, "/admin.html")

    expect(page.get_by_role("heading", name="Admins only")).to_be_visible()
    expect(page.locator("#refused-view")).to_contain_text(web_server.analyst.email)
    expect(page.get_by_role("tab")).to_have_count(0)
    expect(page.locator("#admin-view")).to_be_hidden()
    for path in ("/api/admin/users", "/api/admin/system", "/api/admin/usage", "/api/admin/audit"):
        assert page.request.get(f"{web_server.base_url}{path}").status == 403, path

    page.get_by_role("link", name="Back to the chat").click()
    expect(page.locator("#chat-view")).to_be_visible()
    session.watch.assert_clean()


def test_system_shows_this_instance_and_refreshes(admin: BrowserSession, web_server: LiveServer) -> None:
    page = admin.page
    chat_once(web_server, "What is the capital of Peru?")
    page.get_by_role("button", name="Refresh").click()

    row = page.locator("#instances-table tbody tr", has_text=f":{web_server.port}")
    expect(row).to_have_count(1)
    expect(row.locator(".badge")).to_have_text("up")
    cells = row.locator("td")
    # The device, then the engine under it (kind and dtype: what "auto" picks on this CPU,
    # bfloat16 where it has fast bfloat16, float32 elsewhere).
    dtype = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    expect(cells.nth(2)).to_have_text(re.compile(rf"^cpu\s*builtin · {dtype}"))
    expect(cells.nth(3)).to_have_text(re.compile(r"^[\d.]+ %$"))
    expect(cells.nth(4)).to_have_text(re.compile(r"MiB|GiB"))
    expect(cells.nth(10)).to_have_text(re.compile(r"just now|\d+ s ago"))
    expect(page.locator("[data-stat='Instances up'] .stat__value")).to_have_text(
        re.compile(r"^[1-9]\d* / [1-9]\d*$")
    )
    for chart in ("#chart-requests", "#chart-tokens"):
        expect(page.locator(chart)).to_have_attribute("aria-label", re.compile(r"over the last 15 minutes"))

    updated = page.locator("#system-updated").inner_text()
    expect(page.locator("#system-updated")).not_to_have_text(updated, timeout=12_000)
    save_screenshot(page, "admin")


def test_usage_shows_the_analysts_requests(admin: BrowserSession, web_server: LiveServer) -> None:
    page = admin.page
    chat_once(web_server, "What colour is snow?")
    with api_client(web_server, web_server.admin) as client:
        rows = client.get("/api/admin/usage", params={"days": 30}).json()
    expected_requests = sum(row["requests"] for row in rows if row["email"] == web_server.analyst.email)
    assert expected_requests >= 1

    page.get_by_role("tab", name="Usage").click()

    row = page.locator("#usage-totals-table tbody tr", has_text=web_server.analyst.email)
    expect(row).to_have_count(1)
    expect(row.locator("td").nth(1)).to_have_text(f"{expected_requests:,}")
    expect(page.locator("#usage-table tbody tr", has_text=web_server.analyst.email).first).to_be_visible()


def test_admin_creates_changes_disables_and_resets_a_user(
    admin: BrowserSession, web_server: LiveServer
) -> None:
    page = admin.page
    email = f"new-{uuid.uuid4().hex[:6]}@example.com"
    page.get_by_role("tab", name="Users").click()

    form = page.get_by_role("form", name="Create a user")
    form.get_by_label("Email").fill(email)
    form.get_by_label("Password").fill("first password 123")
    form.get_by_role("button", name="Create user").click()
    expect(page.locator("#users-error")).to_have_text(f"Created {email} (analyst).")
    row = page.locator("#users-table tbody tr", has_text=email)
    expect(row.locator(".badge")).to_have_text("active")

    row.get_by_label(f"Role of {email}").select_option("admin")
    expect(page.locator("#users-error")).to_have_text(f"{email} is now admin.")

    row.get_by_role("button", name=f"Disable {email}").click()
    page.get_by_role("dialog").get_by_role("button", name="Disable").click()
    expect(row.locator(".badge")).to_have_text("disabled")
    with api_client(web_server, web_server.admin) as client:
        stored = next(user for user in client.get("/api/admin/users").json() if user["email"] == email)
    assert (stored["role"], stored["disabled"]) == ("admin", True)
    login = {"email": email, "password": "first password 123"}
    assert httpx.post(f"{web_server.base_url}/api/auth/login", json=login).status_code == 403

    row.get_by_role("button", name=f"Enable {email}").click()
    expect(row.locator(".badge")).to_have_text("active")

    row.get_by_role("button", name=f"Reset the password of {email}").click()
    page.get_by_role("dialog").get_by_role("button", name="Reset password").click()
    new_password = page.locator("[data-secret=password]").inner_text()
    assert len(new_password) >= 12
    page.get_by_role("dialog").get_by_role("button", name="Done").click()
    login = {"email": email, "password": new_password}
    assert httpx.post(f"{web_server.base_url}/api/auth/login", json=login).status_code == 200


def test_audit_log_is_paged(admin: BrowserSession, web_server: LiveServer) -> None:
    page = admin.page
    with (
        api_client(web_server, web_server.analyst) as analyst,
        api_client(web_server, web_server.admin) as boss,
    ):
        for index in range(120):
            total = boss.get("/api/admin/audit", params={"page": 1, "page_size": 1}).json()["total"]
            if total > 60:
                break
            assert analyst.post("/api/keys", json={"name": f"audit filler {index}"}).status_code in (200, 201)
    pages = -(-total // 50)

    page.get_by_role("tab", name="Audit log").click()

    expect(page.locator("#audit-table tbody tr")).to_have_count(50)
    expect(page.locator("#audit-page")).to_have_text(
        re.compile(rf"^Page 1 of {pages}$|^Page 1 of {pages + 1}$")
    )
    expect(page.get_by_role("button", name="← Newer")).to_be_disabled()
    page.get_by_role("button", name="Older →").click()
    expect(page.locator("#audit-page")).to_have_text(re.compile(r"^Page 2 of \d+$"))
    expect(page.get_by_role("button", name="← Newer")).to_be_enabled()
    assert page.locator("#audit-table tbody tr").count() >= 1
    # The admin's own sign-in is on the first page, newest first.
    page.get_by_role("button", name="← Newer").click()
    expect(
        page.locator("#audit-table tbody tr[data-action=login]", has_text=web_server.admin.email).first
    ).to_be_visible()
