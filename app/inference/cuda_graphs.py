"""CUDA graphs of the decode step: captured per (batch bucket, attention window), then replayed.

A decode step of a small model is a chain of a few hundred tiny kernels whose launches, not the
bytes they read, set its time on a GPU. Replaying a captured graph launches them all at once.

A graph fixes its shapes and the addresses it reads and writes, so:
- the batch is padded to a bucket (`GRAPH_BATCH_BUCKETS`): padding rows compute in free slots
  at position 0, whose writes are never read, with whatever token an earlier step left there;
- the attention window is the rows' longest length rounded up to the cache's step (masked, so
  rows of any length share one graph);
- a graph reads the KV cache's tensors as they were at capture: when the cache reallocates them
  (`KVCache.allocations` changes), every graph is dropped and captured again on demand.

Nothing here knows the model: the runner hands over its eager decode step
(``step(tokens, positions, window, masked) -> logits``) and this module captures calls of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from app.inference.kv_cache import CAPACITY_STEP, KVCache, round_up
from app.inference.transfer import to_device

logger = logging.getLogger(__name__)

GRAPH_BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)

DecodeStep = Callable[[torch.Tensor, torch.Tensor, int, bool], torch.Tensor]


class DecodeGraphs:
    """The captured decode steps of one runner, over one KV cache.

    step: the eager (or compiled) decode step; tokens and positions [rows] (long, on the device),
    window in positions, masked; returns logits [rows, vocab]. smallest_bucket: the smallest
    batch captured (a compiled step specialises batches of one, so it starts at two).
    """

    def __init__(self, cache: KVCache, step: DecodeStep, smallest_bucket: int = 1) -> None:
        self.cache = cache
        self._step = step
        self._smallest_bucket = smallest_bucket
        self._graphs: dict[tuple[int, int], _CapturedStep] = {}
        self._pool: Any = None
        self._allocation = cache.allocations

    def fits(self, rows: int) -> bool:
        """Whether a batch of `rows` rows has a bucket (larger ones run eagerly)."""
        return rows <= GRAPH_BATCH_BUCKETS[-1]

    def captured(self) -> list[torch.cuda.CUDAGraph]:
        """The graphs captured so far (for measuring a replay alone, as bench/gpu_check does)."""
        return [step.graph for step in self._graphs.values()]

    def clear(self) -> None:
        """Drop every graph (they point at tensors that are gone)."""
        self._graphs.clear()
        # A pool whose graphs are all gone cannot take new captures: the next graph starts a new one.
        self._pool = None

    def replay(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step of the cache's running rows; returns logits [rows, vocab] (a view).

        tokens: [rows] on the device, row r's latest token (slot r of the cache). The logits are
        the graph's output buffer: the next replay of the same graph overwrites them. The first
        step of a (bucket, window) captures its graph (and runs it). Raises what the capture or
        the replay raises (torch.OutOfMemoryError, a CUDA error).
        """
        if self._allocation != self.cache.allocations:
            self.clear()
            self._allocation = self.cache.allocations
        rows = tokens.shape[0]
        lengths = self.cache.lengths
        bucket = next(size for size in GRAPH_BATCH_BUCKETS if size >= max(rows, self._smallest_bucket))
        bucket = min(bucket, self.cache.max_slots)
        window = min(round_up(max(lengths) + 1, CAPACITY_STEP), self.cache.capacity)
        step = self._graphs.get((bucket, window))
        positions = to_device(lengths + [0] * (bucket - rows), tokens.device)
        if step is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            step = _CapturedStep(self._step, bucket, window, tokens.device, self._pool)
            step.tokens[:rows].copy_(tokens)
            step.positions.copy_(positions)
            step.capture()
            self._graphs[(bucket, window)] = step
            logger.debug("captured a CUDA graph for batch %d, window %d", bucket, window)
        else:
            step.tokens[:rows].copy_(tokens)
            step.positions.copy_(positions)
        step.graph.replay()
        return step.logits[:rows]


class _CapturedStep:
    def __init__(self, step: DecodeStep, bucket: int, window: int, device: torch.device, pool: Any) -> None:
        self._step = step
        self.window = window
        self.tokens = torch.zeros(bucket, dtype=torch.long, device=device)
        self.positions = torch.zeros(bucket, dtype=torch.long, device=device)
        self.pool = pool
        self.graph = torch.cuda.CUDAGraph()
        self.logits: torch.Tensor

    def _run(self) -> torch.Tensor:
        return self._step(self.tokens, self.positions, self.window, True)

    def capture(self) -> None:
        # The inputs already hold the real step, so the warm-up writes the same cache entries.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run()
        torch.cuda.current_stream().wait_stream(side)
        # thread_local: the event loop thread may touch CUDA (a seeded request's generator) meanwhile.
        with torch.cuda.graph(self.graph, pool=self.pool, capture_error_mode="thread_local"):
            self.logits = self._run()
