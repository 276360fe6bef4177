"""The monitoring role's Prometheus files, checked by Prometheus's own promtool (Debian's
`prometheus` package, in the Makefile's SYSTEM_PACKAGES), and its Grafana dashboard."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from tests.conftest import REPO_ROOT

ROLE = REPO_ROOT / "roles" / "monitoring"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is missing: install Debian's prometheus (make system-deps)"
)


def role_variables(**overrides: Any) -> dict[str, Any]:
    variables = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    variables |= yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
    return variables | {"ansible_managed": "Ansible managed"} | overrides


def render(template: str, **overrides: Any) -> str:
    """Renders one of the role's templates as Ansible would (the filters these templates use)."""
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    environment.filters["comment"] = lambda text: "\n".join(f"# {line}" for line in text.splitlines())
    return environment.from_string((ROLE / "templates" / template).read_text()).render(
        **role_variables(**overrides)
    )


def promtool(*argv: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *argv], capture_output=True, text=True, timeout=120, check=False)


@needs_promtool
def test_alert_rules_pass_promtool_check(tmp_path: Path) -> None:
    rules = tmp_path / "zeus.rules.yml"
    rules.write_text(render("etc/prometheus/rules/zeus.rules.yml.j2"))
    result = promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 11 rules found" in result.stdout


@needs_promtool
def test_a_broken_rule_fails_promtool_check(tmp_path: Path) -> None:
    # The check above must be able to fail: the same rules with one expression broken.
    rules = tmp_path / "zeus.rules.yml"
    rules.write_text(
        render("etc/prometheus/rules/zeus.rules.yml.j2").replace('up{job="zeus"} == 0', "up{job=", 1)
    )
    assert promtool("check", "rules", str(rules)).returncode != 0


# promtool's unit tests of the rules: series over time, and which alerts fire when.
RULE_TESTS = """
rule_files: [zeus.rules.yml]
evaluation_interval: 15s
tests:
  - interval: 15s
    input_series:
      - series: 'up{job="zeus", instance="10.0.0.21:8000"}'
        values: '1 1 0 0 0 0 0 0 0'
      - series: 'up{job="zeus", instance="10.0.0.21:8001"}'
        values: '1 1 1 1 1 1 1 1 1'
    alert_rule_test:
      - eval_time: 30s
        alertname: ZeusInstanceDown
        exp_alerts: []
      - eval_time: 2m
        alertname: ZeusInstanceDown
        exp_alerts:
          - exp_labels: {severity: critical, job: zeus, instance: "10.0.0.21:8000"}
            exp_annotations:
              summary: "Zeus instance 10.0.0.21:8000 does not answer /metrics"
              description: >-
                Prometheus could not scrape 10.0.0.21:8000: the instance is stopped, crashed or
                unreachable. nginx sends its share of the traffic to the others. Look at
                `systemctl status zeus-api@PORT` and `journalctl -u zeus-api@PORT` on its host.
  - interval: 1h
    input_series:
      # The last dump at 02:30 on the first day (in seconds since the epoch), none after it.
      - series: 'zeus_backup_last_success_timestamp_seconds{job="node", instance="db:9100"}'
        values: '9000x30'
    alert_rule_test:
      - eval_time: 20h
        alertname: ZeusBackupTooOld
        exp_alerts: []
      - eval_time: 30h
        alertname: ZeusBackupTooOld
        exp_alerts:
          - exp_labels: {severity: critical, job: node, instance: "db:9100"}
            exp_annotations:
              summary: "The last database dump on db:9100 is 1d 3h 30m 0s old"
              description: >-
                zeus-pg-backup.timer has not written a dump for more than a day: see
                `systemctl status zeus-pg-backup.service` and `journalctl -u zeus-pg-backup`
                on the database host.
  - interval: 15s
    input_series:
      - series: 'vllm:num_requests_waiting{job="zeus", instance="a:8000", model_name="m"}'
        values: '10x20 60x20'
      - series: 'zeus:max_queue{job="zeus", instance="a:8000", model_name="m"}'
        values: '64x40'
    alert_rule_test:
      - eval_time: 4m
        alertname: ZeusQueueSaturated
        exp_alerts: []
      - eval_time: 9m
        alertname: ZeusQueueSaturated
        exp_alerts:
          - exp_labels: {severity: warning, instance: "a:8000"}
            exp_annotations:
              summary: "a:8000: the queue is 93.75% full"
              description: >-
                Requests beyond ZEUS_MAX_QUEUE are answered 429. Add instances (playbooks/scale.yml) or hosts.
"""


@needs_promtool
def test_alerts_fire_when_and_only_when_they_should(tmp_path: Path) -> None:
    (tmp_path / "zeus.rules.yml").write_text(render("etc/prometheus/rules/zeus.rules.yml.j2"))
    (tmp_path / "tests.yml").write_text(RULE_TESTS)
    result = promtool("test", "rules", str(tmp_path / "tests.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_prometheus_configuration_passes_promtool(tmp_path: Path) -> None:
    config = tmp_path / "prometheus.yml"
    config.write_text(render("etc/prometheus/prometheus.yml.j2"))
    result = promtool("check", "config", "--syntax-only", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = [job["job_name"] for job in yaml.safe_load(config.read_text())["scrape_configs"]]
    assert jobs == ["prometheus", "alertmanager", "zeus", "node", "postgres", "nginx"]


def test_target_lists_are_valid_file_sd(tmp_path: Path) -> None:
    rendered = render(
        "etc/prometheus/file_sd/targets.yml.j2",
        item={"job": "zeus", "targets": ["10.0.0.22:8001", "10.0.0.21:8000"]},
    )
    assert yaml.safe_load(rendered) == [{"targets": ["10.0.0.21:8000", "10.0.0.22:8001"]}]
    empty = render("etc/prometheus/file_sd/targets.yml.j2", item={"job": "zeus", "targets": []})
    assert yaml.safe_load(empty) == []


def test_dashboard_and_rules_read_only_metrics_that_zeus_exposes() -> None:
    dashboard = json.loads((ROLE / "files" / "grafana-zeus.json").read_text())
    assert dashboard["__inputs"][0]["name"] == "DS_PROMETHEUS"
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    expressions.append(render("etc/prometheus/rules/zeus.rules.yml.j2"))
    used = {name for expr in expressions for name in re.findall(r"\b((?:vllm|zeus)[:_][a-z0-9_:]+)", expr)}
    metrics_source = (REPO_ROOT / "app" / "telemetry" / "metrics.py").read_text()
    # Counters are declared without _total, histograms without _bucket; the backup's metric
    # comes from the postgresql role's zeus-pg-backup-metric.
    backup_script = (
        REPO_ROOT / "roles/postgresql/templates/usr/local/sbin/zeus-pg-backup-metric.j2"
    ).read_text()
    missing = sorted(
        name
        for name in used
        if f'"{re.sub(r"_(bucket|total)$", "", name)}"' not in metrics_source
        and f'"{name}"' not in metrics_source
        and name not in backup_script
        # vllm18's gauge of the KV cache (vLLM's name) comes with the engine's KV-cache statistics.
        and name != "vllm:kv_cache_usage_perc"
    )
    assert not missing, f"the dashboard or the rules read metrics Zeus does not expose: {missing}"
