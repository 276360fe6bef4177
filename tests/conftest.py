"""Fixtures shared by every test package."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.support.live_server import LiveServer

REPO_ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_PATH = REPO_ROOT / "models" / "smollm2-135m-instruct"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    """The tiny generated model (fixed seed), built once and reused across runs."""
    from tests.support.tiny_model import build_tiny_model

    return build_tiny_model(REPO_ROOT / ".pytest_cache" / "tiny-model")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    if not (SMOLLM2_PATH / "config.json").exists():
        pytest.fail(f"{SMOLLM2_PATH} is missing: run `make setup` first")
    return SMOLLM2_PATH


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, migrated to head, dropped at the end.

    On the cluster of tests/support/start-postgres.sh (role zeus_test/zeus_test on 127.0.0.1:5432),
    or on the server of ZEUS_TEST_DATABASE_URL (an admin URL whose role may CREATE DATABASE).
    """
    from tests.support.databases import fresh_database

    with fresh_database("session") as url:
        yield url


@pytest.fixture(scope="session")
def live_server(
    database_url: str, tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """The real app in a subprocess (`python -m app serve`) on the tiny model and the session
    database; `.base_url`, `.admin` and `.analyst` (Account: email, password, api_key), created
    with the CLI. Set ZEUS_STATIC_DIR so it serves app/static at / as in development."""
    import uuid

    from tests.support.live_server import start_live_server

    server = start_live_server(
        database_url,
        tiny_model_path,
        tmp_path_factory.mktemp("live-server"),
        ZEUS_STATIC_DIR=str(REPO_ROOT / "app" / "static"),
    )
    try:
        tag = uuid.uuid4().hex[:6]
        server.admin = server.create_account(f"admin-{tag}@example.com", "admin")
        server.analyst = server.create_account(f"analyst-{tag}@example.com", "analyst")
        yield server
    finally:
        server.stop()
