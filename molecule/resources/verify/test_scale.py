"""scale: 2 -> 4 -> 1 -> 2 instances per model host while streamed completions keep flowing."""

from __future__ import annotations

import time

from loadgen import LoadGenerator, summarize
from monitoring import Monitoring
from zeus_hosts import Deployment, wait_until

STEPS = (4, 1, 2)


def test_scaling_under_streaming_load_fails_no_request(
    deployment: Deployment, api_key: str, model_id: str
) -> None:
    deployment.assert_units_match_upstream(2)
    monitoring = (
        Monitoring(deployment.addresses[deployment.monitoring_host]) if deployment.monitoring_host else None
    )
    served_per_step: dict[int, int] = {}
    with LoadGenerator(deployment.base_url, api_key, model_id, concurrency=2) as load:
        time.sleep(3)
        for instances in STEPS:
            step_started = time.monotonic()
            deployment.run_playbook(
                "playbooks/scale.yml", f"instances={instances}", log_name=f"scale-to-{instances}"
            )
            deployment.assert_units_match_upstream(instances)
            # Prometheus follows: it scrapes exactly the running instances (file_sd, no reload).
            if monitoring is not None:
                wait_until(
                    lambda: monitoring.target_addresses("zeus") == deployment.unit_endpoints(),
                    timeout=30,
                    what=f"Prometheus's zeus targets to be the {instances} instances per host",
                )
            served_per_step[instances] = sum(
                1 for record in load.records() if record.ok and record.ended >= step_started
            )
            print(
                f"scale.yml -e instances={instances}: {time.monotonic() - step_started:.0f} s, "
                f"{served_per_step[instances]} streams completed meanwhile"
            )
            failed = [record for record in load.records() if not record.ok]
            assert not failed, f"after scaling to {instances} per host:\n{summarize(load.records())}"
        time.sleep(3)
    records = load.records()
    print(summarize(records))
    assert all(record.ok for record in records), summarize(records)
    # The load must have run during every step, or "no failed request" proves nothing.
    assert all(count > 0 for count in served_per_step.values()), (
        f"requests served per step: {served_per_step}"
    )
