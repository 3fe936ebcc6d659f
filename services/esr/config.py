"""The ``[services.esr]`` table, read with :class:`appliance.config.Table`.

Example (see ``etc/esr.toml``)::

    [services.esr]
    source = "store"                 # the node's store; or "redis://..." / "unix:///...sock"
    table = 254                      # routing table the routes go into (254 = main)
    proto = 229                      # protocol number marking our routes (0xe5)
    next_hops = { dn1 = "10.77.0.2", dn2 = { via = "10.77.0.3", dev = "eth0" } }
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from appliance.config import Table

_DN_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_IFNAME = re.compile(r"^[^\s/]{1,15}$")
RESERVED_TABLES = (0, 253, 255)          # unspec, default, local
RESERVED_PROTOS = range(0, 5)            # unspec, redirect, kernel, boot, static


@dataclass(frozen=True)
class NextHop:
    via: Any = None          # ip_address or None
    dev: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"via": str(self.via) if self.via is not None else None, "dev": self.dev}


@dataclass(frozen=True)
class ESRConfig:
    next_hops: Any                    # MappingProxyType[str, NextHop]
    source: str = "store"             # "store" or a Redis URL of its own
    namespace: str = "appliance"      # store namespace when source is a Redis URL
    table: int = 254
    proto: int = 0xE5
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0


def _next_hop(table: Table, dn: str, value: Any) -> NextHop | None:
    if isinstance(value, str):
        value = {"via": value}
    if not isinstance(value, dict):
        table.error(f"next_hops.{dn}", 'expected an address or { via = "...", dev = "..." }')
        return None
    sub = Table(value, table.key_path(f"next_hops.{dn}"), table.problems)
    before = len(sub.problems.items)
    via = sub.ip("via", None)
    dev = sub.str("dev", None, pattern=_IFNAME, describe="an interface name")
    sub.done()
    if via is None and dev is None:
        if len(sub.problems.items) == before:
            sub.error(None, "needs via (the DN's address) and/or dev")
        return None
    return NextHop(via, dev)


def parse(table: Table, context) -> ESRConfig | None:
    before = len(table.problems.items)
    source = table.str("source", "store")
    namespace = table.str("namespace", "appliance")
    if source is not None and source != "store" and not source.startswith(
            ("redis://", "rediss://", "unix://")):
        table.error("source", f'{source!r} is not "store" or a redis:// / unix:// URL')
    rt = table.int("table", 254, min=1, max=2**32 - 1)
    if rt in RESERVED_TABLES:
        table.error("table", f"{rt} is reserved (0 unspec, 253 default, 255 local)")
    proto = table.int("proto", 0xE5, min=0, max=255)
    if proto in RESERVED_PROTOS:
        table.error("proto", f"{proto} is the kernel's (0-4): pick a number of our own "
                             "(default 229 = 0xe5)")
    retry_initial = table.float("retry_initial_s", 0.5, min=0.01)
    retry_max = table.float("retry_max_s", 30.0, min=0.01)
    hops: dict[str, NextHop] = {}
    raw = table.table("next_hops", required=True)
    if raw is not None:
        for dn, value in raw.data.items():
            raw._seen.add(dn)
            if not _DN_ID.match(dn):
                raw.error(dn, "is not a node id")
                continue
            hop = _next_hop(table, dn, value)
            if hop is not None:
                hops[dn] = hop
        if not raw.data:
            table.error("next_hops", "needs at least one DN: { dn1 = \"10.77.0.2\" }")
        versions = {h.via.version for h in hops.values() if h.via is not None}
        if len(versions) > 1:
            table.error("next_hops", "mixes IPv4 and IPv6 next hops")
    table.done()
    if len(table.problems.items) > before:
        return None
    return ESRConfig(next_hops=MappingProxyType(hops), source=source, namespace=namespace,
                     table=rt, proto=proto, retry_initial_s=retry_initial, retry_max_s=retry_max)
