"""The slot-based KV cache of the runner: growth, row moves and the models it refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from app.inference import (
    EngineConfig,
    GenerationRequest,
    GenerationResult,
    InferenceEngine,
    ModelLoadError,
)
from app.inference.model_runner import ModelRunner
from app.inference.scheduler import fill_holes as _fill_holes
from tests.inference.conftest import EngineFactory
from tests.inference.helpers import chat, reference_tokens, wait_for


async def _submit_together_and_compare_with_generate(
    engine: InferenceEngine, requests: list[GenerationRequest], running_together: int | None = None
) -> list[GenerationResult]:
    """Submit in one tick; each result must equal `generate` on its prompt alone."""
    references = [reference_tokens(engine, request) for request in requests]
    streams = [engine.submit(request) for request in requests]
    if running_together is not None:
        await wait_for(lambda: engine.stats().running == running_together)
    results = [await stream.result() for stream in streams]
    for result, reference in zip(results, references, strict=True):
        assert list(result.token_ids) == reference
    return results


@pytest.mark.parametrize(
    ("keep", "order"),
    [
        ([0, 1, 2], [0, 1, 2]),
        ([1, 2], [2, 1]),  # row 0 finished: row 1 stays, row 2 moves into slot 0
        ([0, 2, 3], [0, 3, 2]),
        ([3], [3]),
        ([], []),
    ],
)
def test_finished_rows_are_replaced_by_the_last_rows(keep: list[int], order: list[int]) -> None:
    result = _fill_holes(keep)
    assert sorted(result) == sorted(keep)
    # Rows that are already inside the new batch keep their slot.
    assert all(result[slot] == slot for slot in range(len(result)) if slot in keep)
    assert result == order


async def test_sequences_growing_past_the_first_cache_block_stay_exact(make_engine: EngineFactory) -> None:
    """The cache starts at 256 positions and is reallocated while rows are mid-sequence."""
    engine = await make_engine()
    long_prompt = "What is the capital of France? What colour is the sky? " * 14
    requests = [
        chat(long_prompt, max_tokens=120, temperature=0, ignore_eos=True),
        chat("Hi", max_tokens=150, temperature=0, ignore_eos=True),
    ]
    assert 200 < engine.count_prompt_tokens(requests[0]) < 256 < engine.count_prompt_tokens(requests[0]) + 120
    await _submit_together_and_compare_with_generate(engine, requests)


async def test_rows_moved_into_freed_slots_keep_their_cache(make_engine: EngineFactory) -> None:
    """Early finishers leave holes that the last rows fill; the moved rows must continue exactly."""
    engine = await make_engine()
    requests = [
        chat("Hi", max_tokens=4, temperature=0, ignore_eos=True),
        chat("What is two plus three?", max_tokens=6, temperature=0, ignore_eos=True),
        chat("Tell me a story.", max_tokens=40, temperature=0, ignore_eos=True),
        chat("What colour is grass?", max_tokens=45, temperature=0, ignore_eos=True),
    ]
    await _submit_together_and_compare_with_generate(engine, requests, running_together=4)


def test_model_types_other_than_llama_family_are_refused(tmp_path: Path, tiny_model_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_path, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as failure:
        InferenceEngine.load(EngineConfig(model_path=model, device="cpu", dtype="float32"))
    message = str(failure.value)
    assert "'gpt2' is not supported" in message and "llama" in message and "\n" not in message


def test_fused_projections_leave_the_model_unchanged(tiny_model_path: Path) -> None:
    """The runner fuses weights into shared tensors; generate() on the model must give the same logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    input_ids = torch.tensor([[5, 17, 42, 9, 100]])
    with torch.inference_mode():
        weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        before = model(input_ids=input_ids).logits
        runner = ModelRunner(model, torch.device("cpu"), max_slots=2)
        after = model(input_ids=input_ids).logits
        logits, _ = runner.prefill([input_ids[0].tolist()])
    # Every weight keeps its values, bit for bit (the fused tensors only share their storage).
    unchanged = model.state_dict()
    assert unchanged.keys() == weights.keys()
    assert all(torch.equal(unchanged[name], weights[name]) for name in weights)
    # The logits may differ in the last bits: a weight that became a view of a fused tensor can
    # take another BLAS kernel (seen on an AVX-512/AMX Xeon with MKL: 4e-6 at most).
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, before[:, -1], rtol=1e-5, atol=1e-5)


def _random_model(model_type: str) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=300,
        max_position_embeddings=512,
        sliding_window=None,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


# Two prompts of different lengths (the decode step needs its mask), and each one's next token.
_PROMPTS = [[5, 17, 42, 9, 100, 7], [8, 3, 250]]
_NEXT_TOKENS = [11, 12]


