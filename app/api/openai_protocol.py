"""OpenAI's request and response bodies for /api/v1, field by field as the API reference has them
(chat completions, legacy completions, models), plus the vLLM extensions Zeus offers (top_k,
min_p, repetition_penalty, ignore_eos). Kept apart from the logic, as vLLM keeps its protocol.py.

Rules, the same for every field:
- Types, ranges and defaults are OpenAI's; `null` is accepted wherever the reference marks a
  field optional or nullable (generated clients send explicit nulls) and means "the default".
- A field Zeus cannot honour is still declared here (so that the schema shows it) and refused
  with a 400 naming it, unless it is null or its value is one Zeus honours; nothing is dropped.
- An unknown field is refused with 400 naming it, as OpenAI's API answers ("Unrecognized request
  argument supplied: foo"; Zeus also sets `param` and the code `unknown_parameter`): a misspelt
  `max_token` must not silently run with the default.
  (vLLM instead ignores unknown fields with a warning in its log; a client never sees that.)
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.api.errors import ApiError
from app.api.schemas import Text
from app.inference.types import SamplingParams, StructuredOutput, TokenLogprob

INT64_MIN = -(2**63)
UINT64_MAX = 2**64 - 1
MAX_STOP_SEQUENCES = 16
MAX_TOP_LOGPROBS = 20
MAX_LEGACY_LOGPROBS = 5
LOGIT_BIAS_LIMIT = 100
# OpenAI's legacy completions default: 16 tokens when max_tokens is not given.
LEGACY_DEFAULT_MAX_TOKENS = 16


class OpenAIRequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


def refuse(param: str, message: str, code: str | None = "unsupported_parameter") -> ApiError:
    """A 400 naming the field (OpenAI's `param`) and saying what this deployment supports."""
    return ApiError(400, message, param=param, code=code)


# ----- messages -------------------------------------------------------------------------------


class TextPart(OpenAIRequestModel):
    type: Literal["text"]
    text: Text


class RefusalPart(OpenAIRequestModel):
    type: Literal["refusal"]
    refusal: Text


def _join_parts(content: str | list[Any] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text if isinstance(part, TextPart) else part.refusal for part in content)


class _Message(OpenAIRequestModel):
    name: str | None = None

    def engine_message(self) -> dict[str, Any]:
        """The message as the engine's chat template takes it (content a plain string)."""
        message: dict[str, Any] = {"role": self.role, "content": _join_parts(self.content)}  # type: ignore[attr-defined]
        if self.name:
            message["name"] = self.name
        return message


class SystemMessage(_Message):
    role: Literal["system"]
    content: Text | list[TextPart]


class DeveloperMessage(_Message):
    """OpenAI's newer name for system instructions; rendered as a system message."""

    role: Literal["developer"]
    content: Text | list[TextPart]

    def engine_message(self) -> dict[str, Any]:
        return {**super().engine_message(), "role": "system"}


class UserMessage(_Message):
    # Image, audio and file parts are refused by the tagged union: the model reads text only.
    role: Literal["user"]
    content: Text | list[TextPart]


class FunctionCallParam(OpenAIRequestModel):
    name: str
    arguments: str


class ToolCallParam(OpenAIRequestModel):
    id: str
    type: Literal["function"]
    function: FunctionCallParam


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: Text | list[TextPart | RefusalPart] | None = None
    refusal: Text | None = None
    tool_calls: list[ToolCallParam] | None = None
    function_call: FunctionCallParam | None = Field(
        default=None, description="deprecated: refused; use tool_calls"
    )
    audio: dict[str, Any] | None = Field(default=None, description="refused: Zeus has no audio")

    def engine_message(self) -> dict[str, Any]:
        message = super().engine_message()
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    # Chat templates (Hugging Face's convention) read the arguments as a mapping.
                    "function": {
                        "name": call.function.name,
                        "arguments": _arguments(call.function.arguments),
                    },
                }
                for call in self.tool_calls
            ]
        return message


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class ToolMessage(OpenAIRequestModel):
    role: Literal["tool"]
    content: Text | list[TextPart]
    tool_call_id: str

    def engine_message(self) -> dict[str, Any]:
        return {"role": "tool", "content": _join_parts(self.content), "tool_call_id": self.tool_call_id}


ChatMessage = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage,
    Field(discriminator="role"),
]


# ----- tools and response formats ---------------------------------------------------------------


