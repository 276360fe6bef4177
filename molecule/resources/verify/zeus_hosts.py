"""The deployed Zeus as the scenarios see it from the controller.

Hosts and groups come from Molecule's inventory, read by testinfra's Ansible runner; every host is
a testinfra host on its podman backend (`podman://NAME`, one `podman exec` per check; its Ansible
backend would run one Ansible call per check over the podman connection). What testinfra has no
module for stays here: HTTP to nginx on the lb container's own address (rootful podman makes it
reachable from the controller), the web app's API, and playbooks run as a user runs them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import testinfra
import testinfra.host
from testinfra.utils.ansible_runner import AnsibleRunner

REPO_ROOT = Path(__file__).resolve().parents[3]
LOG_DIR = REPO_ROOT / ".molecule-work" / "logs"
VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", REPO_ROOT / ".venv")) / "bin"
NGINX_PORT = 8081


class CommandFailed(AssertionError):
    """A playbook run failed; the message carries its output."""


def inventory_dir() -> Path:
    ephemeral = os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY")
    if not ephemeral:
        raise RuntimeError(
            "MOLECULE_EPHEMERAL_DIRECTORY is not set: run these checks through `molecule verify` "
            "(or molecule/resources/run-scenarios.sh), which points it at the scenario's inventory"
        )
    return Path(ephemeral) / "inventory"


def wait_until(condition: Callable[[], Any], *, timeout: float, interval: float = 1.0, what: str) -> Any:
    """Polls condition until it returns something truthy; raises AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        # testinfra's check_output raises AssertionError (CommandFailed is one).
        except (httpx.HTTPError, AssertionError) as error:
            last_error = error
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error})")


@dataclass(frozen=True)
class Unit:
    host: str
    port: int
    active: bool
    enabled: bool
    main_pid: int
    restarts: int


