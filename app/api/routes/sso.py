"""Single sign-on: which sign-in methods this server offers, OpenID Connect (redirect to the
provider and its callback) and LDAP bind login. Every login and refusal is written to the audit
log (actions login.oidc, login.oidc_refused, login.ldap, login.ldap_failed, login.ldap_refused,
login.ldap_error, login.ldap_throttled, login.password_off)."""

from __future__ import annotations

import logging
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from app.api.deps import (
    LoginOutcome,
    SessionDep,
    StateDep,
    check_origin,
    client_address,
    request_is_https,
    set_session_cookie,
)
from app.api.errors import COMMON_RESPONSES, ErrorBody
from app.api.schemas import Strict, Text, UserOut
from app.auth import ldap, oidc, throttle
from app.auth.accounts import audit, start_session
from app.auth.external import sign_in_external
from app.config import Settings

log = logging.getLogger("zeus.sso")

router = APIRouter(prefix="/api/auth", tags=["sso"], responses=COMMON_RESPONSES)

# Binds the provider's callback to the browser that started the sign-in. SameSite=Lax, not Strict:
# the callback is a top-level navigation coming from the provider's site, and a Strict cookie
# would not be sent with it.
SSO_COOKIE = "zeus_sso"
CALLBACK_PATH = "/api/auth/oidc/callback"
NOT_FOUND = {404: {"model": ErrorBody, "description": "this sign-in method is not configured"}}


class OidcProviderOut(BaseModel):
    name: str = Field(description='shown as "Sign in with NAME"')
    login_url: str


class ProvidersOut(BaseModel):
    password: bool = Field(description="POST /api/auth/login accepts local passwords")
    ldap: bool = Field(description="POST /api/auth/ldap/login accepts directory passwords")
    oidc: OidcProviderOut | None


class LdapLoginBody(Strict):
    username: Text = Field(min_length=1, max_length=ldap.MAX_USERNAME_LENGTH)
    password: Text = Field(min_length=1, max_length=1024)


@router.get("/providers", response_model=ProvidersOut)
def providers(state: StateDep) -> ProvidersOut:
    """The sign-in methods of this server, for the sign-in page."""
    settings = state.settings
    return ProvidersOut(
        password=settings.password_login,
        ldap=settings.ldap_enabled,
        oidc=OidcProviderOut(name=settings.oidc_display_name, login_url="/api/auth/oidc/login")
        if settings.oidc_enabled
        else None,
    )


def refuse_password_login(db: Session, settings: Settings, *, email: str, address: str) -> None:
    """Raises the 403 of POST /api/auth/login while ZEUS_PASSWORD_LOGIN=false (and audits it)."""
    instead = [
        f"Sign in with {settings.oidc_display_name}" if settings.oidc_enabled else "",
        "the directory sign-in (POST /api/auth/ldap/login)" if settings.ldap_enabled else "",
    ]
    with db.begin():
        audit(db, action="login.password_off", actor_email=email, address=address)
    raise HTTPException(
        403,
        "password sign-in is turned off on this server (ZEUS_PASSWORD_LOGIN=false): use "
        + " or ".join(item for item in instead if item),
    )


def _redirect_uri(request: Request, settings: Settings) -> str:
    if settings.oidc_redirect_uri:
        return settings.oidc_redirect_uri
    scheme = "https" if request_is_https(request) else request.url.scheme
    host = (
        request.headers.get("x-forwarded-host") or request.headers.get("host") or request.url.netloc
    ).split(",")[0]
    return f"{scheme}://{host.strip()}{CALLBACK_PATH}"


def _back_to_page(next_path: str, message: str) -> RedirectResponse:
    """Back to the sign-in page (of the chat page or the admin page), which shows `message`."""
    page = next_path.split("?", 1)[0].split("#", 1)[0] or "/"
    response = RedirectResponse(f"{page}?sso_error={quote(message)}", status_code=303)
    response.delete_cookie(SSO_COOKIE, path="/api/auth/oidc")
    return response


