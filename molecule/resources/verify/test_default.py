"""default: what a user and an operator see right after site.yml on three hosts."""

from __future__ import annotations

import json
from collections import Counter

import httpx
import openai
import pytest
from monitoring import Monitoring
from zeus_hosts import CommandFailed, Deployment, stream_chat_message, wait_until

INSTANCES_PER_HOST = 2


def test_every_instance_unit_is_active_and_enabled(deployment: Deployment) -> None:
    for host in deployment.model_hosts:
        units = deployment.units(host)
        assert len(units) == INSTANCES_PER_HOST, (
            f"{host}: expected {INSTANCES_PER_HOST} zeus-api@ units, got {units}"
        )
        assert all(unit.active and unit.enabled for unit in units), f"{host}: {units}"


def test_nginx_upstream_lists_exactly_the_running_instances(deployment: Deployment) -> None:
    upstream = deployment.upstream_endpoints()
    assert len(upstream) == INSTANCES_PER_HOST * len(deployment.model_hosts), upstream
    deployment.assert_units_match_upstream(INSTANCES_PER_HOST)


def test_health_answers_through_nginx(deployment: Deployment) -> None:
    with deployment.client(timeout=10) as client:
        assert client.get("/health").status_code == 200
        response = client.get("/api/health")
    assert response.status_code == 200, response.text
    health = response.json()
    assert health["status"] == "ok", health
    assert health["db"] == "ok", health
    assert response.headers.get("x-zeus-instance"), "an instance's answer must name it in X-Zeus-Instance"


def test_analyst_chat_is_streamed_and_stored_in_postgresql(
    deployment: Deployment, analyst: tuple[httpx.Client, str]
) -> None:
    client, email = analyst
    conversation = client.post("/api/conversations", json={"title": "molecule default"})
    assert conversation.status_code == 201, conversation.text
    conversation_id = conversation.json()["id"]
    question = "What is the capital of France? Answer in one sentence."

    stream = stream_chat_message(client, conversation_id, question)

    assert stream.status_code == 200, stream.transport_error
    assert stream.transport_error is None, stream.transport_error
    assert [event for event, _ in stream.events][:2] == ["start", "delta"], stream.events[:3]
    done = stream.first("done")
    assert done is not None and done["status"] == "complete", stream.events[-3:]
    assert stream.text.strip(), "the reply streamed no text"

    stored = deployment.sql_json(
        "select json_agg(json_build_object('role', m.role, 'content', m.content, 'status', m.status)"
        " order by m.id) from messages m join conversations c on c.id = m.conversation_id"
        f" join users u on u.id = c.user_id where c.id = {int(conversation_id)} and u.email = '{email}'"
    )
    assert stored is not None, f"conversation {conversation_id} of {email} has no message in PostgreSQL"
    assert [(m["role"], m["content"]) for m in stored] == [("user", question), ("assistant", stream.text)], (
        stored
    )
    assert stored[1]["status"] == "complete", stored


def test_requests_are_spread_over_every_instance(deployment: Deployment) -> None:
    with deployment.client(timeout=30) as client:
        answers = [client.get("/api/health") for _ in range(40)]
    assert all(answer.status_code == 200 for answer in answers), Counter(a.status_code for a in answers)
    served_by = Counter(answer.headers.get("x-zeus-instance") for answer in answers)
    assert len(served_by) == INSTANCES_PER_HOST * len(deployment.model_hosts), served_by
    assert None not in served_by, served_by


def test_the_official_openai_client_streams_through_nginx(
    deployment: Deployment, api_key: str, model_id: str
) -> None:
    client = openai.OpenAI(base_url=f"{deployment.base_url}/api/v1", api_key=api_key, timeout=120)
    assert model_id in [model.id for model in client.models.list()]

    stream = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage

    assert text.strip(), "the OpenAI client received no text"
    assert usage is not None and 0 < usage.completion_tokens <= 16, usage


# --- monitoring (group monitoring on the lb host) -------------------------------------------------
EXPORTERS = {
    "prometheus-node-exporter": "every host",
    "prometheus-postgres-exporter": "db",
    "prometheus-nginx-exporter": "lb",
}


