"""Cancellation, backpressure, limits, shutdown and metrics hooks of a running engine."""

from __future__ import annotations

import asyncio
import time

import pytest

from app.inference import (
    EngineClosedError,
    EngineFullError,
    EngineObserver,
    GenerationRequest,
    GenerationResult,
    InvalidRequestError,
    PromptTooLongError,
    SamplingParams,
    TextDelta,
)
from tests.inference.conftest import EngineFactory
from tests.inference.helpers import chat, wait_for

ENDLESS = {"max_tokens": 500, "temperature": 0, "ignore_eos": True}


@pytest.mark.parametrize("overlap_host_work", [False, True], ids=["serial", "overlapped"])
async def test_cancel_frees_the_slot_within_one_step(
    make_engine: EngineFactory, overlap_host_work: bool
) -> None:
    steps_at_finish: list[int] = []

    class StepsAtFinish(EngineObserver):
        def on_request_finished(self, result: GenerationResult) -> None:
            steps_at_finish.append(engine.stats().decode_steps_total)

    engine = await make_engine(
        max_batch_size=2, max_queue=0, observer=StepsAtFinish(), overlap_host_work=overlap_host_work
    )
    first = engine.submit(chat("Tell me a story.", **ENDLESS))
    second = engine.submit(chat("What is two plus three?", **ENDLESS))
    await wait_for(lambda: engine.stats().decode_steps_total >= 5)
    with pytest.raises(EngineFullError):
        engine.submit(chat("Hi", **ENDLESS))

    steps_at_cancel = engine.stats().decode_steps_total
    first.cancel()
    result = await first.result()
    assert result.finish_reason == "cancelled"
    # The step in flight when cancel() ran may complete; the next one no longer includes the row.
    assert steps_at_finish[0] - steps_at_cancel <= 1
    assert 5 <= result.completion_tokens < 500

    third = engine.submit(chat("Hi", max_tokens=3, temperature=0, ignore_eos=True))
    assert (await third.result()).completion_tokens == 3
    second.cancel()
    assert (await second.result()).finish_reason == "cancelled"
    await wait_for(lambda: engine.stats().running == 0)


async def test_leaving_the_stream_early_cancels_the_request(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    stream = engine.submit(chat("Tell me a story.", **ENDLESS))
    deltas = 0
    async for item in stream:
        assert isinstance(item, TextDelta)
        deltas += 1
        if deltas == 3:
            break
    await wait_for(lambda: engine.stats().running == 0, timeout_s=5)
    assert engine.stats().tokens_generated_total < 100


async def test_full_engine_refuses_with_retry_after(make_engine: EngineFactory) -> None:
    engine = await make_engine(max_batch_size=1, max_queue=1)
    running = engine.submit(chat("Tell me a story.", **ENDLESS))
    queued = engine.submit(chat("Tell me a story.", **ENDLESS))
    with pytest.raises(EngineFullError) as refused:
        engine.submit(chat("Hi", max_tokens=1))
    assert refused.value.retry_after_s >= 1
    assert "1 running and 1 queued" in str(refused.value)
    await wait_for(lambda: engine.stats().running == 1 and engine.stats().queued == 1)

    queued.cancel()
    assert (await queued.result()).finish_reason == "cancelled"
    accepted = engine.submit(chat("Hi", max_tokens=2, temperature=0, ignore_eos=True))
    running.cancel()
    assert (await running.result()).finish_reason == "cancelled"
    assert (await accepted.result()).completion_tokens == 2


async def test_prompt_longer_than_the_limit_is_refused_before_queueing(make_engine: EngineFactory) -> None:
    engine = await make_engine(max_input_tokens=20)
    request = chat("What is the capital of France? " * 10, max_tokens=5)
    size = engine.count_prompt_tokens(request)
    with pytest.raises(PromptTooLongError) as refused:
        engine.submit(request)
    assert (refused.value.limit, refused.value.actual) == (20, size)
    assert "20" in str(refused.value) and str(size) in str(refused.value)
    assert engine.stats().requests_total == 0


async def test_prompt_plus_max_tokens_beyond_the_context_is_refused(make_engine: EngineFactory) -> None:
    engine = await make_engine(max_input_tokens=4096, max_new_tokens=4096)
    request = chat("Hi", max_tokens=engine.context_length)
    size = engine.count_prompt_tokens(request)
    with pytest.raises(PromptTooLongError) as refused:
        engine.submit(request)
    assert str(engine.context_length) in str(refused.value)
    assert refused.value.actual == size


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"max_tokens": 10_000}, "is over this server's limit of 512"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -3}, "top_k"),
    ],
)
async def test_invalid_parameters_are_refused(make_engine: EngineFactory, params: dict, message: str) -> None:
    engine = await make_engine()
    with pytest.raises(InvalidRequestError, match=message):
        engine.submit(chat("Hi", **params))


async def test_raw_prompt_and_messages_are_exclusive(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    with pytest.raises(InvalidRequestError):
        engine.submit(GenerationRequest(prompt="Hi", messages=({"role": "user", "content": "Hi"},)))
    result = await engine.submit(
        GenerationRequest(prompt="The capital of", params=SamplingParams(max_tokens=4))
    ).result()
    assert result.completion_tokens >= 1


async def test_shutdown_finishes_short_work_and_cancels_the_rest_within_the_bound(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine(max_new_tokens=1900)
    short = engine.submit(chat("Hi", max_tokens=5, temperature=0, ignore_eos=True))
    # Far more steps than fit in the bound (a step takes well over 0.25 ms).
    endless = engine.submit(chat("Tell me a story.", max_tokens=1900, temperature=0, ignore_eos=True))
    await wait_for(lambda: engine.stats().decode_steps_total >= 1)

    started = time.monotonic()
    await engine.shutdown(timeout_s=0.5)
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 3.0
    assert (await short.result()).finish_reason == "length"
    assert (await endless.result()).finish_reason == "cancelled"
    assert not engine.stats().accepting
    with pytest.raises(EngineClosedError):
        engine.submit(chat("Hi"))


async def test_observer_sees_queue_first_tokens_steps_and_results(make_engine: EngineFactory) -> None:
    class Recorder(EngineObserver):
        def __init__(self) -> None:
            self.events: list[tuple[str, object]] = []

        def on_request_queued(self, queued: int) -> None:
            self.events.append(("queued", queued))

        def on_first_token(self, ttft_s: float) -> None:
            self.events.append(("first_token", ttft_s))

        def on_step(self, running: int, queued: int, new_tokens: int, step_s: float) -> None:
            self.events.append(("step", new_tokens))

        def on_request_finished(self, result: GenerationResult) -> None:
            self.events.append(("finished", result))

    recorder = Recorder()
    engine = await make_engine(observer=recorder)
    try:
        results = await asyncio.gather(
            *(
                engine.submit(chat(q, max_tokens=6, temperature=0, ignore_eos=True)).result()
                for q in ("Hi", "Yo")
            )
        )
    finally:
        await engine.shutdown(timeout_s=1)
    kinds = [kind for kind, _ in recorder.events]
    assert kinds.count("queued") == 2
    assert kinds.count("first_token") == 2
    assert kinds.count("finished") == 2
    assert sum(value for kind, value in recorder.events if kind == "step") == 12
    assert {id(value) for kind, value in recorder.events if kind == "finished"} == {id(r) for r in results}
    for result in results:
        assert result.ttft_s is not None
        assert result.e2e_s == pytest.approx(result.ttft_s + result.decode_s)
