"""The limits that apply to one caller: the user's (an admin's override, else the ZEUS_* default)
and, for a request made with an API key, the key's own on top."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import ApiKey, User


@dataclass(frozen=True)
class Limits:
    """Concurrent generations (count) and token budgets (prompt + completion tokens); None: none.

    user_*: across all of the user's requests (chat page and every key); key_*: only the requests
    made with this API key.
    """

    user_max_concurrent: int
    user_daily_tokens: int | None
    user_monthly_tokens: int | None
    key_max_concurrent: int | None = None
    key_daily_tokens: int | None = None
    key_monthly_tokens: int | None = None

    @property
    def has_budget(self) -> bool:
        return any(
            budget is not None
            for budget in (
                self.user_daily_tokens,
                self.user_monthly_tokens,
                self.key_daily_tokens,
                self.key_monthly_tokens,
            )
        )


def limits_for(db: Session, settings: Settings, user_id: int, api_key_id: int | None) -> Limits:
    """One query; a user or key deleted meanwhile falls back to the defaults (its request fails later)."""
    user = db.execute(
        select(User.max_concurrent, User.daily_token_budget, User.monthly_token_budget).where(
            User.id == user_id
        )
    ).first()
    key = None
    if api_key_id is not None:
        key = db.execute(
            select(ApiKey.max_concurrent, ApiKey.daily_token_budget, ApiKey.monthly_token_budget).where(
                ApiKey.id == api_key_id
            )
        ).first()

    def pick(override: int | None, default: int | None) -> int | None:
        return default if override is None else override

    return Limits(
        user_max_concurrent=pick(user.max_concurrent if user else None, settings.max_concurrent_per_user)
        or 1,
        user_daily_tokens=pick(user.daily_token_budget if user else None, settings.daily_token_budget),
        user_monthly_tokens=pick(user.monthly_token_budget if user else None, settings.monthly_token_budget),
        key_max_concurrent=key.max_concurrent if key else None,
        key_daily_tokens=key.daily_token_budget if key else None,
        key_monthly_tokens=key.monthly_token_budget if key else None,
    )
