"""Dependencies of the routes: the database session, the caller, and the role and origin rules."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Request, Response
from sqlalchemy.orm import Session

from app.api.schemas import UserOut
from app.auth.accounts import user_for_api_key, user_for_session
from app.auth.tokens import sign_session_token, unsign_session_cookie
from app.config import Settings
from app.models import User
from app.state import ZeusState

SESSION_COOKIE = "zeus_session"
STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def get_state(request: Request) -> ZeusState:
    return request.app.state.zeus


StateDep = Annotated[ZeusState, Depends(get_state)]


def get_db(state: StateDep) -> Iterator[Session]:
    """One session per request; the route commits what it changes."""
    with state.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_db)]


@dataclass(frozen=True)
class Caller:
    user: User
    api_key_id: int | None = None
    session_token: str | None = None

    @property
    def via_cookie(self) -> bool:
        return self.session_token is not None


def client_address(request: Request) -> str:
    # uvicorn already replaced it with X-Forwarded-For when the peer is a trusted proxy.
    return request.client.host if request.client else "unknown"


def request_is_https(request: Request) -> bool:
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "").lower() == "https"


def set_session_cookie(response: Response, request: Request, settings: Settings, token: str) -> None:
    """The signed session cookie of a new login (password, OpenID Connect or LDAP)."""
    assert settings.secret_key is not None
    response.set_cookie(
        SESSION_COOKIE,
        sign_session_token(token, settings.secret_key.get_secret_value()),
        max_age=settings.session_ttl_s,
        httponly=True,
        samesite="strict",
        secure=settings.cookie_secure or request_is_https(request),
        path="/",
    )


@dataclass
class LoginOutcome:
    """What a sign-in attempt (password or LDAP) decided inside its transaction. `answer` turns it
    into the reply after the transaction committed: a refusal must still keep the throttle's record
    of the attempt, so it is raised only once the record is stored."""

    status: int
    message: str = ""
    user: UserOut | None = None
    token: str | None = None
    retry_after_s: int | None = None

    def answer(self, response: Response, request: Request, settings: Settings) -> UserOut:
        """The signed-in user with the session cookie set; else HTTPException(status, message),
        with Retry-After (seconds) when the attempt was throttled."""
        if self.status != 200 or self.user is None or self.token is None:
            headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s else None
            raise HTTPException(self.status, self.message, headers)
        set_session_cookie(response, request, settings, self.token)
        return self.user


def check_origin(request: Request) -> None:
    """Browsers send Origin on cross-site POSTs; a mismatch is a forged request (CSRF). Clients
    that send no Origin at all are not browsers and carry no ambient cookie risk."""
    origin = request.headers.get("origin")
    if origin is None:
        return
    host = request.headers.get("x-forwarded-host") or request.headers.get("host", "")
    # Ports are compared too when both sides name one; nginx may drop the port from Host.
    origin_host = urlsplit(origin).netloc.lower()
    expected = host.split(",")[0].strip().lower()
    if origin_host != expected and origin_host.split(":")[0] != expected:
        raise HTTPException(
            403, f"cross-origin request refused: Origin {origin} does not match host {expected}"
        )


def _caller(request: Request, state: ZeusState, db: Session) -> Caller | None:
    authorization = request.headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        found = user_for_api_key(db, credentials.strip())
        if found is None:
            raise HTTPException(401, "invalid, revoked or expired API key", {"WWW-Authenticate": "Bearer"})
        return Caller(user=found[0], api_key_id=found[1].id)
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie and state.settings.secret_key is not None:
        token = unsign_session_cookie(cookie, state.settings.secret_key.get_secret_value())
        if token is not None and (found_session := user_for_session(db, token)) is not None:
            return Caller(user=found_session[0], session_token=token)
    return None


def current_caller(request: Request, state: StateDep, db: SessionDep) -> Caller:
    caller = _caller(request, state, db)
    # Ends the read transaction so that routes start their own with `db.begin()`.
    db.commit()
    if caller is None:
        raise HTTPException(401, "not authenticated: log in or send Authorization: Bearer <API key>")
    if caller.via_cookie and request.method in STATE_CHANGING_METHODS:
        check_origin(request)
    return caller


def admin_caller(caller: Annotated[Caller, Depends(current_caller)]) -> Caller:
    if caller.user.role != "admin":
        raise HTTPException(403, "this needs the admin role")
    return caller


CallerDep = Annotated[Caller, Depends(current_caller)]
AdminDep = Annotated[Caller, Depends(admin_caller)]
