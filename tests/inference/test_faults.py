"""One request's parameters or failures never touch another request in the same batch.

Each fault is injected through a real seam (a parameter that really breaks sampling, or one
internal function patched to fail for one request id) while an unrelated greedy stream shares
the batch; that stream must finish token-identical to `generate` alone.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from app.inference import EngineClosedError, GenerationRequest, GenerationResult, InvalidRequestError
from app.inference.model_runner import ModelRunner
from app.inference.outputs import RequestOutput
from app.inference.sampling import Sampler
from tests.inference.conftest import EngineFactory
from tests.inference.helpers import chat, reference_tokens, wait_for

VICTIM = "victim"


def _unrelated() -> GenerationRequest:
    request = chat("Tell me a story.", max_tokens=24, temperature=0, ignore_eos=True)
    return GenerationRequest(messages=request.messages, params=request.params, request_id="bystander")


def _victim(**params: Any) -> GenerationRequest:
    settings = {"max_tokens": 16, "temperature": 0, "ignore_eos": True, **params}
    request = chat("What is two plus three?", **settings)
    return GenerationRequest(messages=request.messages, params=request.params, request_id=VICTIM)


async def _run_side_by_side(
    engine: Any, victim: GenerationRequest
) -> tuple[GenerationResult, GenerationResult]:
    """The bystander starts first and is decoding when the victim joins its batch."""
    bystander_request = _unrelated()
    expected = reference_tokens(engine, bystander_request)
    bystander = engine.submit(bystander_request)
    await wait_for(lambda: engine.stats().decode_steps_total >= 2)
    victim_stream = engine.submit(victim)
    victim_result = await victim_stream.result()
    bystander_result = await bystander.result()
    assert bystander_result.finish_reason == "length"
    assert bystander_result.error is None
    assert list(bystander_result.token_ids) == expected
    return victim_result, bystander_result


async def test_a_tiny_temperature_is_raised_with_one_warning(
    make_engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    engine = await make_engine()
    with caplog.at_level(logging.WARNING, logger="app.inference.engine"):
        victim, _ = await _run_side_by_side(engine, _victim(temperature=1e-40, top_p=1e-9, top_k=1))
    assert victim.finish_reason == "length" and victim.error is None
    warnings = [r for r in caplog.records if "temperature" in r.getMessage()]
    assert len(warnings) == 1 and "0.01" in warnings[0].getMessage()


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 1e-40},
        {"temperature": 1e30, "top_p": 1.0},
        {"temperature": 0.01, "top_p": 1e-12, "top_k": 10**9, "min_p": 1.0},
        {"temperature": 0.5, "repetition_penalty": 1e-38, "presence_penalty": 2.0, "frequency_penalty": -2.0},
        {"temperature": 1.0, "logit_bias": tuple((token, -100.0) for token in range(200))},
        {"temperature": 0.3, "seed": -(2**63), "logprobs": 20},
    ],
)
async def test_extreme_but_valid_parameters_are_served(make_engine: EngineFactory, params: dict) -> None:
    engine = await make_engine()
    victim, _ = await _run_side_by_side(engine, _victim(**params))
    assert victim.finish_reason == "length", victim.error
    assert victim.completion_tokens == 16


@pytest.mark.parametrize(
    ("params", "field", "allowed"),
    [
        ({"temperature": float("nan")}, "temperature", "0 (greedy) or more"),
        ({"temperature": -0.5}, "temperature", "0 (greedy) or more"),
        ({"top_p": 0.0}, "top_p", "(0, 1]"),
        ({"top_p": float("inf")}, "top_p", "(0, 1]"),
        ({"top_k": -2}, "top_k", "positive integer"),
        ({"min_p": 1.5}, "min_p", "[0, 1]"),
        ({"presence_penalty": 2.5}, "presence_penalty", "[-2, 2]"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty", "[-2, 2]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty", "above 0"),
        ({"logit_bias": ((3, float("-inf")),)}, "logit_bias", "[-100, 100]"),
        ({"logit_bias": ((3, 101.0),)}, "logit_bias", "[-100, 100]"),
        ({"logit_bias": ((10**7, 1.0),)}, "logit_bias", "token ids must be in [0,"),
        ({"seed": 2**64}, "seed", "[-2^63, 2^64 - 1]"),
        ({"logprobs": 21}, "top_logprobs", "[0, 20]"),
    ],
)
async def test_what_cannot_be_made_safe_is_refused_naming_the_field(
    make_engine: EngineFactory, params: dict, field: str, allowed: str
) -> None:
    engine = await make_engine()
    with pytest.raises(InvalidRequestError) as refused:
        engine.submit(_victim(**params))
    assert refused.value.param == field
    assert allowed in str(refused.value)
    assert engine.stats().requests_total == 0


async def test_a_failing_detokenizer_ends_only_its_request(
    make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = RequestOutput.add_token
    calls = {"victim": 0}

    def add_token(self: RequestOutput, *args: Any) -> Any:
        if self.request_id == VICTIM:
            calls["victim"] += 1
            if calls["victim"] == 4:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return original(self, *args)

    monkeypatch.setattr(RequestOutput, "add_token", add_token)
    engine = await make_engine()
    victim, _ = await _run_side_by_side(engine, _victim())
    assert victim.finish_reason == "error"
    assert victim.error is not None and "UnicodeDecodeError" in victim.error
    assert victim.completion_tokens == 4


async def test_a_failing_stop_check_ends_only_its_request(
    make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = RequestOutput._check_stop

    def check_stop(self: RequestOutput, text: str) -> str:
        if self.request_id == VICTIM:
            raise RuntimeError("stop-string check broke")
        return original(self, text)

    monkeypatch.setattr(RequestOutput, "_check_stop", check_stop)
    engine = await make_engine()
    victim, _ = await _run_side_by_side(engine, _victim(stop=("never",)))
    assert victim.finish_reason == "error"
    assert victim.error is not None and "stop-string check broke" in victim.error


@pytest.mark.parametrize("overlap_host_work", [False, True], ids=["serial", "overlapped"])
async def test_a_failing_sampler_ends_only_its_request(
    make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch, overlap_host_work: bool
) -> None:
    original = Sampler.__call__

    def call(self: Sampler, logits: torch.Tensor, rows: Any) -> Any:
        if any(getattr(row, "request_id", None) == VICTIM and len(row.output_ids) >= 3 for row in rows):
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return original(self, logits, rows)

    monkeypatch.setattr(Sampler, "__call__", call)
    engine = await make_engine(overlap_host_work=overlap_host_work)
    victim, bystander = await _run_side_by_side(engine, _victim(temperature=0.8, seed=3))
    assert victim.finish_reason == "error"
    assert victim.error is not None and "probability tensor" in victim.error
    assert bystander.error is None
    # The engine goes on serving.
    again = await engine.submit(_unrelated()).result()
    assert again.finish_reason == "length"


async def test_non_finite_logits_end_only_their_row(
    make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await make_engine()
    original = ModelRunner.decode

    def decode(self: ModelRunner, tokens: torch.Tensor) -> torch.Tensor:
        logits = original(self, tokens)
        for row, sequence in enumerate(engine._running):
            if sequence.request_id == VICTIM and len(sequence.output_ids) >= 4:
                logits[row] = float("nan")
        return logits

    monkeypatch.setattr(ModelRunner, "decode", decode)
    victim, _ = await _run_side_by_side(engine, _victim(temperature=0.7, top_p=0.9))
    assert victim.finish_reason == "error"
    assert victim.error is not None and "not finite" in victim.error
    assert victim.completion_tokens == 4


async def test_a_failing_prefill_ends_only_its_prompt_even_when_shared(
    make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await make_engine()
    victim_ids = engine.render(_victim())
    original = ModelRunner.prefill

    def prefill(self: ModelRunner, token_ids: list[list[int]], past: Any = None) -> Any:
        if victim_ids in token_ids:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return original(self, token_ids, past)

    monkeypatch.setattr(ModelRunner, "prefill", prefill)
    bystander_request = _unrelated()
    expected = reference_tokens(engine, bystander_request)
    # Submitted together: they share one prefill, which fails; each is then prefilled alone.
    bystander = engine.submit(bystander_request)
    victim = engine.submit(_victim())
    victim_result = await victim.result()
    assert victim_result.finish_reason == "error" and "out of memory" in (victim_result.error or "")
    bystander_result = await bystander.result()
    assert list(bystander_result.token_ids) == expected


async def test_a_transient_step_failure_costs_no_request(
    make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await make_engine()
    original = ModelRunner.decode
    failures = {"left": 1}

    def decode(self: ModelRunner, tokens: torch.Tensor) -> torch.Tensor:
        if any(s.request_id == VICTIM for s in engine._running) and failures["left"]:
            failures["left"] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return original(self, tokens)

    monkeypatch.setattr(ModelRunner, "decode", decode)
    victim_request = _victim()
    expected = reference_tokens(engine, victim_request)
    victim, _ = await _run_side_by_side(engine, victim_request)
    assert list(victim.token_ids) == expected
    assert failures["left"] == 0


async def test_a_step_that_keeps_failing_ends_the_running_rows_and_the_engine_goes_on(
    make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine = await make_engine()
    original = ModelRunner.decode

    def decode(self: ModelRunner, tokens: torch.Tensor) -> torch.Tensor:
        if any(s.request_id == VICTIM for s in engine._running):
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        return original(self, tokens)

    monkeypatch.setattr(ModelRunner, "decode", decode)
    with caplog.at_level(logging.ERROR, logger="app.inference.engine"):
        result = await engine.submit(_victim()).result()
    assert result.finish_reason == "error"
    assert "illegal memory access" not in (result.error or ""), "device details stay in the log"
    lines = [r.getMessage() for r in caplog.records if "failed twice" in r.getMessage()]
    assert len(lines) == 1 and VICTIM in lines[0]
    # Later requests are served normally.
    bystander_request = _unrelated()
    again = await engine.submit(bystander_request).result()
    assert list(again.token_ids) == reference_tokens(engine, bystander_request)
    assert engine.healthy


@pytest.mark.parametrize("overlap_host_work", [False, True], ids=["serial", "overlapped"])
async def test_a_step_failing_for_one_row_ends_that_row_alone(
    make_engine: EngineFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    overlap_host_work: bool,
) -> None:
    """The victim's fourth token is an id past the embedding table: every decode step of a batch
    holding its row raises in the real forward pass (IndexError, as a corrupted token would).
    Bisecting the batch finds that row; the four others finish with generate()'s tokens and text."""
    engine = await make_engine(overlap_host_work=overlap_host_work)
    original = Sampler.__call__

    def call(self: Sampler, logits: torch.Tensor, rows: Any) -> Any:
        output = original(self, logits, rows)
        for row, sequence in enumerate(rows):
            if getattr(sequence, "request_id", None) == VICTIM and len(sequence.output_ids) == 3:
                output.tokens[row] = engine.vocab_size
        return output

    monkeypatch.setattr(Sampler, "__call__", call)
    questions = ["Tell me a story.", "Hi", "What is two plus three?", "What is four plus one?"]
    bystanders = []
    for index, question in enumerate(questions):
        request = chat(question, max_tokens=20, temperature=0, ignore_eos=True)
        bystanders.append(
            GenerationRequest(messages=request.messages, params=request.params, request_id=f"b{index}")
        )
    expected = [reference_tokens(engine, request) for request in bystanders]
    requests = [*bystanders[:2], _victim(max_tokens=20), *bystanders[2:]]
    with caplog.at_level(logging.ERROR, logger="app.inference.engine"):
        streams = [engine.submit(request) for request in requests]
        results = [await stream.result() for stream in streams]
    victim = results.pop(2)
    assert victim.finish_reason == "error"
    assert victim.completion_tokens == 4
    for result, tokens in zip(results, expected, strict=True):
        assert result.error is None and result.finish_reason == "length"
        assert list(result.token_ids) == tokens
        assert result.text == engine.tokenizer.decode(tokens, skip_special_tokens=True)
    lines = [r.getMessage() for r in caplog.records if "failed twice" in r.getMessage()]
    assert len(lines) == 1 and VICTIM in lines[0]
    assert not any(f"b{index}" in lines[0] for index in range(len(questions)))
    assert engine.healthy


