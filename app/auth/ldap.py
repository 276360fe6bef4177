"""LDAP bind login with ldap3 (pure Python): find the user's entry, bind as it with the password
the user typed, read the email address and whether the entry belongs to the admin group.

Two ways to find the entry (README "SSO"):
- search: bind as the service account ZEUS_LDAP_BIND_DN (or anonymously when it is unset), search
  ZEUS_LDAP_USER_BASE with ZEUS_LDAP_USER_FILTER, which must match exactly one entry;
- template: ZEUS_LDAP_USER_DN_TEMPLATE, e.g. uid={username},ou=people,dc=example,dc=org; the
  entry and the group are then read with the user's own bind.
The username is escaped for the filter (RFC 4515) and for the DN (RFC 4514), so it cannot widen
the search or name another entry.
"""

from __future__ import annotations

import logging
import math
import ssl
from dataclasses import dataclass

from ldap3 import BASE, NONE, SUBTREE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn

from app.config import Settings

log = logging.getLogger("zeus.ldap")

MAX_USERNAME_LENGTH = 256


class LdapUnavailable(Exception):
    """The directory cannot be reached or answered with an error (not a wrong password)."""


class LdapRefused(Exception):
    """The directory knows the user, but Zeus cannot make an account of the entry (e.g. no email)."""


@dataclass(frozen=True)
class DirectoryUser:
    dn: str
    email: str
    # None when ZEUS_LDAP_ADMIN_GROUP is unset: the account keeps the role it has.
    admin: bool | None


def _server(settings: Settings) -> Server:
    assert settings.ldap_url
    tls = None
    if settings.ldap_url.startswith("ldaps://") or settings.ldap_start_tls:
        tls = Tls(
            validate=ssl.CERT_REQUIRED,
            ca_certs_file=str(settings.ldap_ca_file) if settings.ldap_ca_file else None,
        )
    return Server(settings.ldap_url, get_info=NONE, tls=tls, connect_timeout=settings.ldap_timeout_s)


def _connection(settings: Settings, server: Server, user: str | None, password: str | None) -> Connection:
    connection = Connection(
        server,
        user=user,
        password=password,
        # ldap3 packs this into a socket option as whole seconds.
        receive_timeout=math.ceil(settings.ldap_timeout_s),
        raise_exceptions=False,
        read_only=True,
    )
    connection.open()
    if settings.ldap_start_tls and not connection.start_tls():
        raise LdapUnavailable(
            f"StartTLS with {settings.ldap_url} failed: {connection.result.get('description')}"
        )
    return connection


def _search_one(connection: Connection, base: str, search_filter: str, scope: str, attributes: list[str]):
    if not connection.search(base, search_filter, search_scope=scope, attributes=attributes, size_limit=2):
        result = connection.result or {}
        if result.get("description") in ("success", "noSuchObject", "sizeLimitExceeded"):
            return list(connection.entries)
        raise LdapUnavailable(
            f"search of {base} failed: {result.get('description')} {result.get('message', '')}"
        )
    return list(connection.entries)


def authenticate(settings: Settings, username: str, password: str) -> DirectoryUser | None:
    """The directory's entry for this username and password, or None when the username is unknown
    or the password wrong. Raises LdapUnavailable (directory down or misconfigured) or LdapRefused."""
    username = username.strip()
    # An empty password would be an "unauthenticated bind" (RFC 4513 5.1.2), which many servers
    # accept as success: it must never count as knowing the password.
    if not username or not password or len(username) > MAX_USERNAME_LENGTH:
        return None
    server = _server(settings)
    email_attribute = settings.ldap_email_attribute
    try:
        if settings.ldap_user_dn_template:
            user_dn = settings.ldap_user_dn_template.replace("{username}", escape_rdn(username))
            lookup = _connection(settings, server, user_dn, password)
            if not lookup.bind():
                return _bind_failed(lookup)
            entries = _search_one(lookup, user_dn, "(objectClass=*)", BASE, [email_attribute])
        else:
            bind_password = (
                settings.ldap_bind_password.get_secret_value() if settings.ldap_bind_password else None
            )
            lookup = _connection(settings, server, settings.ldap_bind_dn, bind_password)
            if not lookup.bind():
                raise LdapUnavailable(
                    f"the service account ZEUS_LDAP_BIND_DN={settings.ldap_bind_dn!r} cannot bind: "
                    f"{lookup.result.get('description')}"
                )
            search_filter = settings.ldap_user_filter.replace("{username}", escape_filter_chars(username))
            assert settings.ldap_user_base
            entries = _search_one(lookup, settings.ldap_user_base, search_filter, SUBTREE, [email_attribute])
            if len(entries) != 1:
                if len(entries) > 1:
                    log.warning("LDAP filter %s matches more than one entry: refusing", search_filter)
                lookup.unbind()
                return None
            user_dn = entries[0].entry_dn
            as_user = _connection(settings, server, user_dn, password)
            bound = as_user.bind()
            as_user.unbind()
            if not bound:
                lookup.unbind()
                return None
        try:
            if not entries:
                raise LdapRefused(f"the directory entry {user_dn} cannot be read")
            values = entries[0].entry_attributes_as_dict.get(email_attribute) or []
            email = next((str(value).strip().lower() for value in values if "@" in str(value)), None)
            if email is None:
                raise LdapRefused(f"the directory entry {user_dn} has no email address ({email_attribute})")
            admin = None
            if settings.ldap_admin_group:
                member_filter = f"({settings.ldap_group_member_attribute}={escape_filter_chars(user_dn)})"
                admin = bool(_search_one(lookup, settings.ldap_admin_group, member_filter, BASE, ["cn"]))
            return DirectoryUser(dn=user_dn, email=email, admin=admin)
        finally:
            lookup.unbind()
    except LDAPException as error:
        raise LdapUnavailable(f"the directory at {settings.ldap_url} cannot be reached: {error}") from None


def _bind_failed(connection: Connection) -> None:
    description = (connection.result or {}).get("description")
    connection.unbind()
    if description in (
        "invalidCredentials",
        "invalidDNSyntax",
        "noSuchObject",
        "inappropriateAuthentication",
    ):
        return None
    raise LdapUnavailable(f"the directory refused the bind: {description}")
