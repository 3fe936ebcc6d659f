"""Publish rrsets with RFC 2136 UPDATEs guarded by the owner epoch.

:meth:`Updater.publish` sends ONE UPDATE for a zone with every change of a
decision.  Its prerequisites say "the guard TXT rrsets hold what I last
read" (see :mod:`.message`), so the server does a compare-and-set.  When
the prerequisite fails, the updater reads the guards again: names whose
guard holds a *newer* epoch (another node took over since) are dropped --
a late writer never overwrites a newer owner -- and the rest is retried.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import dns.name
import dns.rdatatype
from twisted.internet import defer
from twisted.logger import Logger

from services.dns.message import (PREREQ_FAILED, DNSError, UpdateError,
                                  answer_rdatas, build_update, check_response, make_query,
                                  rcode_text)
from services.dns.records import Change, guard_name, guard_rdata, parse_guard
from services.dns.tsigkey import TSIGKey

_log = Logger(namespace="appliance.dns")

MAX_CAS_ROUNDS = 3


@dataclass
class PublishResult:
    zone: str
    server: str | None = None
    applied: list[Change] = field(default_factory=list)
    stale: list[tuple[Change, tuple[str, int]]] = field(default_factory=list)  # (change, server guard)
    latency_s: float = 0.0


def may_overwrite(current: tuple[str, int] | None, node: str, epoch: int) -> bool:
    """May ``node`` at ``epoch`` replace records guarded by ``current`` (node, epoch)?

    Yes if nothing guards them, if the guard's epoch is not higher (an equal
    epoch from another node happens when a promote races a fresh claim; the
    cluster has already picked one of them), or if the guard is this node's
    own (a restart that lost its epoch counter).  Only a HIGHER epoch held by
    another node stops the write.
    """
    if current is None:
        return True
    other, other_epoch = current
    return other == node or epoch >= other_epoch


class Updater:
    """Signed UPDATEs and reads through a :class:`~.client.DNSClient`."""

    def __init__(self, client, key: TSIGKey | None, node: str, clock, metrics=None):
        self.client = client
        self.key = key
        self.node = node
        self.clock = clock
        self.metrics = metrics
        #: owner name -> guard rdatas last read or written (the CAS "expected" value)
        self.guards: dict[dns.name.Name, frozenset] = {}

    @property
    def key_name(self) -> str | None:
        return self.key.name if self.key else None

    @defer.inlineCallbacks
    def publish(self, zone: dns.name.Name, changes: list[Change], epochs: Mapping[str, int]):
        """Write ``changes`` in one UPDATE; fire with a :class:`PublishResult`."""
        result = PublishResult(zone.to_text())
        pending = []
        for change in changes:      # a newer owner we already know of wins without asking
            guard = parse_guard(self.guards.get(change.spec.name, ()))
            if may_overwrite(guard, self.node, epochs[change.spec.resource]):
                pending.append(change)
            else:
                result.stale.append((change, guard))
        for _round in range(MAX_CAS_ROUNDS):
            if not pending:
                return result
            upd = build_update(zone, pending, self.guards, self.node, epochs, self.key)
            started = self.clock.seconds()
            try:
                response, server = yield self.client.exchange(upd, zone.to_text(), self.key_name)
            except DNSError as e:
                if self.metrics is not None:
                    self.metrics.failed(e.rcode)
                raise
            result.server = server
            rcode = rcode_text(response)
            result.latency_s = self.clock.seconds() - started
            if self.metrics is not None:
                self.metrics.answered(rcode, result.latency_s)
            if rcode == "NOERROR":
                for change in pending:
                    self.guards[change.spec.name] = frozenset(
                        [guard_rdata(self.node, epochs[change.spec.resource])])
                result.applied.extend(pending)
                return result
            if rcode not in PREREQ_FAILED:
                raise UpdateError(zone.to_text(), server, rcode, self.key_name)
            # Somebody wrote a guard since we last looked: read, keep what we may overwrite.
            names = sorted({c.spec.name for c in pending})
            current = yield self.read_guards(zone, names)
            keep = []
            for change in pending:
                guard = parse_guard(current[change.spec.name])
                if may_overwrite(guard, self.node, epochs[change.spec.resource]):
                    keep.append(change)
                else:
                    result.stale.append((change, guard))
            pending = keep
        if pending:
            raise UpdateError(zone.to_text(), result.server or "?", "YXRRSET", self.key_name,
                              "update (guard kept changing)")
        return result

    @defer.inlineCallbacks
    def read_guards(self, zone: dns.name.Name, names: Iterable[dns.name.Name]):
        """``{name: guard rdatas}`` read from the server (also refreshes the cache)."""
        names = list(names)
        found = yield defer.gatherResults(
            [self.read(zone, guard_name(n), dns.rdatatype.TXT) for n in names],
            consumeErrors=True).addErrback(lambda f: f.value.subFailure)
        out = {}
        for name, rdatas in zip(names, found):
            self.guards[name] = rdatas
            out[name] = rdatas
        return out

    @defer.inlineCallbacks
    def read(self, zone: dns.name.Name, name: dns.name.Name, rdtype):
        """The rdatas the primary publishes at ``name``/``rdtype`` (empty set: none)."""
        query = make_query(name, rdtype, self.key)
        response, server = yield self.client.exchange(query, zone.to_text(), self.key_name,
                                                      what="query")
        check_response(response, zone.to_text(), server, self.key_name, "query")
        return answer_rdatas(response, name, rdtype)
