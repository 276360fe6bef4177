"""Replayed CUDA graphs compute what the eager decode step computes, also across a cache reallocation.

Needs a CUDA device (skipped elsewhere): graphs exist only there.
"""

from __future__ import annotations

import pytest
import torch

from app.inference.kv_cache import CAPACITY_STEP
from app.inference.model_runner import ModelRunner
from tests.inference.test_model_runner import _PROMPTS, _random_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _decode_logits(use_cuda_graphs: bool, steps: int) -> tuple[list[torch.Tensor], ModelRunner]:
    model = _random_model("llama").cuda()
    runner = ModelRunner(model, torch.device("cuda"), max_slots=4, use_cuda_graphs=use_cuda_graphs)
    with torch.inference_mode():
        _, staged = runner.prefill(_PROMPTS)
        runner.cache.add_rows(staged, [len(prompt) for prompt in _PROMPTS])
        # The same tokens every step: argmax near a tie could send the two runs apart.
        tokens = torch.tensor([11, 12], device="cuda")
        logits = [runner.decode(tokens).cpu() for _ in range(steps)]
    return logits, runner


def test_replayed_steps_match_eager_steps_past_a_reallocation() -> None:
    steps = CAPACITY_STEP  # the longest row then passes the first capacity: the cache grows
    eager, _ = _decode_logits(use_cuda_graphs=False, steps=steps)
    graphed, runner = _decode_logits(use_cuda_graphs=True, steps=steps)
    assert runner.cache.capacity > CAPACITY_STEP and runner.cache.allocations >= 2
    assert runner.graphs is not None and runner.graphs.captured()
    for expected, actual in zip(eager, graphed, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
