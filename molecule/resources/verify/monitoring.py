"""Prometheus and Alertmanager of a deployment, through their HTTP APIs (v1 and v2)."""

from __future__ import annotations

from typing import Any

import httpx

PROMETHEUS_PORT = 9090
ALERTMANAGER_PORT = 9093


class Monitoring:
    def __init__(self, address: str) -> None:
        self.prometheus = f"http://{address}:{PROMETHEUS_PORT}"
        self.alertmanager = f"http://{address}:{ALERTMANAGER_PORT}"

    def targets(self, job: str | None = None) -> list[dict[str, Any]]:
        """Prometheus's active targets (of one job): each with labels, health, lastError."""
        response = httpx.get(f"{self.prometheus}/api/v1/targets", params={"state": "active"}, timeout=10)
        response.raise_for_status()
        targets = response.json()["data"]["activeTargets"]
        return [target for target in targets if job is None or target["labels"]["job"] == job]

    def target_addresses(self, job: str) -> set[tuple[str, int]]:
        addresses = set()
        for target in self.targets(job):
            host, _, port = target["labels"]["instance"].rpartition(":")
            addresses.add((host, int(port)))
        return addresses

    def not_up(self) -> list[str]:
        """Every active target that is not up, as 'job instance: health (last error)'."""
        return [
            f"{t['labels']['job']} {t['labels']['instance']}: {t['health']} ({t['lastError']})"
            for t in self.targets()
            if t["health"] != "up"
        ]

    def firing(self, alertname: str) -> list[dict[str, Any]]:
        """Alertmanager's active alerts of that name (each with labels, status, startsAt)."""
        response = httpx.get(
            f"{self.alertmanager}/api/v2/alerts",
            params={"filter": f'alertname="{alertname}"', "active": "true", "silenced": "false"},
            timeout=10,
        )
        response.raise_for_status()
        return [alert for alert in response.json() if alert["status"]["state"] == "active"]
