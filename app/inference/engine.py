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
   into the KV-cache slots after the running rows (model_runner.py: one slot per row, each
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
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.inference.contract import EngineCapabilities, EngineInfo, ToolCallExtraction
from app.inference.detokenizer import IncrementalDetokenizer, StopStringFilter
from app.inference.loading import LoadedModel, load_model
from app.inference.model_runner import ModelRunner, StagedKV, check_supported, to_device
from app.inference.sampling import make_generator, sample_next_tokens
from app.inference.stream import RequestStream
from app.inference.types import (
    EngineClosedError,
    EngineFullError,
    EngineObserver,
    EngineStats,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    InvalidRequestError,
    ModelLoadError,
    PromptTooLongError,
    SamplingParams,
    TextDelta,
)

logger = logging.getLogger(__name__)

_MAX_STOP_STRINGS = 16


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
    detokenizer: IncrementalDetokenizer
    stop_filter: StopStringFilter
    generator: torch.Generator | None
    prefilled: int = 0
    staged: StagedKV | None = None  # keys/values of a prompt prefilled in chunks so far
    output_ids: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    # Tokens consumed since the last TextDelta (a delta may be empty while a character is incomplete).
    pending_token_count: int = 0


class _ChosenTokens:
    """The tokens one decode step chose for its rows, on their way to the host.

    On CUDA the copy is queued behind the step into pinned memory, and reading waits for that step
    only, not for work queued after it.
    """

    def __init__(self, tokens: torch.Tensor, sequences: list[_Sequence]) -> None:
        self.sequences = sequences
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

    def read(self) -> list[int]:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()


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


def _fill_holes(keep: list[int]) -> list[int]:
    """New row order after dropping rows: survivors stay in place, the last ones move into the holes.

    Moving a few rows costs less than shifting every row after the first finished one.
    """
    count = len(keep)
    kept = set(keep)
    movers = [row for row in keep if row >= count]
    return [row if row in kept else movers.pop() for row in range(count)]


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
        if self._runner.uses_openblas:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=config.torch_threads or torch.get_num_threads(), user_api="blas")
        # Metrics hooks; set before start() (the scheduler thread calls them).
        self.observer: EngineObserver | None = None
        self._lock = threading.Condition()
        self._incoming: deque[_Sequence] = deque()
        self._waiting: deque[_Sequence] = deque()
        self._prefilling: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
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
        self._recent_request_seconds = 10.0

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

    def prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        """The token ids the model will see for this request (chat template applied)."""
        if (request.messages is None) == (request.prompt is None):
            raise InvalidRequestError("send either messages or a prompt, not both and not neither")
        if request.prompt is not None:
            return list(self._tokenizer(request.prompt)["input_ids"])
        if not request.messages:
            raise InvalidRequestError("messages must not be empty")
        if not self._tokenizer.chat_template:
            raise InvalidRequestError(f"model {self.model_name} has no chat template: send a raw prompt")
        for message in request.messages:
            if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
                raise InvalidRequestError("each message needs a string role and a string content")
        text = self._tokenizer.apply_chat_template(
            [dict(message) for message in request.messages], add_generation_prompt=True, tokenize=False
        )
        # The template already wrote the special tokens; the tokenizer must not add a second BOS.
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return len(self.prompt_token_ids(request))

    def _validate(self, params: SamplingParams, prompt_length: int) -> None:
        if params.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {params.max_tokens}")
        if params.max_tokens > self.config.max_new_tokens:
            raise InvalidRequestError(
                f"max_tokens {params.max_tokens} exceeds the limit of {self.config.max_new_tokens}"
            )
        if not (math.isfinite(params.temperature) and params.temperature >= 0):
            raise InvalidRequestError(f"temperature must be 0 or more, got {params.temperature}")
        if not 0 < params.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {params.top_p}")
        if params.top_k < 0:
            raise InvalidRequestError(f"top_k must be 0 (off) or more, got {params.top_k}")
        if len(params.stop) > _MAX_STOP_STRINGS:
            raise InvalidRequestError(f"at most {_MAX_STOP_STRINGS} stop strings, got {len(params.stop)}")
        if prompt_length == 0:
            raise InvalidRequestError("the prompt is empty")
        if prompt_length > self.config.max_input_tokens:
            raise PromptTooLongError(
                f"the prompt has {prompt_length} tokens; the limit is {self.config.max_input_tokens}",
                limit=self.config.max_input_tokens,
                actual=prompt_length,
            )
        context = self._loaded.context_length
        if prompt_length + params.max_tokens > context:
            raise PromptTooLongError(
                f"the prompt has {prompt_length} tokens and max_tokens is {params.max_tokens}; together "
                f"they exceed the model's context of {context} tokens "
                f"(at most {max(context - params.max_tokens, 0)} prompt tokens with this max_tokens)",
                limit=max(context - params.max_tokens, 0),
                actual=prompt_length,
            )

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; raises at once when it cannot be served (see types.py for the errors)."""
        if not self._accepting:
            raise EngineClosedError("the engine is not accepting requests (not started or shutting down)")
        prompt_ids = self.prompt_token_ids(request)
        self._validate(request.params, len(prompt_ids))
        stream = RequestStream(request.request_id, len(prompt_ids), self._wake)
        sequence = _Sequence(
            stream=stream,
            params=request.params,
            prompt_ids=prompt_ids,
            submitted_at=time.monotonic(),
            detokenizer=IncrementalDetokenizer(self._scheduler_tokenizer, prompt_ids),
            stop_filter=StopStringFilter(request.params.stop),
            generator=make_generator(request.params, self._loaded.device),
        )
        with self._lock:
            if not self._accepting:
                raise EngineClosedError("the engine is shutting down")
            capacity = self.config.max_batch_size + self.config.max_queue
            if self._in_system >= capacity:
                raise EngineFullError(
                    f"the engine is full: {self.config.max_batch_size} running and "
                    f"{self.config.max_queue} queued requests",
                    retry_after_s=self._retry_after_s(),
                )
            self._in_system += 1
            self._requests_total += 1
            self._incoming.append(sequence)
            queued = len(self._incoming) + len(self._waiting)
            self._lock.notify_all()
        self._notify("on_request_queued", queued)
        return stream

    def _retry_after_s(self) -> int:
        # Time for the queue ahead to drain through the batch, from recent request durations.
        waves = 1 + (len(self._waiting) + len(self._incoming)) / self.config.max_batch_size
        return max(1, math.ceil(self._recent_request_seconds * waves))

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # ----- scheduler thread ------------------------------------------------------------------

    def _run(self) -> None:
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
                except Exception as error:
                    logger.exception("engine step failed; failing the affected requests")
                    self._fail_everything(error)
                if not self._running:
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
        while self._waiting and len(self._running) + len(self._prefilling) < self.config.max_batch_size:
            self._prefilling.append(self._waiting.popleft())
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
        for queue in (self._waiting, self._prefilling):
            for sequence in [s for s in queue if s.stream.cancel_requested]:
                queue.remove(sequence)
                self._finish(sequence, "cancelled")
        keep = [row for row, s in enumerate(self._running) if not s.stream.cancel_requested]
        if len(keep) < len(self._running):
            for sequence in self._running:
                if sequence.stream.cancel_requested:
                    self._finish(sequence, "cancelled")
            self._keep_rows(keep)

    def _prefill(self) -> list[_Block]:
        """Prefill admitted prompts within this iteration's token budget; return blocks ready to decode.

        Short prompts that wait together are prefilled together (one right-padded forward pass);
        a prompt longer than a chunk is prefilled alone, one chunk per iteration.
        """
        chunk_limit = self.config.prefill_chunk_tokens
        # With nothing decoding there is nobody to stall: take a larger share of the queue at once.
        budget = chunk_limit if self._running else 4 * chunk_limit
        ready: list[_Block] = []
        while self._prefilling and budget > 0:
            head = self._prefilling[0]
            if head.prefilled == 0 and len(head.prompt_ids) <= chunk_limit:
                group = self._take_prefill_group(budget)
                block, logits = self._prefill_group(group)
                budget -= len(group) * max(block.lengths)
            else:
                chunk = min(len(head.prompt_ids) - head.prefilled, budget, chunk_limit)
                logits = self._prefill_chunk(head, chunk)
                budget -= chunk
                if head.prefilled < len(head.prompt_ids):
                    continue
                self._between.append(self._prefilling.popleft())
                assert head.staged is not None
                block = _Block(sequences=[head], staged=head.staged, lengths=[head.prefilled])
                head.staged = None
            tokens = sample_next_tokens(
                logits, [s.params for s in block.sequences], [s.generator for s in block.sequences]
            ).tolist()
            keep = [
                row
                for row, (sequence, token) in enumerate(zip(block.sequences, tokens, strict=True))
                if not self._accept_token(sequence, token)
            ]
            if keep:
                block.keep(keep)
                ready.append(block)
            # First tokens reach their clients now, not after the rest of this iteration.
            self._flush_outbox()
        return ready

    def _take_prefill_group(self, budget: float) -> list[_Sequence]:
        chunk_limit = self.config.prefill_chunk_tokens
        group = [self._prefilling.popleft()]
        self._between.append(group[0])
        width = len(group[0].prompt_ids)
        while self._prefilling and self._prefilling[0].prefilled == 0:
            length = len(self._prefilling[0].prompt_ids)
            padded_total = max(width, length) * (len(group) + 1)
            if length > chunk_limit or padded_total > budget:
                break
            group.append(self._prefilling.popleft())
            self._between.append(group[-1])
            width = max(width, length)
        return group

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

    def _join(self, blocks: list[_Block]) -> None:
        """Freshly prefilled blocks join the running batch in the slots after the running rows."""
        for block in blocks:
            self._runner.add_rows(block.staged, block.lengths)
            self._running.extend(block.sequences)
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
        logits = self._runner.decode(self._next_tokens)
        self._next_tokens = sample_next_tokens(
            logits,
            [s.params for s in self._running],
            [s.generator for s in self._running],
        )
        self._steps_total += 1
        chosen = _ChosenTokens(self._next_tokens, list(self._running))
        if self._overlap_host_work:
            chosen, self._unread = self._unread, chosen
            if chosen is None:
                return
        self._accept_step(chosen)

    def _accept_step(self, chosen: _ChosenTokens) -> None:
        """Take in a step's tokens and drop the rows they finished from the running batch."""
        for sequence, token in zip(chosen.sequences, chosen.read(), strict=True):
            # A sequence may have finished since the step ran (cancelled, or one step earlier).
            if not sequence.stream.finished:
                self._accept_token(sequence, token)
        keep = [row for row, sequence in enumerate(self._running) if not sequence.stream.finished]
        if len(keep) < len(self._running):
            self._keep_rows(keep)

    def _keep_rows(self, keep: list[int]) -> None:
        """Drop finished rows from the running batch at once, freeing their share of the cache."""
        order = _fill_holes(keep)
        self._running = [self._running[row] for row in order]
        self._runner.keep_rows(order)
        self._next_tokens = self._next_tokens[to_device(order, self._loaded.device)]
        if not self._running:
            self._unread = None  # every row it holds has finished

    def _accept_token(self, sequence: _Sequence, token: int) -> bool:
        """Record a sampled token, queue its text; True when the sequence is finished (and reported)."""
        now = time.monotonic()
        sequence.output_ids.append(token)
        sequence.pending_token_count += 1
        self._tokens_total += 1
        if sequence.first_token_at is None:
            sequence.first_token_at = now
            self._notify("on_first_token", now - sequence.submitted_at)
        is_eos = token in self._loaded.eos_token_ids and not sequence.params.ignore_eos
        if not is_eos:
            text = sequence.stop_filter.feed(sequence.detokenizer.add_token(token))
            self._emit_text(sequence, text)
            if sequence.stop_filter.stopped:
                self._finish(sequence, "stop")
                return True
        if is_eos:
            self._finish(sequence, "stop")
            return True
        if len(sequence.output_ids) >= sequence.params.max_tokens:
            self._finish(sequence, "length")
            return True
        return False

    def _emit_text(self, sequence: _Sequence, text: str) -> None:
        if text:
            delta = TextDelta(text=text, token_count=sequence.pending_token_count)
            self._outbox.append((sequence.stream, delta))
            sequence.pending_token_count = 0

    def _finish(self, sequence: _Sequence, reason: FinishReason, error: str | None = None) -> None:
        if reason in ("length", "stop") and not sequence.stop_filter.stopped:
            tail = sequence.stop_filter.feed(sequence.detokenizer.flush())
            self._emit_text(sequence, tail + sequence.stop_filter.flush())
        now = time.monotonic()
        first = sequence.first_token_at
        result = GenerationResult(
            finish_reason=reason,
            text=sequence.stop_filter.text,
            prompt_tokens=len(sequence.prompt_ids),
            completion_tokens=len(sequence.output_ids),
            ttft_s=None if first is None else first - sequence.submitted_at,
            decode_s=0.0 if first is None else now - first,
            e2e_s=now - sequence.submitted_at,
            error=error,
            token_ids=tuple(sequence.output_ids),
        )
        sequence.staged = None
        sequence.stream.finished = True
        self._outbox.append((sequence.stream, result))
        with self._lock:
            self._in_system -= 1
        # A smoothed request duration feeds Retry-After estimates.
        self._recent_request_seconds = 0.8 * self._recent_request_seconds + 0.2 * result.e2e_s
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
        self._runner.release()

    def _fail_everything(self, error: Exception) -> None:
        message = f"{type(error).__name__}: {error}"
        stranded = [s for s in self._between if not s.stream.finished]
        for sequence in [*self._prefilling, *stranded, *self._running]:
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
        if self.observer is None:
            return
        try:
            getattr(self.observer, hook)(*args)
        except Exception:
            logger.exception("engine observer hook %s failed", hook)
