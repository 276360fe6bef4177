"""Every few seconds each instance writes its row in `instances` (the latest state) and one row in
`instance_samples` (the admin page's 15-minute charts); old samples are pruned."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta

import psutil
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.db import describe_db_error, transaction
from app.models import Instance, InstanceSample, Message
from app.state import ZeusState

log = logging.getLogger("zeus.heartbeat")
SAMPLE_RETENTION = timedelta(hours=1)
# Rows of instances that were scaled away disappear from the admin page after this long.
INSTANCE_RETENTION = timedelta(days=1)


def gpu_memory_bytes(device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    try:
        import torch

        return int(torch.cuda.memory_reserved(torch.device(device)))
    except Exception:
        return None


def interrupt_orphaned_replies(db: Session, stale_after_s: float, conversation_id: int | None = None) -> int:
    """Replies still `streaming` whose process stopped heartbeating (killed, crashed) or was
    replaced by a restart of its instance become `interrupted`; their partial text stays."""
    live_runs = select(Instance.run_id).where(
        Instance.last_heartbeat > func.now() - timedelta(seconds=stale_after_s)
    )
    statement = (
        update(Message)
        .where(Message.status == "streaming", Message.stream_run_id.not_in(live_runs))
        .values(status="interrupted", updated_at=func.now())
    )
    if conversation_id is not None:
        statement = statement.where(Message.conversation_id == conversation_id)
    return db.execute(statement).rowcount


@dataclass
class Heartbeat:
    state: ZeusState
    process: psutil.Process = field(default_factory=psutil.Process)
    _last_time: float = 0.0
    _last_requests: int = 0
    _last_tokens: int = 0

    def __post_init__(self) -> None:
        self.process.cpu_percent(None)  # the first call only starts the measurement
        self._last_time = time.monotonic()
        stats = self.state.engine_stats()
        if stats is not None:
            self._last_requests, self._last_tokens = stats.requests_total, stats.tokens_generated_total

    def beat(self) -> None:
        """One heartbeat; blocking (database), called from a thread."""
        state = self.state
        now = time.monotonic()
        elapsed = max(now - self._last_time, 1e-6)
        stats = state.engine_stats()
        requests_total = stats.requests_total if stats else self._last_requests
        tokens_total = stats.tokens_generated_total if stats else self._last_tokens
        requests_per_s = (requests_total - self._last_requests) / elapsed
        tokens_per_s = (tokens_total - self._last_tokens) / elapsed
        self._last_time, self._last_requests, self._last_tokens = now, requests_total, tokens_total
        device = str(state.engine.device)
        values = {
            "run_id": state.run_id,
            "host": socket.gethostname(),
            "port": state.settings.port,
            "pid": os.getpid(),
            "model": state.engine.model_name,
            "device": device,
            "started_at": state.started_at,
            "last_heartbeat": func.now(),
            "cpu_percent": self.process.cpu_percent(None),
            "rss_bytes": self.process.memory_info().rss,
            "gpu_memory_bytes": gpu_memory_bytes(device),
            "in_flight": state.in_flight,
            "queue_running": stats.running if stats else 0,
            "queue_waiting": stats.queued if stats else 0,
            "requests_per_s": round(requests_per_s, 3),
            "tokens_per_s": round(tokens_per_s, 3),
            "engine": state.engine_description(),
        }
        with transaction(state.sessions) as db:
            statement = insert(Instance).values(name=state.instance_name, **values)
            db.execute(statement.on_conflict_do_update(index_elements=[Instance.name], set_=values))
            db.add(
                InstanceSample(
                    instance_name=state.instance_name,
                    in_flight=values["in_flight"],
                    queue=values["queue_running"] + values["queue_waiting"],
                    requests_per_s=values["requests_per_s"],
                    tokens_per_s=values["tokens_per_s"],
                    cpu_percent=values["cpu_percent"],
                    rss_bytes=values["rss_bytes"],
                )
            )
            db.execute(delete(InstanceSample).where(InstanceSample.ts < func.now() - SAMPLE_RETENTION))
            db.execute(delete(Instance).where(Instance.last_heartbeat < func.now() - INSTANCE_RETENTION))
            interrupt_orphaned_replies(db, state.settings.stale_after_s)

    async def run_forever(self) -> None:
        interval = self.state.settings.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.beat)
            except Exception as error:
                log.warning("heartbeat not written: %s", describe_db_error(error))
