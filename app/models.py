"""ORM tables. The schema itself is created by the Alembic migrations in app/migrations."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

ROLES = ("admin", "analyst")
# The text search configuration of conversation search: the query must use the same expression as
# the GIN indexes below, or PostgreSQL cannot use them.
SEARCH_CONFIG = "english"
MESSAGE_SEARCH_VECTOR = f"to_tsvector('{SEARCH_CONFIG}'::regconfig, content)"
TITLE_SEARCH_VECTOR = f"to_tsvector('{SEARCH_CONFIG}'::regconfig, title)"
MESSAGE_STATUSES = ("streaming", "complete", "stopped", "error", "interrupted")


class Base(DeclarativeBase):
    pass


def _now_column() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class User(Base):
    __tablename__ = "users"
    __table_args__ = (
        CheckConstraint("role IN ('admin', 'analyst')", name="users_role_known"),
        CheckConstraint("auth_source IN ('local', 'oidc', 'ldap')", name="users_auth_source_known"),
        Index(
            "users_external_id",
            "auth_source",
            "external_id",
            unique=True,
            postgresql_where="external_id IS NOT NULL",
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    # Stored lower-cased, so the unique index is case-insensitive.
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    created_at: Mapped[datetime] = _now_column()
    last_login_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Fair share and quotas (app/access); None: the ZEUS_* default of the same name applies.
    max_concurrent: Mapped[int | None] = mapped_column(Integer)
    daily_token_budget: Mapped[int | None] = mapped_column(BigInteger)
    monthly_token_budget: Mapped[int | None] = mapped_column(BigInteger)
    # Who vouches for this account: "local" (its password hash), "oidc" or "ldap". SSO accounts
    # hold an unusable password hash, so the password form can never open them.
    auth_source: Mapped[str] = mapped_column(String(16), default="local", server_default="local")
    # The provider's stable id: "ISSUER SUB" for OpenID Connect, the entry's DN for LDAP.
    external_id: Mapped[str | None] = mapped_column(String(1024))


class SsoLogin(Base):
    """An OpenID Connect sign-in between the redirect to the provider and its callback. Kept in the
    database, not in process memory, because the callback may reach another instance."""

    __tablename__ = "sso_logins"
    __table_args__ = (Index("sso_logins_expires_at", "expires_at"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    state: Mapped[str] = mapped_column(String(128), unique=True)
    # SHA-256 of the random value in the browser's cookie: the callback must come from the browser
    # that started the sign-in (otherwise an attacker could log a victim into the attacker's account).
    browser_hash: Mapped[str] = mapped_column(String(64))
    nonce: Mapped[str] = mapped_column(String(128))
    code_verifier: Mapped[str] = mapped_column(String(128))
    redirect_uri: Mapped[str] = mapped_column(String(2048))
    next_path: Mapped[str] = mapped_column(String(512), default="/")
    created_at: Mapped[datetime] = _now_column()
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class WebSession(Base):
    """A login: the cookie carries a random token, signed; only its SHA-256 is stored."""

    __tablename__ = "sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = _now_column()
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    address: Mapped[str | None] = mapped_column(String(64))


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    # The first characters of the key, shown in lists so people can tell keys apart.
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = _now_column()
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # After this instant the key authenticates no more (None: never expires).
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The key's own limits, on top of its owner's (None: only the owner's apply).
    max_concurrent: Mapped[int | None] = mapped_column(Integer)
    daily_token_budget: Mapped[int | None] = mapped_column(BigInteger)
    monthly_token_budget: Mapped[int | None] = mapped_column(BigInteger)

    user: Mapped[User] = relationship()


class Conversation(Base):
    __tablename__ = "conversations"
    __table_args__ = (
        Index("conversations_user_updated", "user_id", "updated_at"),
        Index("conversations_title_search", text(TITLE_SEARCH_VECTOR), postgresql_using="gin"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(String(200), default="", server_default="")
    created_at: Mapped[datetime] = _now_column()
    updated_at: Mapped[datetime] = _now_column()
    # Sent first on every turn; a new conversation starts with the admin-set default.
    system_prompt: Mapped[str] = mapped_column(Text, default="", server_default="")
    # None: the chat defaults (temperature 0.7, max_tokens ZEUS_MAX_NEW_TOKENS).
    temperature: Mapped[float | None] = mapped_column(Float)
    max_tokens: Mapped[int | None] = mapped_column(Integer)
    # The oldest message the model saw on the latest turn (older ones no longer fit its budget);
    # None while the whole conversation fits. No foreign key: the page only draws a marker there.
    context_start_message_id: Mapped[int | None] = mapped_column(Integer)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        CheckConstraint("role IN ('system', 'user', 'assistant')", name="messages_role_known"),
        CheckConstraint(
            "status IN ('streaming', 'complete', 'stopped', 'error', 'interrupted')",
            name="messages_status_known",
        ),
        Index("messages_conversation_id", "conversation_id", "id"),
        Index("messages_streaming", "status", postgresql_where="status = 'streaming'"),
        Index("messages_content_search", text(MESSAGE_SEARCH_VECTOR), postgresql_using="gin"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text, default="", server_default="")
    status: Mapped[str] = mapped_column(String(16), default="complete", server_default="complete")
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = _now_column()
    updated_at: Mapped[datetime] = _now_column()
    # Which process streams this reply: when that run stops heartbeating, the reply is interrupted.
    stream_run_id: Mapped[str | None] = mapped_column(String(36))
    # Set by POST .../stop on any instance; the streaming instance polls it.
    stop_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")


class SiteSetting(Base):
    """Settings admins change at run time (e.g. `default_system_prompt`), shared by every instance."""

    __tablename__ = "site_settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text, default="", server_default="")
    updated_at: Mapped[datetime] = _now_column()


class Usage(Base):
    __tablename__ = "usage"
    # usage_user_ts / usage_key_ts: the budget checks sum one user's (one key's) rows since a day
    # or month began, before every generation.
    __table_args__ = (
        Index("usage_ts", "ts"),
        Index("usage_user_ts", "user_id", "ts"),
        Index("usage_key_ts", "api_key_id", "ts"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    ts: Mapped[datetime] = _now_column()
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    source: Mapped[str] = mapped_column(String(16))  # "chat" or "openai"
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16))


class GenerationLease(Base):
    """One admitted generation (waiting or running) of a user, held by the instance run serving it.

    The per-user concurrency limit counts these rows across every instance. A lease lives only
    while its run heartbeats (instances.run_id): a killed instance's leases stop counting after
    the stale timeout, without anyone deleting them.
    """

    __tablename__ = "generation_leases"
    __table_args__ = (Index("generation_leases_user", "user_id"), Index("generation_leases_run", "run_id"))

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    run_id: Mapped[str] = mapped_column(String(36))
    acquired_at: Mapped[datetime] = _now_column()


class AuditEntry(Base):
    __tablename__ = "audit_log"
    __table_args__ = (Index("audit_log_ts", "ts"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    ts: Mapped[datetime] = _now_column()
    actor_user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    # Kept as text so the entry still names the actor after the account is gone, and for failed
    # logins with an unknown email.
    actor_email: Mapped[str | None] = mapped_column(String(320))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(320))
    address: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)


class LoginAttempt(Base):
    """The rolling window of the login throttle; shared by every instance through the database."""

    __tablename__ = "login_attempts"
    __table_args__ = (
        Index("login_attempts_email_ts", "email", "ts"),
        Index("login_attempts_address_ts", "address", "ts"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    ts: Mapped[datetime] = _now_column()
    email: Mapped[str] = mapped_column(String(320))
    address: Mapped[str] = mapped_column(String(64))
    success: Mapped[bool] = mapped_column(Boolean)


class Instance(Base):
    """The latest heartbeat of each instance (one row per instance name)."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    run_id: Mapped[str] = mapped_column(String(36))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    pid: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(255))
    device: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_heartbeat: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    cpu_percent: Mapped[float] = mapped_column(Float, default=0.0)
    rss_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    gpu_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    in_flight: Mapped[int] = mapped_column(Integer, default=0)
    queue_running: Mapped[int] = mapped_column(Integer, default=0)
    queue_waiting: Mapped[int] = mapped_column(Integer, default=0)
    requests_per_s: Mapped[float] = mapped_column(Float, default=0.0)
    tokens_per_s: Mapped[float] = mapped_column(Float, default=0.0)
    # The engine's kind, dtype, quantization, tensor_parallel_size and kv_cache_usage (the
    # heartbeat's copy of /api/health's "engine"); None from instances older than this column.
    engine: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class InstanceSample(Base):
    """One heartbeat's numbers, kept for the admin page's charts and pruned after an hour."""

    __tablename__ = "instance_samples"
    __table_args__ = (Index("instance_samples_ts", "ts"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    instance_name: Mapped[str] = mapped_column(String(255))
    ts: Mapped[datetime] = _now_column()
    in_flight: Mapped[int] = mapped_column(Integer, default=0)
    queue: Mapped[int] = mapped_column(Integer, default=0)
    requests_per_s: Mapped[float] = mapped_column(Float, default=0.0)
    tokens_per_s: Mapped[float] = mapped_column(Float, default=0.0)
    cpu_percent: Mapped[float] = mapped_column(Float, default=0.0)
    rss_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
