"""Every route × anonymous, analyst (the owner), another analyst and an admin."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import pytest

from tests.api.conftest import Member, Zeus

ROLES = ("anonymous", "owner", "other", "admin")


@dataclass
class World:
    zeus: Zeus
    owner: Member
    target_user: Member

    async def conversation(self, with_message: bool = False) -> int:
        async with self.zeus.client(headers=self.owner.bearer) as client:
            conversation = (await client.post("/api/conversations", json={})).json()["id"]
            if with_message:
                await client.post(f"/api/conversations/{conversation}/messages", json={"content": "hi"})
            return conversation

    async def key(self) -> int:
        async with self.zeus.client(headers=self.owner.bearer) as client:
            return (await client.post("/api/keys", json={"name": "matrix"})).json()["id"]


Request = Callable[[World], Awaitable[tuple[str, str, dict | None]]]


def fixed(method: str, path: str, body: dict | None = None) -> Request:
    async def build(world: World) -> tuple[str, str, dict | None]:
        return method, path.format(user=world.target_user.id), body

    return build


def on_conversation(
    method: str, suffix: str = "", body: dict | None = None, with_message: bool = False
) -> Request:
    async def build(world: World) -> tuple[str, str, dict | None]:
        return method, f"/api/conversations/{await world.conversation(with_message)}{suffix}", body

    return build


def on_first_message(method: str, body: dict) -> Request:
    async def build(world: World) -> tuple[str, str, dict | None]:
        conversation = await world.conversation(with_message=True)
        async with world.zeus.client(headers=world.owner.bearer) as client:
            first = (await client.get(f"/api/conversations/{conversation}/messages")).json()[0]["id"]
        return method, f"/api/conversations/{conversation}/messages/{first}", body

    return build


def on_key(method: str, prefix: str, body: dict | None = None) -> Request:
    async def build(world: World) -> tuple[str, str, dict | None]:
        return method, f"{prefix}/{await world.key()}", body

    return build


OWNED = (401, 200, 404, 404)
ANY_USER = (401, 200, 200, 200)
ADMIN_ONLY = (401, 403, 403, 200)
COMPLETION = {"model": "tiny-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

# route template -> how to call it, expected status for (anonymous, owner, other, admin).
MATRIX: dict[tuple[str, str], tuple[Request, tuple[int, int, int, int]]] = {
    ("GET", "/api/health"): (fixed("GET", "/api/health"), (200, 200, 200, 200)),
    ("GET", "/metrics"): (fixed("GET", "/metrics"), (200, 200, 200, 200)),
    ("POST", "/api/auth/login"): (
        fixed("POST", "/api/auth/login", {"email": "x@example.com", "password": "wrongpass"}),
        (401, 401, 401, 401),
    ),
    ("POST", "/api/auth/logout"): (fixed("POST", "/api/auth/logout"), (204, 204, 204, 204)),
    ("GET", "/api/auth/me"): (fixed("GET", "/api/auth/me"), ANY_USER),
    ("GET", "/api/auth/me/usage"): (fixed("GET", "/api/auth/me/usage"), ANY_USER),
    ("PATCH", "/api/admin/users/{user_id}/limits"): (
        fixed("PATCH", "/api/admin/users/{user}/limits", {"daily_token_budget": None}),
        ADMIN_ONLY,
    ),
    ("GET", "/api/admin/users/{user_id}/usage"): (fixed("GET", "/api/admin/users/{user}/usage"), ADMIN_ONLY),
    ("PATCH", "/api/admin/api-keys/{key_id}"): (
        on_key("PATCH", "/api/admin/api-keys", {"max_concurrent": None}),
        ADMIN_ONLY,
    ),
    # Single sign-on: public; this server configures neither OIDC nor LDAP (tests/api/routes/test_sso.py).
    ("GET", "/api/auth/providers"): (fixed("GET", "/api/auth/providers"), (200, 200, 200, 200)),
    ("GET", "/api/auth/oidc/login"): (fixed("GET", "/api/auth/oidc/login"), (404, 404, 404, 404)),
    ("GET", "/api/auth/oidc/callback"): (
        fixed("GET", "/api/auth/oidc/callback?state=s&code=c"),
        (404, 404, 404, 404),
    ),
    ("POST", "/api/auth/ldap/login"): (
        fixed("POST", "/api/auth/ldap/login", {"username": "x", "password": "wrongpass"}),
        (404, 404, 404, 404),
    ),
    ("GET", "/api/conversations"): (fixed("GET", "/api/conversations"), ANY_USER),
    ("DELETE", "/api/conversations"): (fixed("DELETE", "/api/conversations"), (401, 204, 204, 204)),
    ("GET", "/api/conversations/defaults"): (fixed("GET", "/api/conversations/defaults"), ANY_USER),
    ("PUT", "/api/admin/chat-defaults"): (
        fixed("PUT", "/api/admin/chat-defaults", {"default_system_prompt": ""}),
        ADMIN_ONLY,
    ),
    ("GET", "/api/conversations/{conversation_id}/export"): (
        on_conversation("GET", "/export?format=json"),
        OWNED,
    ),
    ("PUT", "/api/conversations/{conversation_id}/messages/{message_id}"): (
        on_first_message("PUT", {"content": "edited", "options": {"max_tokens": 4}}),
        OWNED,
    ),
    ("POST", "/api/auth/password"): (
        fixed("POST", "/api/auth/password", {"current_password": "wrong one", "new_password": "long enough"}),
        (401, 400, 400, 400),
    ),
    ("POST", "/api/conversations"): (fixed("POST", "/api/conversations", {}), (401, 201, 201, 201)),
    ("PATCH", "/api/conversations/{conversation_id}"): (on_conversation("PATCH", "", {"title": "t"}), OWNED),
    ("DELETE", "/api/conversations/{conversation_id}"): (on_conversation("DELETE"), (401, 204, 404, 404)),
    ("GET", "/api/conversations/{conversation_id}/messages"): (on_conversation("GET", "/messages"), OWNED),
    ("POST", "/api/conversations/{conversation_id}/messages"): (
        on_conversation("POST", "/messages", {"content": "hello", "options": {"max_tokens": 4}}),
        OWNED,
    ),
    ("POST", "/api/conversations/{conversation_id}/regenerate"): (
        on_conversation("POST", "/regenerate", {"options": {"max_tokens": 4}}, with_message=True),
        OWNED,
    ),
    ("POST", "/api/conversations/{conversation_id}/stop"): (on_conversation("POST", "/stop"), OWNED),
    ("GET", "/api/keys"): (fixed("GET", "/api/keys"), ANY_USER),
    ("POST", "/api/keys"): (fixed("POST", "/api/keys", {"name": "k"}), (401, 201, 201, 201)),
    ("DELETE", "/api/keys/{key_id}"): (on_key("DELETE", "/api/keys"), (401, 204, 404, 404)),
    ("GET", "/api/admin/users"): (fixed("GET", "/api/admin/users"), ADMIN_ONLY),
    ("POST", "/api/admin/users"): (
        fixed(
            "POST",
            "/api/admin/users",
            {"email": "new@example.com", "password": "long enough", "role": "analyst"},
        ),
        (401, 403, 403, 201),
    ),
    ("PATCH", "/api/admin/users/{user_id}"): (
        fixed("PATCH", "/api/admin/users/{user}", {"role": "analyst"}),
        ADMIN_ONLY,
    ),
    ("POST", "/api/admin/users/{user_id}/reset-password"): (
        fixed("POST", "/api/admin/users/{user}/reset-password", {}),
        ADMIN_ONLY,
    ),
    ("GET", "/api/admin/api-keys"): (fixed("GET", "/api/admin/api-keys"), ADMIN_ONLY),
    ("DELETE", "/api/admin/api-keys/{key_id}"): (
        on_key("DELETE", "/api/admin/api-keys"),
        (401, 403, 403, 204),
    ),
    ("GET", "/api/admin/system"): (fixed("GET", "/api/admin/system"), ADMIN_ONLY),
    ("GET", "/api/admin/usage"): (fixed("GET", "/api/admin/usage"), ADMIN_ONLY),
    ("GET", "/api/admin/audit"): (fixed("GET", "/api/admin/audit"), ADMIN_ONLY),
    ("GET", "/api/v1/models"): (fixed("GET", "/api/v1/models"), ANY_USER),
    ("POST", "/api/v1/chat/completions"): (fixed("POST", "/api/v1/chat/completions", COMPLETION), ANY_USER),
}


async def test_the_matrix_covers_every_route(zeus: Zeus) -> None:
    async with zeus.client() as client:
        paths = (await client.get("/openapi.json")).json()["paths"]
    app_routes = {(method.upper(), path) for path, operations in paths.items() for method in operations}
    assert app_routes == set(MATRIX)


@pytest.mark.parametrize("route", list(MATRIX), ids=[f"{m} {p}" for m, p in MATRIX])
async def test_route_answers_each_role(
    route: tuple[str, str], zeus: Zeus, analyst: Member, other_analyst: Member, admin: Member
) -> None:
    build, expected = MATRIX[route]
    target = zeus.member(prefix="target")
    world = World(zeus=zeus, owner=analyst, target_user=target)
    callers: dict[str, dict[str, str]] = {
        "anonymous": {},
        "owner": analyst.bearer,
        "other": other_analyst.bearer,
        "admin": admin.bearer,
    }
    got = []
    for role in ROLES:
        method, path, body = await build(world)
        if path == "/api/admin/users" and method == "POST":
            body = {**body, "email": f"{role}-{target.email}"}
        async with httpx.AsyncClient(base_url=zeus.base_url, headers=callers[role], timeout=60) as client:
            response = await client.request(method, path, json=body)
            got.append(response.status_code)
    assert tuple(got) == expected


async def test_analyst_session_cookie_gets_403_on_admin_routes(zeus: Zeus, analyst: Member) -> None:
    async with zeus.logged_in(analyst) as client:
        response = await client.get("/api/admin/users")
        assert response.status_code == 403 and response.json() == {"detail": "this needs the admin role"}
