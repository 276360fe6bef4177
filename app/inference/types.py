"""The engine's public vocabulary: what callers submit, what they get back, and how it can fail.

This module is the contract between the inference engine and everything that uses it (the API,
the benchmark, the tests). It imports neither torch nor FastAPI.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class StructuredOutput:
    """Constrained decoding (OpenAI's `response_format`): the output must parse as JSON.

    json_schema None with json_object True: any JSON object; json_schema set: JSON text of a
    JSON Schema the output must validate against. Engines that cannot honour it say so in
    `EngineCapabilities.structured_output`, and the API refuses the request with a 400.
    """

    json_object: bool = False
    json_schema: str | None = None


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings, with OpenAI's and vLLM's meanings (vLLM's SamplingParams).

    temperature 0 means greedy decoding. top_k 0, top_p 1.0 and min_p 0.0 disable those filters.
    presence_penalty / frequency_penalty (OpenAI, [-2, 2]) subtract from the logits of tokens
    already generated, once / per occurrence; repetition_penalty (vLLM, > 0, 1.0 off) divides
    positive and multiplies negative logits of tokens in the prompt or the output.
    logit_bias: (token id, bias in [-100, 100]) pairs added to the logits before sampling.
    seed: any integer of the 64-bit range (signed or unsigned), None for unseeded.
    logprobs: None for none; k >= 0 returns the chosen token's log-probability plus the k most
    likely ones (OpenAI's `top_logprobs`), computed from the model's distribution before
    temperature and filters (as vLLM's default "raw" logprobs).
    ignore_eos (vLLM's extension) keeps generating past end-of-sequence so that exactly
    max_tokens tokens come out: benchmarks use it for comparable runs.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    structured: StructuredOutput | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """Either chat messages (rendered with the tokenizer's chat template) or a raw prompt.

    messages: OpenAI chat messages as dicts (role, content as a string; assistant messages may
    carry `tool_calls`, tool messages `tool_call_id`). tools: OpenAI tool definitions, passed to
    the chat template; only engines whose capabilities include tools accept them.
    """

    params: SamplingParams = field(default_factory=SamplingParams)
    messages: tuple[dict[str, Any], ...] | None = None
    prompt: str | None = None
    request_id: str = ""
    tools: tuple[dict[str, Any], ...] | None = None
    # The prompt as the serving layer rendered it (Engine.render), so the engine does not render
    # it again; None: the engine renders `messages` or `prompt` itself.
    prompt_token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability (natural log) and the most likely alternatives."""

    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """New text since the previous delta; never splits a multi-byte character."""

    text: str
    token_count: int
    # One entry per token of this delta when the request asked for logprobs.
    logprobs: tuple[TokenLogprob, ...] = ()
    # The ids of this delta's tokens, where the engine reports them (vLLM: its tool-call parsers
    # look for marker tokens); empty otherwise.
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class GenerationResult:
    """The last item of every stream."""

    finish_reason: FinishReason
    text: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    decode_s: float
    # Submitted to finished: queueing, prefill and decoding.
    e2e_s: float
    error: str | None = None
    # Submitted to scheduled (its prefill began); None when it never left the queue.
    queue_s: float | None = None
    # The generated token ids (end-of-sequence included when the model wrote it): tests compare them.
    token_ids: tuple[int, ...] = ()
    # Every generated token's logprobs when the request asked for them.
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for health checks, heartbeats and metrics."""

    running: int
    queued: int
    max_batch_size: int
    max_queue: int
    requests_total: int
    tokens_generated_total: int
    accepting: bool
    # Forward passes of the running batch since start: a clock measured in decode steps.
    decode_steps_total: int = 0
    # Fraction of the KV cache in use (0..1) and the prefix cache's hit rate (0..1), where the
    # engine has them (vLLM); None otherwise.
    kv_cache_usage: float | None = None
    prefix_cache_hit_rate: float | None = None
    # The prefix cache's counters since start, in prompt tokens (vLLM's vllm:prefix_cache_queries
    # and vllm:prefix_cache_hits): looked up, and found cached. None where there is no prefix
    # cache (the built-in engine).
    prefix_cache_queries: int | None = None
    prefix_cache_hits: int | None = None


class EngineObserver:
    """Metrics hooks; subclass and override what you need (every method here does nothing).

    The engine calls them from its scheduler thread, so they must be thread-safe and quick
    (prometheus_client metrics are both). An exception raised by a hook is logged and ignored.
    """

    def on_request_queued(self, queued: int) -> None:
        """A request was accepted; `queued` requests now wait for a slot."""

    def on_first_token(self, ttft_s: float) -> None:
        """A request produced its first token, `ttft_s` after it was submitted."""

    def on_step(self, running: int, queued: int, new_tokens: int, step_s: float) -> None:
        """One scheduler iteration: batch size, queue depth, tokens produced, wall time."""

    def on_request_finished(self, result: GenerationResult) -> None:
        """A request ended (any finish reason). TPOT = decode_s / (completion_tokens - 1)."""


def notify_observer(observer: EngineObserver | None, hook: str, *args: Any) -> None:
    """Calls `observer.<hook>(*args)` for an engine; an exception raised by the hook is logged
    and ignored (EngineObserver's rule: metrics never fail a generation)."""
    if observer is None:
        return
    try:
        getattr(observer, hook)(*args)
    except Exception:
        logger.exception("engine observer hook %s failed", hook)


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class EngineFullError(EngineError):
    """Running batch and queue are both full: the API answers 429 with Retry-After."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PromptTooLongError(EngineError):
    """The prompt exceeds ZEUS_MAX_INPUT_TOKENS or the model's context: the API answers 400."""

    def __init__(self, message: str, limit: int, actual: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.actual = actual


class InvalidRequestError(EngineError):
    """Parameters the engine cannot honour (for instance max_tokens beyond the limit): 400.

    param: the request field at fault (OpenAI's `param`, e.g. "max_tokens"), when known.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineClosedError(EngineError):
    """The engine is shutting down or not started: the API answers 503."""


class ModelLoadError(EngineError):
    """The model folder is missing or broken, or loading ran out of memory; one clear line."""
