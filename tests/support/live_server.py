"""The real app as a subprocess (`python -m app serve`), for the web pages' browser tests and for
the tests that need a separate process (kill, SIGTERM, schemathesis over HTTP)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_SECRET_KEY = "test-only-4f9c2a7e1b8d6035c9e4a1f7b2d8e6c3"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def app_environment(database_url: str, model_path: Path, **extra: str) -> dict[str, str]:
    """The ZEUS_* settings of a test instance: small limits so that tests run fast."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("ZEUS_")}
    env.update(
        ZEUS_DATABASE_URL=database_url,
        ZEUS_SECRET_KEY=TEST_SECRET_KEY,
        ZEUS_MODEL_PATH=str(model_path),
        ZEUS_DEVICE="cpu",
        ZEUS_TORCH_THREADS="1",
        ZEUS_MAX_BATCH_SIZE="4",
        ZEUS_MAX_QUEUE="4",
        ZEUS_MAX_INPUT_TOKENS="512",
        ZEUS_MAX_NEW_TOKENS="64",
        ZEUS_HEARTBEAT_INTERVAL_S="1",
        ZEUS_STREAM_FLUSH_INTERVAL_S="0.5",
        ZEUS_DRAIN_TIMEOUT_S="5",
        # Every test logs in from 127.0.0.1 against one shared database: the per-address rule
        # would otherwise add up the deliberate failures of unrelated tests.
        ZEUS_LOGIN_MAX_FAILURES_PER_ADDRESS="1000",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run_cli(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        env=env,
        cwd=REPO_ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@dataclass
class Account:
    email: str
    password: str
    role: str
    api_key: str = ""


@dataclass
class LiveServer:
    base_url: str
    port: int
    env: dict[str, str]
    process: subprocess.Popen[str]
    log_path: Path
    admin: Account = field(default_factory=lambda: Account("", "", "admin"))
    analyst: Account = field(default_factory=lambda: Account("", "", "analyst"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def create_account(self, email: str, role: str, password: str = "correct horse battery") -> Account:
        done = run_cli(
            self.env,
            "create-user",
            "--email",
            email,
            "--role",
            role,
            "--password-stdin",
            stdin=password + "\n",
        )
        assert done.returncode == 0, done.stderr
        key = run_cli(self.env, "create-api-key", "--email", email, "--name", "tests")
        assert key.returncode == 0, key.stderr
        return Account(email=email, password=password, role=role, api_key=key.stdout.strip())

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_live_server(
    database_url: str, model_path: Path, log_dir: Path, ready_timeout_s: float = 120.0, **extra_env: str
) -> LiveServer:
    port = free_port()
    env = app_environment(database_url, model_path, **extra_env)
    log_path = log_dir / f"zeus-{port}.log"
    log_file = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=REPO_ROOT,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log_file.close()
    server = LiveServer(
        base_url=f"http://127.0.0.1:{port}", port=port, env=env, process=process, log_path=log_path
    )
    deadline = time.monotonic() + ready_timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"zeus exited with {process.returncode} before it was ready:\n{server.log()}")
        try:
            if httpx.get(f"{server.base_url}/api/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop(signal.SIGKILL)
            raise RuntimeError(f"zeus not healthy after {ready_timeout_s} s:\n{server.log()}")
        time.sleep(0.2)
