"""The "Sign in with ..." button in chromium: the real app (`python -m app serve`) configured for
node's oidc-provider, which the test starts; the provider's login form is filled in as a person
would. The provider runs at localhost and Zeus at 127.0.0.1, different sites to the browser, so
the cookies' SameSite rules apply as they do between a company's provider and Zeus."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.support.databases import fresh_database
from tests.support.identity import (
    ADMIN_GROUP_CLAIM,
    CLIENT_ID,
    CLIENT_SECRET,
    LDAP_PEOPLE,
    OidcProvider,
    oidc_provider_port,
    start_oidc_provider,
    start_slapd,
)
from tests.support.live_server import LiveServer, start_live_server
from tests.web.helpers import STATIC_DIR, save_screenshot

pytestmark = pytest.mark.browser

USERS = {"wanda": {"password": "wanda-secret", "email": "wanda@corp.test", "groups": [ADMIN_GROUP_CLAIM]}}


def _start_server(database_url: str, tiny_model_path: Path, log_dir: Path, provider_port: int, **extra: str):
    return start_live_server(
        database_url,
        tiny_model_path,
        log_dir,
        ZEUS_STATIC_DIR=str(STATIC_DIR),
        ZEUS_OIDC_ISSUER=f"http://localhost:{provider_port}",
        ZEUS_OIDC_CLIENT_ID=CLIENT_ID,
        ZEUS_OIDC_CLIENT_SECRET=CLIENT_SECRET,
        ZEUS_OIDC_DISPLAY_NAME="Test IdP",
        ZEUS_OIDC_SCOPES="openid email profile groups",
        ZEUS_OIDC_ADMIN_CLAIM="groups",
        ZEUS_OIDC_ADMIN_VALUES=ADMIN_GROUP_CLAIM,
        **extra,
    )


@pytest.fixture(scope="module")
def sso_servers(
    tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveServer, LiveServer, OidcProvider]]:
    """Two instances of Zeus on one fresh database, one with the password form (for local and
    slapd's accounts) and one with ZEUS_PASSWORD_LOGIN=false, and the provider that knows both
    callbacks."""
    provider_port = oidc_provider_port()
    with (
        fresh_database("websso") as database_url,
        start_slapd(tmp_path_factory.mktemp("sso-slapd")) as slapd,
    ):
        log_dir = tmp_path_factory.mktemp("sso-servers")
        ldap_environment = {f"ZEUS_{name.upper()}": value for name, value in slapd.settings().items()}
        with_passwords = _start_server(
            database_url, tiny_model_path, log_dir, provider_port, **ldap_environment
        )
        try:
            sso_only = _start_server(
                database_url, tiny_model_path, log_dir, provider_port, ZEUS_PASSWORD_LOGIN="false"
            )
            try:
                with start_oidc_provider(
                    provider_port,
                    [f"{server.base_url}/api/auth/oidc/callback" for server in (with_passwords, sso_only)],
                    USERS,
                    tmp_path_factory.mktemp("sso-provider"),
                ) as provider:
                    yield with_passwords, sso_only, provider
            finally:
                sso_only.stop()
        finally:
            with_passwords.stop()


def test_sign_in_with_the_provider_button(new_session, sso_servers) -> None:
    server, _, provider = sso_servers
    session = new_session()
    page = session.page
    page.goto(f"{server.base_url}/")
    button = page.get_by_role("link", name="Sign in with Test IdP")
    expect(button).to_be_visible()
    # The password form is still there beside it (ZEUS_PASSWORD_LOGIN defaults to true), for
    # directory and local accounts.
    expect(page.locator("#login-form").get_by_label("Username or email")).to_be_visible()
    expect(page.locator("#login-form").get_by_label("Password")).to_be_visible()
    save_screenshot(page, "sso-login-button")

    button.click()
    page.wait_for_url(f"http://localhost:{provider.port}/interaction/**")
    page.get_by_label("Username").fill("wanda")
    page.get_by_label("Password").fill(USERS["wanda"]["password"])
    page.get_by_role("button", name="Sign in").click()

    # Back at Zeus, signed in, as admin (the provider's groups claim names the admin group).
    expect(page.locator("#chat-view")).to_be_visible()
    assert page.url.startswith(f"{server.base_url}/")
    expect(page.locator("#user-email")).to_have_text("wanda@corp.test")
    expect(page.locator("#admin-link")).to_be_visible()
    session.watch.assert_clean()


def test_a_refused_sign_in_is_explained_on_the_sign_in_page(new_session, sso_servers) -> None:
    server, _, _ = sso_servers
    session = new_session()
    page = session.page
    # A callback whose state Zeus never issued, as a forged or replayed link would be.
    page.goto(f"{server.base_url}/api/auth/oidc/callback?state=forged&code=stolen")
    expect(page.locator("#login-view")).to_be_visible()
    expect(page.locator("#login-error")).to_contain_text("this sign-in is unknown or was already used")
    # The message is taken out of the address, so a reload does not show it again.
    assert "sso_error" not in page.url
    expect(page.get_by_role("link", name="Sign in with Test IdP")).to_be_visible()
    session.watch.assert_clean()


def test_with_password_login_off_only_the_button_is_offered(new_session, sso_servers) -> None:
    _, server, provider = sso_servers
    session = new_session()
    page = session.page
    page.goto(f"{server.base_url}/admin.html")
    button = page.get_by_role("link", name="Sign in with Test IdP")
    expect(button).to_be_visible()
    form = page.locator("#login-form")
    expect(form.get_by_label("Password")).to_be_hidden()
    expect(form.get_by_role("button", name="Sign in", exact=True)).to_be_hidden()
    save_screenshot(page, "sso-only-login")

    button.click()
    page.wait_for_url(f"http://localhost:{provider.port}/**")
    # A new browser profile: the provider has no session for it and shows its form.
    page.get_by_label("Username").fill("wanda")
    page.get_by_label("Password").fill(USERS["wanda"]["password"])
    page.get_by_role("button", name="Sign in").click()
    # Back on the admin page it started from, signed in as admin.
    expect(page.locator("#admin-view")).to_be_visible()
    assert page.url.startswith(f"{server.base_url}/admin.html")
    session.watch.assert_clean()


def test_the_form_signs_in_directory_and_local_accounts(new_session, sso_servers) -> None:
    server, _, _ = sso_servers
    local = server.create_account("local-admin@example.com", "admin")
    for username, password, email in (
        ("ada", LDAP_PEOPLE["ada"][0], "ada@zeus.test"),
        # Not in the directory: the page tries the local account of that email.
        (local.email, local.password, local.email),
    ):
        session = new_session()
        page = session.page
        page.goto(f"{server.base_url}/")
        form = page.locator("#login-form")
        expect(form.get_by_label("Username or email")).to_be_visible()
        form.get_by_label("Username or email").fill(username)
        form.get_by_label("Password").fill("wrong-password")
        form.get_by_role("button", name="Sign in", exact=True).click()
        expect(page.locator("#login-error")).to_have_text("Wrong username or password.")
        form.get_by_label("Password").fill(password)
        form.get_by_role("button", name="Sign in", exact=True).click()
        expect(page.locator("#chat-view")).to_be_visible()
        expect(page.locator("#user-email")).to_have_text(email)
        # Both are admins: ada through the directory group, the local one by her role.
        expect(page.locator("#admin-link")).to_be_visible()
        session.watch.assert_clean()
