"""gunicorn settings of a production instance: `gunicorn --config python:app.gunicorn_conf
--bind HOST:PORT 'app.main:create_app()'` (one uvicorn worker; one model copy per instance)."""

from __future__ import annotations

import math
import os

worker_class = "uvicorn_worker.UvicornWorker"
workers = 1
# Streams may last minutes: gunicorn must never kill a worker for being "silent".
timeout = 0
# SIGTERM: stop accepting, let streams finish for this long, then the engine cancels the rest.
graceful_timeout = math.ceil(float(os.environ.get("ZEUS_DRAIN_TIMEOUT_S", "30")))
keepalive = 75
forwarded_allow_ips = os.environ.get("ZEUS_TRUSTED_PROXIES", "127.0.0.1")
accesslog = None
errorlog = "-"
loglevel = os.environ.get("ZEUS_LOG_LEVEL", "info")


def on_starting(server) -> None:  # gunicorn hook, in the master before the worker forks
    """The instance's default name (hostname:port) needs the port the worker listens on."""
    for address in server.cfg.bind:
        host, _, port = address.rpartition(":")
        if port.isdigit():
            os.environ.setdefault("ZEUS_HOST", host.strip("[]") or "0.0.0.0")
            os.environ.setdefault("ZEUS_PORT", port)
            break
