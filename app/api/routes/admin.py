"""Administration (admin role only): users, every API key, the instances, usage and the audit log."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response
from sqlalchemy import Date, cast, func, select, text

from app.access.summary import usage_summary
from app.api.deps import AdminDep, SessionDep, StateDep, client_address
from app.api.errors import COMMON_RESPONSES, ErrorBody
from app.api.routes.usage import usage_out
from app.api.schemas import (
    AdminKeyOut,
    AdminUserOut,
    AuditItem,
    AuditPage,
    HistoryPoint,
    InstanceOut,
    KeyLimitsUpdate,
    LimitsUpdate,
    PasswordOut,
    PasswordReset,
    SystemOut,
    SystemTotals,
    UsageOut,
    UsageRow,
    UserCreate,
    UserUpdate,
)
from app.auth.accounts import (
    AccountConflict,
    AccountError,
    audit,
    create_user,
    revoke_api_key,
    set_password,
    update_user,
)
from app.models import ApiKey, AuditEntry, Instance, Usage, User

router = APIRouter(prefix="/api/admin", tags=["admin"], responses=COMMON_RESPONSES)
NOT_FOUND = {404: {"model": ErrorBody, "description": "not found"}}
BAD_REQUEST = {400: {"model": ErrorBody, "description": "refused by the account rules"}}
HISTORY_WINDOW = timedelta(minutes=15)
HISTORY_BUCKET_S = 15


@router.get("/users", response_model=list[AdminUserOut])
def list_users(caller: AdminDep, db: SessionDep) -> list[User]:
    return list(db.scalars(select(User).order_by(User.id)))


@router.post(
    "/users",
    response_model=AdminUserOut,
    status_code=201,
    responses={**BAD_REQUEST, 409: {"model": ErrorBody, "description": "email taken"}},
)
def add_user(body: UserCreate, caller: AdminDep, db: SessionDep, request: Request) -> User:
    with db.begin():
        try:
            user = create_user(
                db,
                email=body.email,
                password=body.password,
                role=body.role,
                actor=caller.user,
                address=client_address(request),
            )
        except AccountConflict as error:
            raise HTTPException(409, str(error)) from None
        except AccountError as error:
            raise HTTPException(400, str(error)) from None
        db.flush()
        db.refresh(user)
    return user


def _user(db: SessionDep, user_id: int) -> User:
    user = db.get(User, user_id)
    if user is None:
        raise HTTPException(404, f"user {user_id} not found")
    return user


@router.patch("/users/{user_id}", response_model=AdminUserOut, responses={**NOT_FOUND, **BAD_REQUEST})
def change_user(user_id: int, body: UserUpdate, caller: AdminDep, db: SessionDep, request: Request) -> User:
    with db.begin():
        user = _user(db, user_id)
        try:
            update_user(
                db,
                user=user,
                actor=caller.user,
                role=body.role,
                disabled=body.disabled,
                address=client_address(request),
            )
        except AccountError as error:
            raise HTTPException(400, str(error)) from None
    return user


@router.post(
    "/users/{user_id}/reset-password", response_model=PasswordOut, responses={**NOT_FOUND, **BAD_REQUEST}
)
def reset_password(
    user_id: int, caller: AdminDep, db: SessionDep, request: Request, body: PasswordReset | None = None
) -> PasswordOut:
    with db.begin():
        user = _user(db, user_id)
        try:
            password = set_password(
                db,
                user=user,
                password=body.password if body else None,
                actor=caller.user,
                address=client_address(request),
            )
        except AccountError as error:
            raise HTTPException(400, str(error)) from None
    return PasswordOut(password=password)


@router.get("/api-keys", response_model=list[AdminKeyOut])
def list_api_keys(caller: AdminDep, db: SessionDep) -> list[AdminKeyOut]:
    rows = db.execute(
        select(ApiKey, User.email).join(User, User.id == ApiKey.user_id).order_by(ApiKey.id.desc())
    )
    return [
        AdminKeyOut(
            id=key.id,
            user_id=key.user_id,
            email=email,
            name=key.name,
            prefix=key.prefix,
            created_at=key.created_at,
            revoked_at=key.revoked_at,
            last_used_at=key.last_used_at,
            expires_at=key.expires_at,
            max_concurrent=key.max_concurrent,
            daily_token_budget=key.daily_token_budget,
            monthly_token_budget=key.monthly_token_budget,
        )
        for key, email in rows
    ]


@router.delete("/api-keys/{key_id}", status_code=204, response_class=Response, responses=NOT_FOUND)
def revoke_key(key_id: int, caller: AdminDep, db: SessionDep, request: Request) -> Response:
    with db.begin():
        key = db.get(ApiKey, key_id)
        if key is None:
            raise HTTPException(404, f"API key {key_id} not found")
        revoke_api_key(db, key=key, actor=caller.user, address=client_address(request))
    return Response(status_code=204)


# ----- fair share and quotas (app/access) -----


def _apply_limits(target: User | ApiKey, body: LimitsUpdate) -> str:
    """Sets the fields the body names (null clears one); returns `name=value` text for the audit log."""
    changes = []
    for name in sorted(body.model_fields_set):
        value = getattr(body, name)
        setattr(target, name, value)
        changes.append(f"{name}={'default' if value is None and name != 'expires_at' else value}")
    return ", ".join(changes) or "nothing"


@router.patch("/users/{user_id}/limits", response_model=AdminUserOut, responses=NOT_FOUND)
def change_user_limits(
    user_id: int, body: LimitsUpdate, caller: AdminDep, db: SessionDep, state: StateDep, request: Request
) -> User:
    """A user's concurrency limit and daily/monthly token budgets; null: the ZEUS_* default."""
    with db.begin():
        user = _user(db, user_id)
        detail = _apply_limits(user, body)
        # This instance stops repeating its remembered refusals at once; others within seconds.
        state.access.forget_refusals(user.id, None)
        audit(
            db,
            action="user.limits",
            actor=caller.user,
            target=user.email,
            address=client_address(request),
            detail=detail,
        )
    return user


