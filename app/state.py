"""What one running instance holds: settings, database, engine, metrics and live counters."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.access.admission import AccessControl
from app.config import Settings
from app.inference.types import EngineStats
from app.telemetry.metrics import Metrics

if TYPE_CHECKING:
    # The inference engine's contract (not SQLAlchemy's Engine, which db_engine is).
    from app.inference.contract import Engine as ModelEngine


@dataclass
class ZeusState:
    settings: Settings
    db_engine: Engine
    sessions: sessionmaker[Session]
    engine: ModelEngine
    run_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    engine_started: bool = False
    draining: bool = False
    # HTTP requests being answered, health and metrics scrapes excluded (Ansible drains on it).
    in_flight: int = 0
    # Replies streamed by this process, by assistant message id: set to stop them at once when the
    # stop request reaches this instance (other instances go through the database flag).
    local_stops: dict[int, asyncio.Event] = field(default_factory=dict)
    metrics: Metrics = field(init=False)
    # Fair share and quotas: the fair gate and the concurrency leases this run holds (app/access).
    access: AccessControl = field(init=False)

    def __post_init__(self) -> None:
        self.access = AccessControl(self.settings)
        self.metrics = Metrics(self.engine_stats, lambda: self.in_flight, model_name=self.engine.model_name)

    @property
    def instance_name(self) -> str:
        return self.settings.resolved_instance_name

    def engine_stats(self) -> EngineStats | None:
        """The engine's numbers; `queued` also counts the requests the fair gate holds (app/access),
        so health, heartbeat and metrics show every request waiting for a batch slot."""
        try:
            stats = self.engine.stats()
        except Exception:
            return None
        gate = self.access.gate
        if gate is not None and gate.waiting:
            stats = dataclasses.replace(stats, queued=stats.queued + gate.waiting)
        return stats

    def engine_description(self) -> dict[str, Any]:
        """The engine's kind, dtype, quantization, tensor-parallel size, context and KV-cache use:
        /api/health's "engine", the heartbeat's copy for the admin page."""
        info = self.engine.info()
        stats = self.engine_stats()
        return {
            "kind": info.kind,
            "dtype": info.dtype,
            "quantization": info.quantization,
            "tensor_parallel_size": info.tensor_parallel_size,
            "max_model_len": info.max_model_len,
            "kv_cache_usage": stats.kv_cache_usage if stats else None,
            "prefix_cache_hit_rate": stats.prefix_cache_hit_rate if stats else None,
        }
