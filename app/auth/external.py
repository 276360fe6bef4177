"""Accounts vouched for by an identity provider (OpenID Connect or LDAP): found by the provider's
stable id, linked by email to an account an admin created beforehand, or created on first login.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.auth.accounts import audit, find_user
from app.auth.oidc import SsoRefused
from app.config import Settings
from app.models import User

# Not an Argon2 hash, so the password form can never open an account that has no password.
UNUSABLE_PASSWORD_HASH = "!no-local-password"


def sign_in_external(
    db: Session,
    *,
    source: str,
    external_id: str,
    email: str,
    admin: bool | None,
    settings: Settings,
    address: str | None,
) -> User:
    """The account for this identity, created or linked as needed, its role following the provider
    when `admin` is not None (True: admin, False: analyst). Raises SsoRefused for a disabled account
    or an email that already belongs to another identity. The caller commits and audits the login."""
    user = db.scalar(select(User).where(User.auth_source == source, User.external_id == external_id))
    if user is None:
        user = find_user(db, email)
        if user is not None and user.external_id is not None:
            raise SsoRefused(
                f"the account {email} belongs to another sign-in ({user.auth_source}): ask an admin"
            )
        if user is not None:
            user.auth_source = source
            user.external_id = external_id
            audit(
                db, action="user.link", actor=user, target=email, address=address, detail=f"source={source}"
            )
        else:
            role = "admin" if admin else "analyst" if admin is False else settings.sso_default_role
            user = User(
                email=email,
                password_hash=UNUSABLE_PASSWORD_HASH,
                role=role,
                disabled=False,
                auth_source=source,
                external_id=external_id,
            )
            db.add(user)
            db.flush()
            audit(
                db,
                action="user.create",
                actor=user,
                target=email,
                address=address,
                detail=f"role={role}, first sign-in via {source}",
            )
    elif user.email != email and find_user(db, email) is None:
        # The provider is the source of truth for the address of the identity it vouches for.
        audit(
            db,
            action="user.update",
            actor=user,
            target=email,
            address=address,
            detail=f"email {user.email}->{email}",
        )
        user.email = email
    if user.disabled:
        raise SsoRefused("this account is disabled: ask an admin")
    if admin is not None:
        role = "admin" if admin else "analyst"
        if role != user.role:
            audit(
                db,
                action="user.update",
                actor=user,
                target=user.email,
                address=address,
                detail=f"role {user.role}->{role} (from {source})",
            )
            user.role = role
    user.last_login_at = func.now()
    return user
