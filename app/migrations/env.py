"""Alembic environment: online migrations only, serialised by a PostgreSQL advisory lock."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from app.db import MIGRATION_LOCK_KEY
from app.models import Base

config = context.config


def run_migrations_online() -> None:
    engine = create_engine(config.get_main_option("sqlalchemy.url"), poolclass=NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, compare_type=True)
        with context.begin_transaction():
            # Taken inside the migration transaction, before Alembic reads the current revision:
            # a second host waits here, then finds the schema already at head and does nothing.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            # Read under the lock, so each concurrent run reports what it really found.
            config.attributes["revision_before"] = context.get_context().get_current_revision()
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported: run `python -m app migrate`")
run_migrations_online()
