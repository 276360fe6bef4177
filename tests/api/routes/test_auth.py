"""Login, sessions, cookies, the origin rule, the login throttle and the audit log."""

from __future__ import annotations

import uuid

from sqlalchemy import select, text

from app.auth.passwords import hash_password
from app.db import transaction
from app.models import AuditEntry, User
from tests.api.conftest import PASSWORD, Member, Zeus


def audit_actions(zeus: Zeus, email: str) -> list[str]:
    with transaction(zeus.state.sessions) as db:
        return list(
            db.scalars(
                select(AuditEntry.action).where(AuditEntry.actor_email == email).order_by(AuditEntry.id)
            )
        )


async def test_login_sets_a_strict_httponly_cookie_and_me_answers(zeus: Zeus, analyst: Member) -> None:
    async with zeus.client() as client:
        response = await client.post(
            "/api/auth/login", json={"email": analyst.email.upper(), "password": PASSWORD}
        )
        assert response.status_code == 200
        assert response.json() == {"id": analyst.id, "email": analyst.email, "role": "analyst"}
        cookie = response.headers["set-cookie"]
        assert cookie.startswith("zeus_session=")
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        assert "Secure" not in cookie
        me = await client.get("/api/auth/me")
        assert me.status_code == 200 and me.json()["email"] == analyst.email
    assert audit_actions(zeus, analyst.email)[-1] == "login"


async def test_cookie_is_secure_behind_tls(zeus: Zeus, analyst: Member) -> None:
    async with zeus.client() as client:
        response = await client.post(
            "/api/auth/login",
            json={"email": analyst.email, "password": PASSWORD},
            headers={"X-Forwarded-Proto": "https"},
        )
        assert response.status_code == 200
        assert "Secure" in response.headers["set-cookie"]


async def test_logout_invalidates_the_session_everywhere(zeus: Zeus) -> None:
    member = zeus.member()
    async with zeus.logged_in(member) as client:
        stolen_cookie = client.cookies["zeus_session"]
        assert (await client.post("/api/auth/logout")).status_code == 204
        assert (await client.get("/api/auth/me")).status_code == 401
    # A copy of the cookie taken before logout is worthless too: the session row is gone.
    async with zeus.client(cookies={"zeus_session": stolen_cookie}) as replay:
        assert (await replay.get("/api/auth/me")).status_code == 401
    assert audit_actions(zeus, member.email)[-2:] == ["login", "logout"]


async def test_forged_or_unsigned_cookies_are_refused(zeus: Zeus, analyst: Member) -> None:
    async with zeus.logged_in(analyst) as client:
        token, _, signature = client.cookies["zeus_session"].rpartition(".")
    for forged in (token, f"{token}.{'0' * len(signature)}", "garbage"):
        async with zeus.client(cookies={"zeus_session": forged}) as attacker:
            assert (await attacker.get("/api/auth/me")).status_code == 401


async def test_wrong_password_and_unknown_email_answer_alike(zeus: Zeus, analyst: Member) -> None:
    async with zeus.client() as client:
        wrong = await client.post("/api/auth/login", json={"email": analyst.email, "password": "nope nope"})
        unknown = await client.post(
            "/api/auth/login", json={"email": "ghost@example.com", "password": "nope nope"}
        )
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json() == {"detail": "wrong email or password"}
    assert "login.failed" in audit_actions(zeus, analyst.email)
    assert "login.failed" in audit_actions(zeus, "ghost@example.com")


async def test_disabled_account_cannot_log_in_and_loses_its_sessions(zeus: Zeus, admin: Member) -> None:
    member = zeus.member()
    async with zeus.logged_in(member) as session:
        async with zeus.logged_in(admin) as admin_client:
            response = await admin_client.patch(f"/api/admin/users/{member.id}", json={"disabled": True})
            assert response.status_code == 200 and response.json()["disabled"] is True
        assert (await session.get("/api/auth/me")).status_code == 401
        login = await session.post("/api/auth/login", json={"email": member.email, "password": PASSWORD})
        assert login.status_code == 403
    async with zeus.client() as client:
        assert (await client.get("/api/auth/me", headers=member.bearer)).status_code == 401


async def test_cross_origin_state_change_with_a_cookie_is_refused(zeus: Zeus, analyst: Member) -> None:
    async with zeus.logged_in(analyst) as client:
        evil = await client.post("/api/conversations", json={}, headers={"Origin": "https://evil.example"})
        assert evil.status_code == 403 and "Origin" in evil.json()["detail"]
        same = await client.post("/api/conversations", json={}, headers={"Origin": zeus.base_url})
        assert same.status_code == 201
        # Reads are not state changes, and clients that send no Origin are not browsers.
        assert (
            await client.get("/api/conversations", headers={"Origin": "https://evil.example"})
        ).status_code == 200
        assert (await client.post("/api/conversations", json={})).status_code == 201
    async with zeus.client() as client:
        # An API key is not ambient authority: no Origin rule for Bearer requests.
        bearer = await client.post(
            "/api/conversations", json={}, headers={**analyst.bearer, "Origin": "https://evil.example"}
        )
        assert bearer.status_code == 201


