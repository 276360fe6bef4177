"""Login, logout and the current user."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, Response
from sqlalchemy import delete, func

from app.api.deps import (
    SESSION_COOKIE,
    CallerDep,
    LoginOutcome,
    SessionDep,
    StateDep,
    check_origin,
    client_address,
)
from app.api.errors import COMMON_RESPONSES, ErrorBody
from app.api.routes.sso import refuse_password_login
from app.api.schemas import LoginBody, PasswordChange, UserOut
from app.auth import throttle
from app.auth.accounts import audit, end_session, find_user, rehash_if_needed, start_session
from app.auth.passwords import hash_password, password_problem, verify_password
from app.auth.tokens import sha256_hex, unsign_session_cookie
from app.models import User, WebSession

router = APIRouter(prefix="/api/auth", tags=["auth"], responses=COMMON_RESPONSES)


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
        outcome = LoginOutcome(status=401, message="wrong email or password")
        if (wait := throttle.retry_after_s(db, email=email, address=address, settings=settings)) is not None:
            outcome = LoginOutcome(
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
                outcome = LoginOutcome(status=403, message="this account is disabled: ask an admin")
                audit(db, action="login.refused_disabled", actor=user, address=address)
            else:
                rehash_if_needed(user, body.password)
                user.last_login_at = func.now()
                token = start_session(db, user=user, ttl_s=settings.session_ttl_s, address=address)
                audit(db, action="login", actor=user, address=address)
                outcome = LoginOutcome(status=200, user=UserOut.model_validate(user), token=token)
        throttle.prune_attempts(db, settings=settings)
    return outcome.answer(response, request, settings)


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


@router.post(
    "/password",
    status_code=204,
    response_class=Response,
    responses={
        400: {"model": ErrorBody, "description": "current password wrong, or the new one refused"},
        429: {"model": ErrorBody, "description": "too many wrong passwords; see Retry-After"},
    },
)
def change_password(
    body: PasswordChange, request: Request, caller: CallerDep, state: StateDep, db: SessionDep
) -> Response:
    """Changes the caller's own password; the current one is required. Every other session of the
    user ends (the one making the change stays signed in). Wrong current passwords count as
    failed logins, so this cannot be used to guess around the login throttle."""
    address = client_address(request)
    user_id = caller.user.id
    with db.begin():
        user = db.get_one(User, user_id)
        throttle.lock_account(db, user.email)
        wait = throttle.retry_after_s(db, email=user.email, address=address, settings=state.settings)
        if wait is not None:
            audit(db, action="password.throttled", actor=user, address=address)
            refusal = HTTPException(
                429, f"too many wrong passwords: try again in {wait} s", {"Retry-After": str(wait)}
            )
        elif not verify_password(user.password_hash, body.current_password):
            throttle.record_attempt(db, email=user.email, address=address, success=False)
            audit(db, action="password.change_failed", actor=user, address=address)
            refusal = HTTPException(400, "the current password is wrong")
        elif problem := password_problem(body.new_password):
            refusal = HTTPException(400, problem)
        else:
            refusal = None
            user.password_hash = hash_password(body.new_password)
            others = delete(WebSession).where(WebSession.user_id == user.id)
            if caller.session_token is not None:
                others = others.where(WebSession.token_hash != sha256_hex(caller.session_token))
            db.execute(others)
            audit(db, action="password.change", actor=user, address=address)
    # Raised after the commit: the failed attempt and its audit entry must be kept.
    if refusal is not None:
        raise refusal
    return Response(status_code=204)
