"""The nginx role's configuration in front of two real Zeus instances (`python -m app serve` on the
tiny model and the session's PostgreSQL): OpenAI clients through /v1/, one conversation staying on
one instance, and an instance that stops losing no request."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import parse_sse
from tests.deploy.nginx import Nginx, start_nginx
from tests.support.live_server import Account, LiveServer, start_live_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def instances(
    database_url: str, tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[LiveServer]]:
    log_dir = tmp_path_factory.mktemp("zeus-instances")
    started: list[LiveServer] = []
    try:
        for _ in range(2):
            started.append(start_live_server(database_url, tiny_model_path, log_dir))
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def analyst(instances: list[LiveServer]) -> Account:
    return instances[0].create_account(f"nginx-{uuid.uuid4().hex[:8]}@example.com", "analyst")


@pytest.fixture(scope="module")
def nginx(instances: list[LiveServer], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    server = start_nginx(
        tmp_path_factory.mktemp("nginx"),
        nginx_upstream_servers=[f"127.0.0.1:{instance.port}" for instance in instances],
        nginx_client_max_body_size="64k",
    )
    yield server
    server.stop()


def completion(client: httpx.Client, path: str = "/v1/chat/completions", **body) -> httpx.Response:
    return client.post(
        path,
        json={
            "model": "tiny-model",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
            **body,
        },
    )


def test_openai_requests_through_v1_stick_to_the_user_and_spread_over_users(
    nginx: Nginx, analyst: Account
) -> None:
    headers = {"Authorization": f"Bearer {analyst.api_key}"}
    with httpx.Client(base_url=nginx.base_url, headers=headers, timeout=120) as client:
        models = client.get("/v1/models")
        assert models.status_code == 200 and models.json()["data"], models.text
        assert [model["id"] for model in models.json()["data"]] == ["tiny-model"]
        same_key = [completion(client) for _ in range(4)]
        assert [answer.status_code for answer in same_key] == [200] * 4, same_key[0].text
        assert len({answer.headers["x-zeus-instance"] for answer in same_key}) == 1
        by_user = {}
        for user in (f"analyst-{index}" for index in range(8)):
            answers = [
                completion(client, user=user),
                completion(client, "/api/v1/chat/completions", user=user),
            ]
            assert [answer.status_code for answer in answers] == [200, 200], answers[0].text
            assert answers[0].json()["choices"][0]["message"]["role"] == "assistant"
            instances = {answer.headers["x-zeus-instance"] for answer in answers}
            assert len(instances) == 1, (user, instances)
            by_user[user] = instances.pop()
    assert len(set(by_user.values())) == 2, by_user


def test_a_conversation_stays_on_one_instance(nginx: Nginx, analyst: Account) -> None:
    with httpx.Client(base_url=nginx.base_url, timeout=120) as client:
        login = client.post("/api/auth/login", json={"email": analyst.email, "password": analyst.password})
        assert login.status_code == 200, login.text
        conversations = [client.post("/api/conversations", json={}).json()["id"] for _ in range(6)]
        served = {}
        for conversation in conversations:
            replies = [
                client.post(f"/api/conversations/{conversation}/messages", json={"content": f"Turn {turn}"})
                for turn in range(2)
            ]
            for reply in replies:
                assert reply.status_code == 200, reply.text
                assert parse_sse(reply.text)[-1][0] == "done"
            instances = {reply.headers["x-zeus-instance"] for reply in replies}
            assert len(instances) == 1, (conversation, instances)
            served[conversation] = instances.pop()
            history = client.get(f"/api/conversations/{conversation}/messages").json()
            assert [message["content"] for message in history if message["role"] == "user"] == [
                "Turn 0",
                "Turn 1",
            ]
    assert len(set(served.values())) == 2, served


def test_one_key_past_its_limit_leaves_every_instance_to_the_others(
    nginx: Nginx, instances: list[LiveServer], analyst: Account
) -> None:
    """Issue 16's example, as a new user tried it: one API key opening many streams at once. Past
    ZEUS_MAX_CONCURRENT_PER_USER (4) every instance answers it 429; those refusals must not make
    nginx take the instances out (they did: max_fails=3, and everyone else got 502)."""
    heavy = instances[0].create_account(f"heavy-{uuid.uuid4().hex[:8]}@example.com", "analyst")
    body = {"max_tokens": 32, "ignore_eos": True}
    with httpx.Client(base_url=nginx.base_url, timeout=120) as heavy_client, ThreadPoolExecutor(16) as pool:
        heavy_client.headers["Authorization"] = f"Bearer {heavy.api_key}"
        flood = list(pool.map(lambda _: completion(heavy_client, **body), range(48)))
    statuses = [answer.status_code for answer in flood]
    assert set(statuses) <= {200, 429}, [a.text for a in flood if a.status_code not in (200, 429)]
    refused = [answer for answer in flood if answer.status_code == 429]
    assert len(refused) >= 3, statuses  # enough to have taken both instances out before
    assert all("your limit is 4" in answer.json()["error"]["message"] for answer in refused)
    assert all(int(answer.headers["retry-after"]) >= 1 for answer in refused)
    with httpx.Client(base_url=nginx.base_url, timeout=120) as client:
        client.headers["Authorization"] = f"Bearer {analyst.api_key}"
        others = [completion(client, user=f"other-{index}") for index in range(8)]
    assert [answer.status_code for answer in others] == [200] * len(others), [a.text for a in others]
    assert "no live upstreams" not in nginx.error_log()


def test_nginx_refuses_a_body_over_its_limit_as_openai_does(nginx: Nginx, analyst: Account) -> None:
    with httpx.Client(base_url=nginx.base_url, timeout=60) as client:
        answer = client.post(
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {analyst.api_key}"},
            json={"model": "tiny-model", "messages": [{"role": "user", "content": "x" * 70_000}]},
        )
    assert answer.status_code == 413
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["error"]["code"] == "request_too_large"


def test_a_stopped_instance_loses_no_request(
    nginx: Nginx, instances: list[LiveServer], analyst: Account
) -> None:
    """Runs last in this module: it stops one of the two instances. Its users move to the other
    one, nobody gets an error, and the other instance's users were already there."""
    headers = {"Authorization": f"Bearer {analyst.api_key}"}
    users = [f"failover-{index}" for index in range(8)]
    with httpx.Client(base_url=nginx.base_url, headers=headers, timeout=120) as client:
        with httpx.Client(base_url=instances[1].base_url) as direct:
            survivor = direct.get("/api/health").headers["x-zeus-instance"]
        before = {user: completion(client, user=user).headers["x-zeus-instance"] for user in users}
        assert len(set(before.values())) == 2 and survivor in before.values(), before
        instances[0].stop(signal.SIGTERM)
        answers = {user: completion(client, user=user) for user in users}
    assert {user: answer.status_code for user, answer in answers.items()} == dict.fromkeys(users, 200)
    assert {user: answer.headers["x-zeus-instance"] for user, answer in answers.items()} == dict.fromkeys(
        users, survivor
    )
