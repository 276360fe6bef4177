"""What every engine checks before it queues a request, written once for both implementations.

The built-in engine (engine.py) and the vLLM engine (vllm_engine.py) must refuse the same requests
with the same errors (the contract suite runs against both), so the parts of admission that do not
depend on how an engine generates live here:

- `prompt_token_ids`: the prompt the model sees (a raw prompt, or the messages through the model's
  chat template, with the tools when given), rendered by the model's own tokenizer;
- `check_sampling`: the sampling parameters' ranges (OpenAI's, which vLLM shares), each refusal
  naming the field and what is allowed;
- `check_prompt`: empty prompts, prompts over ZEUS_MAX_INPUT_TOKENS and prompts that leave no room
  for max_tokens in the model's context, refused with the sizes (PromptTooLongError);
- `RetryAfter` and `engine_full`: the 429 when running and queued requests are at their limits,
  with a Retry-After estimated from recent request durations.

Every function raises before anything is queued; none changes the engine's state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from app.inference.limits import (
    LOGIT_BIAS_RANGE,
    MAX_STOP_STRINGS,
    MAX_TOP_LOGPROBS,
    PENALTY_RANGE,
    SEED_RANGE,
    check_max_tokens,
)
from app.inference.types import (
    EngineFullError,
    GenerationRequest,
    InvalidRequestError,
    PromptTooLongError,
    SamplingParams,
)

# ----- the prompt ------------------------------------------------------------------------------


def prompt_token_ids(tokenizer: Any, request: GenerationRequest, model_name: str) -> list[int]:
    """The token ids the model will see: a raw prompt tokenized, or the messages (and the tools, when
    given) through the model's chat template with the generation prompt.

    Raises InvalidRequestError (with `param`) for a request that cannot be rendered: neither or both
    of messages and prompt, tools with a raw prompt, no messages, a model without a chat template,
    a message without a string role or content (content may be null beside tool_calls), or a
    template that refuses the messages (its own raise_exception)."""
    if (request.messages is None) == (request.prompt is None):
        raise InvalidRequestError("send either messages or a prompt, not both and not neither")
    if request.prompt is not None:
        if request.tools:
            raise InvalidRequestError("tools need chat messages, not a raw prompt", param="tools")
        return list(tokenizer(request.prompt)["input_ids"])
    if not request.messages:
        raise InvalidRequestError("messages must not be empty", param="messages")
    if not tokenizer.chat_template:
        raise InvalidRequestError(f"model {model_name} has no chat template: send a raw prompt")
    for message in request.messages:
        if not isinstance(message.get("role"), str):
            raise InvalidRequestError("each message needs a string role", param="messages")
        content = message.get("content")
        if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            raise InvalidRequestError("each message needs a string content", param="messages")
    try:
        text = tokenizer.apply_chat_template(
            [dict(message) for message in request.messages],
            tools=[dict(tool) for tool in request.tools] if request.tools else None,
            add_generation_prompt=True,
            tokenize=False,
        )
    except Exception as error:  # jinja2 errors raised by the template itself (raise_exception)
        raise InvalidRequestError(
            f"the model's chat template cannot render these messages: {one_line(error)}",
            param="tools" if request.tools else "messages",
        ) from None
    # The template already wrote the special tokens; the tokenizer must not add a second BOS.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def submitted_prompt_ids(
    request: GenerationRequest, render: Callable[[GenerationRequest], list[int]]
) -> list[int]:
    """The ids submit() queues: those the serving layer rendered (`request.prompt_token_ids`), else
    `render(request)` (the engine's own Engine.render)."""
    if request.prompt_token_ids is not None:
        return list(request.prompt_token_ids)
    return render(request)


def check_prompt(
    request: GenerationRequest,
    params: SamplingParams,
    prompt_length: int,
    *,
    max_input_tokens: int,
    context_length: int,
) -> None:
    """Refuse an empty prompt (InvalidRequestError), or one too long (PromptTooLongError with the
    limit and the actual size): over max_input_tokens, or leaving less than max_tokens of the
    model's context (prompt + reply must fit)."""
    if prompt_length == 0:
        raise InvalidRequestError(
            "the prompt is empty", param="prompt" if request.prompt is not None else "messages"
        )
    if prompt_length > max_input_tokens:
        raise PromptTooLongError(
            f"the prompt has {prompt_length} tokens; the limit is {max_input_tokens}",
            limit=max_input_tokens,
            actual=prompt_length,
        )
    if prompt_length + params.max_tokens > context_length:
        room = max(context_length - params.max_tokens, 0)
        raise PromptTooLongError(
            f"the prompt has {prompt_length} tokens and max_tokens is {params.max_tokens}; together "
            f"they exceed the model's context of {context_length} tokens "
            f"(at most {room} prompt tokens with this max_tokens)",
            limit=room,
            actual=prompt_length,
        )


# ----- sampling parameters ---------------------------------------------------------------------


def _finite_in(value: float, low: float, high: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and low <= value <= high


def check_sampling(params: SamplingParams, *, max_new_tokens: int, vocab_size: int) -> None:
    """Refuse what cannot be sampled, naming the field and its range (InvalidRequestError).

    max_tokens in [1, max_new_tokens]; temperature finite and >= 0; top_p in (0, 1]; top_k 0 or -1
    (off) or positive; min_p in [0, 1]; presence and frequency penalties in [-2, 2];
    repetition_penalty finite and > 0; logit_bias ids in the vocabulary with biases in [-100, 100];
    seed in [-2^63, 2^64 - 1]; top_logprobs in [0, 20]; at most 16 stop strings."""
    check_max_tokens(params.max_tokens, limit=max_new_tokens)
    if not _finite_in(params.temperature, 0.0, math.inf):
        raise InvalidRequestError(
            f"temperature must be a finite number, 0 (greedy) or more, got {params.temperature}",
            param="temperature",
        )
    if not (_finite_in(params.top_p, 0.0, 1.0) and params.top_p > 0):
        raise InvalidRequestError(f"top_p must be in (0, 1], got {params.top_p}", param="top_p")
    if not isinstance(params.top_k, int) or params.top_k < -1:
        raise InvalidRequestError(
            f"top_k must be 0 or -1 (off) or a positive integer, got {params.top_k}", param="top_k"
        )
    if not _finite_in(params.min_p, 0.0, 1.0):
        raise InvalidRequestError(f"min_p must be in [0, 1], got {params.min_p}", param="min_p")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        if not _finite_in(value, *PENALTY_RANGE):
            raise InvalidRequestError(f"{name} must be in [-2, 2], got {value}", param=name)
    if not (_finite_in(params.repetition_penalty, 0.0, math.inf) and params.repetition_penalty > 0):
        raise InvalidRequestError(
            f"repetition_penalty must be a finite number above 0 (1 is off), got {params.repetition_penalty}",
            param="repetition_penalty",
        )
    for token_id, bias in params.logit_bias:
        if not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
            raise InvalidRequestError(
                f"logit_bias token ids must be in [0, {vocab_size - 1}], got {token_id}", param="logit_bias"
            )
        if not _finite_in(bias, *LOGIT_BIAS_RANGE):
            raise InvalidRequestError(
                f"logit_bias values must be in [-100, 100], got {bias} for token {token_id}",
                param="logit_bias",
            )
    if params.seed is not None and not (
        isinstance(params.seed, int) and SEED_RANGE[0] <= params.seed <= SEED_RANGE[1]
    ):
        raise InvalidRequestError(
            f"seed must be an integer in [-2^63, 2^64 - 1], got {params.seed}", param="seed"
        )
    if params.logprobs is not None and not 0 <= params.logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(
            f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {params.logprobs}", param="top_logprobs"
        )
    if len(params.stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError(
            f"at most {MAX_STOP_STRINGS} stop strings, got {len(params.stop)}", param="stop"
        )


# ----- a full engine ---------------------------------------------------------------------------


class RetryAfter:
    """Retry-After for a full engine: the time for the queue ahead to drain through the batch,
    from a smoothed duration of recent requests (seconds; 10 until the first one finishes)."""

    def __init__(self, initial_request_s: float = 10.0) -> None:
        self.request_seconds = initial_request_s

    def observe(self, e2e_s: float) -> None:
        """One finished request's submit-to-end time (seconds)."""
        self.request_seconds = 0.8 * self.request_seconds + 0.2 * e2e_s

    def seconds(self, queued: int, max_batch_size: int) -> int:
        """Whole seconds (>= 1) until a slot is likely free, with `queued` requests waiting."""
        waves = 1 + max(0, queued) / max_batch_size
        return max(1, math.ceil(self.request_seconds * waves))


def engine_full(max_batch_size: int, max_queue: int, retry_after_s: int) -> EngineFullError:
    """The refusal (429 with Retry-After) when max_batch_size run and max_queue wait already."""
    return EngineFullError(
        f"the engine is full: {max_batch_size} running and {max_queue} queued requests",
        retry_after_s=retry_after_s,
    )


def one_line(error: BaseException) -> str:
    """An exception's message on one line (at most 400 characters), for errors and logs."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:400]
