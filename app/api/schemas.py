"""Request and response bodies of the web app's API (the OpenAI ones live in routes/openai.py)."""

from __future__ import annotations

from datetime import date, datetime
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


class ConversationCreate(Strict):
    title: Text | None = Field(default=None, max_length=200)


class ConversationRename(Strict):
    title: Text = Field(max_length=200)


class ConversationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    title: str
    created_at: datetime
    updated_at: datetime


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
    options: GenerationOptions | None = None


class StopOut(BaseModel):
    stopped: bool


class KeyCreate(Strict):
    name: Text = Field(min_length=1, max_length=100)


class KeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


class KeyCreated(BaseModel):
    id: int
    name: str
    key: str = Field(description="the secret; shown this once only")


class AdminKeyOut(KeyOut):
    user_id: int
    email: str


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
    db: str
    queue: QueueOut
    in_flight: int
    reason: str | None = None
