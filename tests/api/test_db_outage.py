"""A real database outage: the app's database refuses connections and its sessions are killed.
The app answers 503 with a clear body, its health says degraded, and it recovers by itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
from sqlalchemy.engine import make_url

from tests.api.conftest import Zeus, serve_in_process, settings_for_tests
from tests.support.databases import fresh_database, run_admin_sql


@pytest_asyncio.fixture(scope="module")
async def zeus(tiny_model_path: Path) -> AsyncIterator[Zeus]:
    # Its own database: the outage must not touch the one the other tests share.
    with fresh_database("outage") as url:
        async for running in serve_in_process(settings_for_tests(url, tiny_model_path, db_pool_timeout_s=3)):
            yield running


def set_outage(database: str, down: bool) -> None:
    run_admin_sql(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {"false" if down else "true"}')
    if down:
        run_admin_sql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'")


async def test_outage_answers_503_and_recovers_without_restart(zeus: Zeus) -> None:
    member = zeus.member()
    database = make_url(zeus.state.settings.database_url).database
    async with zeus.client(headers=member.bearer) as client:
        assert (await client.get("/api/conversations")).status_code == 200
        set_outage(database, down=True)
        try:
            down = await client.get("/api/conversations")
            assert down.status_code == 503
            assert down.json()["detail"].startswith("database unavailable")
            assert "Traceback" not in down.text and down.headers["retry-after"]
            openai_style = await client.get("/api/v1/models")
            assert openai_style.status_code == 503 and openai_style.json()["error"]["message"].startswith(
                "database"
            )
            health = await client.get("/api/health")
            assert health.status_code == 503
            assert health.json()["status"] == "degraded" and health.json()["db"] != "ok"
            await asyncio.sleep(1.5)  # heartbeats fail meanwhile; the app must keep running
        finally:
            set_outage(database, down=False)
        deadline = time.monotonic() + 15
        while (await client.get("/api/health")).status_code != 200:
            assert time.monotonic() < deadline, "did not recover"
            await asyncio.sleep(0.2)
        assert (await client.get("/api/conversations")).status_code == 200
        conversation = (await client.post("/api/conversations", json={})).json()["id"]
        reply = await client.post(f"/api/conversations/{conversation}/messages", json={"content": "back?"})
        assert reply.status_code == 200 and "event: done" in reply.text
