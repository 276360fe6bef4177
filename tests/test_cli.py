"""The command line of contract.md: migrate, check, serve's start-up failures, create-user,
create-api-key, reset-password. Real subprocesses on a real database."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from app.auth.passwords import verify_password
from app.auth.tokens import sha256_hex
from app.db import database_url as sqlalchemy_url
from app.db import head_revision
from tests.support.databases import fresh_database
from tests.support.live_server import REPO_ROOT, app_environment, free_port, run_cli


@pytest.fixture(scope="module")
def env(database_url: str, tiny_model_path: Path) -> dict[str, str]:
    return app_environment(database_url, tiny_model_path)


def query(url: str, sql: str, **params: object):
    engine = create_engine(sqlalchemy_url(url), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return connection.execute(text(sql), params).all()
    finally:
        engine.dispose()


def assert_one_line_problems(done: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr
    for fragment in expected:
        assert any(fragment in line for line in lines), f"{fragment!r} not in {lines}"


@pytest.fixture
def empty_database() -> Iterator[str]:
    with fresh_database("cli", migrate=False) as url:
        yield url


def test_migrate_is_idempotent_and_safe_concurrently(empty_database: str, tiny_model_path: Path) -> None:
    env = app_environment(empty_database, tiny_model_path)
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "app", "migrate"],
            env=env,
            cwd=REPO_ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], outputs
    stdout = [out for out, _ in outputs]
    # Exactly one of them upgraded; the others waited on the lock and found nothing to do.
    head = head_revision()
    assert sum(f"empty -> {head}" in out for out in stdout) == 1
    assert sum(out.strip() == f"database schema at {head}" for out in stdout) == 2
    assert query(empty_database, "SELECT version_num FROM alembic_version") == [(head,)]
    again = run_cli(env, "migrate")
    assert again.returncode == 0 and again.stdout.strip() == f"database schema at {head}"


def test_check_passes_on_a_good_setup(env: dict[str, str]) -> None:
    done = run_cli(env, "check", "--port", str(free_port()))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok: configuration, database and model folder"


def test_check_names_each_problem_on_one_line(env: dict[str, str], tmp_path: Path) -> None:
    bad = {**env, "ZEUS_SECRET_KEY": "changeme", "ZEUS_MODEL_PATH": str(tmp_path / "missing")}
    assert_one_line_problems(run_cli(bad, "check"), "ZEUS_SECRET_KEY looks like a placeholder")
    bad["ZEUS_SECRET_KEY"] = env["ZEUS_SECRET_KEY"]
    assert_one_line_problems(run_cli(bad, "check"), "model folder not found")


def test_check_database_failures(env: dict[str, str], empty_database: str) -> None:
    url = make_url(env["ZEUS_DATABASE_URL"])
    wrong_password = url.set(password="wrong").render_as_string(hide_password=False)
    assert_one_line_problems(
        run_cli({**env, "ZEUS_DATABASE_URL": wrong_password}, "check"), "database refused the credentials"
    )
    unreachable = url.set(port=free_port()).render_as_string(hide_password=False)
    assert_one_line_problems(
        run_cli({**env, "ZEUS_DATABASE_URL": unreachable}, "check"), "database unreachable"
    )
    assert_one_line_problems(
        run_cli({**env, "ZEUS_DATABASE_URL": empty_database}, "check"), "run `python -m app migrate`"
    )


def test_check_and_serve_refuse_a_taken_port(env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert_one_line_problems(
            run_cli(env, "check", "--port", port), f"port {port} on 127.0.0.1 is already in use"
        )
        served = run_cli(env, "serve", "--port", port)
        assert_one_line_problems(served, "already in use")


def test_serve_refuses_a_missing_model_folder(env: dict[str, str], tmp_path: Path) -> None:
    served = run_cli({**env, "ZEUS_MODEL_PATH": str(tmp_path / "nope")}, "serve", "--port", str(free_port()))
    assert_one_line_problems(served, "model folder not found")
    assert len(served.stderr.strip().splitlines()) == 1


def test_serve_refuses_a_broken_model_folder(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    served = run_cli({**env, "ZEUS_MODEL_PATH": str(tmp_path)}, "serve", "--port", str(free_port()))
    assert served.returncode != 0 and "Traceback" not in served.stderr
    problem_lines = [line for line in served.stderr.splitlines() if line.startswith("zeus: ")]
    assert len(problem_lines) == 1 and "model" in problem_lines[0]


def test_create_user_then_duplicate(env: dict[str, str], database_url: str) -> None:
    created = run_cli(
        env,
        "create-user",
        "--email",
        "Cli.User@Example.com",
        "--role",
        "analyst",
        "--password",
        "a fine password",
    )
    assert created.returncode == 0, created.stderr
    assert created.stdout == ""
    ((role, password_hash),) = query(
        database_url, "SELECT role, password_hash FROM users WHERE email = :e", e="cli.user@example.com"
    )
    assert role == "analyst" and verify_password(password_hash, "a fine password")
    duplicate = run_cli(
        env,
        "create-user",
        "--email",
        "cli.user@example.com",
        "--role",
        "admin",
        "--password",
        "another password",
    )
    assert duplicate.returncode == 3 and "already exists" in duplicate.stderr
    tolerated = run_cli(
        env,
        "create-user",
        "--email",
        "cli.user@example.com",
        "--role",
        "admin",
        "--password",
        "another password",
        "--exist-ok",
    )
    assert tolerated.returncode == 0
    assert_one_line_problems(
        run_cli(
            env, "create-user", "--email", "short@example.com", "--role", "analyst", "--password", "short"
        ),
        "at least 8 characters",
    )
    assert (
        run_cli(
            env, "create-user", "--email", "x@example.com", "--role", "root", "--password", "xxxxxxxxx"
        ).returncode
        == 2
    )
    audit = query(
        database_url, "SELECT actor_email, action FROM audit_log WHERE target = 'cli.user@example.com'"
    )
    assert ("cli", "user.create") in audit


def test_create_api_key_prints_only_the_key(env: dict[str, str], database_url: str) -> None:
    run_cli(
        env,
        "create-user",
        "--email",
        "keyholder@example.com",
        "--role",
        "analyst",
        "--password-stdin",
        stdin="keyholder password\n",
    )
    done = run_cli(env, "create-api-key", "--email", "keyholder@example.com", "--name", "batch job")
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert done.stdout == key + "\n" and key.startswith("zk-") and len(key) > 40
    stored = query(database_url, "SELECT name, key_hash FROM api_keys WHERE key_hash = :h", h=sha256_hex(key))
    assert stored == [("batch job", sha256_hex(key))]
    assert_one_line_problems(
        run_cli(env, "create-api-key", "--email", "nobody@example.com"), "no user with email"
    )


def test_reset_password_generates_or_reads_one(env: dict[str, str], database_url: str) -> None:
    run_cli(
        env,
        "create-user",
        "--email",
        "forgetful@example.com",
        "--role",
        "analyst",
        "--password",
        "forgotten password",
    )
    generated = run_cli(env, "reset-password", "--email", "forgetful@example.com")
    assert generated.returncode == 0
    password = generated.stdout.strip()
    assert len(password) >= 16

    def current_hash() -> str:
        return query(database_url, "SELECT password_hash FROM users WHERE email = 'forgetful@example.com'")[
            0
        ][0]

    assert verify_password(current_hash(), password)
    chosen = run_cli(
        env,
        "reset-password",
        "--email",
        "forgetful@example.com",
        "--password-stdin",
        stdin="my new password\n",
    )
    assert chosen.returncode == 0 and chosen.stdout == ""
    assert verify_password(current_hash(), "my new password") and not verify_password(
        current_hash(), password
    )


def test_commands_report_a_bad_environment_in_one_line(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "app", "migrate"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_one_line_problems(done, "ZEUS_DATABASE_URL is not set")


@pytest.mark.smollm2
def test_out_of_memory_while_loading_is_one_line(database_url: str, smollm2_path: Path) -> None:
    """A real allocation failure: the address space is capped a little above what the imports
    need, so the libraries load and the model's weights do not fit."""
    import resource

    env = app_environment(database_url, smollm2_path)
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import app.startup, app.inference, transformers; "
            "print(open('/proc/self/status').read().split('VmPeak:')[1].split()[0])",
        ],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    limit = (int(probe.stdout.strip()) + 330_000) * 1024

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    done = subprocess.run(
        [sys.executable, "-m", "app", "check", "--load-model"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=cap_memory,
    )
    assert_one_line_problems(done, "out of memory while loading")
    assert len(done.stderr.strip().splitlines()) == 1
