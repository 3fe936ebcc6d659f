"""The ``[services.sip]`` table, read with :class:`appliance.config.Table`.

Example (see ``etc/sip.toml``)::

    [services.sip]
    listen_address = "127.0.0.1"        # UDP (and default) listener address; "0.0.0.0" = all
    port = 15060                        # UDP port (0 = no UDP)
    tcp = "tcp:15060:interface=127.0.0.1"   # optional stream listeners: Twisted
    tls = "ssl:15061:interface=127.0.0.1:privateKey=key.pem:certKey=cert.pem"  # endpoint strings
    domains = ["example.test"]          # served domains; empty = any
    default_expires = 3600              # when neither Expires nor expires= is given
    min_expires = 60                    # below it (and not 0): 423 Interval Too Brief
    max_expires = 7200                  # longer requests are shortened to this
    max_contacts = 10                   # bindings per AOR (more: 503)
    receive_buffer_bytes = 4194304      # SO_RCVBUF of the UDP socket
    max_pending = 2048                  # REGISTERs waiting for the store/backups: more get 503
    shed_lag_ms = 50                    # reactor this late: REGISTERs beyond shed_min_pending
    shed_min_pending = 256              #   in flight get 503 + Retry-After (0 = never on lag)
    shed_hold_ms = 250                  #   ... and for this long after the last late tick

    [services.sip.auth]                 # optional: digest authentication of REGISTERs
    realm = "example.test"
    ha1_file = "etc/sip-users.ha1"      # user:realm:HA1 (MD5) or user:realm:ALGORITHM:HA1
    algorithms = ["SHA-256", "MD5"]     # offered in this order (RFC 8760)
    nonce_ttl_s = 300                   # older nonces: 401 with stale=true
    invite = false                      # also challenge INVITEs
    # instead of ha1_file, a directory (cleartext password attribute):
    [services.sip.auth.ldap]
    servers = ["ldap://10.0.0.5", "ldap://10.0.0.6"]   # tried in turn
    base_dn = "ou=people,dc=example,dc=net"
    bind_dn = "cn=sip,dc=example,dc=net"              # with password_file; else anonymous
    password_file = "etc/ldap.pw"
    filter = "(uid={user})"
    password_attribute = "userPassword"
    strategy = "first"                                # or "round_robin"
    timeout_s = 2                                     # per server: connect and answer
    cache_ttl_s = 60                                  # answers cached this long
    serve_stale = true                                # directory down: last good answer
    stale_max_s = 86400                               # ... if not older than this
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.sip.registrar import Limits

_DOMAIN = re.compile(r"^[A-Za-z0-9.\-]{1,253}(:\d{1,5})?$")


@dataclass(frozen=True)
class AuthConfig:
    realm: str
    ha1_file: str | None
    credentials: object            # services.sip.auth.HA1File (None with ldap)
    algorithms: tuple[str, ...]
    nonce_ttl_s: float
    invite: bool
    ldap: object = None            # services.sip.ldap_credentials.LdapSettings


@dataclass(frozen=True)
class ReplicationConfig:
    peers: tuple[str, ...]
    mode: str                      # "sync" | "async"
    timeout_s: float
    batch: int
    backlog_limit: int = 10_000    # missed AORs per backup before a paged full resync
    page: int = 100                # most AORs per full-resync page
    window: int = 1                # full-resync pages in flight
    pause_s: float = 0.002         # reactor breath between two pages
    sync_grace_s: float = 5.0      # at start, a peer down this long is not waited for
    sync_max_s: float = 600.0      # at start, unable at most this long (peers' synced markers)
    page_s: float = 0.008          # full resync: a page's round trip aims at this (sizes pages)
    turn_s: float = 0.002          # full resync: page building per reactor turn at most
    min_rate: float = 2500.0       # full resync: AORs/s at least (pages grow on a slow box)


@dataclass(frozen=True)
class ClusterRoles:
    """Who serves what: one cluster resource (``shards == 0``) or one per shard."""

    shards: int = 0                                   # 0 = unsharded
    resource: str = "sip:registrar"                   # unsharded resource (or a [[vip]] name)
    priority: tuple[tuple[str, int], ...] = ()        # unsharded: node -> priority
    preempt: bool = False
    not_owner: str = "redirect"                       # or "serve-if-owner-down"
    addresses: tuple[tuple[str, str], ...] = ()       # node -> "host:port" for 302s


@dataclass(frozen=True)
class SIPConfig:
    listen_address: object            # ipaddress.IPv4Address | IPv6Address
    port: int
    tcp: str | None
    tls: str | None
    domains: tuple[str, ...]
    limits: Limits
    receive_buffer_bytes: int = 4 * 1024 * 1024
    sweep_interval_s: float = 5.0
    server_header: str = "appliance-sip"
    auth: AuthConfig | None = None
    replication: ReplicationConfig | None = None
    roles: ClusterRoles = ClusterRoles()
    max_pending: int = 2048
    shed_lag_ms: float = 50.0
    shed_min_pending: int = 256
    shed_hold_ms: float = 250.0


def parse(table, context) -> SIPConfig | None:
    """Validate ``table``; return None after recording problems."""
    before = len(table.problems.items)
    listen_address = table.ip("listen_address", "127.0.0.1")
    if isinstance(listen_address, str):
        import ipaddress
        listen_address = ipaddress.ip_address(listen_address)
    port = table.int("port", 5060, min=0, max=65535)
    tcp = table.endpoint("tcp", None)
    tls = table.endpoint("tls", None, tls_in_string=True)
    if tls is not None and not tls.startswith("ssl:"):
        table.error("tls", f'"{tls}" is not an ssl: endpoint (e.g. "ssl:5061:privateKey=key.pem")')
    domains = []
    for i, d in enumerate(table.list("domains", default=[]) or ()):
        path = f"{table.key_path('domains')}[{i}]"
        if not isinstance(d, str) or not _DOMAIN.match(d):
            table.problems.add(path, f"{d!r} is not a domain name")
        else:
            domains.append(d.lower())
    default_expires = table.int("default_expires", 3600, min=1, max=2 ** 31 - 1)
    min_expires = table.int("min_expires", 60, min=0, max=2 ** 31 - 1)
    max_expires = table.int("max_expires", 7200, min=1, max=2 ** 31 - 1)
    max_contacts = table.int("max_contacts", 10, min=1, max=1000)
    rcvbuf = table.int("receive_buffer_bytes", 4 * 1024 * 1024, min=0, max=1 << 30)
    sweep = table.float("sweep_interval_s", 5.0, min=0.1, max=3600)
    max_pending = table.int("max_pending", 2048, min=1, max=1_000_000)
    shed_lag_ms = table.float("shed_lag_ms", 50.0, min=0, max=60_000)
    shed_min_pending = table.int("shed_min_pending", 256, min=0, max=1_000_000)
    shed_hold_ms = table.float("shed_hold_ms", 250.0, min=0, max=60_000)
    if None not in (min_expires, max_expires) and max_expires < min_expires:
        table.error("max_expires", f"{max_expires} is below min_expires {min_expires}")
    if None not in (default_expires, max_expires) and default_expires > max_expires:
        table.error("default_expires", f"{default_expires} is above max_expires {max_expires}")
    if port == 0 and tcp is None and tls is None:
        table.error("port", "0 (no UDP) needs a tcp or tls listener")
    auth = None
    at = table.table("auth")
    if at is not None:
        auth = _parse_auth(at, domains)
        at.done()
    replication = None
    rt = table.table("replication")
    if rt is not None:
        peers = []
        for i, peer in enumerate(rt.list("peers", min_len=1) or ()):
            if peer not in context.peer_ids:
                rt.problems.add(f"{rt.key_path('peers')}[{i}]",
                                f"{peer!r} is not a cluster peer (known: "
                                f"{', '.join(context.peer_ids) or 'none'})")
            else:
                peers.append(peer)
        mode = rt.str("mode", "sync", choices=("sync", "async"))
        timeout = rt.float("timeout_s", 2.0, min=0.01, max=60)
        batch = rt.int("batch", 100, min=1, max=10000)
        backlog_limit = rt.int("backlog_limit", 10_000, min=1, max=10_000_000)
        page = rt.int("page", 100, min=1, max=5000)
        window = rt.int("window", 1, min=1, max=64)
        pause = rt.float("pause_ms", 2.0, min=0, max=10_000)
        grace = rt.float("sync_grace_s", 5.0, min=0, max=3600)
        sync_max = rt.float("sync_max_s", 600.0, min=0, max=86400)
        page_ms = rt.float("page_ms", 8.0, min=0.1, max=10_000)
        turn_ms = rt.float("turn_ms", 2.0, min=0.1, max=1000)
        min_rate = rt.float("min_rate", 2500.0, min=1, max=10_000_000)
        rt.done()
        if peers and None not in (mode, timeout, batch, backlog_limit, page, window, pause,
                                  grace, sync_max, page_ms, turn_ms, min_rate):
            replication = ReplicationConfig(tuple(peers), mode, timeout, batch, backlog_limit,
                                            page, window, pause / 1000.0, grace, sync_max,
                                            page_ms / 1000.0, turn_ms / 1000.0, min_rate)
    roles = _parse_roles(table, context, port)
    if len(table.problems.items) != before:
        return None
    return SIPConfig(listen_address, port, tcp, tls, tuple(domains),
                     Limits(default_expires, min_expires, max_expires, max_contacts),
                     rcvbuf, sweep, auth=auth, replication=replication, roles=roles,
                     max_pending=max_pending, shed_lag_ms=shed_lag_ms,
                     shed_min_pending=shed_min_pending, shed_hold_ms=shed_hold_ms)


_RESOURCE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_HOSTPORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]{1,253})(:\d{1,5})?$")


def _parse_roles(table, context, port) -> ClusterRoles | None:
    members = set(context.peer_ids) | ({context.node_id} if context.node_id else set())
    shards = table.int("shards", 0, min=0, max=1024)
    resource = table.str("resource", "sip:registrar", pattern=_RESOURCE,
                         describe="a resource name (letters, digits, '_', '.', ':', '-')")
    if shards and table.has("resource"):
        table.error("resource", "only for an unsharded registrar (shards = 0); shard "
                                "resources are named sip:shard<N>")
    preempt = table.bool("preempt", False)
    not_owner = table.str("not_owner", "redirect", choices=("redirect", "serve-if-owner-down"))
    priority = {}
    pt = table.table("priority")
    if pt is not None:
        if shards:
            table.error("priority", "only for an unsharded registrar; shards rotate the "
                                    "node order (shard i prefers the i-th node)")
        for member in list(pt.data):
            value = pt.int(member, min=0, max=255)
            if member not in members:
                pt.error(member, f"{member!r} is neither this node nor a cluster peer")
            elif value is not None:
                priority[member] = value
        pt.done()
    addresses = {}
    at = table.table("addresses")
    if at is not None:
        for member in list(at.data):
            value = at.str(member)
            if member not in members:
                at.error(member, f"{member!r} is neither this node nor a cluster peer")
            elif value is not None and not _HOSTPORT.match(value):
                at.error(member, f'"{value}" is not "host" or "host:port"')
            elif value is not None:
                addresses[member] = value
        at.done()
    if None in (shards, resource, preempt, not_owner):
        return None
    return ClusterRoles(shards, resource, tuple(sorted(priority.items())), preempt, not_owner,
                        tuple(sorted(addresses.items())))


def _parse_auth(at, domains) -> AuthConfig | None:
    from pathlib import Path

    from services.sip.auth import ALGORITHMS, HA1File, HA1FileError
    realm = at.str("realm", domains[0] if domains else None)
    if realm is None and not at.has("realm"):
        at.error("realm", "missing (required when domains is empty)")
    ha1_file = at.path_("ha1_file", None)
    ldap = None
    lt = at.table("ldap")
    if lt is not None:
        ldap = _parse_ldap(lt)
        lt.done()
    if (ha1_file is None) == (lt is None):
        at.error(None, "needs exactly one of ha1_file and ldap")
    algorithms = []
    for i, a in enumerate(at.list("algorithms", default=["SHA-256", "MD5"], min_len=1) or ()):
        if not isinstance(a, str) or a.upper() not in ALGORITHMS:
            at.problems.add(f"{at.key_path('algorithms')}[{i}]",
                            f"{a!r} is not one of {', '.join(ALGORITHMS)}")
        else:
            algorithms.append(a.upper())
    ttl = at.float("nonce_ttl_s", 300.0, min=1, max=86400)
    invite = at.bool("invite", False)
    credentials = None
    if ha1_file is not None:
        try:
            credentials = HA1File.parse(Path(ha1_file).read_text(encoding="utf-8"), ha1_file)
        except OSError as e:
            at.error("ha1_file", f"{ha1_file}: cannot read: {e.strerror or e}")
        except HA1FileError as e:
            at.error("ha1_file", str(e))
    if None in (realm, ttl, invite) or not algorithms or (credentials is None and ldap is None):
        return None
    return AuthConfig(realm, ha1_file, credentials, tuple(algorithms), ttl, invite, ldap)


def _parse_ldap(lt):
    from pathlib import Path

    from services.sip.ldap_credentials import LdapSettings
    servers = []
    for i, url in enumerate(lt.list("servers", min_len=1) or ()):
        if not isinstance(url, str) or not url.startswith(("ldap://", "ldaps://")):
            lt.problems.add(f"{lt.key_path('servers')}[{i}]",
                            f"{url!r} is not an ldap:// or ldaps:// URL")
        else:
            servers.append(url)
    base_dn = lt.str("base_dn")
    bind_dn = lt.str("bind_dn", None)
    password_file = lt.path_("password_file", None)
    password = None
    if password_file is not None:
        try:
            password = Path(password_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            lt.error("password_file", f"{password_file}: cannot read: {e.strerror or e}")
    elif bind_dn is not None:
        lt.error("bind_dn", "needs password_file")
    flt = lt.str("filter", "(uid={user})")
    if flt is not None and "{user}" not in flt:
        lt.error("filter", f'"{flt}" does not contain {{user}}')
    attr = lt.str("password_attribute", "userPassword")
    strategy = lt.str("strategy", "first", choices=("first", "round_robin"))
    timeout = lt.float("timeout_s", 2.0, min=0.1, max=60)
    ttl = lt.float("cache_ttl_s", 60.0, min=0, max=86400)
    serve_stale = lt.bool("serve_stale", True)
    stale_max = lt.float("stale_max_s", 86400.0, min=0, max=30 * 86400)
    if not servers or None in (base_dn, flt, attr, strategy, timeout, ttl, serve_stale, stale_max):
        return None
    return LdapSettings(tuple(servers), base_dn, bind_dn, password, flt, attr, strategy, timeout,
                        ttl, serve_stale, stale_max)