@dataclass
class Deployment:
    """The hosts of one Molecule run and how to reach them."""

    inventory_dir: Path
    # testinfra hosts by inventory name (the container's name).
    hosts: dict[str, testinfra.host.Host]
    lb_host: str
    db_host: str
    model_hosts: tuple[str, ...]
    # None when the inventory has no monitoring group (the monitoring checks are then skipped).
    monitoring_host: str | None
    admin_email: str
    admin_password: str
    db_name: str
    # Each host's address on the podman network: nginx's upstream and X-Zeus-Instance use it.
    addresses: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_molecule(cls) -> Deployment:
        inventory = inventory_dir()
        ansible = AnsibleRunner(str(inventory))

        def group(name: str) -> list[str]:
            hosts = ansible.get_hosts(name)
            if not hosts:
                raise RuntimeError(f"the inventory in {inventory} has no host in group {name!r}")
            return hosts

        lb_host, db_host = group("lb")[0], group("db")[0]
        model_hosts = tuple(group("model_servers"))
        monitoring_host = (ansible.get_hosts("monitoring") or [None])[0]
        names = {lb_host, db_host, *model_hosts} | ({monitoring_host} if monitoring_host else set())
        hosts = {name: testinfra.get_host(f"podman://{name}") for name in sorted(names)}
        # The scenarios' group_vars as the inventory gives them, untemplated: hence the vault_
        # value, not zeus_api_admin_password ("{{ vault_zeus_admin_password }}").
        model_vars = ansible.get_variables(model_hosts[0])
        return cls(
            inventory_dir=inventory,
            hosts=hosts,
            lb_host=lb_host,
            db_host=db_host,
            model_hosts=model_hosts,
            monitoring_host=monitoring_host,
            admin_email=model_vars["zeus_api_admin_email"],
            admin_password=model_vars["vault_zeus_admin_password"],
            db_name=ansible.get_variables(db_host)["postgresql_db_name"],
            addresses={name: host.interface.default("inet").addresses[0] for name, host in hosts.items()},
        )

    # --- HTTP through nginx ------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{self.addresses[self.lb_host]}:{NGINX_PORT}"

    def client(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=timeout)

    # --- systemd units -----------------------------------------------------------------------
    def units(self, host: str) -> list[Unit]:
        """Every loaded zeus-api@PORT unit of host, active or not."""
        machine = self.hosts[host]
        listed = machine.check_output("systemctl list-units %s --all --no-legend --plain", "zeus-api@*")
        units = []
        ports = sorted(int(port) for port in re.findall(r"^zeus-api@(\d+)\.service\s", listed, flags=re.M))
        for port in ports:
            # One `systemctl show`; UnitFileState is what `systemctl is-enabled` prints.
            properties = machine.service(f"zeus-api@{port}.service").systemd_properties
            units.append(
                Unit(
                    host=host,
                    port=port,
                    active=properties.get("ActiveState") == "active",
                    enabled=properties.get("UnitFileState") == "enabled",
                    main_pid=int(properties.get("MainPID") or 0),
                    restarts=int(properties.get("NRestarts") or 0),
                )
            )
        return units

    def active_units(self) -> list[Unit]:
        return [unit for host in self.model_hosts for unit in self.units(host) if unit.active]

    def unit_endpoints(self) -> set[tuple[str, int]]:
        """(address, port) of every active instance, as nginx should list them."""
        return {(self.addresses[unit.host], unit.port) for unit in self.active_units()}

    # --- nginx -------------------------------------------------------------------------------
    def upstream_endpoints(self) -> set[tuple[str, int]]:
        """(address, port) of every server in service in the upstreams of nginx's loaded configuration."""
        config = self.hosts[self.lb_host].check_output("nginx -T")
        endpoints: set[tuple[str, int]] = set()
        names_to_addresses = self.addresses
        for block in re.findall(r"^\s*upstream\s+\S+\s*\{(.*?)\}", config, flags=re.S | re.M):
            for server, parameters in re.findall(r"^\s*server\s+([^\s;]+)([^;]*);", block, flags=re.M):
                if "down" in parameters.split():
                    continue  # marked out of service (upgrade.yml does that while restarting one)
                host, _, port = server.rpartition(":")
                endpoints.add((names_to_addresses.get(host, host), int(port)))
        return endpoints

    def assert_units_match_upstream(self, instances_per_host: int) -> None:
        units = [unit for host in self.model_hosts for unit in self.units(host)]
        per_host = {host: [u.port for u in units if u.host == host and u.active] for host in self.model_hosts}
        wrong_count = {host: ports for host, ports in per_host.items() if len(ports) != instances_per_host}
        assert not wrong_count, (
            f"expected {instances_per_host} active zeus-api@ units per host, got {per_host}"
        )
        not_enabled = [f"{u.host}:{u.port}" for u in units if u.active and not u.enabled]
        assert not not_enabled, f"active but not enabled (would not come back after a reboot): {not_enabled}"
        leftovers = [f"{u.host}:{u.port}" for u in units if not u.active]
        assert not leftovers, f"loaded but inactive zeus-api@ units left behind: {leftovers}"
        upstream = self.upstream_endpoints()
        expected = self.unit_endpoints()
        assert upstream == expected, (
            f"nginx upstream {sorted(upstream)} != running instances {sorted(expected)} "
            f"(missing: {sorted(expected - upstream)}, extra: {sorted(upstream - expected)})"
        )

    def host_of_instance(self, instance: str) -> tuple[str, int]:
        """Maps an X-Zeus-Instance value (host:port, host a name or an address) to (container, port)."""
        name, _, port = instance.rpartition(":")
        for host, address in self.addresses.items():
            if name in (host, address) or name.split(".")[0] == host:
                return host, int(port)
        raise AssertionError(f"X-Zeus-Instance {instance!r} names no model host of {self.addresses}")

    # --- PostgreSQL --------------------------------------------------------------------------
    def sql(self, query: str) -> str:
        db = self.hosts[self.db_host]
        with db.sudo("postgres"):
            return db.check_output("psql -d %s -AXqt -v ON_ERROR_STOP=1 -c %s", self.db_name, query).strip()

    def sql_json(self, query: str) -> Any:
        """Runs a query whose single value is JSON (e.g. json_agg) and decodes it."""
        value = self.sql(query)
        return json.loads(value) if value else None

    # --- playbooks ---------------------------------------------------------------------------
    def run_playbook(self, playbook: str, *extra_vars: str, log_name: str) -> str:
        """Runs a project playbook as a user would (from the repository root) against these hosts."""
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        log_path = LOG_DIR / f"{log_name}.log"
        argv = [str(VENV_BIN / "ansible-playbook"), "-i", str(self.inventory_dir), playbook]
        for extra in extra_vars:
            argv += ["-e", extra]
        started = time.monotonic()
        result = subprocess.run(
            argv, cwd=REPO_ROOT, capture_output=True, text=True, env=ansible_env(), check=False
        )
        output = result.stdout + result.stderr
        log_path.write_text(output)
        if result.returncode != 0:
            raise CommandFailed(
                f"{' '.join(argv[1:])} exited {result.returncode} after "
                f"{time.monotonic() - started:.0f} s (full log: {log_path}):\n{output[-6000:]}"
            )
        return output


