"""The caught-up barrier and mixed versions (issue 12, session 6).

Heartbeats (UDP) carry the partner state, the peer link (TLS) carries the lease
updates: the cluster can say NORMAL while updates the partner made meanwhile --
e.g. in PARTNER-DOWN on our addresses while only the peer link was down -- are
still on their way (simulator seed 4658).  NORMAL is served only after the
partner's ``update_done``, which follows every record it owed us on the same
ordered stream (draft-ietf-dhc-failover-12 UPDREQ / UPDDONE).

A previous-version partner never sends ``stored`` nor ``update_done``: without
its hello (capabilities) the peer link's ack marks records synced as that
version expects, and NORMAL needs no exchange.
"""

from __future__ import annotations

from ipaddress import IPv4Address

from twisted.internet import defer

from services.dhcp.v4 import leases as L
from services.dhcp.v4 import pools as P
from services.dhcp.v4.handler import Dhcp4Handler
from services.dhcp.v4.leases import Lease
CAPS = ("dhcp4.stored", "dhcp4.update-done")     # services.dhcp.v4.service.CAPS
from tests.sim.dhcp4.pair import discover, mac, macs_of
from tests.support.sync import ok
from tests.unit.test_dhcp4_ack_order import Link
from tests.unit.test_dhcp4_failover_rules import T0, service


def hw(i):
    return mac(i).hex(":")


class Cluster:
    def __init__(self, link, state):
        self.peerlink = link
        self.state = state

    def register_partner(self, peer, listener, **kw):
        return self.state


def node(tmp_path, state, *, hello=True):
    link = Link()
    svc, clock = service(tmp_path, cluster=Cluster(link, state))
    svc._setup_failover()
    svc.handler = Dhcp4Handler(svc.config, svc.leases, IPv4Address("10.0.0.1"),
                               now=clock.seconds, failover=svc.view)
    if hello:
        svc._remote_update("b", {"hello": {"caps": list(CAPS)}})
    return svc, clock, link


def offered(svc, i):
    """The address offered to the i-th client whose hash bucket is a's (or None)."""
    reply = svc.handler.handle(discover(macs_of(P.PRIMARY, i)[-1]))
    reply = ok(reply) if isinstance(reply, defer.Deferred) else reply
    return None if reply is None else str(reply[0].yiaddr)


def test_normal_serves_only_after_the_partners_update_done(tmp_path):
    """a comes out of RECOVER-DONE; b ran PARTNER-DOWN and gave a's address .10 to Y
    while only the peer link was down.  The heartbeats say NORMAL before b's record
    arrives: a must not offer .10 (or anything) until b's update_done."""
    svc, clock, link = node(tmp_path, P.RECOVER_DONE)
    assert svc.view.hold
    svc._partner_state("b", P.NORMAL, "peer b is NORMAL")
    requests = link.bodies("update_request")
    assert requests, "no update_request sent on entering NORMAL"
    assert svc.view.state != P.NORMAL or svc.view.hold
    assert offered(svc, 1) is None, "served before caught up with the partner"
    y = Lease("10.0.0.10", 1, L.BOUND, hw(50), "", "", T0 + 600, T0, "b", "b", 5,
              pexp=T0 + 600)
    ok(defer.maybeDeferred(svc._remote_update, "b", {"leases": [y.to_wire()]}))
    ok(defer.maybeDeferred(svc._remote_update, "b",
                           {"update_done": requests[-1]["update_request"]}))
    assert svc.view.state == P.NORMAL and not svc.view.hold
    got = offered(svc, 1)
    assert got is not None and got != "10.0.0.10"


def test_an_old_update_done_does_not_end_a_newer_catch_up(tmp_path):
    svc, clock, link = node(tmp_path, P.COMM_INTERRUPTED)
    svc._partner_state("b", P.NORMAL, "heard")
    first = link.bodies("update_request")[-1]["update_request"]
    svc._partner_state("b", P.COMM_INTERRUPTED, "peer b not heard")
    svc._partner_state("b", P.NORMAL, "heard")
    svc._remote_update("b", {"update_done": first})
    assert svc.view.state == P.COMM_INTERRUPTED
    svc._remote_update("b", {"update_done": link.bodies("update_request")[-1]["update_request"]})
    assert svc.view.state == P.NORMAL


