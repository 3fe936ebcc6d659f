"""The ``[services.dhcp6]`` table: frozen typed objects out of the ``Table`` reader.

Example (etc/dhcp6.toml has every key with comments)::

    [services.dhcp6]
    listen_address = "::1"          # or interface = "veth0" (direct clients, ff02::1:2)
    port = 547
    rapid_commit = true
    [[services.dhcp6.subnets]]
    id = 1
    subnet = "2001:db8:1::/64"
    pool = ["2001:db8:1::100", "2001:db8:1::1ff"]
    pd_pools = [{ prefix = "2001:db8:100::/40", delegated_length = 56 }]
    dns_servers = ["2001:db8:1::1"]
    reservations = [{ duid = "00:03:00:01:52:54:00:00:00:01", address = "2001:db8:1::10" }]

Decisions worth knowing:

* Pools are bounded: at most ``MAX_POOL`` addresses per address pool and
  ``MAX_POOL`` delegated prefixes per prefix pool (the allocator keeps a
  per-lease record and an in-memory index; a /64 is not a pool).
* T1/T2 default to 0.5 and 0.8 of the preferred lifetime (RFC 8415 21.4).
* DUIDs are written as hex, with or without ``:`` separators, and kept as
  lowercase hex without separators.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Network
from typing import Any

from appliance.config import ParseContext, Table, ip_item
from services.dhcp.failover.config import Failover, parse_failover

#: RFC 8156 allocates by split pools (or proportionally) and has every partner answer
#: every new client.  ``load-balancing`` (not the default) keeps the split pools and
#: takes the v4 design's client ownership: the RFC 3074 hash of the DUID names the
#: partner that answers a SOLICIT at once, the other only once the client's elapsed
#: time reaches ``delay_s`` or the partner is not heard (services/dhcp/v6/failover.py)
FAILOVER_MODES = ("split-scope", "load-balancing", "hot-standby")

MAX_POOL = 2 ** 20
_DOMAIN = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)"
                     r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")
_HEX = re.compile(r"^[0-9a-fA-F]{2}(:?[0-9a-fA-F]{2})*$")
_MAX_SUBNET_ID = 2**32 - 1


def normalize_duid(text: Any) -> str | None:
    """``"00:01:AB.."`` or ``"0001ab.."`` -> ``"0001ab.."``; None if not a DUID (3..130 octets)."""
    if not isinstance(text, str) or not _HEX.match(text):
        return None
    h = text.replace(":", "").lower()
    return h if 3 <= len(h) // 2 <= 130 else None


@dataclass(frozen=True)
class Pool:
    """Inclusive address range ``first..last``."""

    first: IPv6Address
    last: IPv6Address

    @property
    def size(self) -> int:
        return int(self.last) - int(self.first) + 1


@dataclass(frozen=True)
class PdPool:
    """Delegated prefixes of ``delegated_length`` carved out of ``prefix``."""

    prefix: IPv6Network
    delegated_length: int

    @property
    def size(self) -> int:
        return 1 << (self.delegated_length - self.prefix.prefixlen)


@dataclass(frozen=True)
class Reservation:
    duid: str                          # lowercase hex
    address: IPv6Address | None = None
    prefix: IPv6Network | None = None
    hostname: str | None = None


@dataclass(frozen=True)
class Subnet:
    id: int
    network: IPv6Network
    pools: tuple[Pool, ...] = ()
    pd_pools: tuple[PdPool, ...] = ()
    preferred_lifetime_s: int = 3000
    valid_lifetime_s: int = 4000
    t1_s: int = 1500
    t2_s: int = 2400
    dns_servers: tuple[IPv6Address, ...] = ()
    domain_list: tuple[str, ...] = ()
    interface_id: bytes | None = None
    reservations: tuple[Reservation, ...] = ()

    @property
    def first(self) -> int:
        return int(self.network.network_address)

    @property
    def last(self) -> int:
        return int(self.network.broadcast_address)

    def reservation_for(self, duid_hex: str) -> Reservation | None:
        return next((r for r in self.reservations if r.duid == duid_hex), None)


@dataclass(frozen=True)
class Dhcp6Config:
    interface: str | None = None
    listen_address: IPv6Address | None = None
    port: int = 547
    server_duid: str | None = None     # hex; None: generated once and kept in the store
    rapid_commit: bool = True
    preference: int | None = None
    dns_servers: tuple[IPv6Address, ...] = ()
    domain_list: tuple[str, ...] = ()
    subnets: tuple[Subnet, ...] = ()
    offer_timeout_s: float = 30.0
    decline_quarantine_s: float = 86400.0
    reclaim_interval_s: float = 10.0
    failover: Failover | None = None   # the partner (services/dhcp/failover/config.py)
    receive_buffer_bytes: int = 4 * 1024 * 1024   # the partner (services/dhcp/failover/config.py)
    #: a SOLICIT that waited in the socket queue longer than this is dropped ("stale"):
    #: its client has retransmitted or moved on; 0: off (dhcp4's discover_max_age_ms)
    solicit_max_age_ms: int = 1000

    def subnet(self, subnet_id: int) -> Subnet | None:
        return next((s for s in self.subnets if s.id == subnet_id), None)

    def subnet_for(self, address) -> Subnet | None:
        """The subnet whose network holds ``address`` (16 bytes, text or IPv6Address)."""
        a = int.from_bytes(address, "big") if isinstance(address, bytes) \
            else int(IPv6Address(address))
        return next((s for s in self.subnets if s.first <= a <= s.last), None)

    def subnet_for_interface_id(self, interface_id: bytes | None) -> Subnet | None:
        return None if interface_id is None else next(
            (s for s in self.subnets if s.interface_id == interface_id), None)


# ---------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------

def _v6(table: Table, path: str, value: Any):
    return ip_item(6)(table, path, value)


def _domain(table: Table, path: str, value: Any):
    if not isinstance(value, str) or not _DOMAIN.match(value):
        table.problems.add(path, f"{value!r} is not a domain name")
        return None
    return value.rstrip(".")


def parse_dhcp6(table: Table, context: ParseContext) -> Dhcp6Config | None:
    """Read ``[services.dhcp6]``; problems go to ``table.problems`` with key paths.
    None when a problem was found (the caller reports them all)."""
    before = len(table.problems.items)
    interface = table.str("interface", None)
    listen_address = table.ip("listen_address", None, version=6)
    port = table.int("port", 547, min=1, max=65535)
    duid_text = table.str("server_duid", None)
    server_duid = None
    if duid_text is not None:
        server_duid = normalize_duid(duid_text)
        if server_duid is None:
            table.error("server_duid", f"{duid_text!r} is not a DUID (3..130 octets of hex)")
    rapid = table.bool("rapid_commit", True)
    preference = table.int("preference", None, min=0, max=255)
    dns = table.list("dns_servers", _v6, ()) or ()
    domains = table.list("domain_list", _domain, ()) or ()
    offer_timeout = table.float("offer_timeout_s", 30.0, min=1, max=3600)
    quarantine = table.float("decline_quarantine_s", 86400.0, min=1, max=30 * 86400)
    reclaim = table.float("reclaim_interval_s", 10.0, min=0.1, max=3600)
    rcvbuf = table.int("receive_buffer_bytes", 4 * 1024 * 1024, min=65536,
                       max=256 * 1024 * 1024)
    max_age = table.int("solicit_max_age_ms", 1000, min=0, max=60000)
    if interface is None and listen_address is None and not table.has("interface") \
            and not table.has("listen_address"):
        table.error("interface", "missing: give interface (direct clients on that link) or "
                                 "listen_address (relayed clients, or the demo on loopback)")
    failover = parse_failover(table, context, modes=FAILOVER_MODES)
    subnets = _parse_subnets(table, failover is not None or table.has("failover"))
    if not subnets and not table.problems.items[before:]:
        table.error("subnets", "missing: at least one [[services.dhcp6.subnets]]")
    table.done()
    if len(table.problems.items) != before:
        return None
    return Dhcp6Config(interface, listen_address, port, server_duid, bool(rapid), preference,
                       tuple(dns), tuple(domains), tuple(subnets), offer_timeout, quarantine,
                       reclaim, failover, rcvbuf, max_age)


def _parse_pool(table: Table, path: str, value: Any) -> Pool | None:
    """``[first, last]``: an inclusive range of at most MAX_POOL addresses."""
    ends = [_v6(table, path, v) for v in value] \
        if isinstance(value, list) and len(value) == 2 else None
    if ends is None:
        table.problems.add(path, "expected [first, last] (two IPv6 addresses)")
    elif None not in ends:
        pool = Pool(*ends)
        if pool.size <= 0:
            table.problems.add(path, f'first address "{pool.first}" is after last "{pool.last}"')
        elif pool.size > MAX_POOL:
            table.problems.add(path, f"{pool.size} addresses: a pool holds at most {MAX_POOL}")
        else:
            return pool
    return None


def _parse_pd_pool(table: Table, path: str, value: Any) -> PdPool | None:
    if not isinstance(value, dict):
        table.problems.add(path, "expected a table { prefix, delegated_length }")
        return None
    pt = Table(value, path, table.problems)
    prefix = pt.network("prefix", version=6)
    length = pt.int("delegated_length", min=1, max=128)
    pt.done()
    if prefix is None or length is None:
        return None
    if length < prefix.prefixlen:
        pt.error("delegated_length", f"{length} is shorter than the pool prefix "
                                     f"/{prefix.prefixlen}")
        return None
    pool = PdPool(prefix, length)
    if pool.size > MAX_POOL:
        pt.error("delegated_length", f"{pool.size} prefixes of /{length} in {prefix}: "
                                     f"a prefix pool holds at most {MAX_POOL}")
        return None
    return pool


def _parse_subnets(table: Table, ids_required: bool = False) -> list[Subnet]:
    out: list[Subnet] = []
    seen: dict[int, str] = {}
    for index, st in enumerate(table.tables("subnets")):
        if ids_required and not st.has("id"):
            st.error("id", "missing (required when failover is set: both partners must "
                           "name each subnet with the same stable id)")
        subnet = _parse_subnet(st, index)
        if subnet is None:
            continue
        if subnet.id in seen:
            st.error("id", f"subnet id {subnet.id} is already used by {seen[subnet.id]}")
            continue
        for other in out:
            if subnet.network.overlaps(other.network):
                st.error("subnet", f'"{subnet.network}" overlaps "{other.network}" of subnet '
                                   f"id {other.id}")
            for p in subnet.pd_pools:
                for q in other.pd_pools:
                    if p.prefix.overlaps(q.prefix):
                        st.error("pd_pools", f'"{p.prefix}" overlaps "{q.prefix}" of subnet '
                                             f"id {other.id}")
        seen[subnet.id] = st.path
        out.append(subnet)
    return out


def _parse_subnet(st: Table, index: int) -> Subnet | None:
    before = len(st.problems.items)
    subnet_id = st.int("id", index + 1, min=1, max=_MAX_SUBNET_ID)
    network = st.network("subnet", version=6)
    if st.has("pool") and st.has("pools"):
        st.error("pools", 'give either "pool" or "pools", not both')
    pools: list[Pool] = []
    raw = st.list("pool", None, None)
    if raw is not None:
        p = _parse_pool(st, st.key_path("pool"), list(raw))
        if p is not None:
            pools.append(p)
    if st.has("pools"):
        pools.extend(st.list("pools", _parse_pool, ()) or ())
    pd_pools = list(st.list("pd_pools", _parse_pd_pool, ()) or ())
    preferred = st.int("preferred_lifetime_s", 3000, min=10, max=2**32 - 2)
    valid = st.int("valid_lifetime_s", 4000, min=10, max=2**32 - 2)
    pref = preferred or 3000
    t1 = st.int("t1_s", pref // 2, min=0, max=2**32 - 2)
    t2 = st.int("t2_s", pref * 4 // 5, min=0, max=2**32 - 2)
    dns = st.list("dns_servers", _v6, ()) or ()
    domains = st.list("domain_list", _domain, ()) or ()
    iface_id = st.str("interface_id", None)
    reservations = _parse_reservations(st)
    st.done()
    if None not in (preferred, valid) and preferred > valid:
        st.error("preferred_lifetime_s", f"{preferred} is above valid_lifetime_s ({valid})")
    if None not in (t1, t2, preferred):
        if t1 > t2:
            st.error("t1_s", f"t1_s ({t1}) must not be above t2_s ({t2})")
        elif t2 > preferred:
            st.error("t2_s", f"t2_s ({t2}) must not be above preferred_lifetime_s ({preferred})")
    if network is not None:
        where = "pools" if st.has("pools") else "pool"
        for i, p in enumerate(pools):
            if p.first not in network or p.last not in network:
                path = f"{where}[{i}]" if where == "pools" else where
                st.error(path, f'"{p.first}".."{p.last}" is not inside subnet "{network}"')
            for j, q in enumerate(pools[:i]):
                if int(p.first) <= int(q.last) and int(q.first) <= int(p.last):
                    st.error(f"pools[{i}]", f"overlaps pools[{j}]")
        for i, p in enumerate(pd_pools):
            for j, q in enumerate(pd_pools[:i]):
                if p.prefix.overlaps(q.prefix):
                    st.error(f"pd_pools[{i}]", f'"{p.prefix}" overlaps pd_pools[{j}]')
        for i, r in enumerate(reservations):
            if r.address is not None and r.address not in network:
                st.problems.add(f"{st.key_path('reservations')}[{i}].address",
                                f'"{r.address}" is outside subnet "{network}"')
    seen: dict[str, int] = {}
    for i, r in enumerate(reservations):
        if r.duid in seen:
            st.problems.add(f"{st.key_path('reservations')}[{i}].duid",
                            f"already reserved by reservations[{seen[r.duid]}]")
        seen.setdefault(r.duid, i)
    if len(st.problems.items) != before or network is None or subnet_id is None:
        return None
    return Subnet(subnet_id, network, tuple(pools), tuple(pd_pools), preferred, valid, t1, t2,
                  tuple(dns), tuple(domains),
                  iface_id.encode() if iface_id is not None else None, tuple(reservations))


def _parse_reservations(st: Table) -> list[Reservation]:
    raw = st.list("reservations", None, ())
    out = []
    for i, value in enumerate(raw or ()):
        path = f"{st.key_path('reservations')}[{i}]"
        if not isinstance(value, dict):
            st.problems.add(path, "expected a table { duid, address?, prefix?, hostname? }")
            continue
        rt = Table(value, path, st.problems)
        text = rt.str("duid")
        address = rt.ip("address", None, version=6)
        prefix = rt.network("prefix", None, version=6)
        hostname = rt.str("hostname", None)
        rt.done()
        duid = normalize_duid(text) if text is not None else None
        if text is not None and duid is None:
            rt.error("duid", f"{text!r} is not a DUID (3..130 octets of hex)")
        if address is None and prefix is None and not rt.has("address") and not rt.has("prefix"):
            rt.error("address", "missing: give address, prefix or both")
        if duid is None:
            continue
        out.append(Reservation(duid, address, prefix, hostname))
    return out


__all__ = ["Dhcp6Config", "Failover", "FAILOVER_MODES", "PdPool", "Pool", "Reservation", "Subnet", "MAX_POOL",
           "normalize_duid", "parse_dhcp6"]
