"""single sign-on: users.auth_source and external_id, sso_logins

Revision ID: 0003_sso
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_sso"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "users", sa.Column("auth_source", sa.String(length=16), server_default="local", nullable=False)
    )
    op.add_column("users", sa.Column("external_id", sa.String(length=1024), nullable=True))
    op.create_check_constraint("users_auth_source_known", "users", "auth_source IN ('local', 'oidc', 'ldap')")
    op.create_index(
        "users_external_id",
        "users",
        ["auth_source", "external_id"],
        unique=True,
        postgresql_where=sa.text("external_id IS NOT NULL"),
    )
    op.create_table(
        "sso_logins",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=128), nullable=False),
        sa.Column("browser_hash", sa.String(length=64), nullable=False),
        sa.Column("nonce", sa.String(length=128), nullable=False),
        sa.Column("code_verifier", sa.String(length=128), nullable=False),
        sa.Column("redirect_uri", sa.String(length=2048), nullable=False),
        sa.Column("next_path", sa.String(length=512), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("state"),
    )
    op.create_index("sso_logins_expires_at", "sso_logins", ["expires_at"], unique=False)


def downgrade() -> None:
    op.drop_index("sso_logins_expires_at", table_name="sso_logins")
    op.drop_table("sso_logins")
    op.drop_index("users_external_id", table_name="users")
    op.drop_constraint("users_auth_source_known", "users", type_="check")
    op.drop_column("users", "external_id")
    op.drop_column("users", "auth_source")
