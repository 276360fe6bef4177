"""The SQLAlchemy engine and sessions, migrations, and turning driver errors into one clear line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from app.config import Settings

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Any constant works as long as every instance uses the same one: it serialises concurrent
# `python -m app migrate` runs (one per host during a deploy).
MIGRATION_LOCK_KEY = 0x2E05_0001

# Errors that mean "the database is not there right now" (answered 503), not a bug.
UNAVAILABLE_ERRORS = (OperationalError, PoolTimeoutError)


def database_url(raw: str) -> URL:
    """psycopg2 is the driver we ship; SQLAlchemy 2.1 would otherwise pick psycopg 3."""
    url = make_url(raw.replace("postgres://", "postgresql://", 1))
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg2")
    return url


def create_db_engine(settings: Settings, *, pool: bool = True) -> Engine:
    options: dict = {
        "pool_pre_ping": True,
        "connect_args": {
            "connect_timeout": settings.db_connect_timeout_s,
            "application_name": f"zeus {settings.resolved_instance_name}"[:63],
        },
    }
    if pool:
        options |= {
            "pool_size": settings.db_pool_size,
            "max_overflow": settings.db_max_overflow,
            "pool_timeout": settings.db_pool_timeout_s,
            "pool_recycle": settings.db_pool_recycle_s,
        }
    else:
        options["poolclass"] = NullPool
    return create_engine(database_url(settings.database_url), **options)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work is committed on success and rolled back on any exception."""
    with sessions() as session, session.begin():
        yield session


def describe_db_error(error: BaseException) -> str:
    """One line saying what is wrong with the database connection, without a stack trace."""
    if isinstance(error, PoolTimeoutError):
        return (
            "database busy: no connection free in the pool (raise ZEUS_DB_POOL_SIZE or ZEUS_DB_MAX_OVERFLOW)"
        )
    original = error.orig if isinstance(error, DBAPIError) else error
    message = " ".join(str(original).split())
    lowered = message.lower()
    if "password authentication failed" in lowered:
        return "database refused the credentials: wrong user or password in ZEUS_DATABASE_URL"
    if "relation" in lowered and "does not exist" in lowered:
        return f"database schema missing or outdated ({message}): run `python -m app migrate`"
    if "does not exist" in lowered and "database" in lowered:
        return f"database not found: {message}"
    if "connection refused" in lowered or "could not connect" in lowered:
        return f"database unreachable: {message}"
    if "timeout expired" in lowered:
        return "database unreachable: connection timed out"
    return f"database unavailable: {message}"


def ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def alembic_config(url: str):  # -> alembic.config.Config; imported lazily, the CLI rarely needs it
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Alembic's ini interpolation treats % specially (passwords may be URL-encoded).
    config.set_main_option("sqlalchemy.url", database_url(url).render_as_string(False).replace("%", "%%"))
    return config


def migrate(url: str) -> tuple[str | None, str]:
    """Upgrade to the newest revision under an advisory lock; returns (before, after) revisions."""
    from alembic import command

    config = alembic_config(url)
    command.upgrade(config, "head")
    return config.attributes.get("revision_before"), current_revision(url) or ""


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return (
        ScriptDirectory.from_config(alembic_config("postgresql://localhost/unused")).get_current_head() or ""
    )


def current_revision(url: str) -> str | None:
    engine = create_engine(database_url(url), poolclass=NullPool, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as connection:
            exists = connection.execute(text("SELECT to_regclass('alembic_version') IS NOT NULL")).scalar()
            if not exists:
                return None
            return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()
