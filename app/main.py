"""create_app(): settings, database, engine (started in the lifespan), routers and middleware.

Production: gunicorn with one uvicorn worker runs `app.main:create_app()`; development:
`python -m app serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from sqlalchemy import func, update
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import drop_validation_422, error_bytes, install_error_handlers
from app.api.routes import admin, auth, conversations, health, keys, openai, sso, usage
from app.config import ConfigError, Settings, load_settings
from app.db import create_db_engine, session_factory, transaction
from app.models import Instance
from app.startup import StartupError, database_problems, load_engine
from app.state import ZeusState
from app.telemetry.heartbeat import Heartbeat

log = logging.getLogger("zeus")
# Scrapes and probes are not work: Ansible waits for in_flight to reach zero while draining.
UNCOUNTED_PATHS = frozenset({"/api/health", "/metrics"})


class BodyTooLarge(Exception):
    pass


class ZeusMiddleware:
    """Pure ASGI (streams pass through untouched): X-Zeus-Instance on every answer, the body size
    cap, the in-flight count, and HTTP metrics by route template."""

    def __init__(self, app: ASGIApp, state: ZeusState) -> None:
        self.app = app
        self.state = state
        self.instance_header = (b"x-zeus-instance", state.instance_name.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        path: str = scope["path"]
        limit = state.settings.max_body_bytes
        started = time.monotonic()
        status_holder = {"status": 500, "started": False}
        body_received = 0
        body_exceeded = False

        async def refuse(status: int, text: str) -> None:
            body = error_bytes(path, status, text)
            status_holder["status"], status_holder["started"] = status, True
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                self.instance_header,
            ]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        too_large = f"request body over {limit} bytes (ZEUS_MAX_BODY_BYTES)"

        async def send_with_header(message: Message) -> None:
            if body_exceeded:
                # The framework answers a body it could not read with its own 400: say 413 instead.
                if message["type"] == "http.response.start" and not status_holder["started"]:
                    await refuse(413, too_large)
                return
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.instance_header]
                status_holder["status"] = message["status"]
                status_holder["started"] = True
            await send(message)

        async def receive_capped() -> Message:
            nonlocal body_received, body_exceeded
            message = await receive()
            if message["type"] == "http.request":
                body_received += len(message.get("body", b""))
                if body_received > limit:
                    body_exceeded = True
                    raise BodyTooLarge
            return message

        declared = dict(scope.get("headers", [])).get(b"content-length")
        counted = path not in UNCOUNTED_PATHS
        if counted:
            state.in_flight += 1
        try:
            if declared is not None and declared.isdigit() and int(declared) > limit:
                await refuse(413, too_large)
                return
            try:
                await self.app(scope, receive_capped, send_with_header)
            except BodyTooLarge:
                if not status_holder["started"]:
                    await refuse(413, too_large)
        finally:
            if counted:
                state.in_flight -= 1
            route = scope.get("route")
            template = getattr(route, "path", None) or (
                "static" if state.settings.static_dir else "unmatched"
            )
            method = scope.get("method", "GET")
            state.metrics.http_requests.labels(method, template, str(status_holder["status"])).inc()
            state.metrics.http_duration.labels(method, template).observe(time.monotonic() - started)


class HeadAsGet:
    """HEAD wherever GET is served (FastAPI routes answer GET only): the request runs as a GET
    and only the status and headers go out."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)


def _mark_down(state: ZeusState) -> None:
    """A clean stop shows the instance as down at once instead of after the stale timeout."""
    with transaction(state.sessions) as db:
        db.execute(
            update(Instance)
            .where(Instance.name == state.instance_name, Instance.run_id == state.run_id)
            .values(
                last_heartbeat=func.now() - timedelta(seconds=state.settings.stale_after_s + 1),
                in_flight=0,
                queue_running=0,
                queue_waiting=0,
            )
        )


