"""The inference engine: iteration-level continuous batching of a Hugging Face causal LM.

One scheduler thread owns the model (torch releases the GIL during the forward pass, so the
asyncio loop of the API keeps serving). Each iteration it:

1. drops cancelled requests (queued, prefilling or running) and admits queued ones while the
   batch has room (max_batch_size running, max_queue waiting; beyond that submit() raises
   EngineFullError at once);
2. prefills admitted prompts within a token budget per iteration (`prefill_chunk_tokens` while
   other sequences are decoding, so they are never stalled for more than about one chunk):
   short prompts waiting together share one right-padded forward pass, a longer prompt is
   prefilled alone, one chunk per iteration; a finished prefill samples the first token;
3. joins the freshly prefilled sequences into the running batch: their keys and values move
   into the KV-cache slots after the running rows (kv_cache.py: one slot per row, each
   with its own length);
4. runs one decode step for the whole batch (logits of the last position only; a CUDA graph
   replay on GPUs), samples each row with its own settings on the device, detokenizes
   incrementally, and removes finished rows at once (the last rows move into the freed slots).
   The step's input tokens are the previous step's choices, still on the device. On CUDA
   (`overlap_host_work`) the host reads a step's tokens only once the next step is queued, so
   its work per token (detokenizing, stop strings, streaming, scheduling) runs while the GPU
   computes instead of between steps; a row that ends on an end-of-sequence token or stop
   string then costs one discarded step, and a row's last token by max_tokens is read before
   launching, so no step runs past it.

Results travel to the asyncio loop through `loop.call_soon_threadsafe`, batched per step (one
wake-up of the loop per step at most, sent just before the next forward pass), into one asyncio
queue per request. A request's stream yields TextDelta items and then exactly one
GenerationResult. Cancelling (stream.cancel(), aclose(), or leaving `async for` early) marks the
sequence; the scheduler drops it before its next forward pass.

Metrics: `stats()` returns counters, and an EngineObserver (types.py) set as `engine.observer`
before `start()` receives on_request_queued / on_first_token / on_step / on_request_finished calls
from the scheduler thread (the API's Prometheus metrics are one).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.inference import admission
from app.inference.contract import EngineCapabilities, EngineInfo, ToolCallExtraction, ToolCallStream
from app.inference.kv_cache import KVCache, StagedKV
from app.inference.loading import LoadedModel, load_model
from app.inference.model_runner import ModelRunner, check_supported
from app.inference.outputs import RequestOutput, TokenTexts
from app.inference.sampling import (
    INVALID_TOKEN,
    MIN_TEMPERATURE,
    Logprobs,
    SampleOutput,
    Sampler,
    make_generator,
)
from app.inference.scheduler import Scheduler
from app.inference.stream import RequestStream
from app.inference.transfer import to_device
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

# Scheduler iterations failing one after another before the engine declares itself broken.
_MAX_FAILED_ITERATIONS = 3


@dataclass(frozen=True)
class EngineConfig:
    model_path: str | Path
    device: str = "auto"
    # "auto": bf16 on CUDA and on CPUs with native bf16, else fp32. Tests force "float32".
    dtype: str = "auto"
    torch_threads: int | None = None
    max_batch_size: int = 8
    max_queue: int = 64
    max_input_tokens: int = 4096
    max_new_tokens: int = 1024
    # Prompt tokens prefilled per iteration while other sequences decode: bounds their stall.
    prefill_chunk_tokens: int = 256
    # torch.compile the decode step (CUDA: fewer, fused kernels inside the CUDA graphs). Costs a
    # minute or two of compilation at the first requests; off by default.
    compile_decode: bool = False
    # Read each decode step's tokens while the next step runs, so the host's work per step
    # (detokenizing, stop strings, streaming, scheduling) hides behind the device's. None: on CUDA,
    # where the device works on while the host does; on the CPU the same cores would do both.
    overlap_host_work: bool | None = None


@dataclass(eq=False)
class _Sequence:
    stream: RequestStream
    params: SamplingParams
    prompt_ids: list[int]
    submitted_at: float
    output: RequestOutput
    generator: torch.Generator | None
    prefilled: int = 0
    # When the scheduler took it from the queue into the batch (vllm:request_queue_time_seconds).
    scheduled_at: float | None = None
    staged: StagedKV | None = None  # keys/values of a prompt prefilled in chunks so far
    output_ids: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    # Prefilled alone: a shared prefill that failed is retried one prompt at a time.
    solo: bool = False

    @property
    def request_id(self) -> str:
        return self.stream.request_id

    @property
    def cancel_requested(self) -> bool:
        return self.stream.cancel_requested


class _ChosenTokens:
    """The tokens one decode step chose for its rows, on their way to the host.

    On CUDA the copy is queued behind the step into pinned memory, and reading waits for that step
    only, not for work queued after it.
    """

    def __init__(
        self, tokens: torch.Tensor, sequences: list[_Sequence], logprobs: Logprobs | None = None
    ) -> None:
        self.sequences = sequences
        self._logprobs = logprobs
        self._ready: torch.cuda.Event | None = None
        if tokens.device.type == "cuda":
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = tokens

    def ends_a_sequence(self) -> bool:
        """Whether these tokens bring a running sequence to its max_tokens."""
        return any(
            not sequence.stream.finished and len(sequence.output_ids) + 1 >= sequence.params.max_tokens
            for sequence in self.sequences
        )

    def read(self) -> tuple[list[int], dict[int, tuple[float, list[int], list[float]]]]:
        """The tokens, and per row that asked: (chosen logprob, top ids, top logprobs)."""
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist(), _read_logprobs(self._logprobs)


def _read_logprobs(logprobs: Logprobs | None) -> dict[int, tuple[float, list[int], list[float]]]:
    if logprobs is None:
        return {}
    chosen = logprobs.chosen.tolist()
    top_ids, top_values = logprobs.top_ids.tolist(), logprobs.top_values.tolist()
    return {row: (chosen[i], top_ids[i], top_values[i]) for i, row in enumerate(logprobs.rows)}


@dataclass(eq=False)
class _Block:
    """Freshly prefilled sequences, waiting to join the running batch with their staged keys/values."""

    sequences: list[_Sequence]
    staged: StagedKV
    lengths: list[int]

    def keep(self, rows: list[int]) -> None:
        self.sequences = [self.sequences[row] for row in rows]
        self.lengths = [self.lengths[row] for row in rows]
        if len(rows) < self.staged.keys.shape[1]:
            index = torch.tensor(rows, device=self.staged.keys.device)
            self.staged = StagedKV(
                self.staged.keys.index_select(1, index), self.staged.values.index_select(1, index)
            )


def functional_pad(values: torch.Tensor, columns: int) -> torch.Tensor:
    """values [rows, k] with `columns` more columns of zeros (unused: each row reads its own k)."""
    if columns <= 0:
        return values
    return torch.cat([values, values.new_zeros(values.shape[0], columns)], dim=1)


class InferenceEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel) -> None:
        self.config = config
        self._loaded = loaded
        self._model = loaded.model
        self._tokenizer = loaded.tokenizer
        # The scheduler thread decodes with its own copy: a fast tokenizer is one Rust object, and
        # encoding prompts on the event loop while decoding on the scheduler thread could otherwise
        # collide on it ("Already borrowed").
        self._scheduler_tokenizer = copy.deepcopy(loaded.tokenizer)
        self._runner = ModelRunner(
            loaded.model, loaded.device, max_slots=config.max_batch_size, compile_decode=config.compile_decode
        )
        self._cache: KVCache = self._runner.cache
        self.vocab_size = int(loaded.model.get_output_embeddings().weight.shape[0])
        self._sampler = Sampler(self.vocab_size, loaded.device)
        # A second one for rows sampled alone after the batch failed (keeps the first one's cache).
        self._row_sampler = Sampler(self.vocab_size, loaded.device)
        self._token_texts = TokenTexts(self._scheduler_tokenizer)
        if self._runner.uses_openblas:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=config.torch_threads or torch.get_num_threads(), user_api="blas")
        # Metrics hooks; set before start() (the scheduler thread calls them).
        self.observer: EngineObserver | None = None
        self._lock = threading.Condition()
        self._incoming: deque[_Sequence] = deque()
        self._scheduler: Scheduler[_Sequence] = Scheduler(config.max_batch_size, config.prefill_chunk_tokens)
        # The running rows' latest tokens, on the device: the next decode step's input.
        self._next_tokens = torch.empty(0, dtype=torch.long, device=loaded.device)
        overlap = config.overlap_host_work
        self._overlap_host_work = loaded.device.type == "cuda" if overlap is None else overlap
        # With overlap_host_work: the latest step's tokens, read once the next step is under way.
        self._unread: _ChosenTokens | None = None
        # Taken out of _prefilling by the current iteration and not yet in _running: if a forward
        # pass fails in between, these must still get their error result.
        self._between: list[_Sequence] = []
        self._in_system = 0
        self._accepting = False
        self._stop_at: float | None = None  # monotonic deadline once shutdown() began
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: list[tuple[RequestStream, TextDelta | GenerationResult]] = []
        self._undelivered: list[tuple[RequestStream, TextDelta | GenerationResult]] = []
        self._delivery_lock = threading.Lock()
        self._delivery_scheduled = False
        self._requests_total = 0
        self._tokens_total = 0
        self._steps_total = 0
        self._retry_after = admission.RetryAfter()
        self._failure: str | None = None
        self._failed_iterations = 0

    # The scheduler's queues, under the names the engine has always used.
    @property
    def _waiting(self) -> deque[_Sequence]:
        return self._scheduler.waiting

    @property
    def _prefilling(self) -> deque[_Sequence]:
        return self._scheduler.prefilling

    @property
    def _running(self) -> list[_Sequence]:
        return self._scheduler.running

    @_running.setter
    def _running(self, sequences: list[_Sequence]) -> None:
        self._scheduler.running = sequences

    # ----- construction and lifecycle -------------------------------------------------------

    @classmethod
    def load(cls, config: EngineConfig) -> InferenceEngine:
        """Load the model (blocking, seconds). Raises ModelLoadError with one line naming what is wrong."""
        if config.max_batch_size < 1 or config.max_queue < 0 or config.prefill_chunk_tokens < 1:
            raise ModelLoadError(
                "engine limits must be positive: "
                f"max_batch_size={config.max_batch_size}, max_queue={config.max_queue}, "
                f"prefill_chunk_tokens={config.prefill_chunk_tokens}"
            )
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        loaded = load_model(config.model_path, device=config.device, dtype=config.dtype)
        check_supported(loaded.model)
        return cls(config, loaded)

    @property
    def model_name(self) -> str:
        return self._loaded.name

    @property
    def device(self) -> str:
        return str(self._loaded.device)

    @property
    def dtype(self) -> str:
        return str(self._loaded.dtype).removeprefix("torch.")

    @property
    def context_length(self) -> int:
        return self._loaded.context_length

    def info(self) -> EngineInfo:
        return EngineInfo(
            kind="builtin",
            model_name=self.model_name,
            device=self.device,
            dtype=self.dtype,
            quantization=None,
            tensor_parallel_size=1,
            max_model_len=self.context_length,
            max_input_tokens=self.config.max_input_tokens,
            max_new_tokens=self.config.max_new_tokens,
            capabilities=EngineCapabilities(structured_output=False, tools=False),
        )

    def extract_tool_calls(self, text: str, request: GenerationRequest) -> ToolCallExtraction:
        raise InvalidRequestError(
            "tools are not supported by the built-in engine: run this model with ZEUS_ENGINE=vllm",
            param="tools",
        )

    def tool_call_stream(self, request: GenerationRequest, tool_choice: str) -> ToolCallStream:
        return self.extract_tool_calls("", request)  # type: ignore[return-value]  # raises

    @property
    def failure(self) -> str | None:
        """Why the engine stopped working for good (its scheduler thread died), else None.

        Once set, submit() refuses everything: /api/health answers 503 with this reason and the
        process exits so that its supervisor (systemd) starts a fresh one.
        """
        return self._failure

    @property
    def healthy(self) -> bool:
        return self._failure is None

    @property
    def uses_openblas(self) -> bool:
        """True when the matrix products run through numpy's OpenBLAS (CPU, fp32)."""
        return self._runner.uses_openblas

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def model(self) -> Any:
        """The underlying transformers model (the benchmark's naive baseline runs generate() on it)."""
        return self._model

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="zeus-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop accepting; let accepted work finish for up to timeout_s, cancel what remains; join."""
        with self._lock:
            self._accepting = False
            self._stop_at = time.monotonic() + max(0.0, timeout_s)
            self._lock.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                running=len(self._running) + len(self._prefilling),
                queued=len(self._waiting) + len(self._incoming),
                max_batch_size=self.config.max_batch_size,
                max_queue=self.config.max_queue,
                requests_total=self._requests_total,
                tokens_generated_total=self._tokens_total,
                accepting=self._accepting,
                decode_steps_total=self._steps_total,
            )

    # ----- submission (event loop thread) ---------------------------------------------------

    def render(self, request: GenerationRequest) -> list[int]:
        """The token ids the model will see for this request (chat template applied; admission.py)."""
        if request.tools:
            # The API refuses tools for this engine before; a direct caller learns why here.
            self.extract_tool_calls("", request)
        return admission.prompt_token_ids(self._tokenizer, request, self.model_name)

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return len(self.render(request))

    def _checked_params(self, params: SamplingParams, request_id: str) -> SamplingParams:
        """Refuse what cannot be sampled safely (naming the field and its range); make the rest safe.

        As vLLM: a temperature below 0.01 (but above 0) is raised to 0.01 with a warning, since
        dividing logits by less overflows. Returns the parameters the engine will use.
        """
        admission.check_sampling(
            params, max_new_tokens=self.config.max_new_tokens, vocab_size=self.vocab_size
        )
        if params.structured is not None:
            raise InvalidRequestError(
                "structured output is not supported by the built-in engine: "
                "run this model with ZEUS_ENGINE=vllm",
                param="response_format",
            )
        changes: dict[str, Any] = {}
        if 0 < params.temperature < MIN_TEMPERATURE:
            logger.warning(
                "request %s: temperature %s is less than %s, which may cause numerical errors (nan or "
                "inf); raised to %s",
                request_id or "?",
                params.temperature,
                MIN_TEMPERATURE,
                MIN_TEMPERATURE,
            )
            changes["temperature"] = MIN_TEMPERATURE
        if params.top_k == -1:
            changes["top_k"] = 0
        return dataclasses.replace(params, **changes) if changes else params

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; raises at once when it cannot be served (see types.py for the errors)."""
        if self._failure is not None:
            raise EngineClosedError(f"the engine has failed and will restart: {self._failure}")
        if not self._accepting:
            raise EngineClosedError("the engine is not accepting requests (not started or shutting down)")
        params = self._checked_params(request.params, request.request_id)
        prompt_ids = admission.submitted_prompt_ids(request, self.render)
        admission.check_prompt(
            request,
            params,
            len(prompt_ids),
            max_input_tokens=self.config.max_input_tokens,
            context_length=self._loaded.context_length,
        )
        stream = RequestStream(request.request_id, len(prompt_ids), self._wake)
        sequence = _Sequence(
            stream=stream,
            params=params,
            prompt_ids=prompt_ids,
            submitted_at=time.monotonic(),
            output=RequestOutput(request.request_id, self._scheduler_tokenizer, prompt_ids, params.stop),
            generator=make_generator(params, self._loaded.device),
        )
        with self._lock:
            if not self._accepting:
                raise EngineClosedError("the engine is shutting down")
            capacity = self.config.max_batch_size + self.config.max_queue
            if self._in_system >= capacity:
                raise admission.engine_full(
                    self.config.max_batch_size, self.config.max_queue, self._retry_after_s()
                )
            self._in_system += 1
            self._requests_total += 1
            self._incoming.append(sequence)
            queued = len(self._incoming) + len(self._waiting)
            self._lock.notify_all()
        self._notify("on_request_queued", queued)
        return stream

    def _retry_after_s(self) -> int:
        return self._retry_after.seconds(len(self._waiting) + len(self._incoming), self.config.max_batch_size)

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # ----- scheduler thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._schedule_forever()
        except BaseException as error:
            self._die(error)

    def _schedule_forever(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while self._incoming:
                        self._waiting.append(self._incoming.popleft())
                    idle = not (self._waiting or self._prefilling or self._running)
                    if idle and self._stop_at is not None:
                        break
                    if idle:
                        self._lock.wait(timeout=1.0)
                        continue
                    past_deadline = self._stop_at is not None and time.monotonic() >= self._stop_at
                if past_deadline:
                    self._cancel_everything()
                    self._flush_outbox()
                    continue
                try:
                    self._iteration()
                    self._failed_iterations = 0
                except Exception as error:
                    # Everything a single request can break is caught closer to it; this is the
                    # scheduler's own fault or the device's. What was in flight cannot be trusted.
                    self._failed_iterations += 1
                    self._fail_in_flight(error)
                    if self._failed_iterations >= _MAX_FAILED_ITERATIONS:
                        raise
                if not self._running:
                    self._flush_outbox()

    def _die(self, error: BaseException) -> None:
        """The scheduler thread is ending on an error: refuse new work, end every request, say why."""
        self._failure = f"the scheduler thread stopped: {type(error).__name__}: {error}"
        logger.critical("engine failed, it serves nothing more: %s", self._failure, exc_info=error)
        with self._lock:
            self._accepting = False
            stranded = [*self._incoming, *self._waiting, *self._prefilling, *self._between, *self._running]
            self._incoming.clear()
            self._waiting.clear()
        message = "the engine failed while serving this request; please retry (the server restarts)"
        for sequence in stranded:
            if not sequence.stream.finished:
                try:
                    self._finish(sequence, "error", error=message)
                except Exception:
                    logger.exception("could not end request %s", sequence.request_id)
        self._prefilling.clear()
        self._between.clear()
        self._running = []
        self._unread = None
        self._flush_outbox()

    def _iteration(self) -> None:
        if self._runner.uses_openblas:
            # The matrix products run on OpenBLAS's threads; torch's OpenMP workers, which spin
            # between parallel regions, would take the same cores. Set every iteration: another
            # thread of the process (the benchmark's generate baseline) may have changed it.
            torch.set_num_threads(1)
        started = time.monotonic()
        tokens_before = self._tokens_total
        self._drop_cancelled()
        for sequence in self._scheduler.admit():
            sequence.scheduled_at = started
        ready = self._prefill()
        if ready:
            self._join(ready)
        self._between.clear()
        if self._running:
            self._decode_step()
        self._notify(
            "on_step",
            len(self._running) + len(self._prefilling),
            len(self._waiting) + len(self._incoming),
            self._tokens_total - tokens_before,
            time.monotonic() - started,
        )

    def _drop_cancelled(self) -> None:
        cancelled, keep = self._scheduler.take_cancelled()
        for sequence in cancelled:
            self._finish(sequence, "cancelled")
        if keep is not None:
            self._keep_rows(keep)

    def _prefill(self) -> list[_Block]:
        """Prefill admitted prompts within this iteration's token budget; return blocks ready to decode.

        Short prompts that wait together are prefilled together (one right-padded forward pass);
        a prompt longer than a chunk is prefilled alone, one chunk per iteration. A shared prefill
        that fails is retried one prompt at a time, so that only a prompt that fails alone fails.
        """
        budget = self._scheduler.prefill_budget()
        ready: list[_Block] = []
        while (work := self._scheduler.next_prefill(budget)) is not None:
            budget -= work.cost
            if work.chunk is None:
                group = work.sequences
                self._between.extend(group)
                try:
                    block, logits = self._prefill_group(group)
                except Exception as error:
                    self._prefill_failed(group, error)
                    continue
            else:
                head = work.sequences[0]
                try:
                    logits = self._prefill_chunk(head, work.chunk)
                except Exception as error:
                    self._prefilling.remove(head)
                    self._fail(head, "prefilling the prompt", error)
                    continue
                if not self._scheduler.chunk_done(head):
                    continue
                self._between.append(head)
                assert head.staged is not None
                block = _Block(sequences=[head], staged=head.staged, lengths=[head.prefilled])
                head.staged = None
            sampled = self._sample(logits, block.sequences)
            tokens, logprobs = _ChosenTokens(sampled.tokens, block.sequences, sampled.logprobs).read()
            keep = [
                row
                for row, (sequence, token) in enumerate(zip(block.sequences, tokens, strict=True))
                if not sequence.stream.finished and not self._accept_token(sequence, token, logprobs.get(row))
            ]
            if keep:
                block.keep(keep)
                ready.append(block)
            # First tokens reach their clients now, not after the rest of this iteration.
            self._flush_outbox()
        return ready

    def _prefill_failed(self, group: list[_Sequence], error: Exception) -> None:
        for sequence in group:
            self._between.remove(sequence)
        if len(group) == 1:
            self._fail(group[0], "prefilling the prompt", error)
            return
        logger.warning(
            "a shared prefill of requests %s failed (%s: %s); prefilling them one at a time",
            ", ".join(s.request_id or "?" for s in group),
            type(error).__name__,
            error,
        )
        self._scheduler.retry_alone(group)

    def _prefill_group(self, group: list[_Sequence]) -> tuple[_Block, torch.Tensor]:
        logits, staged = self._runner.prefill([s.prompt_ids for s in group])
        for sequence in group:
            sequence.prefilled = len(sequence.prompt_ids)
        return _Block(sequences=group, staged=staged, lengths=[len(s.prompt_ids) for s in group]), logits

    def _prefill_chunk(self, sequence: _Sequence, chunk: int) -> torch.Tensor:
        start = sequence.prefilled
        logits, sequence.staged = self._runner.prefill(
            [sequence.prompt_ids[start : start + chunk]], past=sequence.staged
        )
        sequence.prefilled += chunk
        return logits

    def _sample(self, logits: torch.Tensor, sequences: list[_Sequence]) -> SampleOutput:
        """Sample the batch in one pass; if that raises, row by row, ending only the rows that fail."""
        try:
            return self._sampler(logits, sequences)
        except Exception as error:
            logger.warning(
                "sampling a batch of %d failed (%s: %s); sampling its rows one at a time",
                len(sequences),
                type(error).__name__,
                error,
            )
        tokens: list[torch.Tensor] = []
        rows: list[int] = []
        chosen: list[torch.Tensor] = []
        top_ids: list[torch.Tensor] = []
        top_values: list[torch.Tensor] = []
        width = max((s.params.logprobs or 0 for s in sequences), default=0)
        for row, sequence in enumerate(sequences):
            try:
                alone = self._row_sampler(logits[row : row + 1], [sequence])
            except Exception as error:
                self._fail(sequence, "sampling the next token", error)
                tokens.append(torch.full((1,), INVALID_TOKEN, dtype=torch.long, device=logits.device))
                continue
            tokens.append(alone.tokens)
            if alone.logprobs is not None:
                # Padded to the widest request of the batch; each row reads its own columns only.
                pad = max(width, 1) - alone.logprobs.top_ids.shape[1]
                rows.append(row)
                chosen.append(alone.logprobs.chosen)
                top_ids.append(functional_pad(alone.logprobs.top_ids, pad))
                top_values.append(functional_pad(alone.logprobs.top_values, pad))
        logprobs = None
        if rows:
            logprobs = Logprobs(rows, torch.cat(chosen), torch.cat(top_ids), torch.cat(top_values))
        return SampleOutput(torch.cat(tokens), logprobs)

    def _join(self, blocks: list[_Block]) -> None:
        """Freshly prefilled blocks join the running batch in the slots after the running rows."""
        for block in blocks:
            self._cache.add_rows(block.staged, block.lengths)
            self._scheduler.join(block.sequences)
        first_tokens = [sequence.output_ids[-1] for block in blocks for sequence in block.sequences]
        self._next_tokens = torch.cat([self._next_tokens, to_device(first_tokens, self._loaded.device)])

    def _decode_step(self) -> None:
        if self._unread is not None and self._unread.ends_a_sequence():
            # Read before launching: a step for a row that has all its tokens would be wasted (and
            # could reach past the context or grow the cache). A row that ends on an end-of-sequence
            # token or a stop string costs one step of computing that is thrown away instead.
            self._accept_step(self._unread)
            self._unread = None
            if not self._running:
                return
        # The previous step's text reaches the event loop now: its thread then works while this
        # thread computes (torch releases the GIL), instead of both contending for the GIL in between.
        self._flush_outbox()
        logits = self._decode_or_fail()
        if logits is None:
            return
        sampled = self._sample(logits, self._running)
        # A row whose sampling failed is already finished; the next step still needs a valid id.
        self._next_tokens = sampled.tokens.clamp(min=0)
        self._steps_total += 1
        chosen = _ChosenTokens(sampled.tokens, list(self._running), sampled.logprobs)
        if self._overlap_host_work:
            chosen, self._unread = self._unread, chosen
            if chosen is None:
                return
        self._accept_step(chosen)

    def _decode_or_fail(self) -> torch.Tensor | None:
        """One decode step, tried twice; when both fail, only the rows that fail alone end.

        A failed step leaves the cache as it was (the rows' lengths only advance on success), so
        a transient failure (out of memory while others allocate) costs one retry and no request.
        A step that fails again is bisected (_rows_failing_alone): the rows whose step fails on
        its own end with an error, with one log line naming them, and the step runs again
        without them. Rows that fail only together (no part of them fails alone: memory, a
        broken device) all end. Returns the step's logits [rows, vocab], or None when no row is
        left to decode.
        """
        try:
            return self._runner.decode(self._next_tokens)
        except Exception as error:
            logger.warning("decode step failed (%s: %s); retrying once", type(error).__name__, error)
        if self._loaded.device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            return self._runner.decode(self._next_tokens)
        except Exception as error:
            failure = error
        rows = list(range(len(self._running)))
        failing = self._rows_failing_alone(rows)
        culprits = [self._running[row] for row in failing]
        together = len(failing) == len(rows) > 1
        logger.error(
            "decode step failed twice (%s: %s); ending requests %s, %s; %d other rows go on",
            type(failure).__name__,
            failure,
            ", ".join(s.request_id or "?" for s in culprits),
            "whose rows fail only together" if together else "whose rows fail alone",
            len(rows) - len(failing),
        )
        message = f"the engine failed while generating this reply ({type(failure).__name__}); please retry"
        for sequence in culprits:
            if not sequence.stream.finished:
                self._finish(sequence, "error", error=message)
        if len(failing) == len(rows):
            self._clear_running()
            return None
        ended = set(failing)
        self._keep_rows([row for row in rows if row not in ended])
        try:
            return self._runner.decode(self._next_tokens)
        except Exception as error:
            logger.error(
                "decode step failed again without those rows (%s: %s); ending requests %s",
                type(error).__name__,
                error,
                ", ".join(s.request_id or "?" for s in self._running),
            )
            for sequence in self._running:
                if not sequence.stream.finished:
                    self._finish(sequence, "error", error=message)
            self._clear_running()
            return None

    def _rows_failing_alone(self, rows: list[int]) -> list[int]:
        """Of running rows `rows`, whose decode step fails together, those whose step fails alone.

        Bisection: each half runs alone (runner.decode_rows: eager, the cache does not advance);
        a half that fails is split again, down to single rows. When neither half fails alone,
        the rows fail only together and all of them are returned. Costs at most about
        2 * log2(rows) forward passes per failing row, on this rare path only.
        """
        if len(rows) == 1:
            return rows
        middle = len(rows) // 2
        failing: list[int] = []
        for half in (rows[:middle], rows[middle:]):
            try:
                tokens = self._next_tokens[to_device(half, self._loaded.device)]
                self._runner.decode_rows(tokens, half)
            except Exception as error:
                logger.debug("decode of rows %s alone failed: %s: %s", half, type(error).__name__, error)
                failing.extend(self._rows_failing_alone(half))
        return failing or rows

    def _accept_step(self, chosen: _ChosenTokens) -> None:
        """Take in a step's tokens and drop the rows they finished from the running batch."""
        tokens, logprobs = chosen.read()
        for row, (sequence, token) in enumerate(zip(chosen.sequences, tokens, strict=True)):
            # A sequence may have finished since the step ran (cancelled, or one step earlier).
            if not sequence.stream.finished:
                self._accept_token(sequence, token, logprobs.get(row))
        keep = [row for row, sequence in enumerate(self._running) if not sequence.stream.finished]
        if len(keep) < len(self._running):
            self._keep_rows(keep)

    def _keep_rows(self, keep: list[int]) -> None:
        """Drop finished rows from the running batch at once, freeing their share of the cache."""
        order = self._scheduler.keep_running(keep)
        self._cache.keep_rows(order)
        self._next_tokens = self._next_tokens[to_device(order, self._loaded.device)]
        if not self._running:
            self._unread = None  # every row it holds has finished

    def _accept_token(
        self, sequence: _Sequence, token: int, logprobs: tuple[float, list[int], list[float]] | None
    ) -> bool:
        """Record a sampled token, queue its text; True when the sequence is finished (and reported).

        Whatever goes wrong here (the model's numbers, detokenizing, stop strings) ends this
        sequence alone, with an error result for its own client.
        """
        if token == INVALID_TOKEN:
            self._fail(sequence, "sampling the next token", ValueError("the model's scores were not finite"))
            return True
        try:
            return self._take_token(sequence, token, logprobs)
        except Exception as error:
            self._fail(sequence, "turning tokens into text", error)
            return True

    def _take_token(
        self, sequence: _Sequence, token: int, logprobs: tuple[float, list[int], list[float]] | None
    ) -> bool:
        now = time.monotonic()
        sequence.output_ids.append(token)
        self._tokens_total += 1
        if sequence.first_token_at is None:
            sequence.first_token_at = now
            self._notify("on_first_token", now - sequence.submitted_at)
        entry = None
        if logprobs is not None:
            chosen, top_ids, top_values = logprobs
            count = sequence.params.logprobs or 0
            text = self._token_texts
            top = tuple((text(i), v) for i, v in zip(top_ids[:count], top_values[:count], strict=True))
            entry = TokenLogprob(token_id=token, token=text(token), logprob=chosen, top=top)
        is_eos = token in self._loaded.eos_token_ids and not sequence.params.ignore_eos
        self._emit(sequence, sequence.output.add_token(token, entry, is_eos))
        if sequence.output.stopped or is_eos:
            self._finish(sequence, "stop")
            return True
        if len(sequence.output_ids) >= sequence.params.max_tokens:
            self._finish(sequence, "length")
            return True
        return False

    def _emit(self, sequence: _Sequence, delta: TextDelta | None) -> None:
        if delta is not None:
            self._outbox.append((sequence.stream, delta))

    def _fail(self, sequence: _Sequence, stage: str, error: Exception) -> None:
        """End one sequence with an error meant for its own client; the others go on."""
        logger.error(
            "request %s failed while %s: %s: %s",
            sequence.request_id or "?",
            stage,
            type(error).__name__,
            error,
            exc_info=error,
        )
        if not sequence.stream.finished:
            self._finish(
                sequence, "error", error=f"generation failed while {stage}: {type(error).__name__}: {error}"
            )

    def _finish(self, sequence: _Sequence, reason: FinishReason, error: str | None = None) -> None:
        if reason in ("length", "stop"):
            try:
                self._emit(sequence, sequence.output.finish())
            except Exception as failure:
                logger.exception("request %s: releasing its last text failed", sequence.request_id or "?")
                reason, error = "error", f"generation failed while turning tokens into text: {failure}"
        now = time.monotonic()
        first = sequence.first_token_at
        result = GenerationResult(
            finish_reason=reason,
            text=sequence.output.text,
            prompt_tokens=len(sequence.prompt_ids),
            completion_tokens=len(sequence.output_ids),
            ttft_s=None if first is None else first - sequence.submitted_at,
            decode_s=0.0 if first is None else now - first,
            e2e_s=now - sequence.submitted_at,
            error=error,
            token_ids=tuple(sequence.output_ids),
            logprobs=tuple(sequence.output.logprobs),
            queue_s=None if sequence.scheduled_at is None else sequence.scheduled_at - sequence.submitted_at,
        )
        sequence.staged = None
        sequence.stream.finished = True
        self._outbox.append((sequence.stream, result))
        with self._lock:
            self._in_system -= 1
        # A smoothed request duration feeds Retry-After estimates.
        self._retry_after.observe(result.e2e_s)
        self._notify("on_request_finished", result)

    def _cancel_everything(self) -> None:
        for sequence in [*self._waiting, *self._prefilling, *self._running]:
            self._finish(sequence, "cancelled")
        self._waiting.clear()
        self._prefilling.clear()
        self._clear_running()

    def _clear_running(self) -> None:
        self._running = []
        self._next_tokens = self._next_tokens[:0]
        self._unread = None
        self._cache.release()

    def _fail_in_flight(self, error: Exception) -> None:
        """An iteration failed outside any one request: end what it had in hand, keep the queue."""
        in_flight = [s for s in [*self._prefilling, *self._between, *self._running] if not s.stream.finished]
        logger.error(
            "engine step failed (%s: %s); ending requests %s",
            type(error).__name__,
            error,
            ", ".join(s.request_id or "?" for s in in_flight),
            exc_info=error,
        )
        message = f"the engine failed while generating this reply ({type(error).__name__}); please retry"
        for sequence in in_flight:
            self._finish(sequence, "error", error=message)
        self._prefilling.clear()
        self._between.clear()
        self._clear_running()
        if self._loaded.device.type == "cuda":
            torch.cuda.empty_cache()

    def _flush_outbox(self) -> None:
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        with self._delivery_lock:
            self._undelivered.extend(batch)
            if self._delivery_scheduled or self._loop is None:
                # The loop has not run the previous delivery yet: it will take these items too.
                # Fewer wake-ups of the loop mean fewer GIL hand-offs in the decode loop.
                return
            self._delivery_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._deliver_undelivered)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            with self._delivery_lock:
                self._undelivered.clear()

    def _deliver_undelivered(self) -> None:
        with self._delivery_lock:
            batch, self._undelivered = self._undelivered, []
            self._delivery_scheduled = False
        for stream, item in batch:
            stream._deliver(item)

    def _notify(self, hook: str, *args: Any) -> None:
        notify_observer(self.observer, hook, *args)
