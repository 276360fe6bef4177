"""Engines on the tiny generated model: fp32 and one thread, so greedy references are exact."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest_asyncio

from app.inference import EngineConfig, EngineObserver, InferenceEngine

EngineFactory = Callable[..., Awaitable[InferenceEngine]]


@pytest_asyncio.fixture
async def make_engine(tiny_model_path: Path) -> AsyncIterator[EngineFactory]:
    engines: list[InferenceEngine] = []

    async def factory(observer: EngineObserver | None = None, **overrides: Any) -> InferenceEngine:
        settings: dict[str, Any] = {
            "model_path": tiny_model_path,
            "device": "cpu",
            "dtype": "float32",
            "torch_threads": 1,
            "max_batch_size": 8,
            "max_queue": 16,
            "max_input_tokens": 512,
            "max_new_tokens": 512,
        }
        settings.update(overrides)
        engine = InferenceEngine.load(EngineConfig(**settings))
        engine.observer = observer
        await engine.start()
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        await engine.shutdown(timeout_s=0)
