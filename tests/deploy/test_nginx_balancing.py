"""nginx's own behaviour with the nginx role's configuration, through a real nginx in front of small
real HTTP upstreams: which instance a request goes to (affinity, least_conn, drained and dead
instances), which refusals move a request to another instance and which failures never do (a
request must never run twice), nginx's own errors in OpenAI's error object, and /v1/ as /api/v1/."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.deploy.nginx import Nginx, Upstream, start_nginx
from tests.support.live_server import free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def upstreams() -> Iterator[list[Upstream]]:
    started: list[Upstream] = []
    yield started
    for upstream in started:
        upstream.stop()


@pytest.fixture
def nginx_factory(tmp_path: Path) -> Iterator:
    started: list[Nginx] = []

    def start(servers: list[Upstream] | list[str], **settings) -> Nginx:
        addresses = [server if isinstance(server, str) else server.address for server in servers]
        nginx = start_nginx(tmp_path / f"nginx-{len(started)}", nginx_upstream_servers=addresses, **settings)
        started.append(nginx)
        return nginx

    yield start
    for nginx in started:
        nginx.stop()


def spawn(upstreams: list[Upstream], *specs: tuple[str, str]) -> list[Upstream]:
    started = [Upstream(name, behaviour).start() for name, behaviour in specs]
    upstreams.extend(started)
    return started


def chat_post(
    client: httpx.Client, key: str, request_id: str, path: str = "/api/v1/chat/completions", **body
) -> httpx.Response:
    return client.post(
        path,
        headers={"Authorization": f"Bearer {key}"},
        json={"id": request_id, "model": "m", "messages": [{"role": "user", "content": "Hi"}], **body},
    )


def served_by(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.headers["x-zeus-instance"]


def conversation_routes(client: httpx.Client, conversations: list[int]) -> dict[int, str]:
    """The instance each conversation's POST .../messages went to (each asked twice: it must not move)."""
    routes = {}
    for conversation in conversations:
        first = served_by(
            client.post(f"/api/conversations/{conversation}/messages", json={"id": uuid.uuid4().hex})
        )
        again = served_by(
            client.post(f"/api/conversations/{conversation}/messages", json={"id": uuid.uuid4().hex})
        )
        assert first == again, (
            f"conversation {conversation} moved from {first} to {again} with every instance up"
        )
        routes[conversation] = first
    return routes


# --- Retries ------------------------------------------------------------------------------------


@pytest.mark.parametrize("balancing", ["affinity", "least_conn"])
@pytest.mark.parametrize("refusal", ["429", "503"])
def test_an_instance_refusal_moves_every_post_to_the_other_instance(
    upstreams: list[Upstream], nginx_factory, balancing: str, refusal: str
) -> None:
    """A full (429) or draining/starting (503) instance has done no work: nginx passes the POST on
    (non_idempotent), and the client never sees the refusal while another instance has room."""
    refusing, healthy = spawn(upstreams, ("refusing", refusal), ("healthy", "ok"))
    nginx = nginx_factory([refusing, healthy], nginx_balancing=balancing)
    sent = [uuid.uuid4().hex for _ in range(24)]
    with httpx.Client(base_url=nginx.base_url, timeout=30) as client:
        answers = [chat_post(client, f"key-{index}", request_id) for index, request_id in enumerate(sent)]
    assert [answer.status_code for answer in answers] == [200] * len(sent), [
        a.text for a in answers if a.status_code != 200
    ]
    assert {answer.headers["x-zeus-instance"] for answer in answers} == {"healthy"}
    assert sorted(healthy.ids()) == sorted(sent), "every POST ran exactly once, on the healthy instance"
    # The refusing instance was asked first for some of them (else nothing was retried).
    assert len(refusing.ids()) >= 1


def test_the_last_refusal_reaches_the_client_unchanged(upstreams: list[Upstream], nginx_factory) -> None:
    """When every instance is full, the client gets an instance's own 429 with its Retry-After."""
    first, second = spawn(upstreams, ("a", "429"), ("b", "429"))
    nginx = nginx_factory([first, second])
    with httpx.Client(base_url=nginx.base_url, timeout=30) as client:
        answer = chat_post(client, "key", uuid.uuid4().hex)
    assert answer.status_code == 429
    assert answer.headers["retry-after"] == "1"
    assert answer.json()["error"]["message"].endswith("refuses")
    assert len(first.ids()) + len(second.ids()) == 2