def ansible_env() -> dict[str, str]:
    """The environment a user's ansible-playbook gets: the project's ansible.cfg, not Molecule's."""
    env = dict(os.environ)
    env["ANSIBLE_CONFIG"] = str(REPO_ROOT / "ansible.cfg")
    env.pop("ANSIBLE_STDOUT_CALLBACK", None)
    return env


# --- the web app's API ---------------------------------------------------------------------
def login(client: httpx.Client, email: str, password: str) -> dict[str, Any]:
    response = client.post("/api/auth/login", json={"email": email, "password": password})
    assert response.status_code == 200, f"login of {email} answered {response.status_code}: {response.text}"
    return response.json()


def create_user(admin: httpx.Client, role: str = "analyst", prefix: str = "analyst") -> tuple[str, str]:
    email = f"{prefix}-{os.urandom(4).hex()}@example.org"
    password = f"pw-{os.urandom(12).hex()}"
    response = admin.post("/api/admin/users", json={"email": email, "password": password, "role": role})
    assert response.status_code == 201, f"creating {email} answered {response.status_code}: {response.text}"
    return email, password


def create_api_key(client: httpx.Client, name: str) -> str:
    response = client.post("/api/keys", json={"name": name})
    assert response.status_code in (200, 201), (
        f"creating an API key answered {response.status_code}: {response.text}"
    )
    return response.json()["key"]


def iter_sse(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of a server-sent event stream; event is "message" when unnamed."""
    event, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    if data:
        yield event, "\n".join(data)


@dataclass
class ChatStream:
    """What a client saw of one streamed reply of the web app's chat API."""

    status_code: int
    instance: str | None
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    transport_error: str | None = None

    @property
    def text(self) -> str:
        return "".join(data.get("text", "") for event, data in self.events if event == "delta")

    def first(self, event_name: str) -> dict[str, Any] | None:
        return next((data for event, data in self.events if event == event_name), None)


def stream_chat_message(
    client: httpx.Client,
    conversation_id: Any,
    content: str,
    on_delta: Callable[[ChatStream], None] | None = None,
) -> ChatStream:
    """Sends a message and reads the whole reply stream; on_delta runs after each delta event."""
    with client.stream(
        "POST", f"/api/conversations/{conversation_id}/messages", json={"content": content}
    ) as response:
        stream = ChatStream(
            status_code=response.status_code, instance=response.headers.get("x-zeus-instance")
        )
        if response.status_code != 200:
            response.read()
            stream.transport_error = response.text
            return stream
        try:
            for event, data in iter_sse(response.iter_lines()):
                stream.events.append((event, json.loads(data)))
                if event == "delta" and on_delta is not None:
                    on_delta(stream)
        except httpx.TimeoutException:
            raise
        except httpx.HTTPError as error:
            stream.transport_error = f"{type(error).__name__}: {error}"
    return stream