async def test_rows_that_fail_only_together_all_end_and_the_engine_goes_on(
    make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every batch of two or more rows fails (as memory would), each row alone would not: no row is
    to blame, so all of them end, and later requests are served."""
    engine = await make_engine()
    original = ModelRunner.decode

    def decode(self: ModelRunner, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[0] >= 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return original(self, tokens)

    monkeypatch.setattr(ModelRunner, "decode", decode)
    with caplog.at_level(logging.ERROR, logger="app.inference.engine"):
        streams = [engine.submit(_unrelated()), engine.submit(_victim())]
        results = [await stream.result() for stream in streams]
    assert [result.finish_reason for result in results] == ["error", "error"]
    lines = [r.getMessage() for r in caplog.records if "failed twice" in r.getMessage()]
    assert len(lines) == 1 and "fail only together" in lines[0]
    again = await engine.submit(_unrelated()).result()
    assert list(again.token_ids) == reference_tokens(engine, _unrelated())


class _SchedulerKilled(BaseException):
    """Stands for whatever could end the scheduler thread outside the per-request guards."""


async def test_a_dead_scheduler_is_reported_and_refuses_new_work(
    make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await make_engine()
    stream = engine.submit(_unrelated())
    await wait_for(lambda: engine.stats().decode_steps_total >= 2)
    original = engine._iteration

    def iteration() -> None:
        raise _SchedulerKilled("injected")

    monkeypatch.setattr(engine, "_iteration", iteration)
    result = await stream.result()
    assert result.finish_reason == "error"
    assert engine.failure is not None and "_SchedulerKilled" in engine.failure
    assert not engine.healthy
    assert not engine.stats().accepting
    with pytest.raises(EngineClosedError, match="failed"):
        engine.submit(_unrelated())
    monkeypatch.setattr(engine, "_iteration", original)
