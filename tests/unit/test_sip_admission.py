"""Admission control of REGISTERs (services.sip.admission) on a task.Clock: the
reactor-lag ticker, the backlog bound, shedding with 503 + Retry-After, and the
service's smaller UDP read batch while lagging."""

from __future__ import annotations

import dataclasses

from twisted.internet.task import Clock

from services.sip.admission import Admission
from tests.unit.test_sip_service import Peer, make, req, settle


def test_lag_is_seen_late_ticks_and_the_turn_in_progress():
    """On time: no lag.  A tick that ran lag_s late makes the reactor lagging for
    hold_s; so does a turn that has already run lag_s past a due tick."""
    clock = Clock()
    changes = []
    a = Admission(clock, lag_s=0.05, hold_s=0.25, tick_s=0.01, on_change=changes.append)
    a.start()
    for _ in range(50):
        clock.advance(0.01)
    assert not a.lagging() and a.stats["late_ticks"] == 0
    clock.advance(0.2)                   # one turn of 200 ms: the tick runs 190 ms late
    assert a.lagging() and a.stats["late_ticks"] == 1 and changes == [True]
    assert a.stats["max_lag_ms"] >= 180
    for _ in range(20):                  # 200 ms of on-time ticks: still held
        clock.advance(0.01)
    assert a.lagging()
    for _ in range(10):
        clock.advance(0.01)
    assert not a.lagging() and changes == [True, False]
    # no tick yet, but this turn has already run 80 ms past the one that was due
    clock.rightNow += 0.09
    assert a.lagging()
    a.stop()


def test_admit_sheds_on_backlog_and_on_lag_beyond_the_floor():
    """Backlog at max_pending: "overload" whatever the lag; lagging: "shed_lag" only
    with at least lag_pending REGISTERs in flight (a lone hiccup sheds nothing)."""
    clock = Clock()
    a = Admission(clock, max_pending=100, lag_s=0.05, hold_s=0.25, lag_pending=10)
    a.start()
    assert a.admit(99) is None and a.admit(100) == "overload"
    clock.advance(0.5)
    assert a.lagging()
    assert a.admit(9) is None
    assert a.admit(10) == "shed_lag"
    assert a.admit(100) == "overload"
    off = Admission(clock, lag_s=0)      # shed_lag_ms = 0: never on lag
    off.start()
    clock.advance(1.0)
    assert not off.lagging() and off.admit(2000) is None
    a.stop()


def test_a_lagging_node_answers_503_retry_after_and_reads_less(tmp_path):
    """While the reactor lags and REGISTERs are in flight, a new REGISTER gets
    503 + Retry-After (counted as shed_lag) instead of queueing behind them, the
    UDP read batch shrinks, and the REGISTERs already taken are answered 200."""
    svc, clock, thread, store, rpc = make(tmp_path)
    svc.config = dataclasses.replace(svc.config, shed_min_pending=1)
    svc.admission.lag_pending = 1

    class Port:
        maxThroughput = svc.READ_BATCH_BYTES
    svc.udp = Port()
    svc.admission.start()
    peer = Peer()
    svc.received(req("REGISTER", "sip:example.test", contacts=["<sip:alice@h>"]), peer.src, False)
    assert svc.pending == 1 and peer.sent == []          # waiting for its commit
    clock.advance(0.3)                                   # a 300 ms turn: the ticker runs late
    assert svc.udp.maxThroughput == svc.READ_BATCH_LAGGING
    svc.received(req("REGISTER", "sip:example.test", to="sip:bob@example.test",
                     branch="z9hG4bKo2", contacts=["<sip:bob@h>"]), peer.src, False)
    [busy] = peer.responses()
    assert busy.code == 503 and busy.get("Retry-After") == "1"
    assert svc.drops["shed_lag"] == 1
    assert svc.rpc_stats()["admission"]["lagging"] is True
    settle(clock, thread)
    assert peer.responses()[-1].code == 200 and svc.pending == 0
    for _ in range(40):                                  # lag over: back to full reads
        clock.advance(0.01)
    assert svc.udp.maxThroughput == svc.READ_BATCH_BYTES
    svc.udp = None
    svc.admission.stop()


def test_an_ack_for_many_states_releases_the_200s_a_slice_per_turn():
    """One backup ack covering hundreds of states (a coalesced message) releases the
    sync waits RELEASE_SLICE per reactor turn, in order, not all in the ack's turn."""
    from twisted.internet import defer

    from services.sip.replication import Replicator

    class Link:
        def __init__(self):
            self.sent = []

        def connected(self, peer):
            return True

        def send(self, peer, channel, body, *, limit=None):
            d = defer.Deferred()
            self.sent.append((body, d))
            return d

    class Location:
        store = None

    clock, link = Clock(), Link()
    r = Replicator(clock, link, ("b",), "sync", Location())
    n = 2 * r.RELEASE_SLICE + 5
    fired = []
    for i in range(n):
        r.replicate(f"sip:u{i}@example.test", {}, [], 1.0).addCallback(
            lambda _, i=i: fired.append(i))
    clock.advance(0)                                     # the turn's states leave
    [(body, d)] = link.sent
    assert len(body["states"]) == n
    d.callback(None)                                     # the backup stored them all
    assert fired == list(range(r.RELEASE_SLICE)), "one slice in the ack's turn"
    assert clock.getDelayedCalls(), "the rest in the next turns"
    clock.advance(0)
    assert fired == list(range(n))
    assert r.stats["timeouts"] == 0
    clock.advance(10)
    assert r.stats["timeouts"] == 0, "released waits are not timed out later"


def test_gc_pauses_are_counted_per_generation():
    """sip.stats admission.gc: collections and the longest pause per generation (on the
    live node of a loaded pair: young collections of 15 ms on average, gen1 up to 190 ms,
    the late ticks' cause)."""
    import gc as _gc

    from services.sip.admission import GCPauses
    g = GCPauses()
    g.start()
    try:
        _gc.collect(1)
        _gc.collect(0)
    finally:
        g.stop()
    st = g.status()
    assert st["collections"][1] >= 1 and st["collections"][0] >= 1
    assert st["max_ms"][1] >= 0.0 and len(st["total_ms"]) == 3
    assert g._callback not in _gc.callbacks
