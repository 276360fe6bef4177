"""failover: an instance killed with SIGKILL in the middle of a streamed reply."""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
from loadgen import LoadGenerator, summarize
from zeus_hosts import ChatStream, Deployment, stream_chat_message, wait_until

# Long enough that the reply is still streaming when the kill lands a few tokens in.
LONG_PROMPT = "Write a long, detailed story of at least five paragraphs about a lighthouse keeper."
DELTAS_BEFORE_KILL = 3


@dataclass(frozen=True)
class Kill:
    host: str
    port: int
    instance: str
    restarts_before: int
    at: float  # time.monotonic()


def test_killed_instance_fails_only_its_own_stream_and_comes_back(
    deployment: Deployment, analyst: tuple[httpx.Client, str], api_key: str, model_id: str
) -> None:
    client, _ = analyst
    deployment.assert_units_match_upstream(2)
    kills: list[Kill] = []

    def kill_serving_instance(stream: ChatStream) -> None:
        if kills or sum(1 for event, _ in stream.events if event == "delta") < DELTAS_BEFORE_KILL:
            return
        assert stream.instance, "the stream carries no X-Zeus-Instance header"
        host, port = deployment.host_of_instance(stream.instance)
        unit = next(u for u in deployment.units(host) if u.port == port)
        kills.append(Kill(host, port, stream.instance, unit.restarts, time.monotonic()))
        # SIGKILL to every process of the unit at once: what an OOM kill or a crash looks like.
        deployment.hosts[host].check_output("systemctl kill --signal=SIGKILL %s", f"zeus-api@{port}.service")

    with LoadGenerator(deployment.base_url, api_key, model_id, concurrency=2) as load:
        time.sleep(3)
        conversation_id = None
        stream = None
        # A short reply may finish before the kill lands; a new conversation gets another try.
        for _attempt in range(3):
            conversation = client.post("/api/conversations", json={"title": "molecule failover"})
            assert conversation.status_code == 201, conversation.text
            conversation_id = conversation.json()["id"]
            try:
                stream = stream_chat_message(
                    client, conversation_id, LONG_PROMPT, on_delta=kill_serving_instance
                )
            except httpx.TimeoutException as error:
                raise AssertionError(f"the stream hung after its instance was killed: {error!r}") from error
            if kills:
                break
        assert kills, "every reply finished before the instance could be killed"
        kill = kills[0]
        stream_ended_after_s = time.monotonic() - kill.at

        # systemd restarts the killed instance, and it becomes ready again.
        def restarted_and_ready() -> bool:
            unit = next((u for u in deployment.units(kill.host) if u.port == kill.port), None)
            if unit is None or not unit.active or unit.restarts <= kill.restarts_before:
                return False
            answer = httpx.get(f"http://{deployment.addresses[kill.host]}:{kill.port}/api/health", timeout=5)
            return answer.status_code == 200

        wait_until(
            restarted_and_ready,
            timeout=180,
            interval=2,
            what=f"systemd to restart zeus-api@{kill.port} on {kill.host}",
        )
        # nginx sends requests to it again (refused connections meanwhile moved to the other instances).

        def nginx_uses_it_again() -> bool:
            with deployment.client(timeout=10) as probe:
                return any(
                    probe.get("/api/health").headers.get("x-zeus-instance") == kill.instance for _ in range(8)
                )

        wait_until(
            nginx_uses_it_again, timeout=120, interval=2, what=f"nginx to send requests to {kill.instance}"
        )
        time.sleep(2)
    records = load.records()
    print(
        f"killed {kill.instance} after {DELTAS_BEFORE_KILL} deltas; its stream ended "
        f"{stream_ended_after_s:.1f} s later with {stream.transport_error or stream.first('error')!r}"
    )
    print(summarize(records))

    # The killed stream ended promptly, without a "done" event, with an error the client sees.
    assert stream is not None
    assert stream.first("done") is None, f"the killed stream still reported done: {stream.events[-2:]}"
    assert stream.transport_error or stream.first("error"), "the stream ended silently, without any error"
    assert stream_ended_after_s < 30, f"the stream took {stream_ended_after_s:.0f} s to end after the kill"

    # The partial reply is stored, marked interrupted.
    def stored_reply() -> dict | None:
        messages = client.get(f"/api/conversations/{conversation_id}/messages").json()
        assistant = [m for m in messages if m["role"] == "assistant"]
        return assistant[-1] if assistant and assistant[-1]["status"] == "interrupted" else None

    reply = wait_until(
        stored_reply, timeout=120, interval=2, what="the partial reply to be marked interrupted"
    )
    received, stored = stream.text, reply["content"]
    print(f"stored as {reply['status']}: {len(stored)} characters; the client had received {len(received)}")
    # The instance may have generated a little more than it sent, or sent more than it saved.
    assert received.startswith(stored) or stored.startswith(received), (
        f"stored partial reply {stored!r} does not match what the client received {received!r}"
    )

    # Only requests in flight on the killed instance when it died may have failed.
    # (A request whose headers had not come back yet carries no instance name: nginx answers 502.)
    other_failures = [
        r
        for r in records
        if not r.ok and not (r.instance in (kill.instance, None) and r.started <= kill.at <= r.ended)
    ]
    assert not other_failures, (
        f"requests other than the killed instance's own failed:\n{summarize(other_failures)}"
    )
    assert any(r.ok and r.started > kill.at for r in records), summarize(records)
    deployment.assert_units_match_upstream(2)
