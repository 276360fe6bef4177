"""The KV cache of the running batch: one slot per row, each with its own length.

One key and one value tensor hold every layer, ``[layers, slots, kv_heads, capacity, head_dim]``.
Row ``r`` of the running batch lives in slot ``r``, so a decode step reads a plain view of the
first ``rows`` slots (with one mask for rows of different lengths), and a CUDA graph captured
against these tensors stays valid until they are reallocated (``allocations`` counts that).

Prompts are prefilled into a separate staging tensor (`StagedKV`): no slot is touched until the
sequence joins the batch (`add_rows`), so a prefill that fails leaves the running rows as they
were. Finished rows leave at once (`keep_rows`): the rows after them move into the freed slots.

Nothing here runs the model; the runner (model_runner.py) writes each decode step's keys and
values at the rows' current lengths and advances them (`advance`) once the step has succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Capacity grows in steps of this many positions (fewer reallocations, and fewer CUDA graphs,
# whose attention windows are rounded to the same step, than exact sizes).
CAPACITY_STEP = 256


def round_up(value: int, step: int) -> int:
    """The smallest multiple of `step` that is at least `value` (both positive)."""
    return -(-value // step) * step


@dataclass
class StagedKV:
    """Keys and values of prompts being prefilled, ``[layers, rows, kv_heads, length, head_dim]``."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def length(self) -> int:
        """Positions staged so far (the padded width for a group of prompts)."""
        return self.keys.shape[3]


class KVCache:
    """Slots for up to `max_slots` running rows, each holding up to `capacity` positions.

    `lengths[r]` is the number of positions written in slot `r` (the row's cached tokens).
    `capacity` grows on demand, geometrically and in steps of CAPACITY_STEP, never beyond the
    model's context (`max_positions`, rounded up to the step). With `keep_storage` (CUDA graphs
    point at the tensors) an empty cache keeps its memory; otherwise it frees it.
    """

    def __init__(
        self,
        *,
        layers: int,
        max_slots: int,
        kv_heads: int,
        head_dim: int,
        max_positions: int,
        device: torch.device,
        dtype: torch.dtype,
        keep_storage: bool,
    ) -> None:
        self.layers = layers
        self.max_slots = max_slots
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.device = device
        self.dtype = dtype
        self.keep_storage = keep_storage
        self.capacity = 0
        self.keys = torch.empty(0, device=device, dtype=dtype)
        self.values = torch.empty(0, device=device, dtype=dtype)
        self.lengths: list[int] = []
        # Incremented whenever `keys`/`values` become new tensors (what was captured is stale).
        self.allocations = 0

    @property
    def rows(self) -> int:
        """Running rows held (slots 0 .. rows - 1)."""
        return len(self.lengths)

    def _shape(self, capacity: int) -> tuple[int, ...]:
        return (self.layers, self.max_slots, self.kv_heads, capacity, self.head_dim)

    def reserve(self, length: int) -> None:
        """Make room for `length` positions in every slot (grows geometrically, keeps contents).

        Raises torch.OutOfMemoryError when the device cannot hold the larger cache; the cache is
        then unchanged.
        """
        if length <= self.capacity:
            return
        capacity = min(
            round_up(max(length, self.capacity * 3 // 2), CAPACITY_STEP),
            round_up(self.max_positions, CAPACITY_STEP),
        )
        capacity = max(capacity, length)
        keys = torch.zeros(self._shape(capacity), device=self.device, dtype=self.dtype)
        values = torch.zeros_like(keys)
        if self.capacity:
            keys[:, :, :, : self.capacity].copy_(self.keys)
            values[:, :, :, : self.capacity].copy_(self.values)
        self.keys, self.values, self.capacity = keys, values, capacity
        self.allocations += 1

    def add_rows(self, staged: StagedKV, lengths: list[int]) -> None:
        """Append staged sequences to the running rows (their slots follow the running rows).

        staged: ``[layers, len(lengths), kv_heads, >= max(lengths), head_dim]``; row i of it
        holds `lengths[i]` real positions. Raises RuntimeError when the slots would overflow.
        """
        first = self.rows
        if first + len(lengths) > self.max_slots:
            raise RuntimeError(f"{first + len(lengths)} rows exceed the {self.max_slots} slots")
        self.reserve(max(lengths) + 1)
        for offset, length in enumerate(lengths):
            slot = first + offset
            self.keys[:, slot, :, :length].copy_(staged.keys[:, offset, :, :length])
            self.values[:, slot, :, :length].copy_(staged.values[:, offset, :, :length])
        self.lengths.extend(lengths)

    def keep_rows(self, keep: list[int]) -> None:
        """Keep running rows `keep` (old indices, in their new order), moving each into its new slot.

        Rows are copied slot by slot in new-slot order, so `keep` must never name as a source a
        slot already written: fill_holes (movers come from slots at or past the new row count)
        and an ascending filter (each row moves down) both order it so. Not a general permutation.
        """
        for slot, source in enumerate(keep):
            if source != slot:
                length = self.lengths[source]
                self.keys[:, slot, :, :length].copy_(self.keys[:, source, :, :length])
                self.values[:, slot, :, :length].copy_(self.values[:, source, :, :length])
        self.lengths = [self.lengths[source] for source in keep]
        if not self.lengths:
            self.release()

    def advance(self) -> None:
        """Every running row has one more position written (after a successful decode step)."""
        self.lengths = [length + 1 for length in self.lengths]

    def release(self) -> None:
        """No row runs any more: free the memory, unless `keep_storage` (then only the rows go)."""
        self.lengths = []
        if self.keep_storage:
            return
        self.keys = torch.empty(0, device=self.device, dtype=self.dtype)
        self.values = torch.empty(0, device=self.device, dtype=self.dtype)
        self.capacity = 0
        self.allocations += 1
