"""The nginx role's files as rendered: the fast in-process rendering the other tests use is the
template module's, the upstream of a delegated rendering takes the lb host's own settings, and
draining marks exactly the named instances down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.nginx import TEMPLATES, render_role, render_role_with_ansible_playbook
from tests.support.live_server import REPO_ROOT

SERVERS = ["10.0.0.21:8000", "10.0.0.21:8001", "10.0.0.22:8000"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings",
    [
        {"nginx_upstream_servers": SERVERS, "nginx_upstream_draining": [SERVERS[1]]},
        {"nginx_upstream_servers": SERVERS[:1], "nginx_balancing": "least_conn", "nginx_tls_enabled": True},
    ],
)
def test_the_fast_rendering_is_the_template_modules(tmp_path: Path, settings: dict) -> None:
    render_role(tmp_path / "fast", settings)
    render_role_with_ansible_playbook(tmp_path / "playbook", settings)
    for name in TEMPLATES:
        assert (tmp_path / "fast" / name).read_text() == (tmp_path / "playbook" / name).read_text(), name


def upstream(tmp_path: Path, **settings) -> str:
    hostvars = settings.pop("hostvars", None)
    render_role(tmp_path, {"nginx_upstream_servers": SERVERS, **settings}, hostvars)
    return (tmp_path / "zeus-upstream.conf").read_text()


def test_draining_marks_exactly_the_named_instances_down(tmp_path: Path) -> None:
    text = upstream(tmp_path, nginx_upstream_draining=[SERVERS[0], SERVERS[2]])
    assert [line.strip() for line in text.splitlines() if line.strip().startswith("server ")] == [
        "server 10.0.0.21:8000 max_fails=0 fail_timeout=10s down;",
        "server 10.0.0.21:8001 max_fails=0 fail_timeout=10s;",
        "server 10.0.0.22:8000 max_fails=0 fail_timeout=10s down;",
    ]


def test_draining_every_instance_marks_none_down(tmp_path: Path) -> None:
    assert " down;" not in upstream(tmp_path, nginx_upstream_draining=SERVERS)


def test_a_delegated_rendering_takes_the_lb_hosts_published_settings(tmp_path: Path) -> None:
    """A rolling restart renders the upstream from a model server's play, whose variables are the
    model server's: the settings come from what the lb host's preflight published."""
    published = {"balancing": "least_conn", "max_fails": 7, "fail_timeout": "3s", "keepalive": 4}
    text = upstream(
        tmp_path,
        nginx_upstream_lb_host="lb1",
        nginx_upstream_max_fails=1,
        hostvars={"lb1": {"nginx_upstream_settings": published}},
    )
    assert "least_conn;" in text and "hash " not in text
    assert "server 10.0.0.21:8000 max_fails=7 fail_timeout=3s;" in text
    assert "keepalive 4;" in text


@pytest.mark.slow
def test_a_rolling_restart_renders_the_lb_hosts_upstream_with_its_own_settings(tmp_path: Path) -> None:
    """playbooks/tasks/upstream_instance.yml through ansible-playbook: a model server's play
    renders the upstream on the lb host (delegated) with the lb host's group settings, which the
    model server cannot see. The file is prepared with the expected text: a rendering that differs
    would be written and followed by `nginx -t` and a reload of a systemd unit, which fail here."""
    inventory = tmp_path / "hosts.ini"
    inventory.write_text(
        "[lb]\nlb1 ansible_connection=local\n[model_servers]\nms1 ansible_connection=local\n"
        "[lb:vars]\nnginx_balancing=least_conn\nnginx_upstream_max_fails=7\n"
    )
    upstream_file = tmp_path / "zeus-upstream.conf"
    expected = {
        "nginx_upstream_servers": SERVERS,
        "nginx_upstream_draining": [SERVERS[1]],
        "nginx_balancing": "least_conn",
        "nginx_upstream_max_fails": 7,
    }
    render_role(tmp_path / "expected", expected)
    # ansible_managed names no file, so the expected text does not depend on the destination.
    upstream_file.write_text((tmp_path / "expected" / "zeus-upstream.conf").read_text())
    before = upstream_file.stat().st_mtime_ns
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("ansible-playbook")),
            "-i",
            str(inventory),
            str(REPO_ROOT / "tests" / "deploy" / "delegated-upstream.yml"),
            "-e",
            json.dumps(
                {
                    "nginx_upstream_servers": SERVERS,
                    "test_draining": [SERVERS[1]],
                    "__nginx_upstream_file": str(upstream_file),
                    "ansible_python_interpreter": sys.executable,
                }
            ),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "changed=0" in done.stdout and "failed=0" in done.stdout, done.stdout
    assert upstream_file.stat().st_mtime_ns == before
    assert f"server {SERVERS[1]} max_fails=7 fail_timeout=10s down;" in upstream_file.read_text()
