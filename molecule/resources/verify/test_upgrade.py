"""upgrade: playbooks/upgrade.yml restarts every instance, one at a time, under streaming load."""

from __future__ import annotations

import time

from loadgen import LoadGenerator, summarize
from zeus_hosts import Deployment


def test_rolling_upgrade_under_streaming_load_fails_no_request(
    deployment: Deployment, api_key: str, model_id: str
) -> None:
    deployment.assert_units_match_upstream(2)
    pids_before = {(unit.host, unit.port): unit.main_pid for unit in deployment.active_units()}
    with LoadGenerator(deployment.base_url, api_key, model_id, concurrency=2) as load:
        time.sleep(3)
        deployment.run_playbook("playbooks/upgrade.yml", log_name="upgrade")
        time.sleep(3)
    records = load.records()
    print(summarize(records))

    assert all(record.ok for record in records), summarize(records)
    assert len(records) >= 10, f"too little load to prove anything: {summarize(records)}"
    pids_after = {(unit.host, unit.port): unit.main_pid for unit in deployment.active_units()}
    assert pids_after.keys() == pids_before.keys(), (pids_before, pids_after)
    not_restarted = [instance for instance, pid in pids_after.items() if pids_before[instance] == pid]
    assert not not_restarted, f"upgrade.yml left these instances running their old process: {not_restarted}"
    deployment.assert_units_match_upstream(2)
