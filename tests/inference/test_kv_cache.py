"""The KV cache's slots on their own: growth keeps contents, rows join and leave, memory is freed.

Plain tensors with known values stand for keys and values (no model needed): each slot must hold
exactly what its row wrote, wherever the row moved.
"""

from __future__ import annotations

import pytest
import torch

from app.inference.kv_cache import CAPACITY_STEP, KVCache, StagedKV
from app.inference.scheduler import fill_holes

_LAYERS, _KV_HEADS, _HEAD_DIM = 2, 2, 4


def _cache(max_slots: int = 4, max_positions: int = 4096, keep_storage: bool = False) -> KVCache:
    return KVCache(
        layers=_LAYERS,
        max_slots=max_slots,
        kv_heads=_KV_HEADS,
        head_dim=_HEAD_DIM,
        max_positions=max_positions,
        device=torch.device("cpu"),
        dtype=torch.float32,
        keep_storage=keep_storage,
    )


def _staged(marks: list[float], width: int) -> StagedKV:
    """Rows filled with their mark (keys) and minus their mark (values), `width` positions each."""
    keys = torch.stack([torch.full((_LAYERS, _KV_HEADS, width, _HEAD_DIM), mark) for mark in marks], dim=1)
    return StagedKV(keys, -keys)


def _assert_slot_holds(cache: KVCache, slot: int, mark: float, length: int) -> None:
    assert cache.lengths[slot] == length
    assert torch.all(cache.keys[:, slot, :, :length] == mark)
    assert torch.all(cache.values[:, slot, :, :length] == -mark)


def test_rows_join_after_the_running_rows_with_their_own_lengths() -> None:
    cache = _cache()
    cache.add_rows(_staged([1.0, 2.0], width=5), [5, 3])
    cache.add_rows(_staged([3.0], width=7), [7])
    assert cache.rows == 3
    assert cache.capacity == CAPACITY_STEP
    for slot, (mark, length) in enumerate([(1.0, 5), (2.0, 3), (3.0, 7)]):
        _assert_slot_holds(cache, slot, mark, length)


def test_growing_keeps_every_slot_and_counts_a_new_allocation() -> None:
    cache = _cache()
    cache.add_rows(_staged([1.0, 2.0], width=4), [4, 2])
    before = cache.allocations
    cache.reserve(CAPACITY_STEP + 1)
    assert cache.capacity == 2 * CAPACITY_STEP
    assert cache.allocations == before + 1, "captured CUDA graphs must learn the tensors changed"
    _assert_slot_holds(cache, 0, 1.0, 4)
    _assert_slot_holds(cache, 1, 2.0, 2)
    # Room that is already there allocates nothing.
    cache.reserve(10)
    assert cache.allocations == before + 1


def test_capacity_never_passes_the_model_context() -> None:
    cache = _cache(max_positions=300)
    cache.reserve(290)
    assert cache.capacity == 2 * CAPACITY_STEP  # 300 rounded up to the step
    cache.reserve(100)
    assert cache.capacity == 2 * CAPACITY_STEP


def test_finished_rows_leave_and_the_last_rows_fill_their_slots() -> None:
    cache = _cache(max_slots=5)
    marks = [1.0, 2.0, 3.0, 4.0, 5.0]
    cache.add_rows(_staged(marks, width=6), [6, 5, 4, 3, 2])
    order = fill_holes([0, 3, 4])  # rows 1 and 2 finished
    cache.keep_rows(order)
    assert cache.rows == 3
    for slot, source in enumerate(order):
        _assert_slot_holds(cache, slot, marks[source], [6, 5, 4, 3, 2][source])


def test_advance_counts_one_more_position_for_every_row() -> None:
    cache = _cache()
    cache.add_rows(_staged([1.0, 2.0], width=3), [3, 1])
    cache.advance()
    assert cache.lengths == [4, 2]


@pytest.mark.parametrize("keep_storage", [False, True])
def test_an_empty_cache_frees_its_memory_unless_graphs_hold_it(keep_storage: bool) -> None:
    cache = _cache(keep_storage=keep_storage)
    cache.add_rows(_staged([1.0], width=3), [3])
    keys = cache.keys
    cache.keep_rows([])
    assert cache.rows == 0
    if keep_storage:
        assert cache.keys is keys and cache.capacity == CAPACITY_STEP
    else:
        assert cache.keys.numel() == 0 and cache.capacity == 0


def test_too_many_rows_are_refused_and_change_nothing() -> None:
    cache = _cache(max_slots=2)
    cache.add_rows(_staged([1.0], width=3), [3])
    with pytest.raises(RuntimeError, match="3 rows exceed the 2 slots"):
        cache.add_rows(_staged([2.0, 3.0], width=3), [3, 3])
    assert cache.lengths == [3]
