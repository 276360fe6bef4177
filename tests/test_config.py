"""Settings: ZEUS_* variables, refusal of placeholder secrets, one clear line per problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import ConfigError, Settings, load_settings, secret_key_problem

GOOD_KEY = "Zk3p9-a8Qw2L7mN4xR6tV1yB5cD0eF2gH8jK3"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("ZEUS_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", "empty"),
        ("changeme", "placeholder"),
        ("CHANGEME-CHANGEME-CHANGEME-CHANGEME-1", "placeholder"),
        ("my-secret-key-that-is-long-enough-1234", "placeholder"),
        ("Short-but-random-8fj2", "at least 32"),
        ("a" * 40, "distinct"),
    ],
)
def test_placeholder_or_weak_secret_keys_are_refused(value: str, expected: str) -> None:
    problem = secret_key_problem(value)
    assert problem is not None and expected in problem and "ZEUS_SECRET_KEY" in problem


def test_a_random_secret_key_is_accepted() -> None:
    assert secret_key_problem(GOOD_KEY) is None


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ZEUS_DATABASE_URL", "postgresql://zeus:pw@db:5432/zeus")
    monkeypatch.setenv("ZEUS_SECRET_KEY", GOOD_KEY)
    monkeypatch.setenv("ZEUS_MODEL_PATH", str(tmp_path))
    monkeypatch.setenv("ZEUS_DEVICE", "cuda:1")
    monkeypatch.setenv("ZEUS_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("ZEUS_DB_POOL_SIZE", "3")
    monkeypatch.setenv("ZEUS_COOKIE_SECURE", "true")
    monkeypatch.setenv("ZEUS_PORT", "8003")
    settings = load_settings()
    assert settings.device == "cuda:1" and settings.max_batch_size == 16 and settings.db_pool_size == 3
    assert settings.cookie_secure is True and settings.model_path == tmp_path
    assert settings.resolved_instance_name.endswith(":8003")
    assert settings.secret_key is not None and GOOD_KEY not in repr(settings)


def test_env_file_is_read(tmp_path: Path) -> None:
    env_file = tmp_path / "8000.env"
    env_file.write_text(
        f"ZEUS_DATABASE_URL=postgresql://a@b/c\nZEUS_SECRET_KEY={GOOD_KEY}\nZEUS_INSTANCE_NAME=web1:8000\n"
    )
    settings = load_settings(env_file)
    assert settings.instance_name == "web1:8000"


def test_every_problem_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZEUS_SECRET_KEY", "changeme")
    monkeypatch.setenv("ZEUS_DEVICE", "tpu")
    monkeypatch.setenv("ZEUS_MAX_BATCH_SIZE", "0")
    with pytest.raises(ConfigError) as error:
        load_settings()
    problems = error.value.problems
    assert len(problems) == 4
    assert "ZEUS_DATABASE_URL is not set" in problems
    assert any(line.startswith("ZEUS_SECRET_KEY looks like a placeholder") for line in problems)
    assert any(line.startswith("ZEUS_DEVICE:") and "'tpu'" in line for line in problems)
    assert any(line.startswith("ZEUS_MAX_BATCH_SIZE:") for line in problems)
    assert all("\n" not in line for line in problems)


def test_serving_problems_name_missing_model_and_secret(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, database_url="postgresql://a@b/c", model_path=tmp_path / "nowhere")
    problems = settings.serving_problems()
    assert problems == [
        "ZEUS_SECRET_KEY is not set: set it to a random string of at least 32 characters",
        f"model folder not found: ZEUS_MODEL_PATH={tmp_path / 'nowhere'} is not a directory",
    ]
    (tmp_path / "empty").mkdir()
    empty = Settings(
        _env_file=None, database_url="postgresql://a@b/c", model_path=tmp_path / "empty", secret_key=GOOD_KEY
    )
    assert empty.serving_problems() == [
        f"model folder {tmp_path / 'empty'} has no config.json: is it a Hugging Face model?"
    ]


def test_only_postgresql_urls() -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(database_url="sqlite:///zeus.db")
    assert error.value.problems == ["ZEUS_DATABASE_URL must be a postgresql:// URL"]


def test_engine_settings_default_to_the_builtin_engine_and_refuse_unknown_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ZEUS_DATABASE_URL", "postgresql://zeus:pw@db:5432/zeus")
    settings = load_settings()
    assert (settings.engine, settings.tensor_parallel_size, settings.gpu_memory_utilization) == (
        "builtin",
        1,
        0.90,
    )
    assert settings.kv_cache_gb is None and settings.max_model_len is None

    monkeypatch.setenv("ZEUS_ENGINE", "vllm")
    monkeypatch.setenv("ZEUS_TENSOR_PARALLEL_SIZE", "2")
    monkeypatch.setenv("ZEUS_KV_CACHE_GB", "1.5")
    monkeypatch.setenv("ZEUS_MAX_MODEL_LEN", "4096")
    settings = load_settings()
    assert (settings.engine, settings.tensor_parallel_size, settings.kv_cache_gb, settings.max_model_len) == (
        "vllm",
        2,
        1.5,
        4096,
    )

    monkeypatch.setenv("ZEUS_ENGINE", "tgi")
    monkeypatch.setenv("ZEUS_GPU_MEMORY_UTILIZATION", "1.5")
    with pytest.raises(ConfigError) as error:
        load_settings()
    problems = error.value.problems
    assert any(line.startswith("ZEUS_ENGINE:") and "'tgi'" in line and "vllm" in line for line in problems)
    assert any(line.startswith("ZEUS_GPU_MEMORY_UTILIZATION:") for line in problems)


def test_single_sign_on_settings_that_cannot_work_are_named() -> None:
    def problems(**values: object) -> list[str]:
        return Settings(_env_file=None, database_url="postgresql://z@db/zeus", **values).sso_problems()  # type: ignore[call-arg]

    assert problems() == []
    assert problems(password_login=False) == [
        "ZEUS_PASSWORD_LOGIN=false with neither ZEUS_OIDC_ISSUER nor ZEUS_LDAP_URL set: nobody could sign in"
    ]
    assert problems(oidc_issuer="https://idp.example.org", oidc_scopes="email") == [
        "ZEUS_OIDC_CLIENT_ID is not set: ZEUS_OIDC_ISSUER needs the client's id",
        "ZEUS_OIDC_SCOPES must include openid (got 'email')",
    ]
    assert problems(oidc_issuer="https://idp", oidc_client_id="zeus", oidc_admin_claim="groups") == [
        "ZEUS_OIDC_ADMIN_CLAIM is set but ZEUS_OIDC_ADMIN_VALUES is empty"
    ]
    ldap = problems(ldap_url="ldap://dir", ldap_user_filter="(uid=x)", ldap_bind_dn="cn=zeus")
    assert ldap == [
        "LDAP needs ZEUS_LDAP_USER_BASE (search for the user) or ZEUS_LDAP_USER_DN_TEMPLATE "
        "(bind with uid={username},...)",
        "ZEUS_LDAP_USER_FILTER must contain {username}",
        "ZEUS_LDAP_BIND_DN is set but ZEUS_LDAP_BIND_PASSWORD is not",
    ]
    assert problems(ldap_url="ldap://dir", ldap_user_base="dc=x", password_login=False) == []
