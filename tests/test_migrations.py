"""The Alembic migrations match the ORM models and can be undone."""

from __future__ import annotations

from alembic import command

from app.db import alembic_config, current_revision, head_revision
from tests.support.databases import fresh_database


def test_models_and_migrations_agree_and_downgrade_works() -> None:
    with fresh_database("migrations") as url:
        config = alembic_config(url)
        command.check(config)  # raises when the models hold changes no migration creates
        command.downgrade(config, "base")
        assert current_revision(url) is None
        command.upgrade(config, "head")
        assert current_revision(url) == head_revision()
