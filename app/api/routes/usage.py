"""The caller's own use against their limits (fair share and quotas, app/access)."""

from __future__ import annotations

from fastapi import APIRouter

from app.access.summary import UsageSummary, usage_summary
from app.api.deps import CallerDep, SessionDep, StateDep
from app.api.errors import COMMON_RESPONSES
from app.api.schemas import BudgetOut, ConcurrencyOut, UsageOut

router = APIRouter(prefix="/api/auth", tags=["auth"], responses=COMMON_RESPONSES)


def usage_out(summary: UsageSummary) -> UsageOut:
    return UsageOut(
        concurrency=ConcurrencyOut(active=summary.active, limit=summary.max_concurrent),
        budgets=[
            BudgetOut(
                scope=use.scope, period=use.period, used=use.used, budget=use.budget, resets_at=use.resets_at
            )
            for use in summary.budgets
        ],
    )


@router.get("/me/usage", response_model=UsageOut)
def my_usage(caller: CallerDep, db: SessionDep, state: StateDep) -> UsageOut:
    """Tokens used today and this month (UTC) against the caller's budgets, and generations now
    running against the concurrency limit; with an API key, that key's own budgets too."""
    return usage_out(usage_summary(db, state.settings, user_id=caller.user.id, api_key_id=caller.api_key_id))
