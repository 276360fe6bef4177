"""The scheduler's decisions with plain objects and a fake runner: no torch, no model, milliseconds."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from app.inference import scheduler as scheduler_module
from app.inference.scheduler import PrefillWork, Scheduler, fill_holes

SCHEDULER_PATH = Path(scheduler_module.__file__)


@dataclass(eq=False)
class FakeSequence:
    name: str
    prompt_ids: list[int]
    max_tokens: int = 3
    prefilled: int = 0
    solo: bool = False
    cancel_requested: bool = False
    output: list[int] = field(default_factory=list)


def sequence(name: str, prompt_tokens: int, max_tokens: int = 3) -> FakeSequence:
    return FakeSequence(name, list(range(prompt_tokens)), max_tokens)


class FakeRunner:
    """Records the passes the engine would run; tokens are the step number."""

    def __init__(self, fail_prefill_of: set[str] = frozenset()) -> None:
        self.passes: list[tuple[str, list[str], int]] = []
        self.fail_prefill_of = fail_prefill_of

    def prefill(self, work: PrefillWork[FakeSequence]) -> None:
        names = [s.name for s in work.sequences]
        if self.fail_prefill_of & set(names):
            raise RuntimeError("prefill failed")
        self.passes.append(("prefill", names, work.cost))
        for s in work.sequences:
            s.prefilled += work.chunk if work.chunk is not None else len(s.prompt_ids)

    def decode(self, rows: list[FakeSequence]) -> None:
        self.passes.append(("decode", [s.name for s in rows], len(rows)))


def iterate(scheduler: Scheduler[FakeSequence], runner: FakeRunner, failed: list[str]) -> None:
    """One engine iteration, as app/inference/engine.py drives it."""
    scheduler.admit()
    budget = scheduler.prefill_budget()
    joined: list[FakeSequence] = []
    while (work := scheduler.next_prefill(budget)) is not None:
        budget -= work.cost
        try:
            runner.prefill(work)
        except RuntimeError:
            if work.chunk is None and len(work.sequences) > 1:
                scheduler.retry_alone(work.sequences)
            else:
                scheduler.prefilling.remove(work.sequences[0]) if work.chunk else None
                failed.extend(s.name for s in work.sequences)
            continue
        if work.chunk is not None and not scheduler.chunk_done(work.sequences[0]):
            continue
        joined.extend(work.sequences)
    scheduler.join(joined)
    if scheduler.running:
        runner.decode(scheduler.running)
        for s in scheduler.running:
            s.output.append(len(runner.passes))
        keep = [row for row, s in enumerate(scheduler.running) if len(s.output) < s.max_tokens]
        if len(keep) < len(scheduler.running):
            scheduler.keep_running(keep)


def test_the_scheduler_module_does_not_import_torch() -> None:
    # Loaded by its path: the package's __init__ imports the engine (and torch) on purpose.
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('scheduler', {str(SCHEDULER_PATH)!r}); "
        "module = sys.modules['scheduler'] = importlib.util.module_from_spec(spec); "
        "spec.loader.exec_module(module); "
        "print(sorted(name for name in sys.modules if name == 'torch' or name.startswith('app')))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "[]"


def test_admission_stops_at_the_batch_size() -> None:
    scheduler: Scheduler[FakeSequence] = Scheduler(max_batch_size=2, prefill_chunk_tokens=64)
    scheduler.waiting.extend(sequence(name, 4) for name in "abc")
    scheduler.admit()
    assert [s.name for s in scheduler.prefilling] == ["a", "b"]
    assert [s.name for s in scheduler.waiting] == ["c"]


def test_short_prompts_share_a_padded_prefill_within_the_budget() -> None:
    scheduler: Scheduler[FakeSequence] = Scheduler(max_batch_size=8, prefill_chunk_tokens=10)
    scheduler.prefilling.extend([sequence("a", 4), sequence("b", 10), sequence("c", 10), sequence("d", 10)])
    # Nothing running: four chunks' worth. Padding counts: 3 prompts x 10 tokens fit, a fourth does not.
    first = scheduler.next_prefill(scheduler.prefill_budget())
    assert first is not None and [s.name for s in first.sequences] == ["a", "b", "c", "d"]
    assert first.cost == 40 and first.chunk is None
    scheduler.prefilling.extend([sequence("e", 9), sequence("f", 9)])
    assert [s.name for s in scheduler.next_prefill(17).sequences] == ["e"]  # 2 x 9 > 17


def test_a_long_prompt_goes_in_chunks_between_decode_steps() -> None:
    scheduler: Scheduler[FakeSequence] = Scheduler(max_batch_size=4, prefill_chunk_tokens=8)
    runner = FakeRunner()
    scheduler.waiting.append(sequence("short", 3, max_tokens=10))
    iterate(scheduler, runner, [])
    scheduler.waiting.append(sequence("long", 30))
    for _ in range(4):
        iterate(scheduler, runner, [])
    kinds = [(kind, names) for kind, names, _ in runner.passes]
    assert kinds[:2] == [("prefill", ["short"]), ("decode", ["short"])]
    # One 8-token chunk per iteration while "short" decodes, each followed by its decode step.
    assert kinds[2:9] == [
        ("prefill", ["long"]),
        ("decode", ["short"]),
        ("prefill", ["long"]),
        ("decode", ["short"]),
        ("prefill", ["long"]),
        ("decode", ["short"]),
        ("prefill", ["long"]),
    ]
    assert kinds[9] == ("decode", ["short", "long"])
    assert [cost for kind, _, cost in runner.passes if kind == "prefill"][1:] == [8, 8, 8, 6]


def test_a_failed_shared_prefill_is_retried_alone_and_only_its_culprit_fails() -> None:
    scheduler: Scheduler[FakeSequence] = Scheduler(max_batch_size=4, prefill_chunk_tokens=16)
    runner = FakeRunner(fail_prefill_of={"bad"})
    scheduler.waiting.extend([sequence("good", 5), sequence("bad", 6), sequence("fine", 7)])
    failed: list[str] = []
    iterate(scheduler, runner, failed)
    assert failed == ["bad"]
    assert [s.name for s in scheduler.running] == ["good", "fine"]
    assert ("prefill", ["good"], 5) in runner.passes and ("prefill", ["fine"], 7) in runner.passes


def test_finished_rows_are_filled_from_the_end() -> None:
    assert fill_holes([0, 2, 3, 5]) == [0, 5, 2, 3]
    assert fill_holes([1, 2]) == [2, 1]
    assert fill_holes([]) == []
    scheduler: Scheduler[FakeSequence] = Scheduler(max_batch_size=8, prefill_chunk_tokens=16)
    runner = FakeRunner()
    lengths = {"a": 2, "b": 5, "c": 2, "d": 5}
    scheduler.waiting.extend(sequence(name, 3, max_tokens=tokens) for name, tokens in lengths.items())
    iterate(scheduler, runner, [])
    iterate(scheduler, runner, [])
    assert [s.name for s in scheduler.running] == ["d", "b"]


def test_cancelled_sequences_leave_every_queue() -> None:
    scheduler: Scheduler[FakeSequence] = Scheduler(max_batch_size=2, prefill_chunk_tokens=16)
    runner = FakeRunner()
    scheduler.waiting.extend(sequence(name, 3, max_tokens=50) for name in "abcd")
    iterate(scheduler, runner, [])
    scheduler.running[0].cancel_requested = True
    scheduler.waiting[1].cancel_requested = True
    cancelled, keep = scheduler.take_cancelled()
    assert sorted(s.name for s in cancelled) == ["a", "d"]
    assert keep == [1]
    scheduler.keep_running(keep)
    scheduler.admit()
    assert [s.name for s in scheduler.running] == ["b"] and [s.name for s in scheduler.prefilling] == ["c"]