@router.get("/users/{user_id}/usage", response_model=UsageOut, responses=NOT_FOUND)
def user_usage(user_id: int, caller: AdminDep, db: SessionDep, state: StateDep) -> UsageOut:
    """What the user sees on their chat page: tokens today and this month, generations running."""
    _user(db, user_id)
    return usage_out(usage_summary(db, state.settings, user_id=user_id))


@router.patch("/api-keys/{key_id}", response_model=AdminKeyOut, responses={**NOT_FOUND, **BAD_REQUEST})
def change_api_key(
    key_id: int, body: KeyLimitsUpdate, caller: AdminDep, db: SessionDep, state: StateDep, request: Request
) -> AdminKeyOut:
    """One key's own limits (applied on top of its owner's) and expiry date (null: never)."""
    with db.begin():
        key = db.get(ApiKey, key_id)
        if key is None:
            raise HTTPException(404, f"API key {key_id} not found")
        owner = _user(db, key.user_id)
        detail = _apply_limits(key, body)
        state.access.forget_refusals(owner.id, key.id)
        audit(
            db,
            action="api_key.limits",
            actor=caller.user,
            target=f"{owner.email} key {key.id} ({key.name})",
            address=client_address(request),
            detail=detail,
        )
        db.flush()
        db.refresh(key)
        return AdminKeyOut(
            id=key.id,
            user_id=key.user_id,
            email=owner.email,
            name=key.name,
            prefix=key.prefix,
            created_at=key.created_at,
            revoked_at=key.revoked_at,
            last_used_at=key.last_used_at,
            expires_at=key.expires_at,
            max_concurrent=key.max_concurrent,
            daily_token_budget=key.daily_token_budget,
            monthly_token_budget=key.monthly_token_budget,
        )