def _transformers_logits_after_next_token(model: Any) -> torch.Tensor:
    """[rows, vocab]: transformers' logits after each prompt followed by its next token."""
    return torch.stack(
        [
            model(input_ids=torch.tensor([[*prompt, token]])).logits[0, -1]
            for prompt, token in zip(_PROMPTS, _NEXT_TOKENS, strict=True)
        ]
    )


def _runner_holding_the_prompts(model: Any, **settings: Any) -> tuple[ModelRunner, torch.Tensor]:
    """A runner with both prompts prefilled into its first slots, and their prefill logits."""
    runner = ModelRunner(model, torch.device("cpu"), **settings)
    logits, staged = runner.prefill(_PROMPTS)
    runner.cache.add_rows(staged, [len(prompt) for prompt in _PROMPTS])
    return runner, logits


@pytest.mark.parametrize("fused_kernels", [False, True], ids=["exact", "fused"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
def test_supported_layouts_compute_what_transformers_computes(model_type: str, fused_kernels: bool) -> None:
    """Biased projections (Qwen2), per-head query/key norms (Qwen3), Mistral: prefill and decode logits.

    The fused kernels of CUDA (rotation matrices, residuals inside the products, one norm kernel)
    run here on the CPU too: the same arithmetic, rounded in another order.
    """
    model = _random_model(model_type)
    with torch.inference_mode():
        references = torch.stack(
            [model(input_ids=torch.tensor([prompt])).logits[0, -1] for prompt in _PROMPTS]
        )
        continued = _transformers_logits_after_next_token(model)
        runner, logits = _runner_holding_the_prompts(model, max_slots=2, fused_kernels=fused_kernels)
        decoded = runner.decode(torch.tensor(_NEXT_TOKENS))
    torch.testing.assert_close(logits, references, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(decoded, continued, rtol=1e-4, atol=1e-4)


def test_a_captured_step_shape_computes_what_transformers_computes() -> None:
    """What a CUDA graph replays: a batch padded to its bucket, a window rounded up to 256 positions.

    Padding rows compute in free slots at position 0 and the real rows must not see them, nor the
    unwritten positions of the window.
    """
    model = _random_model("llama")
    with torch.inference_mode():
        continued = _transformers_logits_after_next_token(model)
        runner, _ = _runner_holding_the_prompts(model, max_slots=4, fused_kernels=True)
        tokens = torch.tensor([*_NEXT_TOKENS, 0, 0])
        positions = torch.tensor([len(prompt) for prompt in _PROMPTS] + [0, 0])
        decoded = runner._decode_forward(tokens, positions, window=runner.cache.capacity, masked=True)
    assert runner.cache.capacity == 256
    torch.testing.assert_close(decoded[:2], continued, rtol=1e-4, atol=1e-4)


def test_one_row_decoded_alone_computes_its_row_of_the_full_step() -> None:
    """decode_rows (how a failing step is bisected): a row alone gives its row of the batch's logits,
    and the cache does not advance, so the full step that follows is unchanged."""
    model = _random_model("llama")
    with torch.inference_mode():
        continued = _transformers_logits_after_next_token(model)
        runner, _ = _runner_holding_the_prompts(model, max_slots=2)
        alone = runner.decode_rows(torch.tensor([_NEXT_TOKENS[1]]), [1])
        assert runner.cache.lengths == [len(prompt) for prompt in _PROMPTS]
        decoded = runner.decode(torch.tensor(_NEXT_TOKENS))
    torch.testing.assert_close(alone[0], continued[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(decoded, continued, rtol=1e-4, atol=1e-4)


async def test_a_prompt_ending_at_its_first_token_leaves_its_group_exact(make_engine: EngineFactory) -> None:
    """Prompts prefilled together; the middle one ends at its first token and its row is dropped."""
    engine = await make_engine()
    requests = [
        chat("What is two plus three?", max_tokens=12, temperature=0, ignore_eos=True),
        chat("Hi", max_tokens=1, temperature=0, ignore_eos=True),
        chat("Tell me a story.", max_tokens=12, temperature=0, ignore_eos=True),
    ]
    results = await _submit_together_and_compare_with_generate(engine, requests)
    assert [result.completion_tokens for result in results] == [12, 1, 12]


@pytest.mark.slow
def test_the_compiled_decode_step_computes_what_transformers_computes() -> None:
    """compile_decode on the CPU (inductor's C++ backend): the logits, and the keys written in place."""
    model = _random_model("llama")
    with torch.inference_mode():
        continued = _transformers_logits_after_next_token(model)
        runner, _ = _runner_holding_the_prompts(model, max_slots=4, fused_kernels=True, compile_decode=True)
        decoded = runner.decode(torch.tensor(_NEXT_TOKENS))
        # The decode step of the second row wrote its key at position 3 of slot 1.
        written = runner.cache.keys[:, 1, :, 3]
    assert runner._compiled_decode is not None, "the compiled step failed and fell back to eager"
    torch.testing.assert_close(decoded, continued, rtol=1e-4, atol=1e-4)
    assert written.abs().sum() > 0
