"""Helpers for the engine tests: requests, the generate() reference, polling."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import torch

from app.inference import GenerationRequest, InferenceEngine, SamplingParams

# The tiny tokenizer's "<|endoftext|>" never occurs in its training data, so the model never
# picks it: as generate()'s end-of-sequence id it disables stopping, like the engine's ignore_eos.
NEVER_GENERATED_TOKEN_ID = 0


def chat(text: str, **params: Any) -> GenerationRequest:
    return GenerationRequest(messages=({"role": "user", "content": text},), params=SamplingParams(**params))


def reference_tokens(engine: InferenceEngine, request: GenerationRequest) -> list[int]:
    """What plain `model.generate` produces for this request alone (greedy)."""
    prompt_ids = engine.render(request)
    params = request.params
    kwargs: dict[str, Any] = {}
    if params.ignore_eos:
        kwargs["eos_token_id"] = NEVER_GENERATED_TOKEN_ID
    with torch.inference_mode():
        output = engine.model.generate(
            torch.tensor([prompt_ids]),
            # Explicit: generate() would otherwise guess a mask from the pad id, which the prompt contains.
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=params.max_tokens,
            do_sample=False,
            **kwargs,
        )
    return output[0, len(prompt_ids) :].tolist()


async def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)