@pytest.mark.parametrize("balancing", ["affinity", "least_conn"])
def test_one_users_refusals_never_take_an_instance_out_for_others(
    upstreams: list[Upstream], nginx_factory, balancing: str
) -> None:
    """A user over a fleet-wide limit gets 429 from every instance. Those refusals are answers,
    not instance failures: with nginx's usual max_fails=3 the heavy key's flood took both
    instances out and the other users got 502 "no live upstreams" (issue 16's bench fairness)."""
    first, second = spawn(upstreams, ("a", "429-heavy"), ("b", "429-heavy"))
    nginx = nginx_factory([first, second], nginx_balancing=balancing)
    with httpx.Client(base_url=nginx.base_url, timeout=30) as client:
        with ThreadPoolExecutor(max_workers=8) as pool:
            heavy = list(pool.map(lambda _: chat_post(client, "heavy", uuid.uuid4().hex), range(40)))
        others = [chat_post(client, f"light-{index}", uuid.uuid4().hex) for index in range(12)]
    assert {answer.status_code for answer in heavy} == {429}
    assert all(answer.headers["retry-after"] == "1" for answer in heavy)
    assert [answer.status_code for answer in others] == [200] * len(others), [
        (answer.status_code, answer.text) for answer in others if answer.status_code != 200
    ]
    assert "no live upstreams" not in nginx.error_log()


def test_a_timeout_after_the_request_was_sent_is_never_retried(
    upstreams: list[Upstream], nginx_factory
) -> None:
    """An instance that read the request and went silent may be running it: the client gets 504
    (OpenAI's error object) and the request is never sent to a second instance."""
    stalling, healthy = spawn(upstreams, ("stalling", "stall"), ("healthy", "ok"))
    stalling.stall_s = 3.0
    nginx = nginx_factory([stalling, healthy], nginx_proxy_read_timeout="1s", nginx_upstream_max_fails=100)
    sent = [uuid.uuid4().hex for _ in range(12)]
    with (
        ThreadPoolExecutor(max_workers=len(sent)) as pool,
        httpx.Client(base_url=nginx.base_url, timeout=30) as client,
    ):
        answers = dict(
            zip(
                sent,
                pool.map(lambda item: chat_post(client, f"key-{item[0]}", item[1]), enumerate(sent)),
                strict=True,
            )
        )
    stalled, served = set(stalling.ids()), healthy.ids()
    assert stalled, "no request went to the stalling instance: the test proves nothing"
    assert not stalled & set(served), "a request that timed out on one instance ran again on another"
    assert len(served) == len(set(served)), "a request ran twice on the healthy instance"
    for request_id, answer in answers.items():
        if request_id in stalled:
            assert answer.status_code == 504, answer.text
            assert answer.headers["content-type"] == "application/json"
            assert answer.json()["error"] == {
                "message": "the Zeus instance did not answer in time; the request was not retried",
                "type": "server_error",
                "param": None,
                "code": "timeout",
            }
        else:
            assert served_by(answer) == "healthy"


# --- Affinity -----------------------------------------------------------------------------------


def test_affinity_keeps_each_conversation_on_one_instance_and_spreads_them(
    upstreams: list[Upstream], nginx_factory
) -> None:
    servers = spawn(upstreams, ("a", "ok"), ("b", "ok"), ("c", "ok"))
    nginx = nginx_factory(servers)
    assert "hash $zeus_affinity_key consistent;" in nginx.upstream_conf()
    with httpx.Client(base_url=nginx.base_url, timeout=30) as client:
        routes = conversation_routes(client, list(range(1, 31)))
        # Every route of one conversation (its messages, its rename...) goes to the same instance.
        for conversation in (1, 2, 3):
            assert (
                served_by(client.get(f"/api/conversations/{conversation}/messages")) == routes[conversation]
            )
    assert set(routes.values()) == {"a", "b", "c"}, routes


