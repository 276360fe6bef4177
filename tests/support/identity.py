"""Real identity providers for the SSO tests, each started as a process on a free port:

- `start_oidc_provider()`: node's oidc-provider (tests/support/oidc/server.js, installed there by
  `npm ci` from its package-lock.json on first use), one confidential client, PKCE required, a
  login form at /interaction/UID. Its issuer is http://localhost:PORT while Zeus runs on
  127.0.0.1: two different sites to a browser, as a company's provider and Zeus are.
- `start_slapd()`: Debian's slapd with a throwaway slapd.conf and an LDIF loaded by slapadd: the
  people of LDAP_PEOPLE, the service account LDAP_SERVICE_DN and the group LDAP_ADMIN_GROUP.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ldap3

from tests.support.live_server import free_port

OIDC_DIR = Path(__file__).resolve().parent / "oidc"
CLIENT_ID = "zeus-tests"
CLIENT_SECRET = "test-client-secret-7c1f9a3e5b"
ADMIN_GROUP_CLAIM = "zeus-admins"

LDAP_BASE = "dc=zeus,dc=test"
LDAP_PEOPLE_BASE = f"ou=people,{LDAP_BASE}"
LDAP_SERVICE_DN = f"cn=zeus-reader,{LDAP_BASE}"
LDAP_SERVICE_PASSWORD = "reader-password-4d2e"
LDAP_ADMIN_GROUP = f"cn=zeus-admins,ou=groups,{LDAP_BASE}"
# uid -> (password, mail or None, member of LDAP_ADMIN_GROUP)
LDAP_PEOPLE: dict[str, tuple[str, str | None, bool]] = {
    "ada": ("ada-password-1", "ada@zeus.test", True),
    "bob": ("bob-password-2", "bob@zeus.test", False),
    "nomail": ("nomail-password-3", None, False),
    "cleo": ("cleo-password-4", "Cleo@Zeus.test", False),
}


def _wait_until(check, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(
        f"{what} did not start within {timeout_s} s:\n{log.read_text(errors='replace')[-3000:]}"
    )


@dataclass
class OidcProvider:
    issuer: str
    port: int
    client_id: str
    client_secret: str
    users: dict[str, dict[str, Any]]


def oidc_provider_port() -> int:
    """The provider's port, chosen before Zeus starts (Zeus needs the issuer, the provider needs
    Zeus's callback address)."""
    return free_port()


def _install_oidc_provider() -> None:
    if (OIDC_DIR / "node_modules" / "oidc-provider" / "package.json").exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is missing: the SSO tests run node's oidc-provider (install Node.js and npm)")
    subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=OIDC_DIR, check=True, timeout=600)


@contextmanager
def start_oidc_provider(
    port: int, redirect_uris: list[str], users: dict[str, dict[str, Any]], workdir: Path
) -> Iterator[OidcProvider]:
    """users: login -> {"password", "email", "email_verified"?, "groups"?}."""
    _install_oidc_provider()
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is missing: the SSO tests run node's oidc-provider")
    issuer = f"http://localhost:{port}"
    config = {
        "issuer": issuer,
        "port": port,
        "client": {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "redirect_uris": redirect_uris},
        "users": users,
    }
    config_path = workdir / f"oidc-{port}.json"
    config_path.write_text(json.dumps(config))
    log_path = workdir / f"oidc-{port}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [node, "server.js", str(config_path)], cwd=OIDC_DIR, stdout=log, stderr=subprocess.STDOUT
        )

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"oidc-provider exited:\n{log_path.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{port}/.well-known/openid-configuration", timeout=2
            ):
                return True
        except OSError:
            return False

    try:
        _wait_until(ready, 30, "oidc-provider", log_path)
        yield OidcProvider(issuer, port, CLIENT_ID, CLIENT_SECRET, users)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Slapd:
    url: str
    port: int

    def settings(self, **extra: Any) -> dict[str, Any]:
        """Zeus's settings for the search-with-a-service-account setup."""
        return {
            "ldap_url": self.url,
            "ldap_bind_dn": LDAP_SERVICE_DN,
            "ldap_bind_password": LDAP_SERVICE_PASSWORD,
            "ldap_user_base": LDAP_PEOPLE_BASE,
            "ldap_admin_group": LDAP_ADMIN_GROUP,
            **extra,
        }


def _ldif() -> str:
    blocks = [
        f"dn: {LDAP_BASE}\nobjectClass: dcObject\nobjectClass: organization\no: Zeus tests\ndc: zeus",
        f"dn: {LDAP_PEOPLE_BASE}\nobjectClass: organizationalUnit\nou: people",
        f"dn: ou=groups,{LDAP_BASE}\nobjectClass: organizationalUnit\nou: groups",
        f"dn: {LDAP_SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
        f"cn: zeus-reader\nuserPassword: {LDAP_SERVICE_PASSWORD}",
    ]
    for uid, (password, mail, _admin) in LDAP_PEOPLE.items():
        entry = (
            f"dn: uid={uid},{LDAP_PEOPLE_BASE}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\n"
            f"sn: {uid}\nuserPassword: {password}"
        )
        blocks.append(entry + (f"\nmail: {mail}" if mail else ""))
    members = [f"member: uid={uid},{LDAP_PEOPLE_BASE}" for uid, (_, _, admin) in LDAP_PEOPLE.items() if admin]
    blocks.append(
        f"dn: {LDAP_ADMIN_GROUP}\nobjectClass: groupOfNames\ncn: zeus-admins\n" + "\n".join(members)
    )
    return "\n\n".join(blocks) + "\n"


def _slapd_conf(workdir: Path) -> str:
    schema = Path("/etc/ldap/schema")
    return f"""include {schema}/core.schema
include {schema}/cosine.schema
include {schema}/inetorgperson.schema
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {workdir}/slapd.pid
argsfile {workdir}/slapd.args

database mdb
maxsize 10485760
suffix "{LDAP_BASE}"
rootdn "cn=manager,{LDAP_BASE}"
rootpw manager-password
directory {workdir}/data
# Passwords are for binding only; the directory is readable by signed-in entries, not anonymously.
access to attrs=userPassword by anonymous auth by * none
access to * by users read by * none
"""


@contextmanager
def start_slapd(workdir: Path) -> Iterator[Slapd]:
    slapd, slapadd = Path("/usr/sbin/slapd"), Path("/usr/sbin/slapadd")
    if not slapd.exists() or not slapadd.exists():
        raise RuntimeError("slapd is missing: `make system-deps` installs Debian's slapd and ldap-utils")
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    conf = workdir / "slapd.conf"
    conf.write_text(_slapd_conf(workdir))
    ldif = workdir / "people.ldif"
    ldif.write_text(_ldif())
    subprocess.run(
        [str(slapadd), "-f", str(conf), "-l", str(ldif)], check=True, capture_output=True, timeout=60
    )
    port = free_port()
    url = f"ldap://127.0.0.1:{port}"
    log_path = workdir / "slapd.log"
    with log_path.open("w") as log:
        # -d keeps slapd in the foreground (so the test owns the process); 0 logs nothing extra.
        process = subprocess.Popen(
            [str(slapd), "-f", str(conf), "-h", f"{url}/", "-d", "0"], stdout=log, stderr=subprocess.STDOUT
        )

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"slapd exited:\n{log_path.read_text(errors='replace')}")
        try:
            ldap3.Connection(ldap3.Server(url, connect_timeout=1), auto_bind=True).unbind()
            return True
        except ldap3.core.exceptions.LDAPException:
            return False

    try:
        _wait_until(ready, 30, "slapd", log_path)
        yield Slapd(url=url, port=port)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
