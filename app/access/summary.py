"""What one user (or one API key) has used against their limits: the chat page's meter, the
admin page and GET /api/auth/me/usage read it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from app.access.leases import live_lease_count
from app.access.limits import limits_for
from app.access.quota import BudgetUse, budget_uses
from app.config import Settings


@dataclass(frozen=True)
class UsageSummary:
    active: int  # generations running or waiting across all instances
    max_concurrent: int
    budgets: list[BudgetUse]  # the user's day and month (limited or not), then the key's limited ones


def usage_summary(
    db: Session,
    settings: Settings,
    *,
    user_id: int,
    api_key_id: int | None = None,
    now: datetime | None = None,
) -> UsageSummary:
    limits = limits_for(db, settings, user_id, api_key_id)
    return UsageSummary(
        active=live_lease_count(db, settings.stale_after_s, user_id=user_id),
        max_concurrent=limits.user_max_concurrent,
        budgets=budget_uses(
            db, limits, user_id=user_id, api_key_id=api_key_id, now=now, include_unlimited=True
        ),
    )