def test_affinity_spreads_requests_without_a_key_over_every_instance(
    upstreams: list[Upstream], nginx_factory
) -> None:
    """Health probes, logins, lists: no conversation, no key, so round-robin over the instances."""
    servers = spawn(upstreams, ("a", "ok"), ("b", "ok"), ("c", "ok"))
    nginx = nginx_factory(servers)
    with httpx.Client(base_url=nginx.base_url, timeout=30) as client:
        seen = [served_by(client.get("/api/health")) for _ in range(9)]
        seen += [served_by(client.get("/api/conversations")) for _ in range(9)]
    assert set(seen[:9]) == set(seen[9:]) == {"a", "b", "c"}, seen


def test_affinity_of_the_openai_api_follows_the_user_field_else_the_api_key(
    upstreams: list[Upstream], nginx_factory
) -> None:
    servers = spawn(upstreams, ("a", "ok"), ("b", "ok"), ("c", "ok"))
    nginx = nginx_factory(servers)
    with httpx.Client(base_url=nginx.base_url, timeout=30) as client:
        # One API key, many end users (a team's shared tool): each user has its own instance, the
        # same through /api/v1/ and /v1/, whatever else the body holds.
        by_user = {}
        for user in (f"user-{index}" for index in range(30)):
            seen = {
                served_by(chat_post(client, "shared-key", uuid.uuid4().hex, user=user)),
                served_by(
                    chat_post(client, "shared-key", uuid.uuid4().hex, "/v1/chat/completions", user=user)
                ),
                served_by(chat_post(client, "shared-key", uuid.uuid4().hex, user=user, temperature=0.5, n=1)),
            }
            assert len(seen) == 1, f"{user} went to {seen}"
            by_user[user] = seen.pop()
        assert set(by_user.values()) == {"a", "b", "c"}
        # The same user behind another key stays where its prefix is cached.
        assert served_by(chat_post(client, "other-key", uuid.uuid4().hex, user="user-7")) == by_user["user-7"]
        # "user" inside a message is text, not the field: the key decides.
        by_key = {}
        for index in range(30):
            key = f"key-{index}"
            seen = {
                served_by(chat_post(client, key, uuid.uuid4().hex)),
                served_by(
                    client.post(
                        "/v1/chat/completions",
                        headers={"Authorization": f"Bearer {key}"},
                        content=json.dumps(
                            {"id": uuid.uuid4().hex, "messages": [{"role": "user", "content": '"user": "x"'}]}
                        ),
                    )
                ),
            }
            assert len(seen) == 1, f"{key} went to {seen}"
            by_key[key] = seen.pop()
        assert set(by_key.values()) == {"a", "b", "c"}


def test_a_drained_instance_share_moves_and_the_others_stay(upstreams: list[Upstream], nginx_factory) -> None:
    """nginx_upstream_draining renders the instance "down": its conversations move to the others
    with no failed request, every other conversation stays where its prefix is cached, and all
    come back once it is put back."""
    servers = spawn(upstreams, ("a", "ok"), ("b", "ok"), ("c", "ok"))
    nginx = nginx_factory(servers)
    conversations = list(range(100, 140))
    with httpx.Client(base_url=nginx.base_url, timeout=30) as client:
        before = conversation_routes(client, conversations)
    assert set(before.values()) == {"a", "b", "c"}

    nginx.rerender(nginx_upstream_draining=[servers[0].address])
    assert f"server {servers[0].address} max_fails=0 fail_timeout=10s down;" in nginx.upstream_conf()
    with httpx.Client(base_url=nginx.base_url, timeout=30) as client:
        during = conversation_routes(client, conversations)
    assert "a" not in during.values()
    assert {c: i for c, i in during.items() if before[c] != "a"} == {
        c: i for c, i in before.items() if i != "a"
    }

    nginx.rerender(nginx_upstream_draining=[])
    with httpx.Client(base_url=nginx.base_url, timeout=30) as client:
        assert conversation_routes(client, conversations) == before


def test_draining_the_only_instance_marks_nothing_down(upstreams: list[Upstream], nginx_factory) -> None:
    """With one instance, "down" would fail every request at once: requests wait for it instead."""
    (only,) = spawn(upstreams, ("only", "ok"))
    nginx = nginx_factory([only], nginx_upstream_draining=[only.address])
    assert " down;" not in nginx.upstream_conf()
    with httpx.Client(base_url=nginx.base_url, timeout=30) as client:
        assert served_by(chat_post(client, "key", uuid.uuid4().hex)) == "only"


