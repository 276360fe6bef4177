"""The fair gate's order and bookkeeping, and the budget periods' boundaries (no database: the
gate is pure asyncio and the periods are date arithmetic; tests/api/test_access.py runs both in
real instances on PostgreSQL)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone

import pytest

from app.access.errors import AccessRefused
from app.access.fair import FairGate
from app.access.quota import period_reset, period_start

HEAVY, LIGHT, THIRD = 1, 2, 3


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_single_request_goes_before_another_users_backlog() -> None:
    gate = FairGate(capacity=1, max_waiting=100)
    order: list[str] = []
    await gate.enter(HEAVY)  # HEAVY runs

    async def wait(user: int, label: str) -> None:
        await gate.enter(user)
        order.append(label)

    tasks = [asyncio.create_task(wait(HEAVY, f"heavy-{n}")) for n in range(50)]
    await settle()
    tasks.append(asyncio.create_task(wait(LIGHT, "light")))
    await settle()
    assert gate.waiting == 51 and gate.waiting_users() == {HEAVY: 50, LIGHT: 1}
    gate.leave(HEAVY)
    await settle()
    assert order == ["light"]
    gate.leave(LIGHT)
    await settle()
    assert order == ["light", "heavy-0"]  # each user's own requests keep their order
    for _ in range(49):
        gate.leave(HEAVY)
        await settle()
    await asyncio.gather(*tasks)
    assert order[2:] == [f"heavy-{n}" for n in range(1, 50)]
    gate.leave(HEAVY)
    assert gate.admitted == 0 and gate.waiting == 0


async def test_slots_alternate_between_waiting_users() -> None:
    gate = FairGate(capacity=2, max_waiting=100)
    await gate.enter(THIRD)
    await gate.enter(THIRD)
    order: list[int] = []

    async def wait(user: int) -> None:
        await gate.enter(user)
        order.append(user)

    tasks = [asyncio.create_task(wait(HEAVY)) for _ in range(3)]
    await settle()
    tasks += [asyncio.create_task(wait(LIGHT)) for _ in range(3)]
    await settle()
    for _ in range(6):
        gate.leave(order[-1] if order else THIRD)
        await settle()
    await asyncio.gather(*tasks)
    assert order == [HEAVY, LIGHT, HEAVY, LIGHT, HEAVY, LIGHT]


async def test_a_full_waiting_line_refuses_and_an_abandoned_wait_is_forgotten() -> None:
    gate = FairGate(capacity=1, max_waiting=1)
    await gate.enter(HEAVY)
    waiting = asyncio.create_task(gate.enter(LIGHT))
    await settle()
    with pytest.raises(AccessRefused) as refused:
        await gate.enter(THIRD)
    assert refused.value.status_code == 429 and "ZEUS_MAX_QUEUE" in refused.value.detail
    assert refused.value.headers == {"Retry-After": "1"}
    waiting.cancel()  # the client left while waiting
    await settle()
    assert gate.waiting == 0
    gate.leave(HEAVY)
    assert gate.admitted == 0
    await gate.enter(THIRD)  # nothing was handed to the abandoned request
    assert gate.admitted_by_user == {THIRD: 1}


@pytest.mark.parametrize(
    ("now", "day_reset", "month_reset"),
    [
        (
            datetime(2026, 11, 29, 22, 40, tzinfo=UTC),
            datetime(2026, 11, 30, tzinfo=UTC),
            datetime(2026, 12, 1, tzinfo=UTC),
        ),
        (
            datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC),
            datetime(2027, 1, 1, tzinfo=UTC),
            datetime(2027, 1, 1, tzinfo=UTC),
        ),
        (
            datetime(2028, 2, 28, 12, 0, tzinfo=UTC),
            datetime(2028, 2, 29, tzinfo=UTC),
            datetime(2028, 3, 1, tzinfo=UTC),
        ),
        (
            datetime(2027, 1, 31, 0, 0, tzinfo=UTC),
            datetime(2027, 2, 1, tzinfo=UTC),
            datetime(2027, 2, 1, tzinfo=UTC),
        ),
        # 01:30 at UTC+2 is 23:30 UTC of the day before: periods are UTC ones.
        (
            datetime(2027, 3, 1, 1, 30, tzinfo=timezone(timedelta(hours=2))),
            datetime(2027, 3, 1, tzinfo=UTC),
            datetime(2027, 3, 1, tzinfo=UTC),
        ),
    ],
)
def test_budget_periods_reset_at_utc_midnight_and_the_first_of_the_month(
    now: datetime, day_reset: datetime, month_reset: datetime
) -> None:
    assert period_reset(now, "day") == day_reset
    assert period_reset(now, "month") == month_reset
    assert period_start(now, "day") == day_reset - timedelta(days=1)
    assert period_start(now, "month").day == 1 and period_start(now, "month") <= now < month_reset
