"""Admin API: users, API keys, instances, usage, audit log."""

from __future__ import annotations

import uuid

from tests.api.conftest import Member, Zeus, insert_stale_instance


async def test_user_lifecycle(zeus: Zeus, admin: Member) -> None:
    email = f"new-{uuid.uuid4().hex[:6]}@example.com"
    async with zeus.logged_in(admin) as client:
        created = await client.post(
            "/api/admin/users", json={"email": email.upper(), "password": "first password", "role": "analyst"}
        )
        assert created.status_code == 201
        user = created.json()
        assert user["email"] == email and user["role"] == "analyst" and user["disabled"] is False
        assert user["last_login_at"] is None
        duplicate = await client.post(
            "/api/admin/users", json={"email": email, "password": "another one", "role": "admin"}
        )
        assert duplicate.status_code == 409 and email in duplicate.json()["detail"]
        bad_role = await client.post(
            "/api/admin/users", json={"email": "x@example.com", "password": "long enough", "role": "root"}
        )
        assert bad_role.status_code == 422 and "role" in bad_role.json()["detail"]
        short = await client.post(
            "/api/admin/users", json={"email": "y@example.com", "password": "short", "role": "analyst"}
        )
        assert short.status_code == 422 and "password" in short.json()["detail"]

        promoted = await client.patch(f"/api/admin/users/{user['id']}", json={"role": "admin"})
        assert promoted.status_code == 200 and promoted.json()["role"] == "admin"
        reset = await client.post(f"/api/admin/users/{user['id']}/reset-password")
        generated = reset.json()["password"]
        assert reset.status_code == 200 and len(generated) >= 16
        chosen = await client.post(
            f"/api/admin/users/{user['id']}/reset-password", json={"password": "chosen one!"}
        )
        assert chosen.json() == {"password": "chosen one!"}
        listed = {item["email"]: item for item in (await client.get("/api/admin/users")).json()}
        assert listed[email]["role"] == "admin"
        assert (await client.patch("/api/admin/users/999999", json={"role": "admin"})).status_code == 404
    async with zeus.client() as anonymous:
        old = await anonymous.post("/api/auth/login", json={"email": email, "password": "first password"})
        assert old.status_code == 401
        new = await anonymous.post("/api/auth/login", json={"email": email, "password": "chosen one!"})
        assert new.status_code == 200 and new.json()["role"] == "admin"


async def test_admin_cannot_lock_themselves_out(zeus: Zeus) -> None:
    admin = zeus.member("admin", "solo")
    async with zeus.client(headers=admin.bearer) as client:
        for change in ({"disabled": True}, {"role": "analyst"}):
            response = await client.patch(f"/api/admin/users/{admin.id}", json=change)
            assert response.status_code == 400 and "your own" in response.json()["detail"]


async def test_every_api_key_listed_and_revocable(zeus: Zeus, admin: Member, analyst: Member) -> None:
    async with zeus.client(headers=admin.bearer) as client:
        keys = (await client.get("/api/admin/api-keys")).json()
        analyst_key = next(key for key in keys if key["email"] == analyst.email)
        assert analyst.api_key.startswith(analyst_key["prefix"]) and analyst_key["user_id"] == analyst.id
        victim = zeus.member()
        victim_key = next(
            key for key in (await client.get("/api/admin/api-keys")).json() if key["email"] == victim.email
        )
        assert (await client.delete(f"/api/admin/api-keys/{victim_key['id']}")).status_code == 204
        assert (await client.delete("/api/admin/api-keys/99999999")).status_code == 404
        revoked = next(
            key for key in (await client.get("/api/admin/api-keys")).json() if key["id"] == victim_key["id"]
        )
        assert revoked["revoked_at"] is not None
    async with zeus.client(headers=victim.bearer) as client:
        assert (await client.get("/api/auth/me")).status_code == 401


async def test_audit_log_pages_newest_first_with_actor_and_address(zeus: Zeus, admin: Member) -> None:
    async with zeus.logged_in(admin) as client:
        target = zeus.member()
        await client.patch(f"/api/admin/users/{target.id}", json={"disabled": True})
        first = (await client.get("/api/admin/audit", params={"page": 1, "page_size": 3})).json()
        assert first["page"] == 1 and first["page_size"] == 3 and len(first["items"]) == 3
        assert first["total"] >= 5
        latest = first["items"][0]
        assert latest["action"] == "user.update" and latest["actor_email"] == admin.email
        assert (
            latest["target"] == target.email
            and latest["detail"] == "disabled"
            and latest["address"] == "127.0.0.1"
        )
        second = (await client.get("/api/admin/audit", params={"page": 2, "page_size": 3})).json()
        assert max(item["id"] for item in second["items"]) < min(item["id"] for item in first["items"])
        assert (await client.get("/api/admin/audit", params={"page_size": 100000})).status_code == 422


async def test_system_shows_this_instance_up_and_stale_ones_down(zeus: Zeus, admin: Member) -> None:
    insert_stale_instance(zeus, "gone:9", "r", "2 minutes", in_flight=3)
    async with zeus.client(headers=admin.bearer) as client:
        system = (await client.get("/api/admin/system")).json()
    instances = {item["instance"]: item for item in system["instances"]}
    me = instances[zeus.state.instance_name]
    assert me["state"] == "up" and me["model"] == zeus.engine.model_name and me["device"] == "cpu"
    assert me["rss_bytes"] > 10_000_000 and me["pid"] > 0 and me["port"] == zeus.state.settings.port
    assert instances["gone:9"]["state"] == "down"
    totals = system["totals"]
    assert totals["instances_up"] >= 1 and totals["instances_down"] >= 1
    assert totals["rss_bytes"] >= me["rss_bytes"]
    # Down instances do not count: their 3 connections and 9 tokens/s are not in the totals.
    assert totals["active_connections"] == sum(
        item["in_flight"] for item in system["instances"] if item["state"] == "up"
    )
    assert system["history"] and {"ts", "requests_per_s", "tokens_per_s"} <= set(system["history"][-1])