def test_monitoring_services_run_where_the_inventory_puts_them(
    deployment: Deployment, monitoring: Monitoring
) -> None:
    # `monitoring` skips this check where the inventory has no monitoring group (no exporters then).
    for name, host in deployment.hosts.items():
        wanted = {"prometheus-node-exporter"}
        if name == deployment.db_host:
            wanted.add("prometheus-postgres-exporter")
        if name == deployment.lb_host:
            wanted.add("prometheus-nginx-exporter")
        if name == deployment.monitoring_host:
            wanted |= {"prometheus", "prometheus-alertmanager"}
        for service in sorted(wanted):
            assert host.service(service).is_running, f"{name}: {service} is not running"
            assert host.service(service).is_enabled, f"{name}: {service} is not enabled"


def test_prometheus_scrapes_every_instance_and_exporter(
    deployment: Deployment, monitoring: Monitoring
) -> None:
    # Exporters started moments ago: give every target a few scrapes to come up.
    wait_until(lambda: not monitoring.not_up(), timeout=60, what="every Prometheus target to be up")
    assert monitoring.target_addresses("zeus") == deployment.unit_endpoints()
    jobs = Counter(target["labels"]["job"] for target in monitoring.targets())
    assert jobs == {
        "zeus": INSTANCES_PER_HOST * len(deployment.model_hosts),
        "node": len({deployment.lb_host, deployment.db_host, *deployment.model_hosts}),
        "postgres": 1,
        "nginx": 1,
        "prometheus": 1,
        "alertmanager": 1,
    }, jobs


def test_a_stopped_instance_fires_its_alert(deployment: Deployment, monitoring: Monitoring) -> None:
    host = deployment.model_hosts[-1]
    port = deployment.units(host)[-1].port
    instance = f"{deployment.addresses[host]}:{port}"
    assert not monitoring.firing("ZeusInstanceDown"), "an instance-down alert fired before any stop"
    deployment.hosts[host].check_output("systemctl stop %s", f"zeus-api@{port}.service")
    try:
        # Scrape and rule intervals of 5 s and `for: 15s` (the scenarios' group_vars/monitoring).
        alerts = wait_until(
            lambda: [a for a in monitoring.firing("ZeusInstanceDown") if a["labels"]["instance"] == instance],
            timeout=120,
            what=f"Alertmanager to hold ZeusInstanceDown for {instance}",
        )
        assert alerts[0]["labels"]["severity"] == "critical", alerts
    finally:
        deployment.hosts[host].check_output("systemctl start %s", f"zeus-api@{port}.service")
    wait_until(
        lambda: not monitoring.not_up(),
        timeout=180,
        what=f"{instance} to be scraped again after its restart",
    )


def test_a_bad_postgresql_setting_stops_the_play_and_the_server_stays_up(deployment: Deployment) -> None:
    started_before = deployment.sql("SELECT pg_postmaster_start_time()")
    model_addresses = sorted(deployment.addresses[host] for host in deployment.model_hosts)
    extra = json.dumps(
        {
            "postgresql_client_addresses": model_addresses,
            "postgresql_app_connections": 40,
            "postgresql_settings": {"work_mem": "lots"},
        }
    )
    with pytest.raises(CommandFailed) as failure:
        deployment.run_playbook(
            "molecule/resources/postgresql-role.yml", extra, log_name="postgresql-bad-setting"
        )
    message = " ".join(str(failure.value).split())
    assert 'invalid value for parameter "work_mem": "lots"' in message, message[-3000:]
    assert "the previous files are back" in message
    # Neither restarted nor reloaded, and the file on disk is the previous one again.
    assert deployment.sql("SELECT pg_postmaster_start_time()") == started_before
    assert deployment.sql("SHOW work_mem") != "lots"
    db = deployment.hosts[deployment.db_host]
    (version,) = db.file("/etc/postgresql").listdir()
    settings = db.file(f"/etc/postgresql/{version}/main/conf.d/zeus.conf").content_string
    assert "work_mem" not in settings, settings
    with deployment.client(timeout=10) as client:
        assert client.get("/api/health").json()["db"] == "ok"
