"""Settings of one Zeus instance: every one is a ZEUS_* environment variable (Ansible writes them
to a 0600 file per instance)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_SECRET_KEY_LENGTH = 32
# Values people paste from examples; a key containing one of them was never really chosen.
PLACEHOLDER_SECRET_FRAGMENTS = (
    "changeme",
    "change-me",
    "change_me",
    "replaceme",
    "replace-me",
    "secret",
    "placeholder",
    "example",
    "password",
    "xxxxxxxx",
    "00000000",
)


class ConfigError(Exception):
    """Settings that cannot work; each line of the message names one variable and what is allowed."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def secret_key_problem(value: str) -> str | None:
    if not value.strip():
        return "ZEUS_SECRET_KEY is empty: set it to a random string of at least 32 characters"
    lowered = value.lower()
    if any(fragment in lowered for fragment in PLACEHOLDER_SECRET_FRAGMENTS):
        return (
            "ZEUS_SECRET_KEY looks like a placeholder: set it to a random string of at least "
            "32 characters (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
        )
    if len(value) < MIN_SECRET_KEY_LENGTH:
        return (
            f"ZEUS_SECRET_KEY is {len(value)} characters long: at least {MIN_SECRET_KEY_LENGTH} are required"
        )
    if len(set(value)) < 8:
        return "ZEUS_SECRET_KEY repeats too few distinct characters: use a random string"
    return None


PositiveInt = Annotated[int, Field(gt=0)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ZEUS_", extra="ignore", case_sensitive=False)

    database_url: str = Field(
        description="SQLAlchemy URL of the PostgreSQL database, e.g. postgresql://zeus:PW@db:5432/zeus"
    )
    secret_key: SecretStr | None = Field(
        default=None, description="signs session cookies; shared by instances"
    )
    model_path: Path | None = Field(default=None, description="folder of a Hugging Face format model")
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$")
    torch_threads: PositiveInt | None = None
    max_batch_size: PositiveInt = 8
    max_queue: Annotated[int, Field(ge=0)] = 64
    max_input_tokens: PositiveInt = 4096
    max_new_tokens: PositiveInt = 1024
    instance_name: str | None = Field(default=None, description="defaults to hostname:port")
    # Where this instance listens: set by `python -m app serve` and by app/gunicorn_conf.py from the bind.
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    # Addresses whose X-Forwarded-For/-Proto are believed (nginx); the login throttle keys on them.
    trusted_proxies: str = "127.0.0.1"

    drain_timeout_s: Annotated[float, Field(ge=0)] = 30.0
    db_pool_size: PositiveInt = 5
    db_max_overflow: Annotated[int, Field(ge=0)] = 5
    db_pool_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    db_pool_recycle_s: int = 1800
    db_connect_timeout_s: PositiveInt = 5
    heartbeat_interval_s: Annotated[float, Field(gt=0)] = 5.0
    cookie_secure: bool = False
    session_ttl_s: PositiveInt = 7 * 24 * 3600
    max_body_bytes: PositiveInt = 1_000_000
    # OpenAI's `n`: choices generated for one request (each is a submission to the engine).
    max_n: Annotated[int, Field(ge=1, le=128)] = 8
    # Browser origins allowed to call the API cross-origin (CORS), comma-separated, e.g.
    # "https://app.example.org,https://notebooks.example.org"; empty (the default): CORS off.
    # Cookies are never sent cross-origin: such callers authenticate with an API key.
    cors_origins: str = ""
    static_dir: Path | None = None
    # While streaming, the partial reply is written and the stop flag read this often.
    stream_flush_interval_s: Annotated[float, Field(gt=0, le=2.0)] = 1.0
    login_window_s: PositiveInt = 900
    login_max_failures_per_account: PositiveInt = 10
    login_max_failures_per_address: PositiveInt = 50

    @field_validator("secret_key")
    @classmethod
    def _refuse_placeholder_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            problem = secret_key_problem(value.get_secret_value())
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("database_url")
    @classmethod
    def _postgresql_only(cls, value: str) -> str:
        if not value.startswith(("postgresql://", "postgresql+psycopg2://", "postgres://")):
            raise ValueError("ZEUS_DATABASE_URL must be a postgresql:// URL")
        return value

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip().rstrip("/") for origin in self.cors_origins.split(",") if origin.strip()]

    @property
    def resolved_instance_name(self) -> str:
        return self.instance_name or f"{socket.gethostname()}:{self.port}"

    @property
    def stale_after_s(self) -> float:
        """A heartbeat older than this marks its instance as down."""
        return max(15.0, 3 * self.heartbeat_interval_s)

    def serving_problems(self) -> list[str]:
        """What is missing to serve; the checks that need no database or model."""
        problems = []
        if self.secret_key is None:
            problems.append("ZEUS_SECRET_KEY is not set: set it to a random string of at least 32 characters")
        if self.model_path is None:
            problems.append("ZEUS_MODEL_PATH is not set: point it at a Hugging Face format model folder")
        elif not self.model_path.is_dir():
            problems.append(f"model folder not found: ZEUS_MODEL_PATH={self.model_path} is not a directory")
        elif not (self.model_path / "config.json").is_file():
            problems.append(f"model folder {self.model_path} has no config.json: is it a Hugging Face model?")
        if self.static_dir is not None and not self.static_dir.is_dir():
            problems.append(f"ZEUS_STATIC_DIR={self.static_dir} is not a directory")
        return problems


def load_settings(env_file: Path | None = None, **overrides: object) -> Settings:
    """Settings from the environment (and env_file); a ConfigError with one line per bad variable."""
    try:
        return Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
    except ValidationError as error:
        problems = []
        for item in error.errors():
            variable = "ZEUS_" + "_".join(str(part) for part in item["loc"]).upper()
            message = str(item["msg"]).removeprefix("Value error, ")
            if item["type"] == "missing":
                problems.append(f"{variable} is not set")
            elif message.startswith(variable):
                problems.append(message)
            else:
                problems.append(f"{variable}: {message} (got {item.get('input')!r})")
        raise ConfigError(problems) from None
