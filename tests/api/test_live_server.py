"""The `live_server` fixture the browser tests use: the app as `python -m app serve`, with an admin
and an analyst created by the CLI, and the pages served from app/static."""

from __future__ import annotations

import httpx

from tests.api.conftest import parse_sse
from tests.support.live_server import LiveServer, run_cli


def test_live_server_serves_api_pages_and_cli_accounts(live_server: LiveServer) -> None:
    with httpx.Client(base_url=live_server.base_url, timeout=60) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        login = client.post(
            "/api/auth/login",
            json={"email": live_server.analyst.email, "password": live_server.analyst.password},
        )
        assert login.status_code == 200 and login.json()["role"] == "analyst"
        conversation = client.post("/api/conversations", json={}).json()["id"]
        events = parse_sse(
            client.post(f"/api/conversations/{conversation}/messages", json={"content": "Hi"}).text
        )
        assert events[-1][0] == "done"
    with httpx.Client(
        base_url=live_server.base_url, headers={"Authorization": f"Bearer {live_server.admin.api_key}"}
    ) as admin:
        assert admin.get("/api/admin/users").status_code == 200
    assert run_cli(live_server.env, "check").returncode == 0
