"""Request and response bodies of the web app's API (the OpenAI ones live in openai_protocol.py)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

Role = Literal["admin", "analyst"]

# The largest integer a JSON number carries exactly (JavaScript's MAX_SAFE_INTEGER): a larger bound
# is rounded to a float by clients and schema tools, so a "valid" seed above it was rejected.
MAX_SEED = 2**53 - 1


def _storable(value: str) -> str:
    """PostgreSQL text cannot hold NUL, and lone surrogates (legal as JSON escapes) are not
    UTF-8: both become U+FFFD, as a browser's text decoder does with invalid input."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = "".join("\ufffd" if 0xD800 <= ord(char) <= 0xDFFF else char for char in value)
    return value


Text = Annotated[str, AfterValidator(_storable)]


class Strict(BaseModel):
    # Unknown fields are mistakes (a typo would otherwise be silently ignored).
    model_config = ConfigDict(extra="forbid")


class LoginBody(Strict):
    email: Text = Field(min_length=1, max_length=320)
    password: Text = Field(min_length=1, max_length=1024)


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    email: str
    role: str


class AdminUserOut(UserOut):
    disabled: bool
    created_at: datetime
    last_login_at: datetime | None
    # Admins' overrides (app/access); None: the ZEUS_* default applies.
    max_concurrent: int | None = None
    daily_token_budget: int | None = None
    monthly_token_budget: int | None = None


class UserCreate(Strict):
    email: Text = Field(min_length=3, max_length=320)
    password: Text = Field(min_length=8, max_length=1024)
    role: Role


class UserUpdate(Strict):
    role: Role | None = None
    disabled: bool | None = None


class PasswordReset(Strict):
    password: Text | None = Field(default=None, min_length=8, max_length=1024)


class PasswordOut(BaseModel):
    password: str


SYSTEM_PROMPT_MAX_CHARS = 20_000


class ConversationSettings(Strict):
    """The per-conversation settings, used on every turn. temperature and max_tokens null: the chat
    defaults (0.7, ZEUS_MAX_NEW_TOKENS); options sent with one message override them for it."""

    system_prompt: Text | None = Field(default=None, max_length=SYSTEM_PROMPT_MAX_CHARS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)


class ConversationCreate(ConversationSettings):
    """system_prompt omitted: the admin-set default (GET /api/conversations/defaults)."""

    title: Text | None = Field(default=None, max_length=200)


class ConversationUpdate(ConversationSettings):
    """PATCH: only the fields sent change; null resets temperature or max_tokens to the default."""

    title: Text | None = Field(default=None, min_length=1, max_length=200)


class SearchMatch(BaseModel):
    """A message that matches a search. snippet: plain text around the match, the matched words
    between U+0002 and U+0003 (the page shows them highlighted)."""

    message_id: int
    role: str
    snippet: str


class ConversationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    title: str
    created_at: datetime
    updated_at: datetime
    system_prompt: str = ""
    temperature: float | None = None
    max_tokens: int | None = None
    context_start_message_id: int | None = Field(
        default=None,
        description="the oldest message the model saw on the latest turn; null while all of it fits",
    )
    matches: list[SearchMatch] = Field(default_factory=list, description="only with ?q=: matching messages")


class MessageOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    role: str
    content: str
    status: str
    created_at: datetime
    prompt_tokens: int | None
    completion_tokens: int | None


class GenerationOptions(Strict):
    """Optional per-message settings; the defaults suit chat. ignore_eos (generate exactly
    max_tokens tokens) exists for benchmarks and tests."""

    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    ignore_eos: bool = False


class MessageCreate(Strict):
    content: Text = Field(min_length=1, max_length=200_000)
    options: GenerationOptions | None = None


class RegenerateBody(Strict):
    """message_id: the reply to write again (it and every later message are replaced); omitted,
    the last reply."""

    message_id: int | None = None
    options: GenerationOptions | None = None


class ChatDefaults(Strict):
    default_system_prompt: Text = Field(default="", max_length=SYSTEM_PROMPT_MAX_CHARS)


class PasswordChange(Strict):
    current_password: Text = Field(min_length=1, max_length=1024)
    new_password: Text = Field(min_length=8, max_length=1024)


class StopOut(BaseModel):
    stopped: bool


