"""The ``[services.dns]`` table, read with :class:`appliance.config.Table`.

Example (see ``etc/dns.toml``)::

    [services.dns]
    servers = ["127.0.0.1:5353"]        # primaries, tried in order
    tsig_key_file = "etc/dns.key"       # BIND key format (tsig-keygen)
    zones = ["example.test."]
    default_ttl = 5
    ddns = { forward_zone = "dhcp.example.test.", reverse_zone = "0.9.10.in-addr.arpa." }

    [[services.dns.records]]
    name = "sip.example.test."
    type = "A"
    resource = "vip-sip"
    values = { a = "10.9.0.11", b = "10.9.0.12" }
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import dns.name
import dns.rdatatype

from appliance.config import Table
from services.dns.servers import parse_server
from services.dns.records import TYPES, RecordSpec, parse_rdata, zone_of
from services.dns.tsigkey import KeyFileError, TSIGKey, parse_key_file, select_key

_RESOURCE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


@dataclass(frozen=True)
class ZoneSettings:
    """A zone with servers and/or a key of its own (``zones = [{ name, servers, tsig_key_file }]``)."""

    servers: tuple[tuple[str, int], ...]
    key: TSIGKey | None
    key_file: str | None
    #: send to the zone's primary named by its SOA MNAME, looked up through ``servers``
    #: (which stay the fallback); the primary's port is ``primary_port``
    discover_primary: bool = False
    primary_port: int = 53
    #: BIND views chosen by TSIG key (split horizon): the records go to every view,
    #: one UPDATE per view signed with its key; ``key`` is the first view's
    views: tuple[TSIGKey, ...] = ()


@dataclass(frozen=True)
class DDNSConfig:
    forward_zone: dns.name.Name
    reverse_zone: dns.name.Name | None
    forward_zones: tuple[dns.name.Name, ...] = ()     # further DDNS domains (per subnet)
    reverse_zones: tuple[dns.name.Name, ...] = ()     # further reverse zones
    attempts: int = 5                                 # per UPDATE (timeouts, SERVFAIL)
    retry_initial_s: float = 0.25
    retry_max_s: float = 5.0
    override_client_update: bool = False              # RFC 4702: S=0 -> the server does A too (O=1)
    override_no_update: bool = False                 # RFC 4702: N=1 -> the server updates anyway


@dataclass(frozen=True)
class DNSConfig:
    servers: tuple[tuple[str, int], ...]
    key: TSIGKey | None
    key_file: str | None
    zones: tuple[dns.name.Name, ...]
    default_ttl: int
    records: tuple[RecordSpec, ...]
    reconcile_interval_s: float = 30.0
    timeout_s: float = 1.0
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0
    ddns: DDNSConfig | None = None
    cluster_id: str | None = None      # identity written into guards (default: derived)
    zone_settings: Any = None      # zone -> ZoneSettings (own servers or key); None: none
    verify_secondaries: tuple[tuple[str, int], ...] = ()   # check they reach the new serial
    verify_timeout_s: float = 5.0
    guard_scope: str = "name"          # "name": a guard per owner name; "resource": per resource and zone


def _name(table, key: str, value: Any) -> dns.name.Name | None:
    try:
        return dns.name.from_text(value)
    except Exception as e:
        table.error(key, f'"{value}" is not a domain name: {e}')
        return None


def parse(table, context) -> DNSConfig | None:
    """Validate ``table``; return None after recording problems."""
    problems_before = len(table.problems.items)
    servers = _servers(table, "servers", required=False)
    key, key_file = _key(table)

    zones = []
    settings = {}
    zone_items = table.list("zones", min_len=1) or ()
    for i, item in enumerate(zone_items):
        path = f"zones[{i}]"
        if isinstance(item, str):
            zone = _name(table, path, item)
            if zone is not None:
                zones.append(zone)
            continue
        if not isinstance(item, dict):
            table.error(path, "expected a zone name or { name, servers, tsig_key_file }")
            continue
        zt = Table(item, f"{table.key_path('zones')}[{i}]", table.problems)
        zname = zt.str("name")
        zone = _name(zt, "name", zname) if zname else None
        zservers = _servers(zt, "servers", required=False) if zt.has("servers") else None
        zkey, zkey_file = _key(zt) if zt.has("tsig_key_file") else (key, key_file)
        discover = bool(zt.bool("discover_primary", False))
        primary_port = zt.int("primary_port", 53, min=1, max=65535)
        views = []
        for j, view in enumerate(zt.list("views", default=None) or ()):
            if not isinstance(view, dict):
                zt.error(f"views[{j}]", "expected { tsig_key_file, tsig_key_name }")
                continue
            vt = Table(view, f"{zt.key_path('views')}[{j}]", table.problems)
            vkey, _ = _key(vt)
            if vkey is None and not vt.has("tsig_key_file"):
                vt.error("tsig_key_file", "a view is chosen by its TSIG key: required")
            vt.done()
            if vkey is not None:
                if any(v.name == vkey.name for v in views):
                    zt.error(f"views[{j}]", f"key {vkey.name} is already another view's")
                views.append(vkey)
        if zt.has("views") and len(zt.data.get("views") or ()) < 2:
            zt.error("views", "needs at least two views (one view is just tsig_key_file)")
        zt.done()
        if zone is not None:
            zones.append(zone)
            if views:
                zkey = views[0]
            if zservers is not None or zkey_file != key_file or discover or views:
                settings[zone] = ZoneSettings(tuple(zservers or servers), zkey, zkey_file,
                                              discover, primary_port or 53, tuple(views))
    if not servers and any(z not in settings or not settings[z].servers for z in zones):
        table.error("servers", "needs at least one server (or servers in every zone)")

    default_ttl = table.int("default_ttl", 5, min=0, max=2_147_483_647)
    secondaries = _servers(table, "verify_secondaries", required=False)
    verify_timeout = table.float("verify_timeout_s", 5.0, min=0.1, max=3600)
    cluster_id = table.str("cluster_id", None, pattern=re.compile(r"^[A-Za-z0-9_.:-]{1,40}$"),
                           describe="letters, digits, '_', '.', ':', '-' (1-40)")
    guard_scope = table.str("guard_scope", "name", choices=("name", "resource"))
    interval = table.float("reconcile_interval_s", 30.0, min=0.1, max=86400)
    timeout = table.float("timeout_s", 1.0, min=0.01, max=60)
    retry_initial = table.float("retry_initial_s", 0.5, min=0.01, max=3600)
    retry_max = table.float("retry_max_s", 30.0, min=0.01, max=86400)
    if retry_initial is not None and retry_max is not None and retry_max < retry_initial:
        table.error("retry_max_s", f"{retry_max} is below retry_initial_s {retry_initial}")

    ddns = None
    dt = table.table("ddns")
    if dt is not None:
        fwd_text = dt.str("forward_zone")
        rev_text = dt.str("reverse_zone", None)
        fwd = _name(dt, "forward_zone", fwd_text) if fwd_text else None
        rev = _name(dt, "reverse_zone", rev_text) if rev_text else None
        more = {}
        for list_key in ("forward_zones", "reverse_zones"):
            names = []
            for i, text in enumerate(dt.list(list_key, default=None) or ()):
                n = _name(dt, f"{list_key}[{i}]", text) if isinstance(text, str) else None
                if n is None and not isinstance(text, str):
                    dt.error(f"{list_key}[{i}]", "expected a zone name string")
                if n is not None:
                    names.append(n)
            more[list_key] = tuple(names)
        attempts = dt.int("attempts", 5, min=1, max=100)
        d_initial = dt.float("retry_initial_s", 0.25, min=0.01, max=3600)
        d_max = dt.float("retry_max_s", 5.0, min=0.01, max=86400)
        if d_initial is not None and d_max is not None and d_max < d_initial:
            dt.error("retry_max_s", f"{d_max} is below retry_initial_s {d_initial}")
        o_client = dt.bool("override_client_update", False)
        o_none = dt.bool("override_no_update", False)
        dt.done()
        if fwd is not None:
            ddns = DDNSConfig(fwd, rev, more["forward_zones"], more["reverse_zones"], attempts,
                              d_initial, d_max, bool(o_client), bool(o_none))

    nodes = ({context.node_id} if context.node_id else set()) | set(context.peer_ids)
    records = []
    for rt in table.tables("records"):
        spec = _parse_record(rt, context, nodes, zones, default_ttl if default_ttl is not None else 5)
        if spec is not None:
            records.append(spec)
    by_name: dict[dns.name.Name, str] = {}
    seen: set = set()
    for i, spec in enumerate(records):
        if spec.key in seen:
            table.error("records", f"{spec.name} {spec.type_text} is configured twice")
        seen.add(spec.key)
        other = by_name.setdefault(spec.name, spec.resource)
        if other != spec.resource:
            table.error("records", f"{spec.name}: all records of one name must follow the same "
                                   f"resource ({other!r} and {spec.resource!r})")
    types_at: dict[dns.name.Name, set] = {}
    for spec in records:
        types_at.setdefault(spec.name, set()).add(spec.rdtype)
    for name, types in types_at.items():
        if dns.rdatatype.CNAME in types and len(types) > 1:
            others = ", ".join(sorted(dns.rdatatype.to_text(t) for t in types
                                      if t != dns.rdatatype.CNAME))
            table.error("records", f"{name}: a CNAME cannot share its name with other data "
                                   f"({others}; RFC 1034 3.6.2): the server would drop the "
                                   "update and reconcile would rewrite it forever")
        if name in zones and dns.rdatatype.CNAME in types:
            table.error("records", f"{name}: a CNAME cannot be at a zone apex")
    if len(table.problems.items) != problems_before or not zones:
        return None
    return DNSConfig(tuple(servers), key, key_file, tuple(zones), default_ttl, tuple(records),
                     interval, timeout, retry_initial, retry_max, ddns, cluster_id,
                     MappingProxyType(settings), tuple(secondaries), verify_timeout,
                     guard_scope or "name")


def _servers(table, key: str, required: bool = True) -> list[tuple[str, int]]:
    servers = []
    for i, text in enumerate(table.list(key, min_len=1 if required else 0,
                                        **({} if required else {"default": None})) or ()):
        path = f"{table.key_path(key)}[{i}]"
        if not isinstance(text, str):
            table.problems.add(path, f"expected a \"host:port\" string, got {type(text).__name__}")
            continue
        try:
            servers.append(parse_server(text))
        except ValueError as e:
            table.problems.add(path, str(e))
    return servers


def _key(table) -> tuple[TSIGKey | None, str | None]:
    key = None
    key_file = table.path_("tsig_key_file", None)
    key_name = table.str("tsig_key_name", None)
    if key_file is not None:
        try:
            key = select_key(parse_key_file(Path(key_file).read_text(encoding="utf-8")), key_name)
        except OSError as e:
            table.error("tsig_key_file", f"{key_file}: cannot read: {e.strerror or e}")
        except KeyFileError as e:
            table.error("tsig_key_file", f"{key_file}: {e}")
    elif key_name is not None:
        table.error("tsig_key_name", "needs tsig_key_file")
    return key, key_file


def _parse_record(rt, context, nodes: set[str], zones, default_ttl: int) -> RecordSpec | None:
    name_text = rt.str("name")
    rdtype = rt.str("type", choices=TYPES)
    ttl = rt.int("ttl", default_ttl, min=0, max=2_147_483_647)
    resource = rt.str("resource", pattern=_RESOURCE,
                      describe="a resource name (letters, digits, '_', '.', ':', '-')")
    values: dict[str, Any] = {}
    vt = rt.table("values", required=True)
    if vt is not None:
        for node in list(vt.data):
            text = vt.str(node)
            if node not in nodes:
                vt.error(node, f"{node!r} is neither this node nor a cluster peer")
            elif text is not None and rdtype is not None:
                try:
                    values[node] = parse_rdata(rdtype, text)
                except ValueError as e:
                    vt.error(node, str(e))
        vt.done()
        if not vt.data:
            rt.error("values", "needs at least one node = \"rdata\"")
    rt.done()
    name = _name(rt, "name", name_text) if name_text else None
    zone = None
    if name is not None and zones:
        zone = zone_of(name, zones)
        if zone is None:
            rt.error("name", f"{name} is not inside any of zones "
                             f"({', '.join(z.to_text() for z in zones)})")
    if resource is not None and resource not in context.vip_names and ":" not in resource:
        known = ", ".join(context.vip_names) or "none"
        rt.error("resource", f"{resource!r} is neither a [[vip]] name (known: {known}) nor a "
                             "service resource (\"service:name\", e.g. \"sip:registrar\")")
        resource = None
    if None in (name, zone, rdtype, ttl, resource) or not values:
        return None
    return RecordSpec(name, dns.rdatatype.from_text(rdtype), ttl, resource,
                      MappingProxyType(values), zone)
