"""A dead engine scheduler: /api/health answers 503 with the reason at once, and the process exits."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import app.main
from tests.api.conftest import serve_in_process, settings_for_tests
from tests.inference.helpers import chat, wait_for


class _SchedulerKilled(BaseException):
    """Stands for whatever could end the engine's scheduler thread."""


async def test_a_dead_engine_makes_health_fail_and_the_process_exit(
    database_url: str, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exits: list[int] = []
    monkeypatch.setattr(app.main, "exit_process", exits.append)
    monkeypatch.setattr(app.main, "ENGINE_FAILURE_GRACE_S", 0.1)
    async for zeus in serve_in_process(settings_for_tests(database_url, tiny_model_path)):
        async with zeus.client() as client:
            assert (await client.get("/api/health")).status_code == 200

            def iteration() -> None:
                raise _SchedulerKilled("injected")

            monkeypatch.setattr(zeus.engine, "_iteration", iteration)
            stream = zeus.engine.submit(chat("Hi", max_tokens=4))
            assert (await stream.result()).finish_reason == "error"
            response = await client.get("/api/health")
            assert response.status_code == 503
            body = response.json()
            assert body["status"] == "failed"
            assert "_SchedulerKilled" in body["reason"]
            await wait_for(lambda: exits == [70], timeout_s=5)
        await asyncio.sleep(0)
