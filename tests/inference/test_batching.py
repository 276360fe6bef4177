"""Continuous batching computes exactly what each request would get alone from model.generate()."""

from __future__ import annotations

import asyncio

import pytest

from app.inference import GenerationRequest, GenerationResult, InferenceEngine, RequestStream, TextDelta
from tests.inference.conftest import EngineFactory
from tests.inference.helpers import chat, reference_tokens, wait_for


async def _collect(stream: RequestStream) -> tuple[str, GenerationResult]:
    text = ""
    async for item in stream:
        if isinstance(item, TextDelta):
            text += item.text
        else:
            return text, item
    raise AssertionError("stream ended without a GenerationResult")


async def _submit_at_step(engine: InferenceEngine, request: GenerationRequest, step: int) -> RequestStream:
    await wait_for(lambda: engine.stats().decode_steps_total >= step)
    return engine.submit(request)


# Overlapped: the engine reads each step's tokens one step late, as it does on CUDA.
OVERLAP = pytest.mark.parametrize("overlap_host_work", [False, True], ids=["serial", "overlapped"])


@OVERLAP
async def test_concurrent_batch_is_token_identical_to_generate_alone(
    make_engine: EngineFactory, overlap_host_work: bool
) -> None:
    engine = await make_engine(overlap_host_work=overlap_host_work)
    long_prompt = "What is the capital of France? What colour is the sky? Tell me a story. " * 4
    requests = [
        chat("What is two plus three?", max_tokens=48, temperature=0, ignore_eos=True),
        chat(long_prompt, max_tokens=40, temperature=0, ignore_eos=True),
        chat("Hi", max_tokens=32, temperature=0, ignore_eos=True),
        chat("Tell me a story.", max_tokens=30, temperature=0),  # stops at its own end-of-sequence
        chat("What colour is grass?", max_tokens=60, temperature=0, ignore_eos=True),  # cancelled mid-way
    ]
    references = [reference_tokens(engine, request) for request in requests]
    assert len(references[3]) < 30, "the tiny model should end this answer itself"

    # A stop string taken from the middle of one reference: the engine must cut its text there.
    stop_source = engine.tokenizer.decode(references[0], skip_special_tokens=True)
    stop_string = stop_source[len(stop_source) // 2 : len(stop_source) // 2 + 3]
    stop_request = chat(
        "What is two plus three?", max_tokens=48, temperature=0, ignore_eos=True, stop=(stop_string,)
    )
    requests.append(stop_request)
    references.append(references[0])

    # Arrivals spread over decode steps, so prompts join a batch that is already running.
    arrival_steps = [0, 3, 7, 12, 2, 5]
    by_request: dict[int, RequestStream] = {}
    for index in sorted(range(len(requests)), key=lambda i: arrival_steps[i]):
        by_request[index] = await _submit_at_step(engine, requests[index], arrival_steps[index])

    cancelled_stream = by_request[4]
    collectors = {index: asyncio.create_task(_collect(stream)) for index, stream in by_request.items()}
    await wait_for(lambda: engine.stats().decode_steps_total >= 20)
    cancelled_stream.cancel()
    outcomes = {index: await task for index, task in collectors.items()}

    for index in (0, 1, 2, 3):
        text, result = outcomes[index]
        assert list(result.token_ids) == references[index], f"request {index} diverged from generate()"
        assert result.completion_tokens == len(references[index])
        assert result.finish_reason == ("stop" if index == 3 else "length")
        assert text == result.text
        expected_text = engine.tokenizer.decode(references[index], skip_special_tokens=True)
        assert result.text == expected_text
        assert result.prompt_tokens == engine.count_prompt_tokens(requests[index])
        assert result.ttft_s is not None and result.ttft_s > 0

    text, result = outcomes[4]
    assert result.finish_reason == "cancelled"
    assert 0 < result.completion_tokens < 60
    assert list(result.token_ids) == references[4][: result.completion_tokens]
    assert text == result.text

    text, result = outcomes[5]
    assert result.finish_reason == "stop"
    assert result.text == stop_source[: stop_source.find(stop_string)]
    assert text == result.text
    assert stop_string not in text
    assert list(result.token_ids) == references[5][: result.completion_tokens]

    stats = engine.stats()
    assert stats.running == 0 and stats.queued == 0
    assert stats.requests_total == 6


@OVERLAP
async def test_a_request_costs_one_decode_step_per_token_after_the_first(
    make_engine: EngineFactory, overlap_host_work: bool
) -> None:
    """The first token comes from the prefill; reading tokens late must not run a step past max_tokens."""
    engine = await make_engine(overlap_host_work=overlap_host_work)
    for max_tokens in (1, 2, 10):
        steps_before = engine.stats().decode_steps_total
        request = chat("Hi", max_tokens=max_tokens, temperature=0, ignore_eos=True)
        result = await engine.submit(request).result()
        assert result.completion_tokens == max_tokens
        assert engine.stats().decode_steps_total - steps_before == max_tokens - 1


async def test_ignore_eos_gives_exactly_max_tokens(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    natural = await engine.submit(
        chat("What is the capital of France?", max_tokens=64, temperature=0)
    ).result()
    assert natural.finish_reason == "stop"
    assert natural.completion_tokens < 64

    forced = await engine.submit(
        chat("What is the capital of France?", max_tokens=64, temperature=0, ignore_eos=True)
    ).result()
    assert forced.finish_reason == "length"
    assert forced.completion_tokens == 64
    assert len(forced.token_ids) == 64


@OVERLAP
async def test_seed_makes_sampling_reproducible(make_engine: EngineFactory, overlap_host_work: bool) -> None:
    engine = await make_engine(overlap_host_work=overlap_host_work)

    async def sample(seed: int) -> tuple[int, ...]:
        request = chat(
            "Tell me a story.",
            max_tokens=24,
            temperature=1.3,
            top_p=0.95,
            top_k=50,
            seed=seed,
            ignore_eos=True,
        )
        return (await engine.submit(request).result()).token_ids

    first, again = await asyncio.gather(sample(7), sample(7))
    assert first == again
    others = {await sample(seed) for seed in (8, 9, 10)}
    assert any(other != first for other in others), "different seeds should not all give the same tokens"


async def test_prompts_arriving_together_are_prefilled_together_and_still_match(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine()
    questions = [
        "Hi",
        "What is the capital of France? Tell me a story.",
        "What colour is grass?",
        "Say hello. " * 9,
    ]
    requests = [chat(question, max_tokens=24, temperature=0, ignore_eos=True) for question in questions]
    references = [reference_tokens(engine, request) for request in requests]
    lengths = {engine.count_prompt_tokens(request) for request in requests}
    assert len(lengths) == len(requests), "different prompt lengths make the shared prefill pad its rows"

    # Submitted in one tick of the event loop: they wait together and share one padded forward pass.
    streams = [engine.submit(request) for request in requests]
    results = [await stream.result() for stream in streams]
    for result, reference in zip(results, references, strict=True):
        assert list(result.token_ids) == reference


async def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(make_engine: EngineFactory) -> None:
    engine = await make_engine(prefill_chunk_tokens=16)
    running_request = chat("Tell me a story.", max_tokens=80, temperature=0, ignore_eos=True)
    long_request = chat("What is the capital of France? " * 8, max_tokens=20, temperature=0, ignore_eos=True)
    long_prompt_tokens = engine.count_prompt_tokens(long_request)
    assert long_prompt_tokens > 4 * 16
    references = [reference_tokens(engine, running_request), reference_tokens(engine, long_request)]

    running = engine.submit(running_request)
    await wait_for(lambda: engine.stats().decode_steps_total >= 3)
    steps_before = engine.stats().decode_steps_total
    steps_at_first_token = None
    async for item in engine.submit(long_request):
        if steps_at_first_token is None:
            steps_at_first_token = engine.stats().decode_steps_total
        long_result = item
    # One chunk per iteration, each followed by a decode step of the running request: it kept streaming.
    chunks = -(-long_prompt_tokens // 16)
    assert steps_at_first_token is not None
    assert steps_at_first_token - steps_before >= chunks - 1

    assert isinstance(long_result, GenerationResult)
    running_result = await running.result()
    assert list(running_result.token_ids) == references[0]
    assert list(long_result.token_ids) == references[1]
