"""What one running instance holds: settings, database, engine, metrics and live counters."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.inference.types import EngineStats
from app.telemetry.metrics import Metrics

if TYPE_CHECKING:
    from app.inference.contract import Engine


@dataclass
class ZeusState:
    settings: Settings
    db_engine: Engine
    sessions: sessionmaker[Session]
    engine: Engine
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

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.engine_stats, lambda: self.in_flight)

    @property
    def instance_name(self) -> str:
        return self.settings.resolved_instance_name

    def engine_stats(self) -> EngineStats | None:
        try:
            return self.engine.stats()
        except Exception:
            return None

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
