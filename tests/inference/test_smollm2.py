"""The real SmolLM2-135M-Instruct (make setup): a batch matches generate() and the answer is sensible."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from app.inference import EngineConfig, InferenceEngine
from tests.inference.helpers import chat, reference_tokens

pytestmark = pytest.mark.smollm2


async def test_smollm2_batch_matches_generate_and_knows_paris(smollm2_path: Path) -> None:
    engine = InferenceEngine.load(
        EngineConfig(model_path=smollm2_path, device="cpu", dtype="float32", torch_threads=2)
    )
    requests = [
        chat("What is the capital of France?", max_tokens=12, temperature=0),
        chat("Name three primary colours.", max_tokens=16, temperature=0),
        chat("Hi", max_tokens=8, temperature=0),
    ]
    references = [reference_tokens(engine, request) for request in requests]
    await engine.start()
    try:
        results = await asyncio.gather(*(engine.submit(request).result() for request in requests))
    finally:
        await engine.shutdown(timeout_s=5)
    for result, reference in zip(results, references, strict=True):
        assert list(result.token_ids) == reference
    assert "Paris" in results[0].text
