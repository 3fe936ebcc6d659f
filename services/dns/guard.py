"""The ``_appliance-owner.<name>`` guard: who last wrote a name, and who may write next.

Each managed owner name carries a TXT rrset ``_appliance-owner.<name>``
holding ``"v2 <cluster> <resource> <node> <epoch>"`` of its last writer --
or, with ``guard_scope = "resource"`` (review L12: fewer public guard names,
fewer signed rrsets to churn, smaller UPDATEs), each resource carries one per
zone, ``_appliance-guard.<resource>.<zone>``: an UPDATE is atomic, so one
compare-and-set guards every name of the resource it writes.
UPDATEs carry it as a prerequisite (a compare-and-set, see
:mod:`.message`), so a late writer cannot overwrite a newer owner.

:func:`verdict` decides whether a node may overwrite what the server holds
(review H3, M1):

- nothing there: write;
- this node's own guard (same cluster): write (a restart lost its counter);
- a guard of the old format ``"<node> <epoch>"`` (no identity), of another
  cluster identity, or of another resource (the name was re-bound): the
  guard's epoch is from an unrelated counter and says nothing -- take it
  over, and say so loudly;
- same cluster, same resource: ``(epoch, priority, node)`` decides, in the
  order :func:`appliance.cluster.ownership.elect` breaks ties, so of two
  nodes claiming one epoch exactly one may write.

A guard that stays ahead of the cluster for good (its epochs were lost
while the server kept them) is cleared by the operator: ``dns.reset_guard``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT

GUARD_LABEL = "_appliance-owner"
#: ``guard_scope = "resource"``: one guard per resource and zone (review L12)
RESOURCE_GUARD_LABEL = "_appliance-guard"
VERSION = "v2"


class Guard(NamedTuple):
    node: str
    epoch: int
    resource: str | None = None      # None: the old format without identity
    cluster: str | None = None

    def text(self) -> str:
        if self.cluster is None or self.resource is None:
            return f"{self.node} {self.epoch}"
        return f"{VERSION} {self.cluster} {self.resource} {self.node} {self.epoch}"

    def show(self) -> str:
        if self.cluster is None:
            return f"{self.node} at epoch {self.epoch} (old guard format)"
        return f"{self.node} at epoch {self.epoch} for {self.resource} in cluster {self.cluster}"


def guard_name(name: dns.name.Name) -> dns.name.Name:
    """The owner name of the guard TXT rrset for ``name``."""
    return dns.name.Name((GUARD_LABEL.encode(),) + name.labels)


def resource_guard_name(resource: str, zone: dns.name.Name) -> dns.name.Name:
    """The owner name of the guard of ``resource`` in ``zone`` (``guard_scope =
    "resource"``): ``_appliance-guard.<resource>.<zone>``, the resource name as ONE label
    (any octet; a name over 63 octets as a digest)."""
    label = resource.encode()
    if len(label) > 63:
        label = hashlib.sha256(label).hexdigest()[:40].encode()
    return dns.name.Name((RESOURCE_GUARD_LABEL.encode(), label) + zone.labels)


def guard_owner(key: dns.name.Name) -> dns.name.Name:
    """The guard's owner name for a guard key: a resource guard name is its own
    owner name; a record name's guard is ``_appliance-owner.<name>``."""
    if key.labels and key.labels[0] == RESOURCE_GUARD_LABEL.encode():
        return key
    return guard_name(key)


def guard_rdata(guard: Guard) -> dns.rdata.Rdata:
    return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, [guard.text()])


def parse_one(text: str) -> Guard | None:
    parts = text.split()
    try:
        if len(parts) == 5 and parts[0] == VERSION:
            return Guard(parts[3], int(parts[4]), parts[2], parts[1])
        if len(parts) == 2:
            return Guard(parts[0], int(parts[1]))
    except ValueError:
        return None
    return None


def parse_guard(rdatas: Iterable[dns.rdata.Rdata]) -> Guard | None:
    """The guard of an rrset (the highest epoch if several), None if absent/garbled."""
    best = None
    for rd in rdatas:
        try:
            text = b"".join(rd.strings).decode("ascii", "replace")
        except AttributeError:
            continue
        value = parse_one(text)
        if value is not None and (best is None or (value.epoch, value.node) > (best.epoch, best.node)):
            best = value
    return best


class Verdict(NamedTuple):
    write: bool
    takeover: str | None = None      # why an unrelated guard is overwritten (logged loudly)


def verdict(current: Guard | None, me: Guard,
            priority: Callable[[str], int] = lambda node: 0) -> Verdict:
    """May ``me`` (this node's guard) overwrite records guarded by ``current``?"""
    if current is None:
        return Verdict(True)
    if current.cluster is None:
        if current.node == me.node:
            return Verdict(True)
        return Verdict(True, f"old guard format ({current.show()}) carries no cluster identity")
    if current.cluster != me.cluster:
        return Verdict(True, f"written by cluster {current.cluster}, this is cluster {me.cluster} "
                             "(a reset or replaced cluster)")
    if current.resource != me.resource:
        return Verdict(True, f"written for resource {current.resource}, the record now follows "
                             f"{me.resource}")
    if current.node == me.node:
        return Verdict(True)
    mine = (me.epoch, priority(me.node), me.node)
    theirs = (current.epoch, priority(current.node), current.node)
    return Verdict(mine >= theirs)


def cluster_identity(explicit: str | None, node_ids: Iterable[str],
                     key_file: str | None) -> str:
    """The cluster identity written into guards.

    ``explicit`` (``[services.dns] cluster_id``) wins; otherwise a digest of
    the member node ids and the cluster's heartbeat key, so a cluster
    rebuilt with a new key (or other members) takes over the guards of the
    old one.  The cluster manager has no cluster id or generation of its
    own yet; when it gets one, use that.
    """
    if explicit:
        return explicit
    h = hashlib.sha256(",".join(sorted(set(node_ids))).encode())
    if key_file:
        try:
            h.update(Path(key_file).read_bytes().strip())
        except OSError:
            pass
    return h.hexdigest()[:12]
