"""Login throttle: a rolling window of failed attempts per account and per client address, kept in
PostgreSQL so that every instance sees the same counts.

Times come from the database clock only, so instances whose clocks drift still agree.
"""

from __future__ import annotations

import math
from datetime import timedelta

from sqlalchemy import ColumnElement, extract, func, select, text
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import LoginAttempt


def lock_account(db: Session, email: str) -> None:
    """Serialises logins of one account across instances until the transaction ends, so that
    concurrent guesses cannot slip past the limit between the count and the insert."""
    db.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": "zeus-login:" + email})


def _retry_after(
    db: Session, condition: ColumnElement[bool], since: ColumnElement, limit: int, window: timedelta
) -> int | None:
    failures = (
        select(LoginAttempt.ts)
        .where(condition, LoginAttempt.success.is_(False), LoginAttempt.ts > since)
        .order_by(LoginAttempt.ts.desc())
        .limit(limit)
        .subquery()
    )
    count, wait_s = db.execute(
        select(func.count(), extract("epoch", func.min(failures.c.ts) + window - func.now())).select_from(
            failures
        )
    ).one()
    if count < limit:
        return None
    # The window rolls: one more try is allowed once the oldest of the counted failures ages out.
    return max(1, math.ceil(float(wait_s)))


def retry_after_s(db: Session, *, email: str, address: str, settings: Settings) -> int | None:
    """Seconds until this account (or address) may try again, or None when it may now."""
    window = timedelta(seconds=settings.login_window_s)
    window_start = func.now() - window
    last_success = (
        select(func.max(LoginAttempt.ts))
        .where(LoginAttempt.email == email, LoginAttempt.success.is_(True))
        .scalar_subquery()
    )
    # A successful login clears the account's count; the address count keeps rolling.
    account_since = func.greatest(window_start, func.coalesce(last_success, window_start))
    waits = [
        _retry_after(
            db, LoginAttempt.email == email, account_since, settings.login_max_failures_per_account, window
        ),
        _retry_after(
            db, LoginAttempt.address == address, window_start, settings.login_max_failures_per_address, window
        ),
    ]
    found = [wait for wait in waits if wait is not None]
    return max(found) if found else None


def record_attempt(db: Session, *, email: str, address: str, success: bool) -> None:
    db.add(LoginAttempt(email=email, address=address, success=success))


def prune_attempts(db: Session, *, settings: Settings) -> None:
    cutoff = func.now() - timedelta(seconds=2 * settings.login_window_s)
    db.execute(LoginAttempt.__table__.delete().where(LoginAttempt.ts < cutoff))
