"""chat: per-conversation system prompt and settings, the model's memory marker, full-text
search indexes, site settings (the admin-set default system prompt)

Revision ID: 0002_chat
Revises: 0001
Create Date: 2026-11-29 22:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_chat"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("conversations", sa.Column("system_prompt", sa.Text(), server_default="", nullable=False))
    op.add_column("conversations", sa.Column("temperature", sa.Float(), nullable=True))
    op.add_column("conversations", sa.Column("max_tokens", sa.Integer(), nullable=True))
    op.add_column("conversations", sa.Column("context_start_message_id", sa.Integer(), nullable=True))
    # Expression indexes: conversation search uses exactly these expressions (app/models.py).
    op.create_index(
        "conversations_title_search",
        "conversations",
        [sa.text("to_tsvector('english'::regconfig, title)")],
        postgresql_using="gin",
    )
    op.create_index(
        "messages_content_search",
        "messages",
        [sa.text("to_tsvector('english'::regconfig, content)")],
        postgresql_using="gin",
    )
    op.create_table(
        "site_settings",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), server_default="", nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )


def downgrade() -> None:
    op.drop_table("site_settings")
    op.drop_index("messages_content_search", table_name="messages", postgresql_using="gin")
    op.drop_index("conversations_title_search", table_name="conversations", postgresql_using="gin")
    op.drop_column("conversations", "context_start_message_id")
    op.drop_column("conversations", "max_tokens")
    op.drop_column("conversations", "temperature")
    op.drop_column("conversations", "system_prompt")