class FunctionDefinition(OpenAIRequestModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionTool(OpenAIRequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIRequestModel):
    name: str


class NamedToolChoice(OpenAIRequestModel):
    type: Literal["function"]
    function: NamedFunction


class ResponseFormatText(OpenAIRequestModel):
    type: Literal["text"]


class ResponseFormatJsonObject(OpenAIRequestModel):
    type: Literal["json_object"]


class JsonSchemaFormat(OpenAIRequestModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    # `schema` is a BaseModel attribute: the alias keeps the wire name.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormatJsonSchema(OpenAIRequestModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema, Field(discriminator="type")
]


class StreamOptions(OpenAIRequestModel):
    include_usage: bool | None = Field(default=None, description="a last chunk with `usage` and no choices")
    include_obfuscation: bool | None = Field(
        default=None,
        description="accepted; Zeus does not pad stream events (the padding only hides event sizes)",
    )


# ----- the sampling fields shared by both completion endpoints ---------------------------------------

Seed = Annotated[
    int, Field(ge=INT64_MIN, le=UINT64_MAX, description="any 64-bit integer, signed or unsigned")
]
Penalty = Annotated[float, Field(ge=-2, le=2)]


class SamplingFields(OpenAIRequestModel):
    model: str
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[str, int] | None = Field(
        default=None, description="token id (as a string) -> bias in [-100, 100], added to its logit"
    )
    max_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1, description="choices per prompt, up to ZEUS_MAX_N")
    seed: Seed | None = None
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP_SEQUENCES)] | None = Field(
        default=None, description=f"one string or a list of at most {MAX_STOP_SEQUENCES}"
    )
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    user: str | None = Field(default=None, description="an end-user id: written to the server log")
    # vLLM's extensions.
    top_k: int | None = Field(default=None, ge=-1, description="vLLM extension; 0 or -1 disable it")
    min_p: float | None = Field(default=None, ge=0, le=1, description="vLLM extension; 0 disables it")
    repetition_penalty: float | None = Field(
        default=None, gt=0, le=10, description="vLLM extension; 1 disables it"
    )
    ignore_eos: bool | None = Field(
        default=None, description="vLLM extension: generate exactly max_tokens tokens"
    )

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        for key, bias in (value or {}).items():
            if not key.strip().isdigit():
                raise ValueError(f'keys are token ids written as strings (e.g. "50256"), got {key!r}')
            if not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
                raise ValueError(f"bias for token {key} is {bias}: allowed is -100 to 100")
        return value

    def check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            # As OpenAI's API and vLLM answer: the options would have nothing to act on.
            raise refuse(
                "stream_options", "stream_options is only allowed when stream is true", code="invalid_value"
            )

    def stop_sequences(self) -> tuple[str, ...]:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return tuple(item for item in stop if item)

    def sampling_params(
        self, *, max_tokens: int, logprobs: int | None, structured: StructuredOutput | None = None
    ) -> SamplingParams:
        """The engine's settings for one choice; null fields take OpenAI's defaults."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(0, self.top_k or 0),
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=tuple((int(key), float(bias)) for key, bias in (self.logit_bias or {}).items()),
            seed=self.seed,
            stop=self.stop_sequences(),
            ignore_eos=bool(self.ignore_eos),
            logprobs=logprobs,
            structured=structured,
        )

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def seed_for_choice(seed: int | None, index: int) -> int | None:
    """Choice i of a seeded request uses seed + i (wrapped into the 64-bit range), so that the n
    choices differ and the whole request still repeats."""
    if seed is None:
        return None
    value = seed + index
    return value - 2**64 if value > UINT64_MAX else value


# ----- chat completions -------------------------------------------------------------------------


class ChatCompletionRequest(SamplingFields):
    """POST /api/v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="the newer name of max_tokens")
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Identifiers OpenAI uses for abuse monitoring and cache routing: written to the log only.
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # Accepted when they ask for what Zeus does anyway, refused otherwise.
    store: bool | None = Field(default=None, description="only false: Zeus does not store completions")
    service_tier: str | None = Field(default=None, description="only auto or default")
    modalities: list[str] | None = Field(default=None, description='only ["text"]')
    # Refused unless null: features of OpenAI's hosted models that Zeus does not have.
    metadata: dict[str, Any] | None = Field(default=None, description="refused: needs stored completions")
    audio: dict[str, Any] | None = Field(default=None, description="refused: Zeus has no audio output")
    prediction: dict[str, Any] | None = Field(default=None, description="refused: no predicted outputs")
    reasoning_effort: str | None = Field(default=None, description="refused: the model does not reason")
    verbosity: str | None = Field(default=None, description="refused: reasoning models only")
    web_search_options: dict[str, Any] | None = Field(default=None, description="refused: no web search")
    functions: list[dict[str, Any]] | None = Field(default=None, description="deprecated: refused; use tools")
    function_call: str | dict[str, Any] | None = Field(
        default=None, description="deprecated: refused; use tool_choice"
    )
    moderation: dict[str, Any] | None = Field(default=None, description="refused: no moderation")
    prompt_cache_options: dict[str, Any] | None = Field(default=None, description="refused")
    prompt_cache_retention: str | None = Field(default=None, description="refused")

    def check_supported(self) -> None:
        """Refuses what no engine of Zeus honours (400 naming the field)."""
        self.check_stream_options()
        if self.store:
            raise refuse("store", "store: Zeus does not store completions; send false or leave it out")
        if self.service_tier not in (None, "auto", "default"):
            raise refuse("service_tier", "service_tier: Zeus has one tier; send auto or default")
        if self.modalities is not None and list(self.modalities) != ["text"]:
            raise refuse("modalities", 'modalities: Zeus generates text only; send ["text"]')
        unsupported = {
            "metadata": "stored completions",
            "audio": "audio output",
            "prediction": "predicted outputs",
            "reasoning_effort": "reasoning models",
            "verbosity": "reasoning models",
            "web_search_options": "web search",
            "functions": "the deprecated `functions` (use `tools`)",
            "function_call": "the deprecated `function_call` (use `tool_choice`)",
            "moderation": "moderation",
            "prompt_cache_options": "prompt cache options",
            "prompt_cache_retention": "prompt cache retention",
        }
        for field, feature in unsupported.items():
            if getattr(self, field) is not None:
                raise refuse(field, f"{field}: Zeus does not support {feature}; leave it out or send null")
        for index, message in enumerate(self.messages):
            if isinstance(message, AssistantMessage):
                if message.function_call is not None:
                    raise refuse(
                        f"messages[{index}].function_call", "function_call is deprecated: send tool_calls"
                    )
                if message.audio is not None:
                    raise refuse(f"messages[{index}].audio", "Zeus has no audio: leave audio out")
        if self.top_logprobs and not self.logprobs:
            raise refuse("top_logprobs", "top_logprobs needs logprobs: true", code="invalid_value")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise refuse("tool_choice", "tool_choice needs tools", code="invalid_value")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {tool.function.name for tool in self.tools or ()}
            if self.tool_choice.function.name not in names:
                raise refuse(
                    "tool_choice",
                    f"tool_choice names `{self.tool_choice.function.name}`, which is not in tools",
                    code="invalid_value",
                )

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_count(self) -> int | None:
        """SamplingParams.logprobs: None, or how many alternatives per token (0: the chosen one only)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def uses_tools(self) -> bool:
        return bool(self.tools) or any(
            isinstance(message, ToolMessage) or (isinstance(message, AssistantMessage) and message.tool_calls)
            for message in self.messages
        )


# ----- legacy completions -------------------------------------------------------------------------


class CompletionRequest(SamplingFields):
    """POST /api/v1/completions (OpenAI's legacy text completions): the prompt is sent as it is,
    without a chat template."""

    prompt: Text | list[Text] | list[int] | list[list[int]] = Field(
        description="a string or a list of strings (each gets its own choices); token id arrays are refused"
    )
    max_tokens: int | None = Field(default=None, ge=1, description=f"default {LEGACY_DEFAULT_MAX_TOKENS}")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LEGACY_LOGPROBS)
    echo: bool | None = Field(default=None, description="prepend the prompt to each choice's text")
    best_of: int | None = Field(
        default=None, ge=1, description="only equal to n (or 1): no server-side ranking"
    )
    suffix: str | None = Field(default=None, description="refused unless empty: no insertion mode")

    def prompts(self) -> list[str]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and all(isinstance(item, str) for item in self.prompt):
            return list(self.prompt)  # type: ignore[arg-type]
        if not self.prompt:
            raise refuse(
                "prompt", "prompt: send a string or a non-empty list of strings", code="invalid_value"
            )
        raise refuse("prompt", "prompt: token id arrays are not supported; send the prompt as text")

    def check_supported(self) -> None:
        self.check_stream_options()
        self.prompts()
        if self.best_of is not None and self.best_of not in (1, self.choices_per_prompt):
            raise refuse(
                "best_of", "best_of: Zeus does not rank candidates; send best_of equal to n or leave it out"
            )
        if self.suffix:
            raise refuse("suffix", "suffix: Zeus has no insertion mode; leave suffix out")
        if self.echo and self.logprobs is not None:
            raise refuse("echo", "echo with logprobs: prompt logprobs are not supported; drop one of them")


# ----- responses -------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call", "abort", "error"]


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    service_tier: str | None = None


class CompletionLogprobs(BaseModel):
    """The legacy shape: parallel lists per token."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "zeus"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----- logprobs in OpenAI's shapes ----------------------------------------------------------------


def _utf8(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(entries: tuple[TokenLogprob, ...] | list[TokenLogprob], top: int) -> list[dict[str, Any]]:
    """`choices[i].logprobs.content` of chat completions: token, logprob, bytes, top_logprobs."""
    return [
        {
            "token": entry.token,
            "logprob": entry.logprob,
            "bytes": _utf8(entry.token),
            "top_logprobs": [
                {"token": token, "logprob": logprob, "bytes": _utf8(token)}
                for token, logprob in entry.top[:top]
            ],
        }
        for entry in entries
    ]


def completion_logprobs(
    entries: tuple[TokenLogprob, ...] | list[TokenLogprob], top: int, offset: int = 0
) -> dict[str, Any]:
    """`choices[i].logprobs` of legacy completions; text_offset counts characters from `offset`."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    position = offset
    for entry in entries:
        tokens.append(entry.token)
        token_logprobs.append(entry.logprob)
        tops.append(dict(entry.top[:top]) if top else None)
        offsets.append(position)
        position += len(entry.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