def _oidc_settings(state: StateDep) -> Settings:
    if not state.settings.oidc_enabled:
        raise HTTPException(404, "OpenID Connect sign-in is not configured on this server (ZEUS_OIDC_ISSUER)")
    return state.settings


@router.get(
    "/oidc/login",
    response_class=RedirectResponse,
    status_code=302,
    responses={
        302: {"description": "to the provider's sign-in page"},
        303: {"description": "back to the sign-in page with ?sso_error=MESSAGE (provider unreachable)"},
        **NOT_FOUND,
    },
)
def oidc_login(
    request: Request,
    state: StateDep,
    db: SessionDep,
    next: str | None = Query(default=None, max_length=512, description="a path of this site to return to"),
) -> RedirectResponse:
    """Starts an OpenID Connect sign-in (authorization code with PKCE) and redirects to the provider."""
    settings = _oidc_settings(state)
    next_path = oidc.safe_next_path(next)
    try:
        with db.begin():
            started = oidc.begin(
                db, settings=settings, redirect_uri=_redirect_uri(request, settings), next_path=next_path
            )
    except oidc.SsoRefused as refusal:
        with db.begin():
            audit(db, action="login.oidc_refused", address=client_address(request), detail=str(refusal))
        return _back_to_page(next_path, str(refusal))
    response = RedirectResponse(started.authorization_url, status_code=302)
    response.set_cookie(
        SSO_COOKIE,
        started.browser_token,
        max_age=int(oidc.LOGIN_TTL.total_seconds()),
        httponly=True,
        samesite="lax",
        secure=settings.cookie_secure or request_is_https(request),
        path="/api/auth/oidc",
    )
    return response


@router.get(
    "/oidc/callback",
    response_class=RedirectResponse,
    status_code=303,
    responses={
        303: {
            "description": "signed in: to the page the sign-in started from, with the session cookie; "
            "refused: to the sign-in page with ?sso_error=MESSAGE"
        },
        **NOT_FOUND,
    },
)
def oidc_callback(
    request: Request,
    state: StateDep,
    db: SessionDep,
    code: str | None = Query(default=None, max_length=4096),
    state_param: str | None = Query(default=None, alias="state", max_length=4096),
    error: str | None = Query(default=None, max_length=256),
    error_description: str | None = Query(default=None, max_length=1024),
    iss: str | None = Query(default=None, max_length=2048, description="RFC 9207: the responding issuer"),
) -> RedirectResponse:
    """The provider's redirect back: checks state, browser and PKCE, validates the ID token, finds
    or creates the account and starts a session."""
    settings = _oidc_settings(state)
    address = client_address(request)
    refusal: oidc.SsoRefused | None = None
    next_path = "/"
    email: str | None = None
    with db.begin():
        try:
            pending = oidc.take_login(db, state=state_param, browser_token=request.cookies.get(SSO_COOKIE))
            next_path = pending.next_path
        except oidc.SsoRefused as refused:
            refusal = refused
    try:
        if refusal is not None:
            raise refusal
        # RFC 9207: a provider that names itself must be the configured one (mix-up attacks).
        if iss is not None and iss.rstrip("/") != str(settings.oidc_issuer).rstrip("/"):
            raise oidc.SsoRefused(
                f"the answer came from issuer {iss!r}, not from {settings.oidc_display_name}"
            )
        if error:
            raise oidc.SsoRefused(
                f"{settings.oidc_display_name} refused the sign-in: {error}"
                + (f" ({error_description})" if error_description else "")
            )
        claims = oidc.finish(settings=settings, pending=pending, code=code)
        # Named in the audit row even when the address is then refused (e.g. not verified).
        claimed = oidc.claim_value(claims, settings.oidc_email_claim)
        email = claimed.strip().lower() if isinstance(claimed, str) else None
        email = oidc.email_from_claims(claims, settings)
        with db.begin():
            user = sign_in_external(
                db,
                source="oidc",
                external_id=oidc.external_id(claims, settings),
                email=email,
                admin=oidc.admin_from_claims(claims, settings),
                settings=settings,
                address=address,
            )
            token = start_session(db, user=user, ttl_s=settings.session_ttl_s, address=address)
            audit(
                db, action="login.oidc", actor=user, address=address, detail=f"issuer={settings.oidc_issuer}"
            )
    except oidc.SsoRefused as refused:
        with db.begin():
            audit(db, action="login.oidc_refused", actor_email=email, address=address, detail=str(refused))
        return _back_to_page(next_path, str(refused))
    response = RedirectResponse(next_path, status_code=303)
    response.delete_cookie(SSO_COOKIE, path="/api/auth/oidc")
    set_session_cookie(response, request, settings, token)
    return response


