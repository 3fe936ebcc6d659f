"""Partner state follows the peer link (heartbeats up, link down for dead_after
intervals = COMMUNICATIONS-INTERRUPTED "peer link down"), RECOVER-DONE as in
draft-ietf-dhc-failover-12, and a partner lost during RECOVER / RECOVER-WAIT."""

from __future__ import annotations

from twisted.internet import defer

from appliance.cluster import partner as P
from tests.unit.test_cluster_manager import ADDR, make_pair, run, start, tmp_state  # noqa: F401


class FakeLink:
    """What the partner code reads of a PeerLink: ``connected(peer)``."""

    running = False

    def __init__(self, up=True):
        self.up = up

    def connected(self, peer):
        return self.up

    def reset(self, peer, why):
        pass


def fsm(**kw):
    args = dict(primary=True, auto_partner_down_s=10, startup_wait_s=1, now=0.0)
    args.update(kw)
    return P.PartnerFSM("b", **args)


def _pair(links, *, sync=True, heard=None):
    clock, net, nodes = make_pair()
    syncs = []
    for n, m in nodes.items():
        other = "b" if n == "a" else "a"
        m.peerlink = links[n]
        def sync_over_link(peer, n=n):
            if not links[n].up:
                return defer.fail(RuntimeError("peer link down"))
            syncs.append(n)
        kw = {"sync": sync_over_link} if sync else {}
        m.register_partner(other, (lambda peer, state, reason, n=n: heard.append((n, state, reason)))
                           if heard is not None else None, primary=(n == "a"), **kw)
    return clock, net, nodes, syncs


def _states(nodes):
    return (nodes["a"].partners["b"].fsm.state, nodes["b"].partners["a"].fsm.state)


def test_link_down_with_heartbeats_up_is_comm_interrupted_and_back_to_normal():
    links = {"a": FakeLink(), "b": FakeLink()}
    heard = []
    clock, net, nodes, _ = _pair(links, heard=heard)
    start(clock, nodes)
    run(clock, 1.0)
    assert _states(nodes) == (P.NORMAL, P.NORMAL)
    links["a"].up = links["b"].up = False
    run(clock, 0.2)
    assert _states(nodes) == (P.NORMAL, P.NORMAL), "shorter than dead_after: still NORMAL"
    run(clock, 0.3)
    assert _states(nodes) == (P.COMM_INTERRUPTED, P.COMM_INTERRUPTED)
    assert any(s == P.COMM_INTERRUPTED and "peer link down" in r for _, s, r in heard), heard
    assert nodes["b"].peers["a"].alive, "heartbeats still up"
    run(clock, 2.0)
    assert _states(nodes) == (P.COMM_INTERRUPTED, P.COMM_INTERRUPTED), "no NORMAL without the link"
    assert not nodes["b"].partner_confirmed("a")
    links["a"].up = links["b"].up = True
    run(clock, 0.2)
    assert _states(nodes) == (P.NORMAL, P.NORMAL)


def test_relationship_without_the_peer_link_ignores_it():
    """Registered without sync (and not explicitly): the link does not matter."""
    links = {"a": FakeLink(False), "b": FakeLink(False)}
    clock, net, nodes, _ = _pair(links, sync=False)
    start(clock, nodes)
    run(clock, 2.0)
    assert _states(nodes) == (P.NORMAL, P.NORMAL)


def test_start_waits_for_the_link_and_gives_up_after_dead_after():
    """At start, heartbeats before the link: no NORMAL yet (no flap NORMAL ->
    COMMUNICATIONS-INTERRUPTED -> NORMAL); a link that never comes is
    COMMUNICATIONS-INTERRUPTED."""
    links = {"a": FakeLink(False), "b": FakeLink(False)}
    heard = []
    clock, net, nodes, _ = _pair(links, heard=heard)
    start(clock, nodes)
    run(clock, 0.15)
    assert P.NORMAL not in _states(nodes)
    links["a"].up = links["b"].up = True
    run(clock, 1.0)
    assert _states(nodes) == (P.NORMAL, P.NORMAL)
    assert [s for n, s, _ in heard if n == "b"] == [P.NORMAL], heard

    links = {"a": FakeLink(False), "b": FakeLink(False)}
    clock, net, nodes, _ = _pair(links)
    start(clock, nodes)
    run(clock, 2.0)
    assert _states(nodes) == (P.COMM_INTERRUPTED, P.COMM_INTERRUPTED)


