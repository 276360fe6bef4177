"""instances.engine: the engine each instance runs (kind, dtype, quantization, tensor parallel, KV cache)

Revision ID: 0002
Revises: 0002_chat
Create Date: 2026-11-29 23:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0002_chat"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instances", sa.Column("engine", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("instances", "engine")