def test_from_partner_down_it_serves_by_the_interrupted_rules_meanwhile(tmp_path):
    """The side that ran PARTNER-DOWN stops using the partner's addresses at once
    (COMMUNICATIONS-INTERRUPTED rules), not when caught up."""
    svc, clock, link = node(tmp_path, P.COMM_INTERRUPTED)
    svc._partner_state("b", P.PARTNER_DOWN, "operator partner-down")
    clock.advance(svc.view.mclt_s + 10)
    assert svc.view.partner_down_since is not None
    svc._partner_state("b", P.NORMAL, "peer b recovered (RECOVER-DONE)")
    assert svc.view.state == P.COMM_INTERRUPTED and not svc.view.hold
    assert svc.view.partner_down_since is None
    assert svc.handler._roles() == (P.PRIMARY,)


def test_the_partner_answers_an_update_request_with_what_it_owes_then_done(tmp_path):
    svc, clock, link = node(tmp_path, P.NORMAL)
    svc._remote_update("b", {"update_done": 1})
    link.sent.clear()
    for i in range(3):
        ok(svc.leases.bind(1, f"10.0.0.{10 + i}", hw(i + 1), lease_time_s=600, roles=None))
    link.sent.clear()                                  # (the outbox's own sends)
    d = defer.maybeDeferred(svc._remote_update, "b", {"update_request": 42})
    keys = [next(iter(b)) for b, _ in link.sent]
    assert keys == ["leases", "update_done"], keys
    assert sorted(w["address"] for w in link.sent[0][0]["leases"]) == \
        ["10.0.0.10", "10.0.0.11", "10.0.0.12"]
    assert link.sent[1][0]["update_done"] == 42
    for _, ack in link.sent:
        if not ack.called:
            ack.callback(None)
    ok(d)


def _sent_and_acked(svc, clock, link):
    ok(svc.leases.bind(1, "10.0.0.10", hw(1), lease_time_s=600, roles=None))
    clock.advance(svc.outbox.delay_s)
    batches = [(b, d) for b, d in link.sent if "leases" in b]
    assert batches
    for _, d in batches:
        d.callback(None)                              # the peer link's ack
    return ok(svc.leases.get("10.0.0.10"))


def test_a_previous_version_partner_acks_by_the_peer_link(tmp_path):
    """No hello from b (a previous version: it never sends "stored"): once b handled
    our hello and HELLO_GRACE_S passed, the peer link's ack marks records synced --
    they no longer stay owed (and pending-free) for ever -- and NORMAL needs no
    update_done."""
    svc, clock, link = node(tmp_path, P.COMM_INTERRUPTED, hello=False)
    for body, d in list(link.sent):
        if "hello" in body:
            d.callback(None)                          # b handled it, said nothing
    clock.advance(svc.HELLO_GRACE_S + 1)
    # not decided while the cluster is not NORMAL (a stopped service's messages are
    # parked and acked by the peer link: silence proves nothing then)
    assert svc._partner_is_current() is None
    svc._partner_state("b", P.NORMAL, "heard")
    assert svc.view.state != P.NORMAL                 # waits: b may be current
    clock.advance(svc.HELLO_GRACE_S + 1)
    assert svc._partner_is_current() is False
    assert svc.view.state == P.NORMAL                 # no update_done from that version
    rec = _sent_and_acked(svc, clock, link)
    assert rec.synced, "a previous version's acked record stays owed for ever"


def test_unknown_version_acks_wait_for_the_hello(tmp_path):
    """Acks that arrive before the partner's version is known wait: its hello says
    it reports "stored" (they stay owed); silence past the grace marks them."""
    svc, clock, link = node(tmp_path, P.NORMAL, hello=False)
    rec = _sent_and_acked(svc, clock, link)
    assert not rec.synced
    svc._remote_update("b", {"hello": {"caps": list(CAPS)}})
    assert not ok(svc.leases.get("10.0.0.10")).synced      # its "stored" will say
    svc2, clock2, link2 = node(tmp_path / "2", P.NORMAL, hello=False)
    rec2 = _sent_and_acked(svc2, clock2, link2)
    assert not rec2.synced
    for body, d in list(link2.sent):
        if "hello" in body and not d.called:
            d.callback(None)
    clock2.advance(svc2.HELLO_GRACE_S + 1)
    assert ok(svc2.leases.get("10.0.0.10")).synced
    assert svc2.view.state == P.NORMAL                  # the catch-up ended too


