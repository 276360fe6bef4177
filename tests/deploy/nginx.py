"""A real nginx (Debian's binary) run as a plain process on a free port, configured by the nginx
role's own templates, rendered by Ansible's template module (tests/deploy/render-nginx.yml) with
the role's defaults and vars; and small real HTTP upstreams whose behaviour a test chooses, for the
tests that are about nginx's own behaviour (retries, affinity, its own errors).

No systemd and no /etc: nginx runs with `-p PREFIX -c PREFIX/nginx.conf`, where nginx.conf is a
minimal main file that includes the two rendered files exactly as Debian's nginx.conf includes
/etc/nginx/conf.d/*.conf.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from tests.deploy.templating import render_role_template
from tests.support.live_server import REPO_ROOT, free_port

RENDER_PLAYBOOK = REPO_ROOT / "tests" / "deploy" / "render-nginx.yml"


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        raise RuntimeError("nginx is not installed: `make system-deps` installs Debian's nginx")
    return found


ROLE_DIR = REPO_ROOT / "roles" / "nginx"
TEMPLATES = ("zeus.conf", "zeus-upstream.conf")


def render_role(out_dir: Path, settings: dict[str, Any], hostvars: dict[str, Any] | None = None) -> None:
    """zeus.conf and zeus-upstream.conf of roles/nginx into out_dir (tests/deploy/templating.py),
    with `settings` as extra vars. A playbook run costs 20 s on a busy CI machine;
    test_the_fast_rendering_is_the_template_modules checks that both give the same bytes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    variables = {"inventory_hostname": "localhost", "hostvars": hostvars or {}, **settings}
    for name in TEMPLATES:
        text = render_role_template(ROLE_DIR, f"etc/nginx/conf.d/{name}.j2", variables, out_dir / name)
        (out_dir / name).write_text(text)


def render_role_with_ansible_playbook(out_dir: Path, settings: dict[str, Any]) -> None:
    """The same files through `ansible-playbook` and the template module (render-nginx.yml)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = out_dir / "render-vars.json"
    extra.write_text(json.dumps({**settings, "nginx_render_dir": str(out_dir)}))
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("ansible-playbook")),
            "-i",
            "localhost,",
            str(RENDER_PLAYBOOK),
            "-e",
            f"@{extra}",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1"},
    )
    if done.returncode != 0:
        raise RuntimeError(f"rendering the nginx role failed:\n{done.stdout}\n{done.stderr}")
    extra.unlink()


MAIN_CONF = """\
{user}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log notice;
events {{ worker_connections 512; }}
http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    include {prefix}/conf.d/*.conf;
}}
"""


@dataclass
class Nginx:
    prefix: Path
    port: int
    settings: dict[str, Any]
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def conf_dir(self) -> Path:
        return self.prefix / "conf.d"

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def upstream_conf(self) -> str:
        return (self.conf_dir / "zeus-upstream.conf").read_text()

    def site_conf(self) -> str:
        return (self.conf_dir / "zeus.conf").read_text()

    def _check(self) -> None:
        done = subprocess.run(
            [nginx_binary(), "-t", "-q", "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf")],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"nginx -t refused the rendered configuration:\n{done.stderr}")

    def start(self) -> None:
        self._check()
        self.process = subprocess.Popen(
            [
                nginx_binary(),
                "-p",
                str(self.prefix),
                "-c",
                str(self.prefix / "nginx.conf"),
                "-g",
                "daemon off;",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start:\n{self.error_log()}")
            time.sleep(0.05)

    def rerender(self, **changes: Any) -> None:
        """Render the role again with these settings changed and reload nginx (SIGHUP), as the
        role's upstream entry point does; returns once the old worker has exited, so that every
        new connection meets the new configuration."""
        self.settings.update(changes)
        render_role(self.conf_dir, self.settings)
        self._check()
        assert self.process is not None
        exited_before = self.error_log().count("exited with code")
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while self.error_log().count("exited with code") <= exited_before:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx's old worker did not exit after the reload:\n{self.error_log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_nginx(prefix: Path, **settings: Any) -> Nginx:
    """nginx on a free port in front of settings["nginx_upstream_servers"], with the role's other
    defaults unless `settings` changes them (any nginx_* variable of roles/nginx)."""
    port = free_port()
    for folder in ("conf.d", "tmp", "static"):
        (prefix / folder).mkdir(parents=True, exist_ok=True)
    settings = {"nginx_listen_port": port, "nginx_static_root": str(prefix / "static"), **settings}
    # Workers of a root master run as "nobody", who cannot enter pytest's 0700 temporary folders.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    (prefix / "nginx.conf").write_text(MAIN_CONF.format(prefix=prefix, user=user))
    render_role(prefix / "conf.d", settings)
    nginx = Nginx(prefix=prefix, port=port, settings=settings)
    nginx.start()
    return nginx


@dataclass
class Received:
    method: str
    path: str
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class Upstream:
    """A real HTTP/1.1 server on 127.0.0.1 standing in for a Zeus instance. `behaviour` decides each
    answer after the whole request body was read: "ok" (200 JSON naming this upstream), "429" and
    "503" (a refusal before any work, as a full or draining instance answers), "429-heavy" (429 to
    the API key "heavy", as every instance answers a user over a fleet-wide limit, "ok" to others),
    "stall" (reads the request, then answers nothing for stall_s). Every request it read is in
    `received`."""

    name: str
    behaviour: str = "ok"
    stall_s: float = 5.0
    port: int = 0
    received: list[Received] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    connections: set[socket.socket] = field(default_factory=set)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ids(self) -> list[str]:
        """The "id" of every JSON body it read."""
        with self.lock:
            return [item.json()["id"] for item in self.received if item.body]

    def start(self) -> Upstream:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with upstream.lock:
                    upstream.connections.add(self.connection)

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with upstream.lock:
                    upstream.received.append(Received(self.command, self.path, body, dict(self.headers)))
                behaviour = upstream.behaviour
                if behaviour == "429-heavy":
                    behaviour = "429" if self.headers.get("Authorization") == "Bearer heavy" else "ok"
                if behaviour == "stall":
                    time.sleep(upstream.stall_s)
                    self.close_connection = True
                    return
                if behaviour in ("429", "503"):
                    status = int(behaviour)
                    payload = {
                        "error": {
                            "message": f"{upstream.name} refuses",
                            "type": "x",
                            "param": None,
                            "code": None,
                        }
                    }
                    extra = {"Retry-After": "1"}
                else:
                    status, payload, extra = 200, {"instance": upstream.name, "path": self.path}, {}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("X-Zeus-Instance", upstream.name)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_HEAD = do_PATCH = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, name=f"upstream-{self.name}", daemon=True).start()
        return self

    def stop(self) -> None:
        """Die as a killed instance does: new connections are refused and the open ones (nginx
        keeps idle ones for reuse) are closed."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        with self.lock:
            for connection in self.connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
            self.connections.clear()


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)