# How long an instance whose engine failed for good keeps answering 503 on /api/health (nginx
# and Ansible's status see it; the failed requests' error results reach their clients) before
# the process exits non-zero, so that its supervisor (systemd, or gunicorn's master for its
# worker) starts a fresh one.
ENGINE_FAILURE_GRACE_S = 2.0


def exit_process(code: int) -> None:
    """Leave at once: the engine's thread is dead, an orderly shutdown would wait on it."""
    logging.shutdown()
    os._exit(code)


async def _exit_when_the_engine_fails(state: ZeusState) -> None:
    # `failure`: a reason, or None (the engine contract).
    # Polled rather than awaited: the engine's thread sets it, and an engine's contract has no event.
    while True:
        failure = state.engine.failure
        if failure is not None:
            break
        await asyncio.sleep(0.5)
    log.critical(
        "engine failed (%s); exiting in %s s so that the service restarts", failure, ENGINE_FAILURE_GRACE_S
    )
    await asyncio.sleep(ENGINE_FAILURE_GRACE_S)
    exit_process(70)  # EX_SOFTWARE


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ZeusState = app.state.zeus
    await state.engine.start()
    state.engine_started = True
    heartbeat = Heartbeat(state)
    try:
        # The first beat registers this run before any reply can stream, and interrupts the
        # replies a previous run of this instance left `streaming`.
        await asyncio.to_thread(heartbeat.beat)
    except Exception as error:
        log.warning("first heartbeat not written: %s", error)
    beating = asyncio.create_task(heartbeat.run_forever())
    watching = asyncio.create_task(_exit_when_the_engine_fails(state))
    log.info(
        "instance %s ready: model %s on %s", state.instance_name, state.engine.model_name, state.engine.device
    )
    try:
        yield
    finally:
        state.draining = True
        beating.cancel()
        watching.cancel()
        log.info("draining: finishing in-flight generations (at most %s s)", state.settings.drain_timeout_s)
        await state.engine.shutdown(state.settings.drain_timeout_s)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(_mark_down, state)
        state.db_engine.dispose()


def build_app(settings: Settings, engine) -> FastAPI:  # engine: app.inference.InferenceEngine
    db_engine = create_db_engine(settings)
    state = ZeusState(
        settings=settings, db_engine=db_engine, sessions=session_factory(db_engine), engine=engine
    )
    engine.observer = state.metrics
    app = FastAPI(
        title="Zeus",
        version="0.1.0",
        description="Chat with a self-hosted language model; OpenAI-compatible under /api/v1.",
        lifespan=lifespan,
    )
    app.state.zeus = state
    install_error_handlers(app)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = drop_validation_422(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    for router in (
        health.router,
        auth.router,
        usage.router,
        sso.router,
        conversations.router,
        conversations.admin_router,
        keys.router,
        admin.router,
        openai.router,
    ):
        app.include_router(router)
    if settings.static_dir is not None:
        app.mount("/", StaticFiles(directory=settings.static_dir, html=True), name="static")
    if settings.cors_origin_list:
        # Off unless origins are named; no credentials: cross-origin callers send an API key.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["Retry-After", "X-Zeus-Instance"],
            allow_credentials=False,
            max_age=600,
        )
    app.add_middleware(ZeusMiddleware, state=state)
    app.add_middleware(HeadAsGet)
    return app


def create_app(settings: Settings | None = None, engine=None) -> FastAPI:
    """The app factory. Under gunicorn, a start-up problem prints one line and exits with
    gunicorn's "worker failed to boot" status, so the master stops instead of respawning."""
    if not logging.getLogger().handlers:
        # Under gunicorn nothing configured the root logger: send ours to stderr (the journal).
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if settings is None:
            settings = load_settings()
        problems = settings.serving_problems() + database_problems(settings)
        if problems:
            raise StartupError("\n".join(problems))
        if engine is None:
            engine = load_engine(settings)
    except (ConfigError, StartupError) as error:
        for line in str(error).splitlines():
            print(f"zeus: {line}", file=sys.stderr, flush=True)
        raise SystemExit(3) from None
    return build_app(settings, engine)
