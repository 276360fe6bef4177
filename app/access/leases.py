"""The per-user concurrency limit across every instance, kept in PostgreSQL.

Each admitted generation holds one row of generation_leases, written by the instance run that
serves it and deleted when the generation ends. A row counts only while its run heartbeats
(instances.run_id, written every ZEUS_HEARTBEAT_INTERVAL_S by app/telemetry/heartbeat.py): an
instance killed mid-generation stops heartbeating, and after the stale timeout
(Settings.stale_after_s, 15 s by default) its leases no longer count; the next admission of that
user deletes them. A restarted instance has a new run id, so its old leases stop counting at once.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.orm import Session

from app.access.errors import AccessRefused
from app.access.limits import Limits
from app.models import GenerationLease, Instance

# pg_advisory_xact_lock(namespace, user id) serialises the count-then-insert of one user's
# admissions across instances; the namespace keeps it apart from other advisory locks.
LEASE_LOCK_NAMESPACE = 0x5A16


def live_runs(stale_after_s: float):
    """The run ids whose instance heartbeated within the stale timeout (a subquery)."""
    return select(Instance.run_id).where(
        Instance.last_heartbeat > func.now() - timedelta(seconds=stale_after_s)
    )


def live_lease_count(
    db: Session, stale_after_s: float, *, user_id: int | None = None, api_key_id: int | None = None
) -> int:
    """Generations of one user (or one key) admitted on a live instance, waiting ones included."""
    query = (
        select(func.count())
        .select_from(GenerationLease)
        .where(GenerationLease.run_id.in_(live_runs(stale_after_s)))
    )
    if api_key_id is not None:
        query = query.where(GenerationLease.api_key_id == api_key_id)
    else:
        query = query.where(GenerationLease.user_id == user_id)
    return int(db.scalar(query) or 0)


def acquire_lease(
    db: Session,
    *,
    run_id: str,
    user_id: int,
    api_key_id: int | None,
    limits: Limits,
    stale_after_s: float,
    held_here: tuple[int, ...],
    retry_after_s: int,
) -> int:
    """Inserts a lease and returns its id, or raises AccessRefused (429) naming the limit.

    Runs in the caller's transaction, which must commit right after (the advisory lock is held
    until then). held_here: the ids of the leases this run still holds; its other rows (a release
    whose delete failed) are removed once older than the stale timeout.
    """
    # Without the lock first: a user at the limit is refused without queueing on the lock (and
    # holding a pooled connection meanwhile) behind their own other attempts.
    _refuse_when_full(
        db,
        user_id=user_id,
        api_key_id=api_key_id,
        limits=limits,
        stale_after_s=stale_after_s,
        retry_after_s=retry_after_s,
    )
    db.execute(select(func.pg_advisory_xact_lock(LEASE_LOCK_NAMESPACE, user_id)))
    stale = timedelta(seconds=stale_after_s)
    db.execute(
        delete(GenerationLease).where(
            GenerationLease.user_id == user_id,
            or_(
                GenerationLease.run_id.not_in(live_runs(stale_after_s)),
                and_(
                    GenerationLease.run_id == run_id,
                    GenerationLease.id.not_in(held_here),
                    GenerationLease.acquired_at < func.now() - stale,
                ),
            ),
        )
    )
    _refuse_when_full(
        db,
        user_id=user_id,
        api_key_id=api_key_id,
        limits=limits,
        stale_after_s=stale_after_s,
        retry_after_s=retry_after_s,
    )
    lease = GenerationLease(user_id=user_id, api_key_id=api_key_id, run_id=run_id)
    db.add(lease)
    db.flush()
    return lease.id


def _refuse_when_full(
    db: Session,
    *,
    user_id: int,
    api_key_id: int | None,
    limits: Limits,
    stale_after_s: float,
    retry_after_s: int,
) -> None:
    active = live_lease_count(db, stale_after_s, user_id=user_id)
    if active >= limits.user_max_concurrent:
        raise AccessRefused(
            f"too many concurrent generations: you have {active} running or waiting across all "
            f"instances and your limit is {limits.user_max_concurrent} (ZEUS_MAX_CONCURRENT_PER_USER "
            "or an admin's setting for you); retry when one of them ends",
            retry_after_s=retry_after_s,
            reason="concurrency",
        )
    if api_key_id is not None and limits.key_max_concurrent is not None:
        active_key = live_lease_count(db, stale_after_s, api_key_id=api_key_id)
        if active_key >= limits.key_max_concurrent:
            raise AccessRefused(
                f"too many concurrent generations for this API key: {active_key} running or waiting, "
                f"the key's limit is {limits.key_max_concurrent} (set by an admin); retry when one ends",
                retry_after_s=retry_after_s,
                reason="concurrency",
                scope="key",
            )


def release_lease(db: Session, lease_id: int) -> None:
    db.execute(delete(GenerationLease).where(GenerationLease.id == lease_id))
