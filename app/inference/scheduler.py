"""Which sequences run, and in which order: the engine's scheduling decisions, with no torch.

In the shape of vLLM's scheduler: sequences wait, are admitted while the batch has room, are
prefilled (short prompts that wait together share one padded pass, a long prompt goes in chunks,
within a token budget per iteration so that running rows are never stalled for long), then run
one decode step per iteration in the rows of the batch. The engine executes each piece of work
on the device and tells the scheduler what came of it; this module only decides, so it is tested
with plain objects in milliseconds (tests/inference/test_scheduler.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class SchedulableSequence(Protocol):
    prompt_ids: list[int]
    # Prompt tokens already prefilled.
    prefilled: int
    # Prefilled alone: a shared prefill that failed is retried one prompt at a time.
    solo: bool

    @property
    def cancel_requested(self) -> bool: ...


S = TypeVar("S", bound=SchedulableSequence)


@dataclass
class PrefillWork(Generic[S]):
    """One forward pass of prefill: several whole prompts (padded to the longest), or one chunk.

    chunk: None for whole prompts, else the number of tokens of `sequences[0]` from its
    `prefilled` position. cost: the tokens it computes (padding included), charged to the budget.
    """

    sequences: list[S]
    chunk: int | None
    cost: int


def fill_holes(keep: list[int]) -> list[int]:
    """New row order after dropping rows: survivors stay in place, the last ones move into the holes.

    Moving a few rows costs less than shifting every row after the first finished one.
    keep: the surviving old row indices, ascending. Returns old indices in their new order.
    """
    count = len(keep)
    kept = set(keep)
    movers = [row for row in keep if row >= count]
    return [row if row in kept else movers.pop() for row in range(count)]


class Scheduler(Generic[S]):
    """Waiting, prefilling and running sequences of one engine (its scheduler thread only)."""

    def __init__(self, max_batch_size: int, prefill_chunk_tokens: int) -> None:
        self.max_batch_size = max_batch_size
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.waiting: deque[S] = deque()
        self.prefilling: deque[S] = deque()
        # Row r of the running batch is running[r] (and KV-cache slot r).
        self.running: list[S] = []

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.prefilling or self.running)

    def admit(self) -> list[S]:
        """Waiting sequences start prefilling, in arrival order, while the batch has room.

        Returns the sequences admitted now (the engine stamps their queue time)."""
        admitted: list[S] = []
        while self.waiting and len(self.running) + len(self.prefilling) < self.max_batch_size:
            admitted.append(self.waiting.popleft())
            self.prefilling.append(admitted[-1])
        return admitted

    def take_cancelled(self) -> tuple[list[S], list[int] | None]:
        """Remove cancelled sequences: returns them, and the running rows to keep (None: all)."""
        cancelled: list[S] = []
        for queue in (self.waiting, self.prefilling):
            for sequence in [s for s in queue if s.cancel_requested]:
                queue.remove(sequence)
                cancelled.append(sequence)
        keep = [row for row, s in enumerate(self.running) if not s.cancel_requested]
        if len(keep) == len(self.running):
            return cancelled, None
        cancelled.extend(s for s in self.running if s.cancel_requested)
        return cancelled, keep

    def prefill_budget(self) -> int:
        """Prompt tokens this iteration may prefill: one chunk while rows decode, more when none do."""
        return self.prefill_chunk_tokens if self.running else 4 * self.prefill_chunk_tokens

    def next_prefill(self, budget: int) -> PrefillWork[S] | None:
        """The next pass of prefill that fits `budget`, taken off `prefilling` unless it is a chunk
        that leaves more of its prompt to do (the engine calls `chunk_done` after it)."""
        if not self.prefilling or budget <= 0:
            return None
        chunk_limit = self.prefill_chunk_tokens
        head = self.prefilling[0]
        if head.prefilled == 0 and len(head.prompt_ids) <= chunk_limit:
            group = [self.prefilling.popleft()]
            width = len(head.prompt_ids)
            while not head.solo and self.prefilling and self.prefilling[0].prefilled == 0:
                candidate = self.prefilling[0]
                length = len(candidate.prompt_ids)
                if candidate.solo or length > chunk_limit or max(width, length) * (len(group) + 1) > budget:
                    break
                group.append(self.prefilling.popleft())
                width = max(width, length)
            return PrefillWork(group, None, width * len(group))
        chunk = min(len(head.prompt_ids) - head.prefilled, budget, chunk_limit)
        return PrefillWork([head], chunk, chunk)

    def chunk_done(self, sequence: S) -> bool:
        """After a chunk ran: True (and off `prefilling`) when the whole prompt is prefilled."""
        if sequence.prefilled < len(sequence.prompt_ids):
            return False
        self.prefilling.remove(sequence)
        return True

    def retry_alone(self, group: list[S]) -> None:
        """A shared prefill failed: its prompts go back to the front, each to be prefilled alone."""
        for sequence in reversed(group):
            sequence.solo = True
            self.prefilling.appendleft(sequence)

    def join(self, sequences: list[S]) -> None:
        """Prefilled sequences take the rows after the running ones."""
        self.running.extend(sequences)

    def keep_running(self, keep: list[int]) -> list[int]:
        """Keep running rows `keep` (ascending old indices); returns the rows' new order (old indices)."""
        order = fill_holes(keep)
        self.running = [self.running[row] for row in order]
        return order
