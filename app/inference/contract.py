"""The engine contract: what the API layer may use of an engine, whichever implementation runs.

Two implementations: `builtin` (app/inference/engine.py: Zeus's own continuous batching on
torch + transformers) and `vllm` (app/inference/vllm_engine.py: vLLM's AsyncLLM in-process).
`app.inference.factory.create_engine` picks one from `ZEUS_ENGINE`; the API imports neither.

Errors (types.py): submit() raises EngineFullError (429), PromptTooLongError (400,
context_length_exceeded), InvalidRequestError (400, with the field in `param`) or
EngineClosedError (503) before any work is queued; a failure during generation ends that
request's stream with a GenerationResult whose finish_reason is "error".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from app.inference.stream import RequestStream
from app.inference.types import EngineObserver, EngineStats, GenerationRequest, TextDelta


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine can honour beyond plain sampling; the API refuses the rest with a 400."""

    # response_format json_object / json_schema (constrained decoding).
    structured_output: bool = False
    # tools / tool_choice, with tool calls parsed from the model's output.
    tools: bool = False
    # The most top_logprobs alternatives per token (OpenAI allows 0..20).
    max_top_logprobs: int = 20


@dataclass(frozen=True)
class EngineInfo:
    """Describes the running engine for /api/health, the heartbeat and the admin page."""

    kind: str  # "builtin" or "vllm"
    model_name: str
    device: str
    dtype: str
    quantization: str | None
    tensor_parallel_size: int
    max_model_len: int
    max_input_tokens: int
    max_new_tokens: int
    capabilities: EngineCapabilities


@dataclass(frozen=True)
class ToolCall:
    """One function call the model asked for (OpenAI's `tool_calls[i]`); arguments as JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolCallExtraction:
    """A finished reply split into its plain content and the tool calls parsed out of it."""

    content: str | None
    tool_calls: tuple[ToolCall, ...]


@dataclass(frozen=True)
class ToolCallDelta:
    """One fragment of a streamed tool call (OpenAI's `delta.tool_calls[i]`): a call's first
    fragment carries its id and function name, later ones only more of its arguments' JSON text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


@dataclass(frozen=True)
class ToolStreamDelta:
    """What a streamed reply's delta adds: plain content, tool-call fragments, or both."""

    content: str | None = None
    tool_calls: tuple[ToolCallDelta, ...] = ()


class ToolCallStream(Protocol):
    """Turns one choice's text deltas into content and tool-call fragments as they arrive."""

    def feed(self, delta: TextDelta) -> ToolStreamDelta | None:
        """What this delta adds (None: nothing to send yet, e.g. a tool call's opening tag)."""
        ...

    def finish(self) -> ToolStreamDelta | None:
        """What the parser still holds once the reply has ended (argument text not yet sent)."""
        ...


@runtime_checkable
class Engine(Protocol):
    """The surface every engine implements (see the module docstring for the errors)."""

    # Metrics hooks, set before start(); called from the engine's own thread or task.
    observer: EngineObserver | None

    @property
    def model_name(self) -> str: ...

    @property
    def device(self) -> str: ...

    @property
    def context_length(self) -> int: ...

    def info(self) -> EngineInfo: ...

    async def start(self) -> None: ...

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop accepting; let accepted work finish for up to timeout_s, cancel what remains."""
        ...

    def stats(self) -> EngineStats: ...

    @property
    def failure(self) -> str | None:
        """Why the engine stopped working for good, else None. Once set, submit() refuses
        everything, /api/health answers 503 with it and the process exits (systemd restarts it)."""
        ...

    @property
    def healthy(self) -> bool:
        """`failure is None`."""
        ...

    @property
    def tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer (the serving layer's tool-call parsers read it)."""
        ...

    def render(self, request: GenerationRequest) -> list[int]:
        """The token ids the model will see for this request (chat template applied, with the
        tools when given); raises InvalidRequestError for a request that cannot be rendered.
        The serving layer renders once and passes the ids on in `request.prompt_token_ids`."""
        ...

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """len(render(request))."""
        ...

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request (its `prompt_token_ids` when set, else rendered here); raises at once
        when it cannot be served."""
        ...

    def extract_tool_calls(self, text: str, request: GenerationRequest) -> ToolCallExtraction:
        """Parse a finished reply's tool calls with the parser for the model's family. Only called
        when `info().capabilities.tools`; other engines raise InvalidRequestError(param="tools")."""
        ...

    def tool_call_stream(self, request: GenerationRequest, tool_choice: str) -> ToolCallStream:
        """A streaming parser of this request's reply: tool_choice "auto" (the model's family's
        parser), "required" (a JSON array of {name, parameters}, as forced by structured output), or
        "function:NAME" (the arguments of NAME, forced likewise). Only called when
        `info().capabilities.tools`; other engines raise InvalidRequestError(param="tools")."""
        ...
