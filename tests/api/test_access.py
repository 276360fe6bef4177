"""Fair share and quotas (app/access) on real instances sharing one real PostgreSQL: the per-user
concurrency limit across two instances, admins' overrides, a dead instance's leases, token
budgets with their reset times, API key expiry and a key's own limits, and fair admission."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest_asyncio
from sqlalchemy import func, select, text

from app.access.admission import REMEMBER_CONCURRENCY_S
from app.access.quota import period_reset, period_start
from app.config import Settings
from app.db import transaction
from app.models import GenerationLease, Usage
from tests.api.conftest import Member, Zeus, insert_stale_instance, serve_in_process, settings_for_tests

LIMIT = 2


@pytest_asyncio.fixture(scope="module")
async def zeus(database_url: str, tiny_model_path: Path) -> AsyncIterator[Zeus]:
    settings = settings_for_tests(
        database_url, tiny_model_path, max_new_tokens=1500, max_concurrent_per_user=LIMIT, max_batch_size=6
    )
    async for running in serve_in_process(settings):
        yield running


@pytest_asyncio.fixture(scope="module")
async def second_zeus(database_url: str, tiny_model_path: Path) -> AsyncIterator[Zeus]:
    """Another instance on the same database, as behind nginx."""
    settings = settings_for_tests(
        database_url, tiny_model_path, max_new_tokens=1500, max_concurrent_per_user=LIMIT, max_batch_size=6
    )
    async for running in serve_in_process(settings):
        yield running


def long_completion(zeus: Zeus, max_tokens: int = 1500) -> dict:
    return {
        "model": zeus.engine.model_name,
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }


def short_completion(zeus: Zeus) -> dict:
    return {"model": zeus.engine.model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def open_stream(stack: AsyncExitStack, client: httpx.AsyncClient, body: dict) -> httpx.Response:
    """A streamed completion left open (its generation keeps running) until the stack closes."""
    response = await stack.enter_async_context(client.stream("POST", "/api/v1/chat/completions", json=body))
    assert response.status_code == 200, await response.aread()
    return response


def leases_of(zeus: Zeus, user_id: int) -> int:
    with transaction(zeus.state.sessions) as db:
        return db.scalar(select(func.count()).where(GenerationLease.user_id == user_id)) or 0


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[Zeus]:
    """One more instance for one test, with its own settings."""
    instances = serve_in_process(settings)
    try:
        yield await anext(instances)
    finally:
        await instances.aclose()


async def wait_for_leases(zeus: Zeus, user_id: int, expected: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (count := leases_of(zeus, user_id)) != expected:
        assert time.monotonic() < deadline, f"{count} leases of user {user_id}, expected {expected}"
        await asyncio.sleep(0.05)


def add_usage(
    zeus: Zeus, member: Member, tokens: int, *, at: datetime | None = None, key_id: int | None = None
) -> None:
    with transaction(zeus.state.sessions) as db:
        db.add(
            Usage(
                ts=at or datetime.now(UTC),
                user_id=member.id,
                api_key_id=key_id,
                source="openai",
                status="complete",
                prompt_tokens=tokens // 2,
                completion_tokens=tokens - tokens // 2,
            )
        )


async def key_id_of(zeus: Zeus, admin: Member, member: Member) -> int:
    async with zeus.client(headers=admin.bearer) as client:
        keys = (await client.get("/api/admin/api-keys")).json()
    return next(key["id"] for key in keys if key["email"] == member.email)


async def test_concurrency_limit_holds_across_two_instances(zeus: Zeus, second_zeus: Zeus) -> None:
    heavy, light = zeus.member(prefix="heavy"), zeus.member(prefix="light")
    async with (
        AsyncExitStack() as stack,
        zeus.client(headers=heavy.bearer) as first,
        second_zeus.client(headers=heavy.bearer) as second,
        zeus.client(headers=light.bearer) as other,
    ):
        await open_stream(stack, first, long_completion(zeus))
        await open_stream(stack, second, long_completion(zeus))
        for client in (first, second):
            refused = await client.post("/api/v1/chat/completions", json=short_completion(zeus))
            assert refused.status_code == 429
            assert int(refused.headers["retry-after"]) >= 1
            error = refused.json()["error"]
            assert error["type"] == "rate_limit_exceeded"
            assert (
                f"your limit is {LIMIT}" in error["message"]
                and "ZEUS_MAX_CONCURRENT_PER_USER" in error["message"]
            )
        # The chat page's route goes through the same check.
        conversation = (await first.post("/api/conversations", json={})).json()["id"]
        chat = await first.post(f"/api/conversations/{conversation}/messages", json={"content": "hi"})
        assert chat.status_code == 429 and f"your limit is {LIMIT}" in chat.json()["detail"]
        # Another user is not held back by the first one's limit.
        assert (await other.post("/api/v1/chat/completions", json=short_completion(zeus))).status_code == 200
        usage = (await first.get("/api/auth/me/usage")).json()
        assert usage["concurrency"] == {"active": LIMIT, "limit": LIMIT}
    # Clients that left gave their leases back: the user may start again.
    await wait_for_leases(zeus, heavy.id, 0)
    async with zeus.client(headers=heavy.bearer) as client:
        assert (await client.post("/api/v1/chat/completions", json=short_completion(zeus))).status_code == 200
    await wait_for_leases(zeus, heavy.id, 0)  # released just after the answer, off the event loop


async def test_a_client_running_exactly_its_limit_in_a_row_is_never_refused(
    zeus: Zeus, second_zeus: Zeus
) -> None:
    """LIMIT workers, each sending its next request the moment the previous answer ended,
    alternating between the two instances (as nginx may): the finished request's lease is gone
    before its last byte is sent, so the next one is never counted against it (an API client at
    its limit got an occasional 429 while the lease was still being deleted)."""
    member = zeus.member(prefix="exact")
    streamed = {**short_completion(zeus), "stream": True, "max_tokens": 3}
    refusals: list[str] = []

    async def worker(index: int) -> None:
        async with (
            zeus.client(headers=member.bearer) as first,
            second_zeus.client(headers=member.bearer) as second,
        ):
            for turn in range(12):
                client = (first, second)[(index + turn) % 2]
                if turn % 2:
                    answer = await client.post("/api/v1/chat/completions", json=short_completion(zeus))
                    if answer.status_code != 200:
                        refusals.append(answer.text)
                    continue
                async with client.stream("POST", "/api/v1/chat/completions", json=streamed) as answer:
                    body = (await answer.aread()).decode()
                    if answer.status_code != 200:
                        refusals.append(body)
                    else:
                        assert body.rstrip().endswith("data: [DONE]"), body[-200:]

    await asyncio.gather(*(worker(index) for index in range(LIMIT)))
    assert refusals == []
    await wait_for_leases(zeus, member.id, 0)


async def test_admin_override_of_the_concurrency_limit(zeus: Zeus, admin: Member) -> None:
    member = zeus.member(prefix="override")
    async with (
        zeus.client(headers=admin.bearer) as admin_client,
        zeus.client(headers=member.bearer) as client,
    ):
        changed = await admin_client.patch(f"/api/admin/users/{member.id}/limits", json={"max_concurrent": 1})
        assert changed.status_code == 200 and changed.json()["max_concurrent"] == 1
        async with AsyncExitStack() as stack:
            await open_stream(stack, client, long_completion(zeus))
            refused = await client.post("/api/v1/chat/completions", json=short_completion(zeus))
            assert refused.status_code == 429 and "your limit is 1" in refused.json()["error"]["message"]
            raised = await admin_client.patch(
                f"/api/admin/users/{member.id}/limits", json={"max_concurrent": 3}
            )
            assert raised.json()["max_concurrent"] == 3
            await open_stream(stack, client, long_completion(zeus))
            await open_stream(stack, client, long_completion(zeus))
            refused = await client.post("/api/v1/chat/completions", json=short_completion(zeus))
            assert refused.status_code == 429 and "your limit is 3" in refused.json()["error"]["message"]
        bad = await admin_client.patch(f"/api/admin/users/{member.id}/limits", json={"max_concurrent": 0})
        assert bad.status_code == 422 and "max_concurrent" in bad.json()["detail"]
        cleared = await admin_client.patch(
            f"/api/admin/users/{member.id}/limits", json={"max_concurrent": None}
        )
        assert cleared.json()["max_concurrent"] is None
        listed = {user["id"]: user for user in (await admin_client.get("/api/admin/users")).json()}
        assert listed[member.id]["max_concurrent"] is None
        audit = (await admin_client.get("/api/admin/audit")).json()["items"]
        assert any(item["action"] == "user.limits" and item["target"] == member.email for item in audit)
        forbidden = await client.patch(f"/api/admin/users/{member.id}/limits", json={"max_concurrent": 99})
        assert forbidden.status_code == 403


async def test_a_dead_instances_leases_stop_counting(zeus: Zeus) -> None:
    member = zeus.member(prefix="orphan")
    dead_run, live_run = str(uuid.uuid4()), str(uuid.uuid4())
    # A host killed mid-generation: its heartbeat is older than the stale timeout (15 s).
    insert_stale_instance(zeus, f"dead-{dead_run[:6]}", dead_run, "1 minute")
    # A live host (fresh heartbeat) holding one of the user's generations.
    insert_stale_instance(zeus, f"live-{live_run[:6]}", live_run, "1 second")
    with transaction(zeus.state.sessions) as db:
        for _ in range(LIMIT):
            db.add(GenerationLease(user_id=member.id, run_id=dead_run))
        db.add(GenerationLease(user_id=member.id, run_id=live_run))
    async with zeus.client(headers=member.bearer) as client, AsyncExitStack() as stack:
        usage = (await client.get("/api/auth/me/usage")).json()
        assert usage["concurrency"]["active"] == 1  # the dead run's leases are not counted
        await open_stream(stack, client, long_completion(zeus))
        with transaction(zeus.state.sessions) as db:
            runs = db.scalars(
                select(GenerationLease.run_id).where(GenerationLease.user_id == member.id)
            ).all()
        assert dead_run not in runs and runs.count(live_run) == 1  # deleted by that admission
        refused = await client.post("/api/v1/chat/completions", json=short_completion(zeus))
        assert (
            refused.status_code == 429 and f"you have {LIMIT} running" in refused.json()["error"]["message"]
        )
        # The live host dies too: once its heartbeat is stale, the user may start another one
        # (after the instance stops repeating its last refusal from memory).
        insert_stale_instance(zeus, f"live-{live_run[:6]}", live_run, "1 minute")
        await asyncio.sleep(REMEMBER_CONCURRENCY_S)
        assert (await client.post("/api/v1/chat/completions", json=short_completion(zeus))).status_code == 200


async def test_daily_budget_refuses_with_the_reset_time_on_both_routes(zeus: Zeus, admin: Member) -> None:
    member = zeus.member(prefix="budget")
    async with (
        zeus.client(headers=admin.bearer) as admin_client,
        zeus.client(headers=member.bearer) as client,
    ):
        unlimited = (await client.get("/api/auth/me/usage")).json()["budgets"]
        assert [(item["period"], item["budget"], item["used"]) for item in unlimited] == [
            ("day", None, 0),
            ("month", None, 0),
        ]
        answer = await client.post("/api/v1/chat/completions", json=short_completion(zeus))
        assert answer.status_code == 200
        spent = answer.json()["usage"]["total_tokens"]
        changed = await admin_client.patch(
            f"/api/admin/users/{member.id}/limits", json={"daily_token_budget": spent + 5}
        )
        assert changed.json()["daily_token_budget"] == spent + 5
        # Under the budget: admitted, and this one uses it up.
        assert (await client.post("/api/v1/chat/completions", json=short_completion(zeus))).status_code == 200
        now = datetime.now(UTC)
        midnight = period_reset(now, "day")
        refused = await client.post("/api/v1/chat/completions", json=short_completion(zeus))
        assert refused.status_code == 429
        message = refused.json()["error"]["message"]
        assert refused.json()["error"]["type"] == "rate_limit_exceeded"
        assert "daily token budget is used up" in message and f"of {spent + 5} tokens" in message
        assert f"resets at {midnight:%Y-%m-%d} 00:00 UTC" in message
        retry_after = int(refused.headers["retry-after"])
        assert abs(retry_after - (midnight - now).total_seconds()) < 30
        conversation = (await client.post("/api/conversations", json={})).json()["id"]
        chat = await client.post(f"/api/conversations/{conversation}/messages", json={"content": "hi"})
        assert chat.status_code == 429 and "resets at" in chat.json()["detail"]
        days = (await client.get("/api/auth/me/usage")).json()["budgets"]
        day = next(item for item in days if item["period"] == "day")
        assert day["budget"] == spent + 5 and day["used"] >= spent * 2
        assert datetime.fromisoformat(day["resets_at"]) == midnight
        # The admin lifts it: admitted again.
        await admin_client.patch(f"/api/admin/users/{member.id}/limits", json={"daily_token_budget": None})
        assert (await client.post("/api/v1/chat/completions", json=short_completion(zeus))).status_code == 200
    # A refusal takes no lease, and the admitted ones are given back (by a task, just after the
    # answer: the serving layer releases when the engine's result arrives).
    await until(lambda: leases_of(zeus, member.id) == 0)


async def test_monthly_budget_counts_this_month_only(zeus: Zeus, admin: Member) -> None:
    member = zeus.member(prefix="month")
    now = datetime.now(UTC)
    add_usage(zeus, member, 1000, at=period_start(now, "month") - timedelta(hours=1))
    async with (
        zeus.client(headers=admin.bearer) as admin_client,
        zeus.client(headers=member.bearer) as client,
    ):
        await admin_client.patch(f"/api/admin/users/{member.id}/limits", json={"monthly_token_budget": 500})
        # Last month's 1000 tokens do not count against this month's 500.
        assert (await client.post("/api/v1/chat/completions", json=short_completion(zeus))).status_code == 200
        add_usage(zeus, member, 500)
        refused = await client.post("/api/v1/chat/completions", json=short_completion(zeus))
        assert refused.status_code == 429
        first_of_next = period_reset(now, "month")
        assert first_of_next.day == 1 and first_of_next > now
        assert "monthly token budget is used up" in refused.json()["error"]["message"]
        assert f"resets at {first_of_next:%Y-%m-%d} 00:00 UTC" in refused.json()["error"]["message"]


async def test_api_key_expiry(zeus: Zeus, admin: Member) -> None:
    member = zeus.member(prefix="expiry")
    key_id = await key_id_of(zeus, admin, member)
    async with (
        zeus.client(headers=admin.bearer) as admin_client,
        zeus.client(headers=member.bearer) as client,
    ):
        future = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
        changed = await admin_client.patch(
            f"/api/admin/api-keys/{key_id}", json={"expires_at": future.isoformat()}
        )
        assert changed.status_code == 200 and datetime.fromisoformat(changed.json()["expires_at"]) == future
        assert (await client.get("/api/v1/models")).status_code == 200
        past = datetime.now(UTC) - timedelta(seconds=1)
        await admin_client.patch(f"/api/admin/api-keys/{key_id}", json={"expires_at": past.isoformat()})
        expired = await client.get("/api/v1/models")
        assert expired.status_code == 401 and "expired" in expired.json()["error"]["message"]
        naive = await admin_client.patch(
            f"/api/admin/api-keys/{key_id}", json={"expires_at": "2030-01-01T00:00:00"}
        )
        assert naive.status_code == 422 and "time zone" in naive.json()["detail"]
        await admin_client.patch(f"/api/admin/api-keys/{key_id}", json={"expires_at": None})
        assert (await client.get("/api/v1/models")).status_code == 200
    async with zeus.logged_in(member) as session:
        created = await session.post(
            "/api/keys",
            json={"name": "short-lived", "expires_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat()},
        )
        assert created.status_code == 201
        listed = {key["name"]: key for key in (await session.get("/api/keys")).json()}
        assert listed["short-lived"]["expires_at"] is not None
        stale = await session.post("/api/keys", json={"name": "late", "expires_at": "2020-01-01T00:00:00Z"})
        assert stale.status_code == 400 and "not in the future" in stale.json()["detail"]


async def test_api_key_own_limits(zeus: Zeus, admin: Member) -> None:
    member = zeus.member(prefix="keylimits")
    key_id = await key_id_of(zeus, admin, member)
    async with (
        zeus.client(headers=admin.bearer) as admin_client,
        zeus.client(headers=member.bearer) as with_key,
        zeus.logged_in(member) as with_session,
    ):
        changed = await admin_client.patch(
            f"/api/admin/api-keys/{key_id}", json={"max_concurrent": 1, "daily_token_budget": 1_000_000}
        )
        assert changed.json()["max_concurrent"] == 1
        async with AsyncExitStack() as stack:
            await open_stream(stack, with_key, long_completion(zeus))
            refused = await with_key.post("/api/v1/chat/completions", json=short_completion(zeus))
            assert refused.status_code == 429 and "the key's limit is 1" in refused.json()["error"]["message"]
            # The user's own limit (2) still has room for a request made without that key.
            assert (
                await with_session.post("/api/v1/chat/completions", json=short_completion(zeus))
            ).status_code == 200
        await wait_for_leases(zeus, member.id, 0)
        add_usage(zeus, member, 1_000_000, key_id=key_id)
        refused = await with_key.post("/api/v1/chat/completions", json=short_completion(zeus))
        assert (
            refused.status_code == 429
            and "this API key's daily token budget" in refused.json()["error"]["message"]
        )
        key_usage = (await with_key.get("/api/auth/me/usage")).json()["budgets"]
        assert {(item["scope"], item["period"]) for item in key_usage} >= {("key", "day")}
        # The user's own budgets are unlimited: the session still works.
        assert (
            await with_session.post("/api/v1/chat/completions", json=short_completion(zeus))
        ).status_code == 200


async def test_fair_admission_serves_the_waiting_user_before_the_heavy_users_backlog(
    database_url: str, tiny_model_path: Path
) -> None:
    """One batch slot: user A's 3 requests (1 running, 2 waiting) and then user B's single one;
    B is let in as soon as A's running one ends, before A's backlog."""
    settings = settings_for_tests(
        database_url,
        tiny_model_path,
        max_batch_size=1,
        max_queue=8,
        max_new_tokens=400,
        max_concurrent_per_user=8,
    )
    async with serving(settings) as zeus:
        heavy, light = zeus.member(prefix="a"), zeus.member(prefix="b")
        finished: list[str] = []

        async def run(member: Member, label: str, tokens: int) -> None:
            async with zeus.client(headers=member.bearer) as client:
                body = {**long_completion(zeus, tokens), "stream": False}
                response = await client.post("/api/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text
                finished.append(label)

        tasks = [asyncio.create_task(run(heavy, "a1", 200))]
        await until(lambda: zeus.engine.stats().running > 0)
        for label in ("a2", "a3"):
            tasks.append(asyncio.create_task(run(heavy, label, 20)))
        await until(lambda: zeus.state.access.gate.waiting >= 2)
        tasks.append(asyncio.create_task(run(light, "b1", 20)))
        await until(lambda: zeus.state.access.gate.waiting >= 3)
        assert zeus.state.access.gate.waiting_users() == {heavy.id: 2, light.id: 1}
        await asyncio.gather(*tasks)
        assert finished[:2] == ["a1", "b1"], finished


async def test_fair_gate_refuses_when_its_waiting_line_is_full(
    database_url: str, tiny_model_path: Path
) -> None:
    settings = settings_for_tests(
        database_url,
        tiny_model_path,
        max_batch_size=1,
        max_queue=1,
        max_new_tokens=1500,
        max_concurrent_per_user=8,
    )
    async with serving(settings) as zeus:
        member = zeus.member()
        async with zeus.client(headers=member.bearer) as client, AsyncExitStack() as stack:
            await open_stream(stack, client, long_completion(zeus))
            waiting = asyncio.create_task(
                client.post("/api/v1/chat/completions", json=short_completion(zeus))
            )
            await until(lambda: zeus.state.access.gate.waiting >= 1)
            full = await client.post("/api/v1/chat/completions", json=short_completion(zeus))
            assert full.status_code == 429 and "server busy" in full.json()["error"]["message"]
            assert "ZEUS_MAX_QUEUE" in full.json()["error"]["message"]
            await stack.aclose()  # the running one ends: the waiting one goes in
            assert (await waiting).status_code == 200
        await wait_for_leases(zeus, member.id, 0)
        with transaction(zeus.state.sessions) as db:
            assert (
                db.execute(
                    text("SELECT count(*) FROM generation_leases WHERE user_id = :u"), {"u": member.id}
                ).scalar()
                == 0
            )
