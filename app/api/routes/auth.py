"""Login, logout and the current user."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, HTTPException, Request, Response
from sqlalchemy import func

from app.api.deps import (
    SESSION_COOKIE,
    CallerDep,
    SessionDep,
    StateDep,
    check_origin,
    client_address,
    set_session_cookie,
)
from app.api.errors import COMMON_RESPONSES, ErrorBody
from app.api.routes.sso import refuse_password_login
from app.api.schemas import LoginBody, UserOut
from app.auth import throttle
from app.auth.accounts import audit, end_session, find_user, rehash_if_needed, start_session
from app.auth.passwords import verify_password
from app.auth.tokens import unsign_session_cookie
from app.models import User

router = APIRouter(prefix="/api/auth", tags=["auth"], responses=COMMON_RESPONSES)


@dataclass
class _LoginOutcome:
    status: int
    message: str = ""
    user: UserOut | None = None
    token: str | None = None
    retry_after_s: int | None = None


@router.post(
    "/login",
    response_model=UserOut,
    responses={
        403: {"model": ErrorBody, "description": "disabled account, or password login turned off"},
        429: {"model": ErrorBody, "description": "too many failed logins; see Retry-After"},
    },
)
def login(body: LoginBody, request: Request, response: Response, state: StateDep, db: SessionDep) -> UserOut:
    check_origin(request)
    email = body.email.strip().lower()
    address = client_address(request)
    settings = state.settings
    if not settings.password_login:
        refuse_password_login(db, settings, email=email, address=address)
    with db.begin():
        throttle.lock_account(db, email)
        outcome = _LoginOutcome(status=401, message="wrong email or password")
        if (wait := throttle.retry_after_s(db, email=email, address=address, settings=settings)) is not None:
            outcome = _LoginOutcome(
                status=429, retry_after_s=wait, message=f"too many failed logins: try again in {wait} s"
            )
            audit(db, action="login.throttled", actor_email=email, address=address)
        else:
            user = find_user(db, email)
            valid = verify_password(user.password_hash if user else None, body.password)
            throttle.record_attempt(db, email=email, address=address, success=valid)
            if not valid or user is None:
                audit(db, action="login.failed", actor_email=email, address=address)
            elif user.disabled:
                outcome = _LoginOutcome(status=403, message="this account is disabled: ask an admin")
                audit(db, action="login.refused_disabled", actor=user, address=address)
            else:
                rehash_if_needed(user, body.password)
                user.last_login_at = func.now()
                token = start_session(db, user=user, ttl_s=settings.session_ttl_s, address=address)
                audit(db, action="login", actor=user, address=address)
                outcome = _LoginOutcome(status=200, user=UserOut.model_validate(user), token=token)
        throttle.prune_attempts(db, settings=settings)
    if outcome.status != 200 or outcome.user is None or outcome.token is None:
        headers = {"Retry-After": str(outcome.retry_after_s)} if outcome.retry_after_s else None
        raise HTTPException(outcome.status, outcome.message, headers)
    set_session_cookie(response, request, settings, outcome.token)
    return outcome.user


@router.post("/logout", status_code=204, response_class=Response)
def logout(request: Request, state: StateDep, db: SessionDep) -> Response:
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie and state.settings.secret_key is not None:
        check_origin(request)
        token = unsign_session_cookie(cookie, state.settings.secret_key.get_secret_value())
        if token is not None:
            with db.begin():
                ended = end_session(db, token=token)
                if ended is not None:
                    audit(
                        db,
                        action="logout",
                        actor=db.get_one(User, ended.user_id),
                        address=client_address(request),
                    )
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


@router.get("/me", response_model=UserOut)
def me(caller: CallerDep) -> UserOut:
    return UserOut.model_validate(caller.user)
