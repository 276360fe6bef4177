"""Throwaway PostgreSQL databases for tests, on the cluster of tests/support/start-postgres.sh
(role zeus_test/zeus_test on 127.0.0.1:5432) or on ZEUS_TEST_DATABASE_URL when set."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from app.db import database_url

DEFAULT_ADMIN_URL = "postgresql://zeus_test:zeus_test@127.0.0.1:5432/postgres"


def admin_url() -> str:
    return os.environ.get("ZEUS_TEST_DATABASE_URL") or DEFAULT_ADMIN_URL


def run_admin_sql(statement: str) -> None:
    """CREATE/DROP/ALTER DATABASE cannot run inside a transaction: autocommit."""
    engine = create_engine(database_url(admin_url()), poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text(statement))
    finally:
        engine.dispose()


@contextmanager
def fresh_database(label: str = "t", migrate: bool = True) -> Iterator[str]:
    """A new, uniquely named database (migrated to head), dropped afterwards; yields its URL."""
    name = f"zeus_{label}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    run_admin_sql(f'CREATE DATABASE "{name}"')
    url = make_url(database_url(admin_url())).set(database=name).render_as_string(hide_password=False)
    try:
        if migrate:
            from app.db import migrate as run_migrations

            run_migrations(url)
        yield url
    finally:
        drop_database(name)


def drop_database(name: str, attempts: int = 10) -> None:
    """DROP DATABASE ... WITH (FORCE). Without pg_signal_backend (a cluster other than
    start-postgres.sh's), an autovacuum worker on the database makes the drop fail with
    InsufficientPrivilege; it is retried while the worker finishes (seconds at most)."""
    from sqlalchemy.exc import ProgrammingError

    for attempt in range(attempts):
        try:
            run_admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except ProgrammingError as error:
            if "pg_signal_backend" not in str(error) or attempt == attempts - 1:
                raise
            time.sleep(0.5)


def create_account(url: str, email: str, role: str, password: str = "correct horse battery") -> str:
    """A user with one API key, written directly (faster than two CLI runs); returns the key."""
    from sqlalchemy.orm import Session

    from app.auth.accounts import create_api_key, create_user

    engine = create_engine(database_url(url), poolclass=NullPool)
    try:
        with Session(engine) as db, db.begin():
            user = create_user(db, email=email, password=password, role=role)
            return create_api_key(db, user=user, name="tests", actor=None).secret
    finally:
        engine.dispose()