def _utc_instant(value: datetime | None) -> datetime | None:
    """An instant with its zone, stored as UTC: PostgreSQL refuses offsets beyond +-15:59, and a
    time without a zone would be read in the database session's zone."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("needs a time zone, e.g. 2027-01-31T00:00:00Z")
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range: use a date between years 1 and 9999 in UTC") from None


Instant = Annotated[datetime, AfterValidator(_utc_instant)]


class KeyCreate(Strict):
    name: Text = Field(min_length=1, max_length=100)
    expires_at: Instant | None = Field(
        default=None, description="after this instant the key stops working (ISO 8601 with a time zone)"
    )


class KeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None
    expires_at: datetime | None = None
    max_concurrent: int | None = None
    daily_token_budget: int | None = None
    monthly_token_budget: int | None = None


class KeyCreated(BaseModel):
    id: int
    name: str
    key: str = Field(description="the secret; shown this once only")


class AdminKeyOut(KeyOut):
    user_id: int
    email: str


class EngineOut(BaseModel):
    """The engine serving this instance (app/inference/contract.py EngineInfo, plus its KV cache)."""

    kind: str
    dtype: str
    quantization: str | None
    tensor_parallel_size: int
    max_model_len: int
    # Fraction of the KV cache in use (0..1); None for engines without a paged cache (builtin).
    kv_cache_usage: float | None = None
    prefix_cache_hit_rate: float | None = None


class InstanceOut(BaseModel):
    host: str
    port: int
    instance: str
    pid: int
    model: str
    device: str
    state: Literal["up", "down"]
    started_at: datetime
    last_heartbeat: datetime
    cpu_percent: float
    rss_bytes: int
    gpu_memory_bytes: int | None
    in_flight: int
    queue: int
    requests_per_s: float
    tokens_per_s: float
    engine: EngineOut | None = None


class SystemTotals(BaseModel):
    instances_up: int
    instances_down: int
    active_connections: int
    queue: int
    requests_per_s: float
    tokens_per_s: float
    cpu_percent: float
    rss_bytes: int
    gpu_memory_bytes: int


class HistoryPoint(BaseModel):
    ts: datetime
    requests_per_s: float
    tokens_per_s: float


class SystemOut(BaseModel):
    instances: list[InstanceOut]
    totals: SystemTotals
    history: list[HistoryPoint]


class UsageRow(BaseModel):
    day: date
    user_id: int
    email: str
    requests: int
    prompt_tokens: int
    completion_tokens: int


class AuditItem(BaseModel):
    id: int
    ts: datetime
    actor_email: str | None
    action: str
    target: str | None
    address: str | None
    detail: str | None


class AuditPage(BaseModel):
    items: list[AuditItem]
    total: int
    page: int
    page_size: int


class QueueOut(BaseModel):
    running: int
    queued: int
    max_batch_size: int
    max_queue: int


class HealthOut(BaseModel):
    # "failed": the engine stopped for good (`reason` says why); the process exits and restarts.
    status: Literal["ok", "degraded", "starting", "draining", "failed"]
    instance: str
    model: str
    device: str
    engine: EngineOut
    db: str
    queue: QueueOut
    in_flight: int
    reason: str | None = None


# ----- fair share and quotas (app/access) -----

MAX_CONCURRENT_OVERRIDE = 10_000
MAX_TOKEN_BUDGET = 2**53 - 1


class LimitsUpdate(Strict):
    """PATCH: only the fields sent change; null removes an override (the ZEUS_* default applies)."""

    max_concurrent: int | None = Field(default=None, ge=1, le=MAX_CONCURRENT_OVERRIDE)
    daily_token_budget: int | None = Field(default=None, ge=0, le=MAX_TOKEN_BUDGET)
    monthly_token_budget: int | None = Field(default=None, ge=0, le=MAX_TOKEN_BUDGET)


class KeyLimitsUpdate(LimitsUpdate):
    """PATCH of one API key: its own limits (on top of its owner's) and its expiry (null: never)."""

    expires_at: Instant | None = None


class BudgetOut(BaseModel):
    scope: Literal["user", "key"] = Field(description="user: all of the user's requests; key: this key's")
    period: Literal["day", "month"] = Field(description="the UTC day or UTC month")
    used: int = Field(description="prompt + completion tokens used in this period")
    budget: int | None = Field(description="tokens allowed in this period; null: unlimited")
    resets_at: datetime = Field(description="when the period ends and the count starts again")


class ConcurrencyOut(BaseModel):
    active: int = Field(description="generations running or waiting, across all instances")
    limit: int


class UsageOut(BaseModel):
    concurrency: ConcurrencyOut
    budgets: list[BudgetOut]