async def test_login_throttle_per_account_with_retry_after(zeus: Zeus) -> None:
    member = zeus.member()
    async with zeus.client() as client:
        for attempt in range(10):
            response = await client.post(
                "/api/auth/login", json={"email": member.email, "password": "wrong guess"}
            )
            assert response.status_code == 401, f"attempt {attempt + 1}: {response.text}"
        # The eleventh try is refused even with the right password, and says when to come back.
        blocked = await client.post("/api/auth/login", json={"email": member.email, "password": PASSWORD})
        assert blocked.status_code == 429
        retry_after = int(blocked.headers["retry-after"])
        assert 800 < retry_after <= 900
        assert f"{retry_after} s" in blocked.json()["detail"]
    # Another instance sees the same window: the count lives in PostgreSQL, not in this process.
    with transaction(zeus.state.sessions) as db:
        count = db.execute(
            text("SELECT count(*) FROM login_attempts WHERE email = :email AND NOT success"),
            {"email": member.email},
        ).scalar()
    assert count == 10
    assert audit_actions(zeus, member.email)[-1] == "login.throttled"


async def test_throttle_window_rolls(zeus: Zeus) -> None:
    member = zeus.member()
    async with zeus.client() as client:
        for _ in range(10):
            await client.post("/api/auth/login", json={"email": member.email, "password": "wrong guess"})
        assert (
            await client.post("/api/auth/login", json={"email": member.email, "password": PASSWORD})
        ).status_code == 429
        # Age the oldest failure past the 15-minute window: exactly one more try is allowed.
        with transaction(zeus.state.sessions) as db:
            db.execute(
                text(
                    "UPDATE login_attempts SET ts = ts - interval '16 minutes' WHERE id = "
                    "(SELECT min(id) FROM login_attempts WHERE email = :email)"
                ),
                {"email": member.email},
            )
        assert (
            await client.post("/api/auth/login", json={"email": member.email, "password": PASSWORD})
        ).status_code == 200


async def test_login_throttle_per_address(zeus: Zeus) -> None:
    limit = zeus.state.settings.login_max_failures_per_address
    # The address rule must catch one client spraying many accounts; fill the window directly.
    with transaction(zeus.state.sessions) as db:
        db.execute(
            text(
                "INSERT INTO login_attempts (email, address, success) "
                "SELECT 'spray-' || n || '@example.com', '127.0.0.1', false FROM generate_series(1, :limit) n"
            ),
            {"limit": limit},
        )
    try:
        async with zeus.client() as client:
            fresh = f"fresh-{uuid.uuid4().hex[:6]}@example.com"
            response = await client.post("/api/auth/login", json={"email": fresh, "password": "whatever1"})
            assert response.status_code == 429 and int(response.headers["retry-after"]) > 0
    finally:
        with transaction(zeus.state.sessions) as db:
            db.execute(text("DELETE FROM login_attempts WHERE email LIKE 'spray-%'"))


async def test_password_hash_is_argon2id_and_old_parameters_are_rehashed(zeus: Zeus) -> None:
    member = zeus.member()
    with transaction(zeus.state.sessions) as db:
        user = db.scalar(select(User).where(User.email == member.email))
        assert user.password_hash.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
        from argon2 import PasswordHasher

        user.password_hash = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(PASSWORD)
    async with zeus.logged_in(member):
        pass
    with transaction(zeus.state.sessions) as db:
        rehashed = db.scalar(select(User.password_hash).where(User.email == member.email))
    assert rehashed.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert hash_password(PASSWORD) != rehashed  # salted


async def test_api_keys_are_shown_once_stored_hashed_and_revocable(zeus: Zeus, analyst: Member) -> None:
    async with zeus.logged_in(analyst) as client:
        created = await client.post("/api/keys", json={"name": "notebook"})
        assert created.status_code == 201
        key = created.json()["key"]
        listed = (await client.get("/api/keys")).json()
        entry = next(item for item in listed if item["id"] == created.json()["id"])
        assert "key" not in entry and key.startswith(entry["prefix"]) and entry["revoked_at"] is None
        with transaction(zeus.state.sessions) as db:
            stored = db.execute(
                text("SELECT key_hash FROM api_keys WHERE id = :id"), {"id": entry["id"]}
            ).scalar()
        assert key not in stored and len(stored) == 64
        async with zeus.client(headers={"Authorization": f"Bearer {key}"}) as bearer:
            assert (await bearer.get("/api/auth/me")).json()["email"] == analyst.email
            assert (await client.delete(f"/api/keys/{entry['id']}")).status_code == 204
            refused = await bearer.get("/api/auth/me")
            assert refused.status_code == 401 and "revoked" in refused.json()["detail"]
    actions = audit_actions(zeus, analyst.email)
    assert "api_key.create" in actions and "api_key.revoke" in actions


async def test_someone_elses_key_cannot_be_revoked(
    zeus: Zeus, analyst: Member, other_analyst: Member
) -> None:
    async with zeus.client(headers=other_analyst.bearer) as other:
        key_id = (await other.post("/api/keys", json={"name": "mine"})).json()["id"]
    async with zeus.client(headers=analyst.bearer) as client:
        assert (await client.delete(f"/api/keys/{key_id}")).status_code == 404
