"""Publish rrsets with RFC 2136 UPDATEs guarded by the owner epoch.

:meth:`Updater.publish` sends ONE UPDATE for a zone with every change of a
decision.  Its prerequisites say "the guard TXT rrsets hold what I last
read" (see :mod:`.message`), so the server does a compare-and-set.  When
the prerequisite fails, the updater reads the guards again: names whose
guard holds a *newer* epoch (another node took over since) are dropped --
a late writer never overwrites a newer owner -- and the rest is retried.
Who may overwrite whom is :func:`.guard.verdict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import dns.name
import dns.rdatatype
from twisted.internet import defer
from twisted.logger import Logger

from services.dns.guard import (Guard, guard_owner, guard_rdata, parse_guard,
                                resource_guard_name, verdict)
from services.dns.message import (PREREQ_FAILED, DNSError, UpdateError,
                                  answer_rdatas, build_update, check_response, make_query,
                                  rcode_text)
from services.dns.records import Change
from services.dns.tsigkey import TSIGKey

_log = Logger(namespace="appliance.dns")

MAX_CAS_ROUNDS = 3


@dataclass
class PublishResult:
    zone: str
    server: str | None = None
    applied: list[Change] = field(default_factory=list)
    stale: list[tuple[Change, Guard]] = field(default_factory=list)   # (change, server guard)
    takeovers: list[tuple[Change, Guard, str]] = field(default_factory=list)  # (.., old, why)
    latency_s: float = 0.0
    rounds: int = 0                  # UPDATEs sent (1 when the expectation was right)


@defer.inlineCallbacks
def send_update(client, message, zone: str, key: str | None, clock=None, metrics=None):
    """Send one UPDATE and count it: fire with ``(response, server, rcode, latency_s)``;
    a transport or refusal error is counted (``metrics.failed``) and raised.  The
    one send path of the updater and of DDNS (review L15: DDNS had a copy)."""
    started = clock.seconds() if clock is not None else 0.0
    try:
        response, server = yield client.exchange(message, zone, key)
    except DNSError as e:
        if metrics is not None:
            metrics.failed(e.rcode)
        raise
    rcode = rcode_text(response)
    latency = clock.seconds() - started if clock is not None else 0.0
    if metrics is not None and clock is not None:
        metrics.answered(rcode, latency)
    return response, server, rcode, latency


def may_overwrite(current, node: str, epoch: int, resource: str | None = None,
                  cluster: str | None = None) -> bool:
    """Compatibility wrapper over :func:`.guard.verdict`."""
    if current is not None and not isinstance(current, Guard):
        current = Guard(*current)
    return verdict(current, Guard(node, epoch, resource, cluster)).write


class Updater:
    """Signed UPDATEs and reads through a :class:`~.client.DNSClient`.

    ``cluster`` is the cluster identity written into guards; ``priority(resource,
    node)`` the node's configured priority for a resource (equal-epoch ties).
    """

    def __init__(self, client, key: TSIGKey | None, node: str, clock, metrics=None, *,
                 cluster: str = "-", priority=None, zones=None, guard_scope: str = "name"):
        self.client = client
        self.key = key
        #: zone -> (client, key) for zones with their own servers or key
        self.zones = dict(zones or {})
        self.node = node
        self.clock = clock
        self.metrics = metrics
        self.cluster = cluster
        self.priority = priority or (lambda resource, node: 0)
        #: "name": a guard per record name; "resource": one per resource and zone (L12)
        self.guard_scope = guard_scope
        #: record names whose old per-name guard was deleted (guard_scope "resource")
        self.legacy_cleared: set[dns.name.Name] = set()
        #: guard key (record name, or resource guard name) -> guard rdatas last read or
        #: written (the CAS "expected" value)
        self.guards: dict[dns.name.Name, frozenset] = {}
        #: owner name -> times the cache entry was set (reads older than a write are dropped)
        self.generation: dict[dns.name.Name, int] = {}

    @property
    def key_name(self) -> str | None:
        return self.key.name if self.key else None

    def client_for(self, zone):
        return self.zones.get(zone, (self.client, self.key))[0]

    def key_for(self, zone) -> TSIGKey | None:
        return self.zones.get(zone, (self.client, self.key))[1]

    def key_name_for(self, zone) -> str | None:
        key = self.key_for(zone)
        return key.name if key else None

    def guard_key(self, spec) -> dns.name.Name:
        """The key of ``spec``'s guard in :attr:`guards` (its owner name: :func:`guard_owner`)."""
        if self.guard_scope == "resource":
            return resource_guard_name(spec.resource, spec.zone)
        return spec.name

    def mine(self, spec, epochs: Mapping[str, int]) -> Guard:
        return Guard(self.node, epochs[spec.resource], spec.resource, self.cluster)

    def remember(self, name: dns.name.Name, rdatas: frozenset, generation: int | None = None):
        """Cache ``rdatas`` as the guard of ``name`` unless it was set after ``generation``."""
        if generation is not None and self.generation.get(name, 0) != generation:
            return
        self.guards[name] = rdatas
        self.generation[name] = self.generation.get(name, 0) + 1

    def expect(self, name: dns.name.Name, resource: str, epoch: int, others,
               previous: tuple[str, int] | None = None) -> None:
        """Derive the expected guard from the claims: an owner claims at the highest
        epoch + 1, so the guard on the server is normally the previous epoch's
        owner's (review M2: a stale cache cost a failed UPDATE, a read and a retry).
        ``previous``: the claim before ours the cluster heard, ``(node, epoch)`` --
        its guard is expected unless the cache holds a newer one of this cluster;
        without it, with one other node that node at ``epoch - 1`` is."""
        cached = parse_guard(self.guards.get(name, ()))
        if previous is not None and previous[1] < epoch:
            if cached is not None and cached.cluster == self.cluster and \
                    cached.resource == resource and cached.epoch >= previous[1]:
                return
            self.remember(name, frozenset([guard_rdata(
                Guard(previous[0], previous[1], resource, self.cluster))]))
            return
        if cached is not None and cached.cluster == self.cluster and \
                cached.resource == resource and cached.epoch >= epoch - 1:
            return
        others = [n for n in others if n != self.node]
        if len(others) == 1 and epoch > 1 and cached is not None and cached.cluster == self.cluster \
                and cached.resource == resource:
            self.remember(name, frozenset([guard_rdata(
                Guard(others[0], epoch - 1, resource, self.cluster))]))

    def _judge(self, change, current: Guard | None, epochs, force: bool, result) -> bool:
        spec = change.spec
        if force:
            if current is not None and current.node != self.node:
                result.takeovers.append((change, current, "reset by the operator"))
            return True
        v = verdict(current, self.mine(spec, epochs),
                    lambda node: self.priority(spec.resource, node))
        if not v.write:
            result.stale.append((change, current))
        elif v.takeover is not None:
            result.takeovers.append((change, current, v.takeover))
        return v.write

    @defer.inlineCallbacks
    def publish(self, zone: dns.name.Name, changes: list[Change], epochs: Mapping[str, int],
                force: bool = False):
        """Write ``changes`` in one UPDATE; fire with a :class:`PublishResult`.

        ``force``: overwrite whatever guard the server holds (``dns.reset_guard``);
        still a compare-and-set against the value read, so a concurrent writer
        is not overwritten blindly.
        """
        result = PublishResult(zone.to_text())
        pending = []
        for change in changes:      # a newer owner we already know of wins without asking
            guard = parse_guard(self.guards.get(self.guard_key(change.spec), ()))
            if self._judge(change, guard, epochs, force, result):
                pending.append(change)
        for _round in range(MAX_CAS_ROUNDS):
            if not pending:
                return result
            legacy = sorted({c.spec.name for c in pending} - self.legacy_cleared) \
                if self.guard_scope == "resource" else ()
            upd = build_update(zone, pending, self.guards, lambda spec: self.mine(spec, epochs),
                               self.key_for(zone), guard_key=self.guard_key, legacy=legacy)
            result.rounds += 1
            _, server, rcode, result.latency_s = yield send_update(
                self.client_for(zone), upd, zone.to_text(), self.key_name_for(zone), self.clock,
                self.metrics)
            result.server = server
            if rcode == "NOERROR":
                for change in pending:
                    self.remember(self.guard_key(change.spec),
                                  frozenset([guard_rdata(self.mine(change.spec, epochs))]))
                self.legacy_cleared.update(legacy)
                result.applied.extend(pending)
                return result
            if rcode not in PREREQ_FAILED:
                raise UpdateError(zone.to_text(), server, rcode, self.key_name_for(zone))
            # Somebody wrote a guard since we last looked: read, keep what we may overwrite.
            names = sorted({self.guard_key(c.spec) for c in pending})
            expected = {n: self.guards.get(n, frozenset()) for n in names}
            current = yield self.read_guards(zone, names)
            for n in names:
                if current[n] and current[n] == expected[n]:
                    # The server answers a query with what the prerequisite says is not
                    # there: a wildcard TXT covers the guard name (review L7; UPDATE
                    # prerequisites never see wildcards).  Expect "no guard" next.
                    self.remember(n, frozenset())
                    current[n] = frozenset()
            keep = []
            result.takeovers = []
            for change in pending:
                if self._judge(change, parse_guard(current[self.guard_key(change.spec)]), epochs,
                               force, result):
                    keep.append(change)
            pending = keep
        if pending:
            raise UpdateError(zone.to_text(), result.server or "?", "YXRRSET",
                              self.key_name_for(zone),
                              "update (guard kept changing)")
        return result

    @defer.inlineCallbacks
    def read_guards(self, zone: dns.name.Name, names: Iterable[dns.name.Name]):
        """``{guard key: guard rdatas}`` read from the server (also refreshes the
        cache, unless a write changed it while reading)."""
        names = list(names)
        before = {n: self.generation.get(n, 0) for n in names}
        found = yield defer.gatherResults(
            [self.read(zone, guard_owner(n), dns.rdatatype.TXT) for n in names],
            consumeErrors=True).addErrback(lambda f: f.value.subFailure)
        out = {}
        for name, rdatas in zip(names, found):
            self.remember(name, rdatas, before[name])
            out[name] = rdatas
        return out

    @defer.inlineCallbacks
    def read(self, zone: dns.name.Name, name: dns.name.Name, rdtype):
        """The rdatas the primary publishes at ``name``/``rdtype`` (empty set: none)."""
        query = make_query(name, rdtype, self.key_for(zone))
        try:
            response, server = yield self.client_for(zone).exchange(
                query, zone.to_text(), self.key_name_for(zone), what="query")
            check_response(response, zone.to_text(), server, self.key_name_for(zone), "query")
        except DNSError as e:
            if self.metrics is not None:       # counted, not only logged (review L8)
                self.metrics.read_failed(e.rcode)
            raise
        return answer_rdatas(response, name, rdtype)
