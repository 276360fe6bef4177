"""Token budgets per UTC day and UTC month, counted from the usage rows (app.models.Usage).

A generation is admitted while every budget that applies has tokens left; its own tokens are
counted when it ends (its usage row), so one that starts just under a budget may end over it:
the concurrency limit bounds by how much.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.access.errors import AccessRefused
from app.access.limits import Limits
from app.models import Usage

Period = Literal["day", "month"]
PERIOD_WORDS = {"day": ("daily", "today (UTC)"), "month": ("monthly", "this month (UTC)")}


def period_start(now: datetime, period: Period) -> datetime:
    """The start of the UTC day or month that contains `now` (an aware datetime)."""
    now = now.astimezone(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return day if period == "day" else day.replace(day=1)


def period_reset(now: datetime, period: Period) -> datetime:
    """When the budget of the period containing `now` starts afresh: the next UTC midnight or
    the first of the next month, 00:00 UTC."""
    start = period_start(now, period)
    if period == "day":
        return start + timedelta(days=1)
    return (start + timedelta(days=32)).replace(day=1)


@dataclass(frozen=True)
class BudgetUse:
    """Tokens used in one period against one budget (None: unlimited)."""

    scope: Literal["user", "key"]
    period: Period
    used: int
    budget: int | None
    resets_at: datetime

    @property
    def exhausted(self) -> bool:
        return self.budget is not None and self.used >= self.budget


def used_tokens(
    db: Session, *, since: datetime, user_id: int | None = None, api_key_id: int | None = None
) -> int:
    """Prompt plus completion tokens of the usage rows since `since`, of one user or one key."""
    query = select(func.coalesce(func.sum(Usage.prompt_tokens + Usage.completion_tokens), 0)).where(
        Usage.ts >= since
    )
    if api_key_id is not None:
        query = query.where(Usage.api_key_id == api_key_id)
    else:
        query = query.where(Usage.user_id == user_id)
    return int(db.scalar(query) or 0)


def budget_uses(
    db: Session,
    limits: Limits,
    *,
    user_id: int,
    api_key_id: int | None,
    now: datetime | None = None,
    include_unlimited: bool = False,
) -> list[BudgetUse]:
    """The user's day and month (and the key's, when it has budgets). Unlimited periods are
    summed only when `include_unlimited` (the usage display shows them; admission skips them)."""
    now = now or datetime.now(UTC)
    wanted: list[tuple[Literal["user", "key"], Period, int | None]] = [
        ("user", "day", limits.user_daily_tokens),
        ("user", "month", limits.user_monthly_tokens),
    ]
    if api_key_id is not None:
        wanted += [("key", "day", limits.key_daily_tokens), ("key", "month", limits.key_monthly_tokens)]
    uses = []
    for scope, period, budget in wanted:
        if budget is None and not (include_unlimited and scope == "user"):
            continue
        since = period_start(now, period)
        used = used_tokens(
            db,
            since=since,
            user_id=user_id if scope == "user" else None,
            api_key_id=api_key_id if scope == "key" else None,
        )
        uses.append(BudgetUse(scope, period, used, budget, period_reset(now, period)))
    return uses


def check_budgets(
    db: Session, limits: Limits, *, user_id: int, api_key_id: int | None, now: datetime | None = None
) -> None:
    """Raises AccessRefused (429, Retry-After: seconds until the reset) when a budget is used up.
    When several are, the one that resets last is named: retrying earlier would not help."""
    if not limits.has_budget:
        return
    now = now or datetime.now(UTC)
    exhausted = [
        use
        for use in budget_uses(db, limits, user_id=user_id, api_key_id=api_key_id, now=now)
        if use.exhausted
    ]
    if not exhausted:
        return
    use = max(exhausted, key=lambda item: item.resets_at)
    adjective, when = PERIOD_WORDS[use.period]
    owner = "your" if use.scope == "user" else "this API key's"
    resets = use.resets_at.strftime("%Y-%m-%d %H:%M UTC")
    raise AccessRefused(
        f"{owner} {adjective} token budget is used up: {use.used} of {use.budget} tokens used {when}; "
        f"it resets at {resets}",
        retry_after_s=int((use.resets_at - now).total_seconds()) + 1,
        reason="quota",
        scope=use.scope,
    )
