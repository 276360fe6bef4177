"""Settings of one Zeus instance: every one is a ZEUS_* environment variable (Ansible writes them
to a 0600 file per instance)."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_SECRET_KEY_LENGTH = 32
# Values people paste from examples; a key containing one of them was never really chosen. The
# same list (app/secret_placeholders.json) is what the Ansible roles refuse for their secrets.
_PLACEHOLDERS = json.loads((Path(__file__).parent / "secret_placeholders.json").read_text())
PLACEHOLDER_SECRET_PATTERN = re.compile(
    "|".join(_PLACEHOLDERS["any_secret"] + _PLACEHOLDERS["secret_key"]), re.IGNORECASE
)


class ConfigError(Exception):
    """Settings that cannot work; each line of the message names one variable and what is allowed."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def secret_key_problem(value: str) -> str | None:
    if not value.strip():
        return "ZEUS_SECRET_KEY is empty: set it to a random string of at least 32 characters"
    if PLACEHOLDER_SECRET_PATTERN.search(value):
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
    # Which engine serves the model (app/inference/factory.py): Zeus's own, or vLLM in-process.
    engine: Literal["builtin", "vllm"] = "builtin"
    # vLLM only: GPUs one instance splits the model across (its heads must divide by it).
    tensor_parallel_size: PositiveInt = 1
    # vLLM only, CUDA: the share of each GPU's memory vLLM may take (weights, activations, KV cache).
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.90
    # vLLM only: the KV cache in GiB. On CPU hosts it is the cache's whole size (vLLM's default is
    # 4 GiB); on CUDA hosts it replaces the share left by ZEUS_GPU_MEMORY_UTILIZATION.
    kv_cache_gb: Annotated[float, Field(gt=0)] | None = None
    # vLLM only: the context length served (prompt + reply); None for the model's own.
    max_model_len: PositiveInt | None = None
    # vLLM only: skip torch.compile and CUDA graphs: starts in seconds instead of minutes (CPU
    # hosts compile with g++), serves slower. Tests and quick trials; off in production.
    enforce_eager: bool = False
    # vLLM only: vLLM's tool-call parser name (hermes, llama3_json, mistral, ...); None picks one
    # for the model's family (app/inference/vllm_engine.py TOOL_PARSERS).
    tool_call_parser: str | None = None
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

    # Fair share and quotas (app/access). Concurrent generations of one user across all instances,
    # waiting ones included; admins override it per user and per API key. Half of one instance's
    # batch (ZEUS_MAX_BATCH_SIZE 8): nginx's affinity sends one user's requests (one API key) to
    # one instance, and a user holding that instance's whole batch would make every other user
    # sent there wait for one of theirs to end (bench fairness: B's TTFT 44x idle at 8, 1.45x at 4).
    max_concurrent_per_user: PositiveInt = 4
    # Token budgets (prompt + completion) per user, per UTC day and per UTC month; None: unlimited.
    # Admins set them per user and per API key, which takes precedence over these defaults.
    daily_token_budget: PositiveInt | None = None
    monthly_token_budget: PositiveInt | None = None
    # Retry-After, in seconds, of the answer to a user over their concurrency limit.
    concurrency_retry_after_s: PositiveInt = 2
    # Hold requests in the API when the engine's batch is full and let them in by user, in turn
    # (app/access/fair.py); off: the engine's own first-come queue decides.
    fair_admission: bool = True
    # --- Single sign-on (README "SSO"). OpenID Connect is on when ZEUS_OIDC_ISSUER is set, LDAP
    # when ZEUS_LDAP_URL is set; both may be on at once, beside or instead of local passwords.
    password_login: bool = Field(
        default=True, description="false: POST /api/auth/login refuses and the page hides the password form"
    )
    sso_default_role: Literal["admin", "analyst"] = "analyst"
    oidc_issuer: str | None = Field(
        default=None, description="issuer URL; its /.well-known/openid-configuration is read"
    )
    oidc_client_id: str | None = None
    oidc_client_secret: SecretStr | None = None
    oidc_display_name: str = Field(
        default="SSO", max_length=60, description='the button says "Sign in with NAME"'
    )
    oidc_scopes: str = "openid email profile"
    # The public callback address registered at the provider; by default built from the request
    # (nginx passes Host and X-Forwarded-Proto), which is right unless a second proxy rewrites them.
    oidc_redirect_uri: str | None = None
    oidc_email_claim: str = "email"
    # A dotted path into the claims (e.g. realm_access.roles); the user is admin when the value is,
    # or contains, one of oidc_admin_values. Unset: SSO users keep the role they have.
    oidc_admin_claim: str | None = None
    oidc_admin_values: str = Field(default="", description="comma-separated")
    oidc_ca_file: Path | None = None
    oidc_timeout_s: Annotated[float, Field(gt=0, le=60)] = 10.0
    ldap_url: str | None = Field(default=None, description="ldap://HOST:389 or ldaps://HOST:636")
    ldap_start_tls: bool = False
    ldap_ca_file: Path | None = None
    # Either a service account that searches for the user's entry (bind_dn, user_base,
    # user_filter) or a DN template to bind with directly (user_dn_template).
    ldap_bind_dn: str | None = None
    ldap_bind_password: SecretStr | None = None
    ldap_user_base: str | None = None
    ldap_user_filter: str = "(|(uid={username})(mail={username}))"
    ldap_user_dn_template: str | None = None
    ldap_email_attribute: str = "mail"
    ldap_admin_group: str | None = Field(default=None, description="DN of the group whose members are admins")
    ldap_group_member_attribute: str = "member"
    ldap_timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    # --- end of single sign-on

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
        return problems + self.sso_problems()

    @property
    def oidc_enabled(self) -> bool:
        return bool(self.oidc_issuer)

    @property
    def ldap_enabled(self) -> bool:
        return bool(self.ldap_url)

    def sso_problems(self) -> list[str]:
        """Single sign-on settings that cannot work together (one line each)."""
        problems = []
        if self.oidc_enabled:
            if not self.oidc_issuer.startswith(("https://", "http://")):  # type: ignore[union-attr]
                problems.append(f"ZEUS_OIDC_ISSUER must be an http(s):// URL (got {self.oidc_issuer!r})")
            if not self.oidc_client_id:
                problems.append("ZEUS_OIDC_CLIENT_ID is not set: ZEUS_OIDC_ISSUER needs the client's id")
            if "openid" not in self.oidc_scopes.split():
                problems.append(f"ZEUS_OIDC_SCOPES must include openid (got {self.oidc_scopes!r})")
            if self.oidc_admin_claim and not self.oidc_admin_values.strip():
                problems.append("ZEUS_OIDC_ADMIN_CLAIM is set but ZEUS_OIDC_ADMIN_VALUES is empty")
        if self.ldap_enabled:
            if not self.ldap_url.startswith(("ldap://", "ldaps://")):  # type: ignore[union-attr]
                problems.append(f"ZEUS_LDAP_URL must start with ldap:// or ldaps:// (got {self.ldap_url!r})")
            if not self.ldap_user_dn_template and not self.ldap_user_base:
                problems.append(
                    "LDAP needs ZEUS_LDAP_USER_BASE (search for the user) or ZEUS_LDAP_USER_DN_TEMPLATE "
                    "(bind with uid={username},...)"
                )
            if self.ldap_user_dn_template and "{username}" not in self.ldap_user_dn_template:
                problems.append("ZEUS_LDAP_USER_DN_TEMPLATE must contain {username}")
            if "{username}" not in self.ldap_user_filter:
                problems.append("ZEUS_LDAP_USER_FILTER must contain {username}")
            if self.ldap_bind_dn and self.ldap_bind_password is None:
                problems.append("ZEUS_LDAP_BIND_DN is set but ZEUS_LDAP_BIND_PASSWORD is not")
        if not (self.password_login or self.oidc_enabled or self.ldap_enabled):
            problems.append(
                "ZEUS_PASSWORD_LOGIN=false with neither ZEUS_OIDC_ISSUER nor ZEUS_LDAP_URL set: "
                "nobody could sign in"
            )
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