def test_link_back_after_the_peer_ran_partner_down_goes_through_recover():
    """a dies, b is declared down, a comes back with the link still down: a waits in
    RECOVER (its sync needs the link), b keeps serving in PARTNER-DOWN; link back:
    sync, RECOVER-DONE, both NORMAL."""
    links = {"a": FakeLink(), "b": FakeLink()}
    clock, net, nodes, syncs = _pair(links)
    start(clock, nodes)
    run(clock, 1.0)
    net.cut.add(ADDR["a"])
    run(clock, 1.0)
    nodes["b"].partner_down("a")
    links["a"].up = links["b"].up = False
    net.cut.clear()
    run(clock, 1.0)
    assert _states(nodes) == (P.RECOVER, P.PARTNER_DOWN), "RECOVER does not need the link to wait"
    links["a"].up = links["b"].up = True
    run(clock, 2.0)
    assert _states(nodes) == (P.NORMAL, P.NORMAL)
    assert "a" in syncs


def test_recover_done_waits_for_a_normal_or_recover_done_partner():
    """draft-12: RECOVER-DONE -> NORMAL only when the partner is NORMAL or RECOVER-DONE
    (the old code also left it on COMMUNICATIONS-INTERRUPTED and STARTUP)."""
    f = fsm()
    f.heard(P.PARTNER_DOWN, 0)
    assert f.sync_done(1).new == P.RECOVER_DONE
    assert f.heard(P.PARTNER_DOWN, 1.1) is None
    assert f.heard(P.COMM_INTERRUPTED, 1.2) is None
    assert f.heard(P.STARTUP, 1.3) is None
    assert f.heard(P.RECOVER_DONE, 1.4).new == P.NORMAL
    g = fsm()
    g.heard(P.PARTNER_DOWN, 0)
    g.sync_done(1)
    assert g.heard(P.NORMAL, 2).new == P.NORMAL
    # the partner side: COMMUNICATIONS-INTERRUPTED / PARTNER-DOWN hearing RECOVER-DONE
    for before in (P.COMM_INTERRUPTED, P.PARTNER_DOWN):
        h = fsm(primary=False)
        h.heard(P.NORMAL, 0)
        h.lost(1)
        if before == P.PARTNER_DOWN:
            h.partner_down(2)
        assert h.heard(P.RECOVER_DONE, 3).new == P.NORMAL


def test_recover_done_joins_a_potential_conflict():
    f = fsm(primary=False)
    f.heard(P.PARTNER_DOWN, 0)
    f.sync_done(1)
    assert f.heard(P.POTENTIAL_CONFLICT, 2).new == P.POTENTIAL_CONFLICT


def test_partner_lost_during_recover_and_recover_wait():
    """Lost in RECOVER: stays RECOVER forever (never PARTNER-DOWN by timeout, even
    with a confirmation).  Lost in RECOVER-WAIT: the wait still ends (RECOVER-DONE),
    then COMMUNICATIONS-INTERRUPTED since nobody is heard."""
    f = fsm(data_lost=True, recover_wait_s=5)
    f.heard(P.NORMAL, 0)
    assert f.state == P.RECOVER
    assert f.lost(1) is None
    for t in (11, 100, 10_000):
        assert f.tick(t, confirm="witness w quorum") is None
    assert f.state == P.RECOVER
    g = fsm(data_lost=True, recover_wait_s=5)
    g.heard(P.NORMAL, 0)
    assert g.sync_done(1).new == P.RECOVER_WAIT
    assert g.lost(2) is None and g.state == P.RECOVER_WAIT
    assert g.tick(6).new == P.RECOVER_DONE
    assert g.tick(6.1).new == P.COMM_INTERRUPTED
    assert g.tick(100, confirm="witness w quorum") is None or g.state != P.NORMAL