def test_a_current_partner_marks_only_by_stored(tmp_path):
    svc, clock, link = node(tmp_path, P.NORMAL)
    rec = _sent_and_acked(svc, clock, link)
    clock.advance(svc.HELLO_GRACE_S + 1)
    assert not ok(svc.leases.get("10.0.0.10")).synced
    svc._remote_update("b", {"stored": [["10.0.0.10", rec.version]]})
    assert ok(svc.leases.get("10.0.0.10")).synced


def test_a_previous_version_partner_acks_recovery_pages_and_send_backs(tmp_path):
    """The records a previous version pulls in its recovery sync, and our merge
    winners sent back to it, are synced by its peer-link ack (it sends no
    "stored"): they do not stay owed for ever."""
    svc, clock, link = node(tmp_path, P.NORMAL, hello=False)
    for body, d in list(link.sent):
        if "hello" in body:
            d.callback(None)
    clock.advance(svc.HELLO_GRACE_S + 1)
    assert svc._partner_is_current() is False
    ok(svc.leases.bind(1, "10.0.0.10", hw(1), lease_time_s=600, roles=None))
    ok(svc.leases.bind(1, "10.0.0.11", hw(2), lease_time_s=600, roles=None))
    link.sent.clear()
    d = svc._send_all("b")
    for body, ack in list(link.sent):
        if "leases" in body and not ack.called:
            ack.callback(None)
    ok(d)
    assert not svc.leases.unsynced, "records a previous version stored stay owed"
    # a merge winner sent back
    ok(svc.leases.bind(1, "10.0.0.12", hw(3), lease_time_s=600, roles=None))
    link.sent.clear()
    svc._send_back("b", "10.0.0.12")
    link.sent[-1][1].callback(None)
    assert "10.0.0.12" not in svc.leases.unsynced


def test_answering_an_update_request_never_holds_the_inbox(tmp_path, monkeypatch):
    """Both sides may ask at once: an answer that held our inbox while it waited for
    the partner's acks (the partner's inbox held the same way) would deadlock."""
    from services.dhcp.v4 import service as S
    monkeypatch.setattr(S, "SYNC_BATCH", 1)
    svc, clock, link = node(tmp_path, P.NORMAL)
    svc._remote_update("b", {"update_done": 1})
    monkeypatch.setattr(svc, "SYNC_WINDOW", 1)
    for i in range(3):
        ok(svc.leases.bind(1, f"10.0.0.{10 + i}", hw(i + 1), lease_time_s=600, roles=None))
    link.sent.clear()
    result = svc._remote_update("b", {"update_request": 9})
    assert not isinstance(result, defer.Deferred) or result.called, \
        "the inbox waits for the partner's acks"
    for _ in range(5):                                 # the acks come; the rest follows
        for _, ack in list(link.sent):
            if not ack.called:
                ack.callback(None)
    keys = [next(iter(b)) for b, _ in link.sent]
    assert keys == ["leases", "leases", "leases", "update_done"], keys


def test_a_partner_back_in_step_after_a_recovery_without_data_is_trusted_again(tmp_path):
    """b recovered without its data: its acks of our expiries free nothing (it may have
    re-given those addresses).  Once it is NORMAL again (MCLT waited, every address we
    reported held) it says so ({"with_data"}) and its acks count again -- also when we
    never went PARTNER-DOWN -> NORMAL, the only reset before (sim seed 12110: we stayed
    COMMUNICATIONS-INTERRUPTED -> NORMAL and distrusted it for ever)."""
    svc, clock, link = node(tmp_path, P.COMM_INTERRUPTED)
    svc._remote_update("b", {"without_data": True})
    assert svc.leases.trust_acks is False
    svc._partner_state("b", P.NORMAL, "heard")
    svc._remote_update("b", {"update_done": link.bodies("update_request")[-1]["update_request"]})
    assert svc.view.state == P.NORMAL
    assert svc.leases.trust_acks is False              # still recovering over there
    svc._remote_update("b", {"with_data": True})
    assert svc.leases.trust_acks is True


def test_the_node_that_recovered_without_data_says_when_it_is_in_step(tmp_path):
    svc, clock, link = node(tmp_path, P.RECOVER)
    svc._without_data = True
    svc._partner_state("b", P.RECOVER_DONE, "recovery sync finished")
    assert not link.bodies("with_data")
    svc._partner_state("b", P.NORMAL, "peer b is NORMAL")
    svc._remote_update("b", {"update_done": link.bodies("update_request")[-1]["update_request"]})
    assert link.bodies("with_data") and not svc._without_data
