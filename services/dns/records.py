"""Desired DNS state from resource ownership (pure: no I/O, no reactor).

A :class:`RecordSpec` binds one owner name and type to a cluster resource:
``values`` maps each node id to the rdata that node publishes while it owns
the resource.  :func:`desired_rdatas` says what the rrset should hold when
``owner`` owns it; SRV sets are reordered so the owner's target has the
lowest priority number (tried first) and the other nodes follow in their
configured order.

Each owner name also carries a guard: the TXT rrset
``_appliance-owner.<name>`` naming the last writer (cluster, resource, node,
epoch), used as an UPDATE prerequisite so that a late writer with an older
epoch cannot overwrite a newer owner (see :mod:`.guard`, :mod:`.message`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT  # noqa: F401

from services.dns.guard import GUARD_LABEL, Guard, guard_name, parse_guard  # noqa: F401 (API)
from services.dns.guard import guard_rdata as _guard_rdata

#: Record types the updater manages (RFC 1035, 3596, 2782, 6742).
TYPES = ("A", "AAAA", "SRV", "CNAME", "NID", "L64", "L32", "LP")



@dataclass(frozen=True)
class RecordSpec:
    """One configured record: ``name``/``type`` follow the owner of ``resource``."""

    name: dns.name.Name
    rdtype: dns.rdatatype.RdataType
    ttl: int
    resource: str
    values: Mapping[str, dns.rdata.Rdata]     # node id -> rdata it publishes
    zone: dns.name.Name

    @property
    def key(self) -> tuple[str, str]:
        return (self.name.to_text(), dns.rdatatype.to_text(self.rdtype))

    @property
    def type_text(self) -> str:
        return dns.rdatatype.to_text(self.rdtype)


def parse_rdata(rdtype: str, text: str, origin: dns.name.Name | None = None) -> dns.rdata.Rdata:
    """Parse ``text`` as rdata of ``rdtype``; ValueError with dnspython's reason if it fails."""
    if rdtype not in TYPES:
        raise ValueError(f"type {rdtype!r} is not one of {', '.join(TYPES)}")
    try:
        return dns.rdata.from_text(dns.rdataclass.IN, rdtype, text, origin=origin or dns.name.root,
                                   relativize=False)
    except Exception as e:   # dnspython raises several syntax error types
        raise ValueError(f"{text!r} is not valid {rdtype} rdata: {e}") from None


def zone_of(name: dns.name.Name, zones: Iterable[dns.name.Name]) -> dns.name.Name | None:
    """The longest of ``zones`` containing ``name`` (None: outside all)."""
    best = None
    for zone in zones:
        if name.is_subdomain(zone) and (best is None or len(zone) > len(best)):
            best = zone
    return best


def guard_rdata(node: str, epoch: int, resource: str | None = None,
                cluster: str | None = None) -> dns.rdata.Rdata:
    """The guard TXT rdata ``node`` writes at ``epoch`` (see :mod:`.guard`)."""
    return _guard_rdata(Guard(node, epoch, resource, cluster))


def desired_rdatas(spec: RecordSpec, owner: str | None) -> frozenset[dns.rdata.Rdata] | None:
    """What ``spec``'s rrset should hold while ``owner`` owns the resource.

    None when nothing can be said (no owner, or an owner without a value:
    leave what is published alone).
    """
    if owner is None or owner not in spec.values:
        return None
    if spec.rdtype == dns.rdatatype.SRV:
        return frozenset(srv_order(spec.values, owner))
    if spec.rdtype in (dns.rdatatype.L64, dns.rdatatype.L32):
        return frozenset(locator_order(spec.values, owner))
    return frozenset([spec.values[owner]])


def locator_order(values: Mapping[str, dns.rdata.Rdata], owner: str) -> list[dns.rdata.Rdata]:
    """ILNP locators (RFC 6742 L64/L32) as a preference-ordered set, like SRV (review
    M10): the owner's locator gets the lowest configured preference (used first), the
    other nodes' follow one step apart, so an ILNP host can move to another locator
    without waiting for DNS.  Equal locators of several nodes appear once."""
    base = min(rd.preference for rd in values.values())
    others = sorted((n for n in values if n != owner), key=lambda n: (values[n].preference, n))
    def locator(rd):
        return getattr(rd, "locator64", None) or getattr(rd, "locator32", None)
    out = {values[owner].replace(preference=base)}
    seen = {locator(values[owner])}
    for i, node in enumerate(others, start=1):
        if locator(values[node]) in seen:
            continue
        seen.add(locator(values[node]))
        out.add(values[node].replace(preference=min(base + i, 65535)))
    return sorted(out, key=lambda r: r.preference)


def srv_order(values: Mapping[str, dns.rdata.Rdata], owner: str) -> list[dns.rdata.Rdata]:
    """SRV rdatas with ``owner`` first: it gets the lowest configured priority
    number, the others follow one step apart in their configured order
    (priority, then node id), keeping their weight, port and target."""
    base = min(rd.priority for rd in values.values())
    others = sorted((n for n in values if n != owner), key=lambda n: (values[n].priority, n))
    out = [values[owner].replace(priority=base)]
    for i, node in enumerate(others, start=1):
        out.append(values[node].replace(priority=min(base + i, 65535)))
    return out


@dataclass(frozen=True)
class Change:
    """One rrset to (re)write in a zone, with the guard it writes."""

    spec: RecordSpec
    rdatas: frozenset
    reason: str


def plan(specs: Iterable[RecordSpec], owned: Mapping[str, int], node: str,
         resources: Iterable[str] | None = None, reason: str = "") -> dict[dns.name.Name, list[Change]]:
    """The changes this node publishes, grouped by zone (one UPDATE per zone).

    ``owned`` maps the resources this node owns to their epoch; only those
    are published.  ``resources`` narrows to the ones a decision touched.
    """
    wanted = set(resources) if resources is not None else None
    out: dict[dns.name.Name, list[Change]] = {}
    for spec in specs:
        if spec.resource not in owned or (wanted is not None and spec.resource not in wanted):
            continue
        rdatas = desired_rdatas(spec, node)
        if rdatas is None:
            continue
        out.setdefault(spec.zone, []).append(Change(spec, rdatas, reason))
    return out


def rdatas_text(rdatas: Iterable[dns.rdata.Rdata] | None) -> list[str] | None:
    """Sorted text forms, for RPC results and logs."""
    if rdatas is None:
        return None
    return sorted(rd.to_text() for rd in rdatas)
