"""Session tokens and API keys: random, only their SHA-256 is stored.

Both are high-entropy random strings, so a fast hash is enough (a slow password hash would cost
every API request tens of milliseconds for no gain). Session cookies are additionally signed
with ZEUS_SECRET_KEY so that forged cookies are rejected before any database work.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

API_KEY_PREFIX = "zk-"
API_KEY_DISPLAY_LENGTH = 10


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def new_session_token() -> str:
    return secrets.token_urlsafe(32)


def _signature(token: str, secret_key: str) -> str:
    return hmac.new(secret_key.encode(), b"zeus-session:" + token.encode(), hashlib.sha256).hexdigest()


def sign_session_token(token: str, secret_key: str) -> str:
    return f"{token}.{_signature(token, secret_key)}"


def unsign_session_cookie(cookie: str, secret_key: str) -> str | None:
    """The token inside a cookie we signed, or None for anything else."""
    token, _, signature = cookie.rpartition(".")
    if not token or not hmac.compare_digest(signature, _signature(token, secret_key)):
        return None
    return token
