"""Users, API keys, sessions and the audit log: keyword-only functions on a SQLAlchemy session.

Shared by the HTTP routes and the CLI, so both apply the same rules and write the same audit rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from app.auth.passwords import generate_password, hash_password, needs_rehash, password_problem
from app.auth.tokens import API_KEY_DISPLAY_LENGTH, new_api_key, new_session_token, sha256_hex
from app.models import ROLES, ApiKey, AuditEntry, User, WebSession


class AccountError(ValueError):
    """A request the account rules refuse; the message says why and what is allowed."""


class AccountConflict(AccountError):
    """The email is already taken."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def normalise_email(email: str) -> str:
    email = email.strip().lower()
    if "@" not in email or len(email) > 320 or email.startswith("@") or email.endswith("@"):
        raise AccountError(f"not an email address: {email!r}")
    return email


def audit(
    db: Session,
    *,
    action: str,
    actor: User | None = None,
    actor_email: str | None = None,
    target: str | None = None,
    address: str | None = None,
    detail: str | None = None,
) -> None:
    db.add(
        AuditEntry(
            actor_user_id=actor.id if actor else None,
            actor_email=actor.email if actor else actor_email,
            action=action,
            target=target,
            address=address,
            detail=detail,
        )
    )


def find_user(db: Session, email: str) -> User | None:
    return db.scalar(select(User).where(User.email == email.strip().lower()))


def create_user(
    db: Session,
    *,
    email: str,
    password: str,
    role: str,
    actor: User | None = None,
    address: str | None = None,
) -> User:
    email = normalise_email(email)
    if role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)} (got {role!r})")
    if problem := password_problem(password):
        raise AccountError(problem)
    if find_user(db, email) is not None:
        raise AccountConflict(f"a user with email {email} already exists")
    user = User(email=email, password_hash=hash_password(password), role=role, disabled=False)
    db.add(user)
    db.flush()
    audit(
        db,
        action="user.create",
        actor=actor,
        actor_email="cli" if actor is None else None,
        target=email,
        address=address,
        detail=f"role={role}",
    )
    return user


def update_user(
    db: Session,
    *,
    user: User,
    actor: User | None,
    role: str | None = None,
    disabled: bool | None = None,
    address: str | None = None,
) -> User:
    if role is not None and role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)} (got {role!r})")
    if actor is not None and actor.id == user.id and (disabled or (role is not None and role != "admin")):
        # Otherwise the last admin can lock everybody out of the admin pages by one click.
        raise AccountError("you cannot disable your own account or remove your own admin role")
    changes = []
    if role is not None and role != user.role:
        changes.append(f"role {user.role}->{role}")
        user.role = role
    if disabled is not None and disabled != user.disabled:
        changes.append("disabled" if disabled else "enabled")
        user.disabled = disabled
        if disabled:
            db.execute(delete(WebSession).where(WebSession.user_id == user.id))
    if changes:
        audit(
            db,
            action="user.update",
            actor=actor,
            actor_email="cli" if actor is None else None,
            target=user.email,
            address=address,
            detail=", ".join(changes),
        )
    return user


def set_password(
    db: Session, *, user: User, password: str | None, actor: User | None, address: str | None = None
) -> str:
    """Sets the given or a generated password, ends the user's sessions, returns the password."""
    password = password or generate_password()
    if problem := password_problem(password):
        raise AccountError(problem)
    user.password_hash = hash_password(password)
    db.execute(delete(WebSession).where(WebSession.user_id == user.id))
    audit(
        db,
        action="user.reset_password",
        actor=actor,
        actor_email="cli" if actor is None else None,
        target=user.email,
        address=address,
    )
    return password


def rehash_if_needed(user: User, password: str) -> None:
    if needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)


@dataclass(frozen=True)
class CreatedKey:
    key: ApiKey
    secret: str


def create_api_key(
    db: Session, *, user: User, name: str, actor: User | None, address: str | None = None
) -> CreatedKey:
    name = name.strip()
    if not name or len(name) > 100:
        raise AccountError("key name must be 1 to 100 characters long")
    secret = new_api_key()
    key = ApiKey(
        user_id=user.id, name=name, prefix=secret[:API_KEY_DISPLAY_LENGTH], key_hash=sha256_hex(secret)
    )
    db.add(key)
    db.flush()
    audit(
        db,
        action="api_key.create",
        actor=actor,
        actor_email="cli" if actor is None else None,
        target=f"{user.email} key {key.id} ({name})",
        address=address,
    )
    return CreatedKey(key=key, secret=secret)


def revoke_api_key(db: Session, *, key: ApiKey, actor: User | None, address: str | None = None) -> None:
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        owner = db.get(User, key.user_id)
        audit(
            db,
            action="api_key.revoke",
            actor=actor,
            actor_email="cli" if actor is None else None,
            target=f"{owner.email if owner else key.user_id} key {key.id} ({key.name})",
            address=address,
        )


def user_for_api_key(db: Session, secret: str) -> tuple[User, ApiKey] | None:
    row = db.execute(
        select(User, ApiKey)
        .join(ApiKey, ApiKey.user_id == User.id)
        .where(
            ApiKey.key_hash == sha256_hex(secret),
            ApiKey.revoked_at.is_(None),
            or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > func.now()),
            User.disabled.is_(False),
        )
    ).first()
    if row is None:
        return None
    user, key = row
    now = utcnow()
    # One write per key per minute at most: enough for "last used", cheap under load.
    if key.last_used_at is None or now - key.last_used_at > timedelta(minutes=1):
        db.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now))
    return user, key


def start_session(db: Session, *, user: User, ttl_s: int, address: str | None) -> str:
    token = new_session_token()
    db.add(
        WebSession(
            token_hash=sha256_hex(token),
            user_id=user.id,
            expires_at=utcnow() + timedelta(seconds=ttl_s),
            address=address,
        )
    )
    return token


def user_for_session(db: Session, token: str) -> tuple[User, WebSession] | None:
    row = db.execute(
        select(User, WebSession)
        .join(WebSession, WebSession.user_id == User.id)
        .where(
            WebSession.token_hash == sha256_hex(token),
            WebSession.expires_at > utcnow(),
            User.disabled.is_(False),
        )
    ).first()
    return None if row is None else (row[0], row[1])


def end_session(db: Session, *, token: str) -> WebSession | None:
    return db.scalar(
        delete(WebSession).where(WebSession.token_hash == sha256_hex(token)).returning(WebSession)
    )
