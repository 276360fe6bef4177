"""quotas and fair share: per-user and per-key limits and budgets, API key expiry, generation leases

Revision ID: 0004_quota
Revises: 0003_sso
Create Date: 2026-11-29 22:40:54.058150
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_quota"
down_revision = "0003_sso"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "generation_leases",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=True),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("generation_leases_run", "generation_leases", ["run_id"], unique=False)
    op.create_index("generation_leases_user", "generation_leases", ["user_id"], unique=False)
    op.add_column("api_keys", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("api_keys", sa.Column("max_concurrent", sa.Integer(), nullable=True))
    op.add_column("api_keys", sa.Column("daily_token_budget", sa.BigInteger(), nullable=True))
    op.add_column("api_keys", sa.Column("monthly_token_budget", sa.BigInteger(), nullable=True))
    op.create_index("usage_key_ts", "usage", ["api_key_id", "ts"], unique=False)
    op.create_index("usage_user_ts", "usage", ["user_id", "ts"], unique=False)
    op.add_column("users", sa.Column("max_concurrent", sa.Integer(), nullable=True))
    op.add_column("users", sa.Column("daily_token_budget", sa.BigInteger(), nullable=True))
    op.add_column("users", sa.Column("monthly_token_budget", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("users", "monthly_token_budget")
    op.drop_column("users", "daily_token_budget")
    op.drop_column("users", "max_concurrent")
    op.drop_index("usage_user_ts", table_name="usage")
    op.drop_index("usage_key_ts", table_name="usage")
    op.drop_column("api_keys", "monthly_token_budget")
    op.drop_column("api_keys", "daily_token_budget")
    op.drop_column("api_keys", "max_concurrent")
    op.drop_column("api_keys", "expires_at")
    op.drop_index("generation_leases_user", table_name="generation_leases")
    op.drop_index("generation_leases_run", table_name="generation_leases")
    op.drop_table("generation_leases")
