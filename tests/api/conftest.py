"""The API tests' fixtures: one real app per test module, served by uvicorn inside the test
process (so tests can read engine.stats()), on the tiny model and the session's database."""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import uvicorn
from sqlalchemy import text

from app.auth.accounts import create_api_key, create_user
from app.config import Settings
from app.db import transaction
from app.main import build_app
from app.startup import load_engine
from app.state import ZeusState
from tests.support.live_server import TEST_SECRET_KEY, free_port

PASSWORD = "correct horse battery"


def settings_for_tests(database_url: str, model_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "secret_key": TEST_SECRET_KEY,
        "model_path": model_path,
        "device": "cpu",
        "torch_threads": 1,
        "max_batch_size": 4,
        "max_queue": 4,
        "max_input_tokens": 512,
        "max_new_tokens": 64,
        "heartbeat_interval_s": 1.0,
        "stream_flush_interval_s": 0.3,
        "drain_timeout_s": 2.0,
        "instance_name": f"test-{uuid.uuid4().hex[:6]}",
        # Every test logs in from 127.0.0.1 against one shared database: the per-address rule
        # would otherwise add up the deliberate failures of unrelated tests.
        "login_max_failures_per_address": 1000,
    }
    values.update(overrides)
    # _env_file=None and explicit values: the developer's own ZEUS_* variables must not leak in.
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@dataclass
class Member:
    id: int
    email: str
    role: str
    api_key: str
    password: str = PASSWORD

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@dataclass
class Zeus:
    base_url: str
    state: ZeusState
    server: uvicorn.Server

    @property
    def engine(self):
        return self.state.engine

    def client(self, **options: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, timeout=60, **options)

    def member(self, role: str = "analyst", prefix: str = "user") -> Member:
        email = f"{prefix}-{uuid.uuid4().hex[:8]}@example.com"
        with transaction(self.state.sessions) as db:
            user = create_user(db, email=email, password=PASSWORD, role=role)
            key = create_api_key(db, user=user, name="tests", actor=None)
            return Member(id=user.id, email=email, role=role, api_key=key.secret)

    @asynccontextmanager
    async def logged_in(self, member: Member) -> AsyncIterator[httpx.AsyncClient]:
        async with self.client() as client:
            response = await client.post(
                "/api/auth/login", json={"email": member.email, "password": member.password}
            )
            assert response.status_code == 200, response.text
            yield client


async def serve_in_process(settings: Settings) -> AsyncIterator[Zeus]:
    app = build_app(settings, load_engine(settings))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("uvicorn stopped before it started")
        await asyncio.sleep(0.05)
    try:
        yield Zeus(base_url=f"http://127.0.0.1:{port}", state=app.state.zeus, server=server)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


@contextmanager
def serve_in_thread(settings: Settings) -> Iterator[Zeus]:
    """The same, on its own event loop in a thread: for synchronous tests (schemathesis)."""
    started: queue.Queue[Zeus | BaseException] = queue.Queue()
    stop = threading.Event()

    async def main() -> None:
        try:
            async for running in serve_in_process(settings):
                started.put(running)
                await asyncio.to_thread(stop.wait)
        except BaseException as error:
            started.put(error)
            raise

    thread = threading.Thread(target=asyncio.run, args=(main(),), name="zeus-test-server", daemon=True)
    thread.start()
    running = started.get(timeout=120)
    if isinstance(running, BaseException):
        raise running
    try:
        yield running
    finally:
        stop.set()
        thread.join(timeout=60)


@pytest_asyncio.fixture(scope="module")
async def zeus(database_url: str, tiny_model_path: Path) -> AsyncIterator[Zeus]:
    async for running in serve_in_process(settings_for_tests(database_url, tiny_model_path)):
        yield running


@pytest.fixture(scope="module")
def admin(zeus: Zeus) -> Member:
    return zeus.member("admin", "admin")


@pytest.fixture(scope="module")
def analyst(zeus: Zeus) -> Member:
    return zeus.member("analyst", "analyst")


@pytest.fixture(scope="module")
def other_analyst(zeus: Zeus) -> Member:
    return zeus.member("analyst", "other")


def insert_stale_instance(zeus: Zeus, name: str, run_id: str, age: str, in_flight: int = 0) -> None:
    """The row a crashed host leaves behind: its last heartbeat is `age` (an SQL interval) old."""
    with transaction(zeus.state.sessions) as db:
        db.execute(
            text(
                "INSERT INTO instances (name, run_id, host, port, pid, model, device, started_at, "
                "last_heartbeat, cpu_percent, rss_bytes, in_flight, queue_running, queue_waiting, "
                "requests_per_s, tokens_per_s) VALUES (:name, :run_id, 'gone', 9, 9, 'm', 'cpu', now(), "
                "now() - CAST(:age AS interval), 50, 1, :in_flight, 1, 1, 9, 9) "
                "ON CONFLICT (name) DO UPDATE SET last_heartbeat = now() - CAST(:age AS interval)"
            ),
            {"name": name, "run_id": run_id, "age": age, "in_flight": in_flight},
        )


def parse_sse(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) of each server-sent event in a body."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                data.append(line.removeprefix("data:").strip())
        events.append((name, "\n".join(data)))
    return events
