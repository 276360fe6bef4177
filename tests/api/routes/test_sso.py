"""Single sign-on against real identity providers that the tests start: node's oidc-provider
(OpenID Connect, code flow with PKCE) and Debian's slapd (LDAP), with the real app on PostgreSQL.
Covers first-login accounts, the admin mapping, refusals (state, browser, disabled, unverified
email, wrong password), ZEUS_PASSWORD_LOGIN=false and the audit rows."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import select, update

from app.db import transaction
from app.models import AuditEntry, SsoLogin, User
from tests.api.conftest import PASSWORD, Zeus, serve_in_process, settings_for_tests
from tests.support.identity import (
    ADMIN_GROUP_CLAIM,
    CLIENT_ID,
    CLIENT_SECRET,
    LDAP_PEOPLE,
    LDAP_PEOPLE_BASE,
    OidcProvider,
    Slapd,
    oidc_provider_port,
    start_oidc_provider,
    start_slapd,
)

CALLBACK = "/api/auth/oidc/callback"
OIDC_USERS: dict[str, dict[str, Any]] = {
    name: {"password": f"{name}-secret", "email": f"{name}@corp.test", "groups": groups}
    for name, groups in {
        "olivia": [],
        "oscar": [ADMIN_GROUP_CLAIM, "staff"],
        "otto": ["staff"],
        "linda": [],
        "dora": [],
        "bea": [],
        "pat": [],
    }.items()
}
OIDC_USERS["una"] = {"password": "una-secret", "email": "una@corp.test", "email_verified": False}


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    with start_slapd(tmp_path_factory.mktemp("slapd")) as running:
        yield running


@pytest_asyncio.fixture(scope="module")
async def sso(
    database_url: str, tiny_model_path: Path, slapd: Slapd, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Zeus, OidcProvider]]:
    provider_port = oidc_provider_port()
    issuer = f"http://localhost:{provider_port}"
    settings = settings_for_tests(
        database_url,
        tiny_model_path,
        oidc_issuer=issuer,
        oidc_client_id=CLIENT_ID,
        oidc_client_secret=CLIENT_SECRET,
        oidc_display_name="Test IdP",
        oidc_scopes="openid email profile groups",
        oidc_admin_claim="groups",
        oidc_admin_values=ADMIN_GROUP_CLAIM,
        **slapd.settings(),
    )
    async for zeus in serve_in_process(settings):
        # The provider needs Zeus's callback address, known only once Zeus listens.
        with start_oidc_provider(
            provider_port, [zeus.base_url + CALLBACK], OIDC_USERS, tmp_path_factory.mktemp("oidc")
        ) as provider:
            assert provider.issuer == issuer
            yield zeus, provider


@contextmanager
def changed_settings(zeus: Zeus, **values: Any) -> Iterator[None]:
    settings = zeus.state.settings
    before = {name: getattr(settings, name) for name in values}
    for name, value in values.items():
        setattr(settings, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(settings, name, value)


def audit_rows(zeus: Zeus, *, email: str | None = None, action_prefix: str = "") -> list[AuditEntry]:
    with transaction(zeus.state.sessions) as db:
        query = select(AuditEntry).where(AuditEntry.action.startswith(action_prefix)).order_by(AuditEntry.id)
        if email is not None:
            query = query.where(AuditEntry.actor_email == email)
        rows = list(db.scalars(query))
        db.expunge_all()
        return rows


def stored_user(zeus: Zeus, email: str) -> User | None:
    with transaction(zeus.state.sessions) as db:
        user = db.scalar(select(User).where(User.email == email))
        if user is not None:
            db.expunge(user)
        return user


async def to_callback(client: httpx.AsyncClient, zeus: Zeus, login: str, *, next: str = "/") -> str:
    """Starts a sign-in at Zeus and signs in at the provider's login form, as a browser would;
    returns the callback address the provider sends the browser back to (not yet followed)."""
    response = await client.get("/api/auth/oidc/login", params={"next": next})
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    for _ in range(12):
        if location.startswith(zeus.base_url + CALLBACK):
            return location
        page = await client.get(location)
        if page.status_code == 200 and "<form" in page.text:
            action = re.search(r'action="([^"]+)"', page.text)
            assert action, page.text
            user = OIDC_USERS[login]
            page = await client.post(
                urljoin(location, action.group(1)), data={"login": login, "password": user["password"]}
            )
        assert page.status_code in (302, 303), f"{location}: {page.status_code} {page.text[:500]}"
        location = urljoin(location, page.headers["location"])
    raise AssertionError(f"the provider never sent the browser back to Zeus (last: {location})")


async def oidc_sign_in(
    client: httpx.AsyncClient, zeus: Zeus, login: str, *, next: str = "/"
) -> httpx.Response:
    return await client.get(await to_callback(client, zeus, login, next=next))


def sso_error(response: httpx.Response) -> str:
    assert response.status_code == 303, response.text
    query = parse_qs(urlsplit(response.headers["location"]).query)
    assert "sso_error" in query, response.headers["location"]
    return query["sso_error"][0]


async def test_providers_lists_the_configured_sign_in_methods(sso) -> None:
    zeus, _ = sso
    async with zeus.client() as client:
        response = await client.get("/api/auth/providers")
    assert response.status_code == 200
    assert response.json() == {
        "password": True,
        "ldap": True,
        "oidc": {"name": "Test IdP", "login_url": "/api/auth/oidc/login"},
    }


async def test_oidc_first_login_creates_the_user_with_the_default_role(sso) -> None:
    zeus, provider = sso
    async with zeus.client() as client:
        start = await client.get("/api/auth/oidc/login", params={"next": "/admin.html"})
        assert start.status_code == 302
        authorization = urlsplit(start.headers["location"])
        params = parse_qs(authorization.query)
        assert authorization.netloc == f"localhost:{provider.port}"
        # PKCE with S256 and a nonce; the verifier itself stays in the database.
        assert params["code_challenge_method"] == ["S256"] and params["code_challenge"][0]
        assert params["nonce"][0] and params["state"][0]
        assert params["redirect_uri"] == [zeus.base_url + CALLBACK]
        cookie = start.headers["set-cookie"]
        assert cookie.startswith("zeus_sso=") and "HttpOnly" in cookie and "SameSite=lax" in cookie
        with transaction(zeus.state.sessions) as db:
            row = db.scalar(select(SsoLogin).where(SsoLogin.state == params["state"][0]))
            assert row is not None and row.next_path == "/admin.html"
            assert row.code_verifier not in cookie

    async with zeus.client() as client:
        done = await oidc_sign_in(client, zeus, "olivia", next="/admin.html")
        assert done.status_code == 303, done.text
        assert done.headers["location"] == "/admin.html"
        me = await client.get("/api/auth/me")
        assert me.status_code == 200, me.text
        assert me.json()["email"] == "olivia@corp.test" and me.json()["role"] == "analyst"

    user = stored_user(zeus, "olivia@corp.test")
    assert user is not None and user.auth_source == "oidc"
    assert user.external_id == f"{provider.issuer} olivia" and user.last_login_at is not None
    actions = [row.action for row in audit_rows(zeus, email="olivia@corp.test")]
    assert actions[-2:] == ["user.create", "login.oidc"]
    # The account has no password: the password form cannot open it.
    async with zeus.client() as client:
        refused = await client.post(
            "/api/auth/login", json={"email": "olivia@corp.test", "password": "x" * 12}
        )
        assert refused.status_code == 401


async def test_oidc_admin_role_follows_the_configured_claim(sso) -> None:
    zeus, _ = sso
    async with zeus.client() as client:
        assert (await oidc_sign_in(client, zeus, "oscar")).status_code == 303
        assert (await client.get("/api/auth/me")).json()["role"] == "admin"
        assert (await client.get("/api/admin/users")).status_code == 200

    # Otto is not in the admin group: an admin role given locally is taken back at his next login.
    async with zeus.client() as client:
        await oidc_sign_in(client, zeus, "otto")
        assert (await client.get("/api/auth/me")).json()["role"] == "analyst"
    with transaction(zeus.state.sessions) as db:
        db.execute(update(User).where(User.email == "otto@corp.test").values(role="admin"))
    async with zeus.client() as client:
        await oidc_sign_in(client, zeus, "otto")
        assert (await client.get("/api/auth/me")).json()["role"] == "analyst"
    details = [row.detail for row in audit_rows(zeus, email="otto@corp.test", action_prefix="user.update")]
    assert details == ["role admin->analyst (from oidc)"]


async def test_oidc_callback_may_reach_another_instance(sso) -> None:
    """Behind nginx the provider's redirect lands on any instance: the sign-in started on one
    instance is finished by another (the state lives in PostgreSQL, not in a process)."""
    zeus, _ = sso
    other_settings = zeus.state.settings.model_copy(update={"instance_name": "test-sso-second"})
    async for other in serve_in_process(other_settings):
        assert other.base_url != zeus.base_url
        async with zeus.client() as client:
            callback = await to_callback(client, zeus, "olivia")
            # The same address on the second instance's port (cookies are per host, not per port).
            response = await client.get(other.base_url + callback.removeprefix(zeus.base_url))
            assert response.status_code == 303 and response.headers["location"] == "/", response.text
            assert response.headers["x-zeus-instance"] == "test-sso-second"
            # The session works on both instances.
            assert (await client.get("/api/auth/me")).json()["email"] == "olivia@corp.test"
            assert (await client.get(other.base_url + "/api/auth/me")).json()["email"] == "olivia@corp.test"


async def test_oidc_refuses_a_bad_state_a_replay_and_another_browser(sso) -> None:
    zeus, _ = sso
    async with zeus.client() as client:
        callback = await to_callback(client, zeus, "bea")
        tampered = re.sub(r"state=[^&]+", "state=forged-state", callback)
        refused = await client.get(tampered)
        assert "unknown or was already used" in sso_error(refused)
        assert "zeus_session" not in refused.headers.get("set-cookie", "")
        assert (await client.get("/api/auth/me")).status_code == 401

        # Another browser (without the zeus_sso cookie) cannot finish this browser's sign-in...
        async with zeus.client() as other_browser:
            stolen = await other_browser.get(callback)
            assert "started in another browser" in sso_error(stolen)
            assert (await other_browser.get("/api/auth/me")).status_code == 401
        # ...and the state is spent: used once, even by the wrong browser.
        replay = await client.get(callback)
        assert "unknown or was already used" in sso_error(replay)
        assert (await client.get("/api/auth/me")).status_code == 401

        # An answer naming another issuer (RFC 9207) is refused.
        callback = await to_callback(client, zeus, "bea")
        assert "&iss=" in callback
        mixed_up = re.sub(r"iss=[^&]+", "iss=https%3A%2F%2Fevil.example", callback)
        assert "not from Test IdP" in sso_error(await client.get(mixed_up))

        # A fresh sign-in goes through, and its callback cannot be used twice.
        callback = await to_callback(client, zeus, "bea")
        assert (await client.get(callback)).status_code == 303
        assert (await client.get("/api/auth/me")).status_code == 200
        assert "unknown or was already used" in sso_error(await client.get(callback))

    refusals = [row.detail or "" for row in audit_rows(zeus, action_prefix="login.oidc_refused")]
    assert sum("unknown or was already used" in detail for detail in refusals) >= 3
    assert any("started in another browser" in detail for detail in refusals)


async def test_oidc_refuses_a_provider_error_and_an_unverified_email(sso) -> None:
    zeus, _ = sso
    async with zeus.client() as client:
        callback = await to_callback(client, zeus, "una")
        assert "has not verified the email address una@corp.test" in sso_error(await client.get(callback))
        assert stored_user(zeus, "una@corp.test") is None

        await client.get("/api/auth/oidc/login")
        state = (await zeus_state_of_latest_login(zeus)).state
        denied = await client.get(CALLBACK, params={"state": state, "error": "access_denied"})
        assert sso_error(denied) == "Test IdP refused the sign-in: access_denied"
    actions = [row.action for row in audit_rows(zeus, email="una@corp.test")]
    assert actions == ["login.oidc_refused"]


async def zeus_state_of_latest_login(zeus: Zeus) -> SsoLogin:
    with transaction(zeus.state.sessions) as db:
        row = db.scalar(select(SsoLogin).order_by(SsoLogin.id.desc()).limit(1))
        assert row is not None
        db.expunge(row)
        return row


async def test_oidc_links_an_existing_account_and_refuses_a_disabled_one(sso) -> None:
    zeus, provider = sso
    member = zeus.member("analyst", "linked")
    with transaction(zeus.state.sessions) as db:
        db.execute(update(User).where(User.id == member.id).values(email="linda@corp.test"))
    async with zeus.client() as client:
        await oidc_sign_in(client, zeus, "linda")
        me = (await client.get("/api/auth/me")).json()
        assert me["id"] == member.id
    linked = stored_user(zeus, "linda@corp.test")
    assert (
        linked is not None
        and linked.auth_source == "oidc"
        and linked.external_id == f"{provider.issuer} linda"
    )

    async with zeus.client() as client:
        await oidc_sign_in(client, zeus, "dora")
    with transaction(zeus.state.sessions) as db:
        db.execute(update(User).where(User.email == "dora@corp.test").values(disabled=True))
    async with zeus.client() as client:
        refused = await oidc_sign_in(client, zeus, "dora")
        assert sso_error(refused) == "this account is disabled: ask an admin"
        assert (await client.get("/api/auth/me")).status_code == 401
    assert audit_rows(zeus, email="dora@corp.test")[-1].action == "login.oidc_refused"


async def test_password_login_can_be_turned_off(sso) -> None:
    zeus, _ = sso
    member = zeus.member("analyst", "local")
    with changed_settings(zeus, password_login=False):
        async with zeus.client() as client:
            providers = (await client.get("/api/auth/providers")).json()
            assert providers["password"] is False and providers["oidc"]["name"] == "Test IdP"
            refused = await client.post("/api/auth/login", json={"email": member.email, "password": PASSWORD})
            assert refused.status_code == 403
            assert refused.json()["detail"].startswith(
                "password sign-in is turned off on this server (ZEUS_PASSWORD_LOGIN=false): "
                "use Sign in with Test IdP"
            )
            assert "set-cookie" not in refused.headers
            # Single sign-on still works.
            assert (await oidc_sign_in(client, zeus, "pat")).status_code == 303
            assert (await client.get("/api/auth/me")).json()["email"] == "pat@corp.test"
    assert [row.action for row in audit_rows(zeus, email=member.email)][-1] == "login.password_off"
    async with zeus.logged_in(member):
        pass


async def test_ldap_good_password_creates_the_user_and_opens_a_session(sso) -> None:
    zeus, _ = sso
    async with zeus.client() as client:
        response = await client.post(
            "/api/auth/ldap/login", json={"username": "bob", "password": LDAP_PEOPLE["bob"][0]}
        )
        assert response.status_code == 200, response.text
        assert response.json()["email"] == "bob@zeus.test" and response.json()["role"] == "analyst"
        assert "SameSite=strict" in response.headers["set-cookie"]
        assert (await client.get("/api/auth/me")).json()["email"] == "bob@zeus.test"
        # The filter also finds the entry by its mail; it is the same account.
        again = await client.post(
            "/api/auth/ldap/login", json={"username": "bob@zeus.test", "password": LDAP_PEOPLE["bob"][0]}
        )
        assert again.status_code == 200 and again.json()["id"] == response.json()["id"]
    user = stored_user(zeus, "bob@zeus.test")
    assert (
        user is not None and user.auth_source == "ldap" and user.external_id == f"uid=bob,{LDAP_PEOPLE_BASE}"
    )
    actions = [row.action for row in audit_rows(zeus, email="bob@zeus.test")]
    assert actions == ["user.create", "login.ldap", "login.ldap"]


async def test_ldap_wrong_password_unknown_user_and_filter_characters_are_refused(sso) -> None:
    zeus, _ = sso
    async with zeus.client() as client:
        for username, password in (
            ("bob", "wrong-password"),
            ("nobody", "whatever1"),
            ("*", LDAP_PEOPLE["bob"][0]),
        ):
            response = await client.post(
                "/api/auth/ldap/login", json={"username": username, "password": password}
            )
            assert response.status_code == 401, (username, response.text)
            assert response.json()["detail"] == "wrong username or password"
        # An empty password would be an anonymous bind, which slapd accepts: refused before LDAP.
        empty = await client.post("/api/auth/ldap/login", json={"username": "bob", "password": ""})
        assert empty.status_code == 422
        assert (await client.get("/api/auth/me")).status_code == 401
    failed = [row.actor_email for row in audit_rows(zeus, action_prefix="login.ldap_failed")]
    assert {"bob", "nobody", "*"} <= set(failed)


async def test_ldap_admin_group_maps_to_admin_and_entries_without_mail_are_refused(sso) -> None:
    zeus, _ = sso
    async with zeus.client() as client:
        response = await client.post(
            "/api/auth/ldap/login", json={"username": "ada", "password": LDAP_PEOPLE["ada"][0]}
        )
        assert response.status_code == 200, response.text
        assert response.json() == {**response.json(), "email": "ada@zeus.test", "role": "admin"}
        assert (await client.get("/api/admin/users")).status_code == 200
        nomail = await client.post(
            "/api/auth/ldap/login", json={"username": "nomail", "password": LDAP_PEOPLE["nomail"][0]}
        )
        assert nomail.status_code == 403
        assert (
            nomail.json()["detail"]
            == f"the directory entry uid=nomail,{LDAP_PEOPLE_BASE} has no email address (mail)"
        )
    assert audit_rows(zeus, email="nomail")[-1].action == "login.ldap_refused"


async def test_ldap_with_a_dn_template_and_no_service_account(sso, slapd: Slapd) -> None:
    zeus, _ = sso
    with changed_settings(
        zeus,
        ldap_bind_dn=None,
        ldap_bind_password=None,
        ldap_user_base=None,
        ldap_user_dn_template=f"uid={{username}},{LDAP_PEOPLE_BASE}",
    ):
        async with zeus.client() as client:
            good = await client.post(
                "/api/auth/ldap/login", json={"username": "cleo", "password": LDAP_PEOPLE["cleo"][0]}
            )
            assert good.status_code == 200, good.text
            # The directory's mail is stored lower-cased, like every email.
            assert good.json()["email"] == "cleo@zeus.test" and good.json()["role"] == "analyst"
            bad = await client.post(
                "/api/auth/ldap/login", json={"username": "cleo", "password": "nope-nope"}
            )
            assert bad.status_code == 401
            # A DN-special character cannot name another entry.
            injected = await client.post(
                "/api/auth/ldap/login",
                json={"username": f"ada,{LDAP_PEOPLE_BASE}", "password": LDAP_PEOPLE["ada"][0]},
            )
            assert injected.status_code == 401
            # Without a service account the group is read with the user's own bind.
            ada = await client.post(
                "/api/auth/ldap/login", json={"username": "ada", "password": LDAP_PEOPLE["ada"][0]}
            )
            assert ada.status_code == 200 and ada.json()["role"] == "admin"
            with changed_settings(zeus, ldap_admin_group=f"cn=nobody,ou=groups,{LDAP_PEOPLE_BASE}"):
                demoted = await client.post(
                    "/api/auth/ldap/login", json={"username": "ada", "password": LDAP_PEOPLE["ada"][0]}
                )
                assert demoted.status_code == 200 and demoted.json()["role"] == "analyst"
    assert audit_rows(zeus, email="ada@zeus.test", action_prefix="user.update")[-1].detail == (
        "role admin->analyst (from ldap)"
    )


async def test_ldap_unreachable_directory_answers_503_and_failures_are_throttled(sso) -> None:
    zeus, _ = sso
    with changed_settings(zeus, ldap_url="ldap://127.0.0.1:9", ldap_timeout_s=2.0):
        async with zeus.client() as client:
            down = await client.post(
                "/api/auth/ldap/login", json={"username": "bob", "password": "whatever1"}
            )
            assert down.status_code == 503
            assert down.json()["detail"] == "the directory server cannot be reached: try again later"
    assert audit_rows(zeus, email="bob", action_prefix="login.ldap_error")

    limit = zeus.state.settings.login_max_failures_per_account
    async with zeus.client() as client:
        for _ in range(limit):
            wrong = await client.post(
                "/api/auth/ldap/login", json={"username": "Ada", "password": "guess-guess"}
            )
            assert wrong.status_code == 401
        throttled = await client.post(
            "/api/auth/ldap/login", json={"username": "ada", "password": LDAP_PEOPLE["ada"][0]}
        )
        assert throttled.status_code == 429
        assert int(throttled.headers["retry-after"]) > 0
    assert audit_rows(zeus, email="ada", action_prefix="login.ldap_throttled")


async def test_sso_routes_answer_404_when_not_configured(database_url: str, tiny_model_path: Path) -> None:
    async for zeus in serve_in_process(settings_for_tests(database_url, tiny_model_path)):
        async with zeus.client() as client:
            assert (await client.get("/api/auth/providers")).json() == {
                "password": True,
                "ldap": False,
                "oidc": None,
            }
            assert (await client.get("/api/auth/oidc/login")).status_code == 404
            assert (await client.get(CALLBACK, params={"state": "x", "code": "y"})).status_code == 404
            ldap = await client.post("/api/auth/ldap/login", json={"username": "a", "password": "b"})
            assert ldap.status_code == 404 and "ZEUS_LDAP_URL" in ldap.json()["detail"]
