"""The production process: gunicorn with app/gunicorn_conf.py and the app factory, as the
zeus_api role's systemd unit runs it. SIGTERM drains open streams; a boot failure stops gunicorn."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.databases import create_account
from tests.support.live_server import REPO_ROOT, app_environment, free_port


def gunicorn(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--config",
            "python:app.gunicorn_conf",
            "--bind",
            f"127.0.0.1:{port}",
            "app.main:create_app()",
        ],
        env=env,
        cwd=REPO_ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def wait_healthy(
    base_url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 120
) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            response = httpx.get(f"{base_url}/api/health", timeout=2)
            if response.status_code == 200:
                return response
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not healthy:\n{log.read_text()}")


@pytest.mark.slow
def test_gunicorn_serves_and_drains_on_sigterm(
    database_url: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = app_environment(database_url, tiny_model_path, ZEUS_MAX_NEW_TOKENS="200", ZEUS_DRAIN_TIMEOUT_S="20")
    log = tmp_path / "gunicorn.log"
    process = gunicorn(env, port, log)
    base_url = f"http://127.0.0.1:{port}"
    try:
        health = wait_healthy(base_url, process, log)
        # The default instance name is hostname:port, the port taken from gunicorn's bind.
        assert health.json()["instance"] == f"{socket.gethostname()}:{port}"
        assert health.headers["x-zeus-instance"] == f"{socket.gethostname()}:{port}"
        api_key = create_account(database_url, f"gunicorn-{port}@example.com", "analyst")
        body = {
            "model": health.json()["model"],
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 200,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        chunks = []
        with httpx.stream(
            "POST",
            f"{base_url}/api/v1/chat/completions",
            json=body,
            timeout=60,
            headers={"Authorization": f"Bearer {api_key}"},
        ) as response:
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data:"):
                    chunks.append(line)
                    break
            process.send_signal(signal.SIGTERM)
            chunks += [line for line in lines if line.startswith("data:")]
        # The stream begun before SIGTERM ran to its end instead of being cut.
        assert chunks[-1] == "data: [DONE]"
        usage = json.loads(chunks[-2].removeprefix("data: "))["usage"]
        assert usage["completion_tokens"] == 200
        assert process.wait(timeout=30) == 0
        assert "draining" in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_gunicorn_stops_on_a_boot_failure(database_url: str, tmp_path: Path) -> None:
    env = app_environment(database_url, tmp_path / "no-model")
    log = tmp_path / "gunicorn.log"
    process = gunicorn(env, free_port(), log)
    assert process.wait(timeout=90) != 0
    output = log.read_text()
    assert "zeus: model folder not found" in output and "Traceback" not in output