@router.post(
    "/ldap/login",
    response_model=UserOut,
    responses={
        **NOT_FOUND,
        429: {"model": ErrorBody, "description": "too many failed logins; see Retry-After"},
    },
)
def ldap_login(
    body: LdapLoginBody, request: Request, response: Response, state: StateDep, db: SessionDep
) -> UserOut:
    """Signs in with a directory username (or email, by ZEUS_LDAP_USER_FILTER) and password; the
    account is created on first login. Counts failures like POST /api/auth/login (429 after
    ZEUS_LOGIN_MAX_FAILURES_PER_ACCOUNT within ZEUS_LOGIN_WINDOW_S)."""
    check_origin(request)
    settings = state.settings
    if not settings.ldap_enabled:
        raise HTTPException(404, "LDAP sign-in is not configured on this server (ZEUS_LDAP_URL)")
    username = body.username.strip()
    # Its own namespace in the throttle: a directory username may equal a local account's email.
    throttle_key = "ldap:" + username.lower()
    address = client_address(request)
    with db.begin():
        # Held across the directory's answer, as the password login holds it across the hash check,
        # so that concurrent guesses on several instances cannot slip past the limit.
        throttle.lock_account(db, throttle_key)
        outcome = LoginOutcome(status=401, message="wrong username or password")
        wait = throttle.retry_after_s(db, email=throttle_key, address=address, settings=settings)
        if wait is not None:
            outcome = LoginOutcome(
                status=429, retry_after_s=wait, message=f"too many failed logins: try again in {wait} s"
            )
            audit(db, action="login.ldap_throttled", actor_email=username, address=address)
        else:
            try:
                found = ldap.authenticate(settings, username, body.password)
                throttle.record_attempt(db, email=throttle_key, address=address, success=found is not None)
                if found is None:
                    audit(db, action="login.ldap_failed", actor_email=username, address=address)
                else:
                    # A savepoint: a refused account (disabled, taken email) keeps no partial change.
                    with db.begin_nested():
                        user = sign_in_external(
                            db,
                            source="ldap",
                            external_id=found.dn,
                            email=found.email,
                            admin=found.admin,
                            settings=settings,
                            address=address,
                        )
                    token = start_session(db, user=user, ttl_s=settings.session_ttl_s, address=address)
                    audit(db, action="login.ldap", actor=user, address=address, detail=f"dn={found.dn}")
                    outcome = LoginOutcome(status=200, user=UserOut.model_validate(user), token=token)
            except ldap.LdapUnavailable as unavailable:
                log.warning("LDAP login of %s: %s", username, unavailable)
                outcome = LoginOutcome(
                    status=503, message="the directory server cannot be reached: try again later"
                )
                audit(
                    db,
                    action="login.ldap_error",
                    actor_email=username,
                    address=address,
                    detail=str(unavailable),
                )
            except (ldap.LdapRefused, oidc.SsoRefused) as refused:
                outcome = LoginOutcome(status=403, message=str(refused))
                audit(
                    db,
                    action="login.ldap_refused",
                    actor_email=username,
                    address=address,
                    detail=str(refused),
                )
        throttle.prune_attempts(db, settings=settings)
    return outcome.answer(response, request, settings)
