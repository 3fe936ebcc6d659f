"""The ``[services.dhcp4]`` table: frozen typed objects out of the ``Table`` reader.

Example (SPEC.md)::

    [services.dhcp4]
    interface = "veth0"            # or listen_address = "127.0.0.1" (relayed only)
    port = 67
    failover = { peer = "b", role = "primary", mode = "split-scope", split = 50,
                 delay_s = 2, mclt_s = 3600, max_unacked = 1000,
                 max_ack_delay_s = 10 }   # partner's clients waiting: evidence
    [[services.dhcp4.subnets]]
    id = 1
    subnet = "10.9.0.0/24"
    pool = ["10.9.0.50", "10.9.0.249"]          # or pools = [[a, b], [c, d]]
    routers = ["10.9.0.1"]
    dns_servers = ["10.9.0.1"]
    lease_time_s = 3600
    reservations = [{ hwaddr = "52:54:00:00:00:01", address = "10.9.0.10" }]

Decisions worth knowing:

* ``subnets[].id`` is required as soon as ``failover`` is set: both partners
  must name a subnet the same way (ANCHORS pain point #4, Kea 2.6 made it
  mandatory).  Without failover a missing id defaults to the 1-based
  position, which is only stable while the file is not reordered.
* ``failover.role`` is ``primary`` or ``secondary``; ``standby`` is accepted
  as a synonym of ``secondary`` in ``hot-standby`` mode and stored as
  ``secondary``.
* ``split`` is the primary's percent, both of the RFC 3074 hash buckets
  (load balancing) and of each pool's addresses (see ``pools.py``).  In
  ``hot-standby`` the secondary's share is its PARTNER-DOWN reserve.
* MAC addresses are normalised to lowercase ``aa:bb:cc:dd:ee:ff``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from appliance.config import ParseContext, Table, ip_item
from services.dhcp.failover.config import ROLES, Failover, parse_failover

MODES = ("split-scope", "load-balancing", "hot-standby")

_MAC = re.compile(r"^[0-9a-fA-F]{2}([:-])[0-9a-fA-F]{2}(\1[0-9a-fA-F]{2}){4}$")
_DOMAIN = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)"
                     r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_MAX_SUBNET_ID = 2**32 - 1


def normalize_mac(text: str) -> str | None:
    """``"AA-BB-cc:..."`` style text to ``"aa:bb:cc:dd:ee:ff"``, or None if not a MAC."""
    if not isinstance(text, str) or not _MAC.match(text):
        return None
    return text.replace("-", ":").lower()


@dataclass(frozen=True)
class Pool:
    """An inclusive address range ``first..last`` inside its subnet."""

    first: IPv4Address
    last: IPv4Address

    @property
    def size(self) -> int:
        return int(self.last) - int(self.first) + 1

    def __contains__(self, address) -> bool:
        return int(self.first) <= int(IPv4Address(address)) <= int(self.last)


@dataclass(frozen=True)
class Reservation:
    """A static host: this hardware address always gets this address."""

    hwaddr: str               # normalised "aa:bb:cc:dd:ee:ff"
    address: IPv4Address
    hostname: str | None = None


@dataclass(frozen=True)
class LdapSettings:
    """``[services.dhcp4.ldap]``: reservations read from a directory."""

    servers: tuple[str, ...]
    base_dn: str
    bind_dn: str | None = None
    password_file: str | None = None
    filter: str = "(objectClass=ieee802Device)"
    mac_attribute: str = "macAddress"
    ip_attribute: str = "ipHostNumber"
    refresh_interval_s: float = 300.0
    timeout_s: float = 2.0

    def password(self) -> str | None:
        if self.password_file is None:
            return None
        return Path(self.password_file).read_text(encoding="utf-8").strip()


@dataclass(frozen=True)
class Subnet:
    id: int
    network: IPv4Network
    pools: tuple[Pool, ...]
    routers: tuple[IPv4Address, ...] = ()
    dns_servers: tuple[IPv4Address, ...] = ()
    domain_name: str | None = None
    lease_time_s: int = 3600
    t1_s: int = 1800
    t2_s: int = 3150
    reservations: tuple[Reservation, ...] = ()

    def reservation_for(self, hwaddr: str) -> Reservation | None:
        for r in self.reservations:
            if r.hwaddr == hwaddr:
                return r
        return None


@dataclass(frozen=True)
class Dhcp4Config:
    interface: str | None = None
    listen_address: IPv4Address | None = None
    port: int = 67
    server_id: IPv4Address | None = None
    failover: Failover | None = None
    subnets: tuple[Subnet, ...] = ()
    offer_timeout_s: float = 30.0
    decline_quarantine_s: float = 86400.0
    reclaim_interval_s: float = 10.0
    receive_buffer_bytes: int = 4 * 1024 * 1024
    ldap: LdapSettings | None = None
    discover_max_age_ms: int = 2000

    def subnet(self, subnet_id: int) -> Subnet | None:
        for s in self.subnets:
            if s.id == subnet_id:
                return s
        return None

    def subnet_for(self, address) -> Subnet | None:
        """The subnet whose network contains ``address`` (e.g. a giaddr)."""
        a = int(address if isinstance(address, IPv4Address) else IPv4Address(address))
        for s in self.subnets:
            net = s.network
            if net.network_address._ip <= a <= net.broadcast_address._ip:
                return s
        return None


# ---------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------

def parse_dhcp4(table: Table, context: ParseContext) -> Dhcp4Config | None:
    """Read ``[services.dhcp4]``; problems go to ``table.problems`` with key paths.

    Returns None when a problem was found (the caller reports them all).
    """
    before = len(table.problems.items)
    interface = table.str("interface", None)
    listen_address = table.ip("listen_address", None, version=4)
    port = table.int("port", 67, min=1, max=65535)
    server_id = table.ip("server_id", None, version=4)
    offer_timeout = table.float("offer_timeout_s", 30.0, min=1, max=3600)
    quarantine = table.float("decline_quarantine_s", 86400.0, min=1, max=30 * 86400)
    reclaim = table.float("reclaim_interval_s", 10.0, min=0.1, max=3600)
    rcvbuf = table.int("receive_buffer_bytes", 4 * 1024 * 1024, min=65536, max=256 * 1024 * 1024)
    max_age = table.int("discover_max_age_ms", 2000, min=0, max=60000)
    if interface is None and listen_address is None and "interface" not in table.data \
            and "listen_address" not in table.data:
        table.error("interface", "missing: give interface (direct clients) or "
                                 "listen_address (relayed clients only)")
    failover = _parse_failover(table, context)
    subnets = _parse_subnets(table, failover is not None or table.has("failover"))
    ldap = _parse_ldap(table)
    table.done()
    if len(table.problems.items) != before:
        return None
    return Dhcp4Config(interface, listen_address, port, server_id, failover, tuple(subnets),
                       offer_timeout, quarantine, reclaim, rcvbuf, ldap, max_age)


def _ldap_url(table: Table, path: str, value: Any):
    if not isinstance(value, str) or not re.match(r"^ldaps?://[^/\s]+/?$", value):
        table.problems.add(path, f"{value!r} is not an LDAP server URL (ldap://host:port)")
        return None
    return value


def _parse_ldap(table: Table) -> LdapSettings | None:
    lt = table.table("ldap")
    if lt is None:
        return None
    servers = lt.list("servers", _ldap_url, min_len=1)
    base_dn = lt.str("base_dn")
    bind_dn = lt.str("bind_dn", None)
    password_file = lt.str("password_file", None)
    flt = lt.str("filter", "(objectClass=ieee802Device)")
    mac_attr = lt.str("mac_attribute", "macAddress")
    ip_attr = lt.str("ip_attribute", "ipHostNumber")
    refresh = lt.float("refresh_interval_s", 300.0, min=1, max=86400)
    timeout = lt.float("timeout_s", 2.0, min=0.1, max=60)
    if flt is not None and not (flt.startswith("(") and flt.endswith(")")):
        lt.error("filter", f"{flt!r} is not an LDAP filter (it is written in parentheses)")
    if bind_dn is not None and password_file is None:
        lt.error("password_file", "missing: bind_dn needs the file holding its password")
    if password_file is not None and not Path(password_file).is_file():
        lt.error("password_file", f"{password_file!r} is not a readable file")
    lt.done()
    if not servers or base_dn is None:
        return None
    return LdapSettings(tuple(servers), base_dn, bind_dn, password_file, flt or "", mac_attr or "",
                        ip_attr or "", refresh or 300.0, timeout or 2.0)


def _parse_failover(table: Table, context: ParseContext) -> Failover | None:
    return parse_failover(table, context, MODES)


def _v4(table: Table, path: str, value: Any) -> IPv4Address | None:
    return ip_item(4)(table, path, value)


def _parse_pool(table: Table, path: str, value: Any) -> Pool | None:
    if not isinstance(value, list) or len(value) != 2:
        table.problems.add(path, "expected [first, last] (two IPv4 addresses)")
        return None
    first = _v4(table, path, value[0])      # SPEC: "subnets[0].pool: ... is not an IPv4 address"
    last = _v4(table, path, value[1])
    if first is None or last is None:
        return None
    if int(first) > int(last):
        table.problems.add(path, f'first address "{first}" is after last "{last}"')
        return None
    return Pool(first, last)


def _parse_subnets(table: Table, ids_required: bool) -> list[Subnet]:
    out: list[Subnet] = []
    seen_ids: dict[int, str] = {}
    placed: list[tuple[Subnet, str]] = []
    for index, st in enumerate(table.tables("subnets")):
        subnet = _parse_subnet(st, index, ids_required)
        if subnet is None:
            continue
        if subnet.id in seen_ids:
            st.error("id", f"subnet id {subnet.id} is already used by {seen_ids[subnet.id]}")
            continue
        seen_ids[subnet.id] = st.path
        for other, other_path in placed:
            if subnet.network.overlaps(other.network):
                st.error("subnet", f'"{subnet.network}" overlaps "{other.network}" of {other_path}')
            for pool in subnet.pools:
                for op in other.pools:
                    if int(pool.first) <= int(op.last) and int(op.first) <= int(pool.last):
                        st.error("pool", f'"{pool.first}".."{pool.last}" overlaps pool '
                                         f'"{op.first}".."{op.last}" of {other_path}')
        placed.append((subnet, st.path))
        out.append(subnet)
    return out


def _parse_subnet(st: Table, index: int, ids_required: bool) -> Subnet | None:
    before = len(st.problems.items)
    subnet_id = st.int("id", None, min=1, max=_MAX_SUBNET_ID)
    if not st.has("id"):
        if ids_required:
            st.error("id", "missing (required when failover is set: both partners must "
                           "name each subnet with the same stable id)")
        else:
            subnet_id = index + 1
    network = st.network("subnet", version=4)
    if st.has("pool") and st.has("pools"):
        st.error("pools", 'give either "pool" or "pools", not both')
    pools: list[Pool] = []
    raw_pool = st.list("pool", None, None)
    if raw_pool is not None:
        pool = _parse_pool(st, st.key_path("pool"), list(raw_pool))
        if pool is not None:
            pools.append(pool)
    if st.has("pools"):
        pools.extend(st.list("pools", _parse_pool, ()) or ())
    routers = st.list("routers", _v4, ()) or ()
    dns_servers = st.list("dns_servers", _v4, ()) or ()
    domain_name = st.str("domain_name", None, pattern=_DOMAIN, describe="a domain name")
    lease_time = st.int("lease_time_s", 3600, min=10, max=2**32 - 2)
    lt = lease_time or 3600
    t1 = st.int("t1_s", lt // 2, min=1, max=2**32 - 2)
    t2 = st.int("t2_s", lt * 7 // 8, min=1, max=2**32 - 2)
    if t1 is not None and t2 is not None and lease_time is not None:
        if not t1 < t2:
            st.error("t1_s", f"t1_s ({t1}) must be below t2_s ({t2})")
        elif not t2 < lease_time:
            st.error("t2_s", f"t2_s ({t2}) must be below lease_time_s ({lease_time})")
    reservations = _parse_reservations(st)
    st.done()

    if network is not None:
        _check_inside(st, network, pools, routers, reservations)
    if len(st.problems.items) != before or network is None or subnet_id is None:
        return None
    return Subnet(subnet_id, network, tuple(pools), tuple(routers), tuple(dns_servers),
                  domain_name, lease_time, t1, t2, _reservations_only(reservations))


def _check_inside(st: Table, network: IPv4Network, pools, routers, reservations) -> None:
    usable_lo, usable_hi = int(network.network_address), int(network.broadcast_address)
    if network.prefixlen < 31:        # network and broadcast are not host addresses
        usable_lo, usable_hi = usable_lo + 1, usable_hi - 1
    where = "pools" if st.has("pools") else "pool"
    for i, pool in enumerate(pools):
        path = f"{where}[{i}]" if where == "pools" else where
        for addr in (pool.first, pool.last):
            if not usable_lo <= int(addr) <= usable_hi:
                st.error(path, f'"{addr}" is not a host address of subnet "{network}"')
                break
        for j, other in enumerate(pools[:i]):
            if int(pool.first) <= int(other.last) and int(other.first) <= int(pool.last):
                st.error(path, f'"{pool.first}".."{pool.last}" overlaps pools[{j}]')
    for i, router in enumerate(routers):
        if router not in network:
            st.problems.add(f"{st.key_path('routers')}[{i}]",
                            f'"{router}" is outside subnet "{network}"')
    seen_mac: dict[str, int] = {}
    seen_addr: dict[IPv4Address, int] = {}
    for i, res in reservations:
        path = f"{st.key_path('reservations')}[{i}]"
        if not usable_lo <= int(res.address) <= usable_hi:
            st.problems.add(f"{path}.address",
                            f'"{res.address}" is not a host address of subnet "{network}"')
        if res.hwaddr in seen_mac:
            st.problems.add(f"{path}.hwaddr", f'"{res.hwaddr}" is already reserved by '
                                              f"reservations[{seen_mac[res.hwaddr]}]")
        if res.address in seen_addr:
            st.problems.add(f"{path}.address", f'"{res.address}" is already reserved by '
                                               f"reservations[{seen_addr[res.address]}]")
        seen_mac.setdefault(res.hwaddr, i)
        seen_addr.setdefault(res.address, i)


def _parse_reservations(st: Table) -> list[tuple[int, Reservation]]:
    """``[(index, Reservation)]`` for the well-formed entries."""
    raw = st.list("reservations", None, ())
    if raw is None:
        return []
    out = []
    for i, value in enumerate(raw):
        path = f"{st.key_path('reservations')}[{i}]"
        if not isinstance(value, dict):
            st.problems.add(path, "expected a table { hwaddr, address, hostname? }")
            continue
        rt = Table(value, path, st.problems)
        mac_text = rt.str("hwaddr")
        address = rt.ip("address", version=4)
        hostname = rt.str("hostname", None, pattern=_HOSTNAME, describe="a host name label")
        rt.done()
        mac = None
        if mac_text is not None:
            mac = normalize_mac(mac_text)
            if mac is None:
                rt.error("hwaddr", f'"{mac_text}" is not a MAC address (aa:bb:cc:dd:ee:ff)')
        if mac is None or address is None:
            continue
        out.append((i, Reservation(mac, address, hostname)))
    return out


def _reservations_only(pairs) -> tuple[Reservation, ...]:
    return tuple(r for _, r in pairs)


__all__ = ["Dhcp4Config", "Failover", "LdapSettings", "Pool", "Reservation", "Subnet", "MODES", "ROLES",
           "normalize_mac", "parse_dhcp4"]


def failover_notes(config: "Dhcp4Config") -> list[str]:
    """Things an operator should know about a valid failover config (logged
    at start, not errors)."""
    f = config.failover
    if f is None:
        return []
    out = []
    for s in config.subnets:
        if s.lease_time_s > f.mclt_s:
            out.append(
                f"subnet {s.id} ({s.network}): lease_time_s ({s.lease_time_s}) is above the "
                f"failover mclt_s ({f.mclt_s}): a client's first lease, and any lease the "
                f"partner has not acknowledged, is at most mclt_s beyond what the partner "
                f"knows (draft-ietf-dhc-failover-12; dhcpd does the same); its next renewal "
                f"after the partner's acknowledgement gets the full lease_time_s")
    if f.mode == "hot-standby" and f.split == 50:
        out.append("hot-standby with split = 50: the primary allocates from only half of "
                   "each pool in NORMAL (the rest is the standby's reserve); split = 90 "
                   "keeps a 10 % reserve")
    return out
