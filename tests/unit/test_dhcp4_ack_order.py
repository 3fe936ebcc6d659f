"""The partner's transport ack must not overtake what it sent back (issue 12, the race
left by the last session: "an ack can overtake a sent-back record while the
receiver's inbox is busy").

A sends its expiry of X's lease; B had renewed X, so B's record wins the merge and B
sends it back *before* the peer link acks A's batch.  On A the ack is handled as it
arrives, but B's record waits in A's inbox behind whatever A is still handling
(the peer link handles messages one at a time, acks at once).  The old service
marked the expiry acknowledged on the transport ack: the address left pending-free
and went to a new client Y while X's renewal at B still ran -- one address, two
clients.  Now the partner says which records it stored in a message of its own
(``{"stored": [[address, version], ...]}``, after the send-backs, in the same
ordered stream as them), and only that marks a record synced; the ones it
rejected (its record won) stay owed and pending-free until its winner arrives.
"""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet import defer

from services.dhcp.v4 import leases as L
from services.dhcp.v4 import pools as P
from services.dhcp.v4.leases import Lease
from tests.sim.dhcp4.pair import mac
from tests.support.sync import ok
from tests.unit.test_dhcp4_failover_rules import T0, service


def hw(i):
    return mac(i).hex(":")


class Link:
    """A peer link: sends are recorded; the test fires their acks."""

    def __init__(self):
        self.sent = []

    def send(self, peer, channel, body, limit=None):
        d = defer.Deferred()
        self.sent.append((body, d))
        return d

    def on(self, *a):
        pass

    def bodies(self, key):
        return [b for b, _ in self.sent if key in b]


class Cluster:
    def __init__(self, link):
        self.peerlink = link

    def register_partner(self, peer, listener, **kw):
        return P.NORMAL


def primary_with_outbox(tmp_path):
    link = Link()
    svc, clock = service(tmp_path, cluster=Cluster(link))
    svc._setup_failover()
    # the partner is this version: its hello says it reports what it stored
    svc._remote_update("b", {"hello": {"caps": ["dhcp4.stored", "dhcp4.update-done"]}})
    svc._remote_update("b", {"update_done": 1})        # caught up: NORMAL
    assert svc.view.state == P.NORMAL and not svc.view.hold
    link.sent.clear()
    return svc, clock, link


def test_an_ack_that_overtakes_the_partners_winner_frees_nothing(tmp_path):
    svc, clock, link = primary_with_outbox(tmp_path)
    # a's own segment is 10.0.0.10..15: X on .10, five other clients on the rest
    x = ok(svc.leases.bind(1, "10.0.0.10", hw(1), lease_time_s=60, roles=None))
    for i in range(1, 6):
        ok(svc.leases.bind(1, f"10.0.0.{10 + i}", hw(10 + i), lease_time_s=3600, roles=None))
    clock.advance(svc.outbox.delay_s)
    while link.sent:                                  # the partner has all of these
        link.sent.pop(0)[1].callback(None)
    for address in list(svc.leases.unsynced):
        ok(svc.leases.mark_synced(ok(svc.leases.get(address))))
    # X renews at b (a never hears of it: b's update is still on its way) ...
    renewed = Lease("10.0.0.10", 1, L.BOUND, hw(1), "", "", T0 + 30 + 600, T0 + 30, "a", "b",
                    7, pexp=T0 + 30 + 600)
    # ... while a expires X's lease and sends the expiry
    clock.advance(120)
    svc._reclaim_due()
    clock.advance(0)
    assert ok(svc.leases.get("10.0.0.10")).state == L.EXPIRED
    clock.advance(svc.outbox.delay_s)
    batch = [(b, d) for b, d in link.sent if "leases" in b]
    assert [w["state"] for w in batch[0][0]["leases"]] == [L.EXPIRED]
    # b answers in wire order: its winner (sent back), then the peer link's ack of
    # a's batch.  a's inbox is busy, so the winner waits there; the ack is handled now.
    batch[0][1].callback(None)
    clock.advance(1)
    y = svc.leases.offer(1, hw(99))
    y = ok(y) if isinstance(y, defer.Deferred) else y
    assert y is None or y.address != "10.0.0.10", (
        "the expiry was taken as acknowledged before b's renewal of X arrived: "
        "10.0.0.10 offered to a second client")
    # the winner arrives: X's binding is back, the address is X's
    ok(defer.maybeDeferred(svc._remote_update, "b", {"leases": [renewed.to_wire()]}))
    rec = ok(svc.leases.get("10.0.0.10"))
    assert rec.state == L.BOUND and rec.hwaddr == hw(1)


def test_the_partner_reports_what_it_stored_after_its_winners(tmp_path):
    """Receiver side: after a batch is stored, one {"stored": [...]} message lists the
    records it took (applied or older than its own, not the ones its record beat),
    sent after the winners; the sender marks exactly those synced."""
    svc, clock, link = primary_with_outbox(tmp_path)
    mine = ok(svc.leases.bind(1, "10.0.0.10", hw(1), lease_time_s=600, roles=None))
    theirs_expired = Lease("10.0.0.10", 1, L.EXPIRED, hw(1), "", "", T0 - 10, T0 - 100, "b",
                           "b", 3)
    theirs_new = Lease("10.0.0.17", 1, L.BOUND, hw(2), "", "", T0 + 600, T0, "b", "b", 4,
                       pexp=T0 + 600)
    ok(defer.maybeDeferred(svc._remote_update, "b", {"leases": [theirs_expired.to_wire(),
                                                               theirs_new.to_wire()]}))
    keys = [next(iter(b)) for b, _ in link.sent]
    assert keys == ["leases", "stored"], link.sent
    assert link.sent[0][0]["leases"][0]["state"] == L.BOUND       # our winner, first
    assert link.sent[1][0]["stored"] == [["10.0.0.17", 4]]
    # and as the sender of "mine": b's report marks it synced, a stale version does not
    assert not ok(svc.leases.get("10.0.0.10")).synced
    ok(defer.maybeDeferred(svc._remote_update, "b", {"stored": [["10.0.0.10",
                                                                 mine.version - 1]]}))
    assert not ok(svc.leases.get("10.0.0.10")).synced
    ok(defer.maybeDeferred(svc._remote_update, "b", {"stored": [["10.0.0.10", mine.version]]}))
    assert ok(svc.leases.get("10.0.0.10")).synced
    assert "10.0.0.10" not in svc.leases.unsynced