@router.get("/system", response_model=SystemOut)
def system(caller: AdminDep, db: SessionDep, state: StateDep) -> SystemOut:
    stale_after = timedelta(seconds=state.settings.stale_after_s)
    rows = db.execute(
        select(Instance, (Instance.last_heartbeat > func.now() - stale_after).label("up")).order_by(
            Instance.name
        )
    ).all()
    instances = [
        InstanceOut(
            host=row.host,
            port=row.port,
            instance=row.name,
            pid=row.pid,
            model=row.model,
            device=row.device,
            state="up" if up else "down",
            started_at=row.started_at,
            last_heartbeat=row.last_heartbeat,
            cpu_percent=row.cpu_percent,
            rss_bytes=row.rss_bytes,
            gpu_memory_bytes=row.gpu_memory_bytes,
            in_flight=row.in_flight,
            queue=row.queue_running + row.queue_waiting,
            requests_per_s=row.requests_per_s,
            tokens_per_s=row.tokens_per_s,
            engine=row.engine,
        )
        for row, up in rows
    ]
    up = [instance for instance in instances if instance.state == "up"]
    totals = SystemTotals(
        instances_up=len(up),
        instances_down=len(instances) - len(up),
        active_connections=sum(instance.in_flight for instance in up),
        queue=sum(instance.queue for instance in up),
        requests_per_s=round(sum(instance.requests_per_s for instance in up), 3),
        tokens_per_s=round(sum(instance.tokens_per_s for instance in up), 3),
        cpu_percent=round(sum(instance.cpu_percent for instance in up), 1),
        rss_bytes=sum(instance.rss_bytes for instance in up),
        gpu_memory_bytes=sum(instance.gpu_memory_bytes or 0 for instance in up),
    )
    # Averaged per instance within each bucket first, then summed across instances, so that an
    # instance with a shorter heartbeat interval does not count twice.
    history = db.execute(
        text(
            """
            SELECT bucket AS ts, sum(requests_per_s) AS requests_per_s, sum(tokens_per_s) AS tokens_per_s
            FROM (
                SELECT to_timestamp(floor(extract(epoch FROM ts) / :bucket) * :bucket) AS bucket,
                       instance_name, avg(requests_per_s) AS requests_per_s, avg(tokens_per_s) AS tokens_per_s
                FROM instance_samples WHERE ts > now() - :window
                GROUP BY 1, 2
            ) per_instance
            GROUP BY bucket ORDER BY bucket
            """
        ),
        {"bucket": HISTORY_BUCKET_S, "window": HISTORY_WINDOW},
    ).all()
    return SystemOut(
        instances=instances,
        totals=totals,
        history=[
            HistoryPoint(
                ts=point.ts,
                requests_per_s=round(point.requests_per_s, 3),
                tokens_per_s=round(point.tokens_per_s, 3),
            )
            for point in history
        ],
    )


@router.get("/usage", response_model=list[UsageRow])
def usage(caller: AdminDep, db: SessionDep, days: Annotated[int, Query(ge=1, le=366)] = 30) -> list[UsageRow]:
    day = cast(func.timezone("UTC", Usage.ts), Date).label("day")
    rows = db.execute(
        select(
            day,
            Usage.user_id,
            User.email,
            func.count().label("requests"),
            func.coalesce(func.sum(Usage.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(Usage.completion_tokens), 0).label("completion_tokens"),
        )
        .join(User, User.id == Usage.user_id)
        .where(Usage.ts > func.now() - timedelta(days=days))
        .group_by(day, Usage.user_id, User.email)
        .order_by(day.desc(), User.email)
    ).all()
    return [
        UsageRow(
            day=row.day,
            user_id=row.user_id,
            email=row.email,
            requests=row.requests,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
        )
        for row in rows
    ]


@router.get("/audit", response_model=AuditPage)
def audit_log(
    caller: AdminDep,
    db: SessionDep,
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    page_size: Annotated[int, Query(ge=1, le=500)] = 50,
) -> AuditPage:
    total = db.scalar(select(func.count()).select_from(AuditEntry)) or 0
    entries = db.scalars(
        select(AuditEntry).order_by(AuditEntry.id.desc()).offset((page - 1) * page_size).limit(page_size)
    )
    return AuditPage(
        items=[
            AuditItem(
                id=entry.id,
                ts=entry.ts,
                actor_email=entry.actor_email,
                action=entry.action,
                target=entry.target,
                address=entry.address,
                detail=entry.detail,
            )
            for entry in entries
        ],
        total=total,
        page=page,
        page_size=page_size,
    )