def test_a_dead_instance_share_moves_with_no_failed_request(upstreams: list[Upstream], nginx_factory) -> None:
    servers = spawn(upstreams, ("a", "ok"), ("b", "ok"), ("c", "ok"))
    nginx = nginx_factory(servers)
    conversations = list(range(200, 240))
    with httpx.Client(base_url=nginx.base_url, timeout=30) as client:
        before = conversation_routes(client, conversations)
        assert "a" in before.values()
        servers[0].stop()  # refuses new connections and drops nginx's kept-alive ones
        sent_after = len(servers[1].received) + len(servers[2].received)
        after = conversation_routes(client, conversations)
    assert "a" not in after.values()
    assert {c: i for c, i in after.items() if before[c] != "a"} == {
        c: i for c, i in before.items() if i != "a"
    }
    # Each POST ran once: 2 per conversation, none twice.
    assert len(servers[1].received) + len(servers[2].received) - sent_after == 2 * len(conversations)


def test_least_conn_is_still_a_setting(upstreams: list[Upstream], nginx_factory) -> None:
    servers = spawn(upstreams, ("a", "ok"), ("b", "ok"))
    nginx = nginx_factory(servers, nginx_balancing="least_conn")
    upstream = nginx.upstream_conf()
    assert "least_conn;" in upstream and "hash" not in upstream and "map " not in upstream
    with httpx.Client(base_url=nginx.base_url, timeout=30) as client:
        seen = {
            served_by(client.post("/api/conversations/7/messages", json={"id": str(n)})) for n in range(6)
        }
    # Without affinity, one conversation's requests spread over the idle instances.
    assert seen == {"a", "b"}


# --- nginx's own errors and /v1/ ------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/api/v1/chat/completions", "/v1/chat/completions", "/api/conversations/1/messages"]
)
def test_a_body_over_the_limit_is_refused_in_openai_error_object(
    upstreams: list[Upstream], nginx_factory, path: str
) -> None:
    (server,) = spawn(upstreams, ("a", "ok"))
    nginx = nginx_factory([server], nginx_client_max_body_size="64k")
    with httpx.Client(base_url=nginx.base_url, timeout=30) as client:
        answer = client.post(path, content=b'{"messages": "' + b"x" * 70_000 + b'"}')
    assert answer.status_code == 413
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.json() == {
        "error": {
            "message": "request body over the limit of 64k (nginx_client_max_body_size)",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_too_large",
        }
    }
    assert server.received == []


def test_no_reachable_instance_is_a_502_in_openai_error_object(nginx_factory) -> None:
    nginx = nginx_factory([f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"])
    with httpx.Client(base_url=nginx.base_url, timeout=30) as client:
        answer = chat_post(client, "key", "x")
        page = client.get("/v1/models")
    for response in (answer, page):
        assert response.status_code == 502
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]["type"] == "server_error"


def test_login_throttling_answers_429_in_openai_error_object(
    upstreams: list[Upstream], nginx_factory
) -> None:
    (server,) = spawn(upstreams, ("a", "ok"))
    nginx = nginx_factory([server], nginx_login_rate="1r/m", nginx_login_burst=1)
    with httpx.Client(base_url=nginx.base_url, timeout=30) as client:
        statuses = [client.post("/api/auth/login", json={"email": "e", "password": "p"}) for _ in range(4)]
    refused = [answer for answer in statuses if answer.status_code == 429]
    assert refused, [answer.status_code for answer in statuses]
    assert refused[0].json()["error"]["code"] == "rate_limit_exceeded"
    assert refused[0].headers["content-type"] == "application/json"


def test_v1_is_answered_as_api_v1(upstreams: list[Upstream], nginx_factory) -> None:
    (server,) = spawn(upstreams, ("a", "ok"))
    nginx = nginx_factory([server])
    with httpx.Client(base_url=nginx.base_url, timeout=30) as client:
        assert client.get("/v1/models?limit=2").json()["path"] == "/api/v1/models?limit=2"
        assert client.head("/v1/models").status_code == 200
        assert (
            chat_post(client, "key", "r1", "/v1/chat/completions").json()["path"]
            == "/api/v1/chat/completions"
        )
    assert [(item.method, item.path) for item in server.received] == [
        ("GET", "/api/v1/models?limit=2"),
        ("HEAD", "/api/v1/models"),
        ("POST", "/api/v1/chat/completions"),
    ]
    assert server.received[-1].json()["id"] == "r1"
