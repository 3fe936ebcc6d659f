"""MappingTable on the embedded store, on a Clock: claims with growing epochs,
one winner of a race, release only by the holder, watchers, RESYNC, the
peer-link replication used when the store is not shared."""

from __future__ import annotations

import json

import pytest
from twisted.internet import defer

from appliance.store.interface import RESYNC
from services.encap.mapping import (CHANNEL, GUARD_PREFIX, MAP_KEY, MappingTable,
                                    normalize_target)
from tests.support.sync import memory_store, ok

T0 = 1_700_000_000.0


def table_on(tmp_path, name="s", clock=None, **kw):
    store, clock = memory_store(tmp_path / name, clock)
    if clock.seconds() == 0:
        clock.advance(T0)
    table = MappingTable(clock, store, kw.pop("node_id", "dn1"), **kw)
    ok(table.start())
    return table, store, clock


def test_normalize_target():
    """Addresses and slices are normalized; /32 is the address; host bits in a slice are refused."""
    assert normalize_target("10.200.0.5") == "10.200.0.5"
    assert normalize_target("10.200.0.5/32") == "10.200.0.5"
    assert normalize_target("10.200.0.64/26") == "10.200.0.64/26"
    assert normalize_target("fd00::1/128") == "fd00::1"
    for bad in ("10.200.0.65/26", "nope", "10.200.0.300"):
        with pytest.raises(ValueError):
            normalize_target(bad)


def test_claim_writes_hash_and_guard_with_growing_epochs(tmp_path):
    """claim stores {dn, epoch, since, reason} in hash encap:map; every change of a
    target (claims by others, release, a new claim) takes the next epoch."""
    table, store, clock = table_on(tmp_path)
    seen = []
    table.watch(lambda t, e: seen.append((t, e and (e["dn"], e["epoch"]))))
    e1 = ok(table.claim("10.200.0.5", "dn1", "primary"))
    assert (e1["dn"], e1["epoch"], e1["reason"], e1["since"]) == ("dn1", 1, "primary", T0)
    stored = json.loads(store.hgetall_now(MAP_KEY)["10.200.0.5"])
    assert stored == {"dn": "dn1", "epoch": 1, "since": T0, "reason": "primary"}
    assert table.lookup("10.200.0.5") == e1
    # the same DN again: nothing written, same epoch
    assert ok(table.claim("10.200.0.5", "dn1", "data"))["epoch"] == 1
    e2 = ok(table.claim("10.200.0.5", "dn2", "first data packet"))
    assert (e2["dn"], e2["epoch"]) == ("dn2", 2)
    assert ok(table.release("10.200.0.5", "dn1")) is False      # dn1 no longer holds it
    assert table.lookup("10.200.0.5")["dn"] == "dn2"
    assert ok(table.release("10.200.0.5", "dn2")) is True
    assert table.lookup("10.200.0.5") is None
    assert "10.200.0.5" not in store.hgetall_now(MAP_KEY)
    tomb = json.loads(store.get_now(GUARD_PREFIX + "10.200.0.5"))
    assert tomb["dn"] is None and tomb["epoch"] == 3
    assert ok(table.claim("10.200.0.5", "dn1", "back"))["epoch"] == 4
    clock.advance(0)        # notifications of our own writes change nothing more
    assert seen == [("10.200.0.5", ("dn1", 1)), ("10.200.0.5", ("dn2", 2)),
                    ("10.200.0.5", None), ("10.200.0.5", ("dn1", 4))]


def test_claim_survives_restart_and_epoch_keeps_growing(tmp_path):
    """The table is loaded from the store at start; epochs continue after a restart."""
    table, store, clock = table_on(tmp_path)
    ok(table.claim("10.200.0.64/26", "dn2", "slice"))
    ok(table.release("10.200.0.64/26", "dn2"))
    ok(table.claim("10.200.0.64/26", "dn1", "slice"))
    table.stop()
    ok(store.stopService())
    table2, _store2, _ = table_on(tmp_path, clock=clock)
    assert table2.lookup("10.200.0.64/26")["epoch"] == 3
    assert ok(table2.claim("10.200.0.64/26", "dn2", "again"))["epoch"] == 4


class SlowReads:
    """The store, but ``get`` answers only when the test says (a race window)."""

    def __init__(self, store):
        self.store = store
        self.held: list = []

    def __getattr__(self, name):
        return getattr(self.store, name)

    def get(self, key):
        d = defer.Deferred()
        self.held.append((key, d))
        return d

    def release_all(self):
        """Answer every held read with the value as it is now, then fire them."""
        held, self.held = self.held, []
        answers = [(d, self.store.get_now(key)) for key, d in held]
        for d, value in answers:
            d.callback(value)


def test_concurrent_claims_leave_one_winner(tmp_path):
    """Two DNs read the same guard, then both commit: one wins (epoch 1), the other's
    compare-and-set fails, it re-reads and returns the winner's entry."""
    store, clock = memory_store(tmp_path)
    slow = SlowReads(store)
    a = MappingTable(clock, slow, "dn1", replicate=False)
    b = MappingTable(clock, slow, "dn2", replicate=False)
    da = a.claim("10.200.0.7", "dn1", "race")
    db = b.claim("10.200.0.7", "dn2", "race")
    slow.release_all()          # both read "absent"; dn1 commits first, dn2's guard fails
    slow.release_all()          # dn2's re-read
    ra, rb = ok(da), ok(db)
    assert ra == rb and ra["dn"] == "dn1" and ra["epoch"] == 1
    assert a.stats["claims"] == 1 and b.stats["claims_lost"] == 1
    assert json.loads(store.hgetall_now(MAP_KEY)["10.200.0.7"])["dn"] == "dn1"
    # a later, uncontended claim by dn2 takes over with the next epoch
    d = b.claim("10.200.0.7", "dn2", "takeover")
    slow.release_all()
    r = ok(d)
    assert r["epoch"] == 2 and r["dn"] == "dn2"


def test_watch_sees_changes_made_by_another_table(tmp_path):
    """A second table on the same store (a shared store) hears every change through
    the change feed: claim, takeover, release."""
    a, store, clock = table_on(tmp_path)
    b = MappingTable(clock, store, "esr", replicate=False)
    ok(b.start())
    seen = []
    b.watch(lambda t, e: seen.append((t, e and e["dn"])))
    ok(a.claim("10.200.0.9", "dn1", "x"))
    clock.advance(0)
    ok(a.claim("10.200.0.9", "dn2", "y"))
    clock.advance(0)
    ok(a.release("10.200.0.9", "dn2"))
    clock.advance(0)
    assert seen == [("10.200.0.9", "dn1"), ("10.200.0.9", "dn2"), ("10.200.0.9", None)]
    assert b.lookup("10.200.0.9") is None
    # changes faster than the feed are coalesced: the watcher hears the latest state
    seen.clear()
    ok(a.claim("10.200.0.9", "dn1", "x"))
    ok(a.claim("10.200.0.9", "dn2", "y"))
    clock.advance(0)
    assert seen == [("10.200.0.9", "dn2")] and b.lookup("10.200.0.9")["epoch"] == 5


def test_start_reports_loaded_entries_to_early_watchers(tmp_path):
    """A watcher registered before start hears every loaded entry (a change from empty)."""
    a, store, clock = table_on(tmp_path)
    ok(a.claim("10.200.0.1", "dn1", "x"))
    ok(a.claim("10.200.0.128/26", "dn2", "slice"))
    b = MappingTable(clock, store, "esr", replicate=False)
    seen = {}
    b.watch(lambda t, e: seen.__setitem__(t, e["dn"]))
    ok(b.start())
    assert seen == {"10.200.0.1": "dn1", "10.200.0.128/26": "dn2"}
    assert b.resolve("10.200.0.130") == ("10.200.0.128/26", b.lookup("10.200.0.128/26"))
    assert b.resolve("10.200.0.1")[0] == "10.200.0.1"
    assert b.resolve("10.200.0.2") is None


def test_resync_reloads_and_reports_differences(tmp_path):
    """Changes made while the feed had a gap are found by the RESYNC reload:
    new, changed and removed entries are reported once each."""
    a, store, clock = table_on(tmp_path)
    b = MappingTable(clock, store, "esr", replicate=False)
    ok(b.start())
    ok(a.claim("10.200.0.1", "dn1", "x"))
    ok(a.claim("10.200.0.2", "dn1", "x"))
    clock.advance(0)
    seen = []
    b.watch(lambda t, e: seen.append((t, e and e["dn"])))
    subs = list(store._subscriptions)
    store._subscriptions[:] = [s for s in subs if s.callback != b._notified]   # the gap
    ok(a.claim("10.200.0.1", "dn2", "moved"))
    ok(a.release("10.200.0.2", "dn1"))
    ok(a.claim("10.200.0.3", "dn2", "new"))
    clock.advance(0)
    assert seen == []
    store._subscriptions[:] = subs
    b._notified(GUARD_PREFIX, RESYNC)
    assert sorted(seen) == [("10.200.0.1", "dn2"), ("10.200.0.2", None), ("10.200.0.3", "dn2")]
    assert b.entries() == a.entries()
    assert b.stats["resyncs"] == 1


class FlakyReads:
    """The store, but the next ``n`` hgetall calls fail (Redis: the change feed is
    back before the command connection)."""

    def __init__(self, store, n):
        self.store, self.n = store, n

    def __getattr__(self, name):
        return getattr(self.store, name)

    def hgetall(self, key):
        if self.n:
            self.n -= 1
            from appliance.store.interface import StoreUnavailable
            return defer.fail(StoreUnavailable("not yet"))
        return self.store.hgetall(key)


def test_failed_reload_after_resync_is_retried(tmp_path):
    """A reload that fails after a RESYNC is retried with backoff until it works."""
    a, store, clock = table_on(tmp_path)
    flaky = FlakyReads(store, 0)
    b = MappingTable(clock, flaky, "esr", replicate=False)
    ok(b.start())
    store._subscriptions[:] = [s for s in store._subscriptions if s.callback != b._notified]
    ok(a.claim("10.200.0.1", "dn1", "x"))
    flaky.n = 2
    b._notified(GUARD_PREFIX, RESYNC)
    assert b.lookup("10.200.0.1") is None and b.stats["reload_failures"] == 1
    clock.advance(0.1)
    assert b.stats["reload_failures"] == 2
    clock.advance(0.2)
    assert b.lookup("10.200.0.1")["dn"] == "dn1"
    b.stop()
    assert not clock.getDelayedCalls()


def test_start_fails_fast_but_keeps_loading_in_the_background(tmp_path):
    """A store that cannot be read at start: start() fails at once, the load is
    retried (0.1 s, 0.2 s, ...), when_loaded() fires and watchers hear the entries."""
    a, store, clock = table_on(tmp_path)
    ok(a.claim("10.200.0.1", "dn1", "x"))
    b = MappingTable(clock, FlakyReads(store, 3), "esr", replicate=False)
    seen = []
    b.watch(lambda t, e: seen.append((t, e["dn"])))
    from appliance.store.interface import StoreUnavailable
    with pytest.raises(StoreUnavailable):
        ok(b.start())
    loaded = b.when_loaded()
    assert not loaded.called and not b.loaded
    clock.advance(0.1)
    assert not loaded.called
    clock.advance(0.2)
    ok(loaded)
    assert b.loaded and seen == [("10.200.0.1", "dn1")]
    assert b.stats["reload_failures"] == 3
    ok(b.when_loaded())
    b.stop()
    assert not clock.getDelayedCalls()


def test_bad_input_fails_the_deferred(tmp_path):
    """A bad target or DN id is an errback, never a synchronous raise."""
    table, _store, _clock = table_on(tmp_path)
    for d in (table.claim("10.200.0.65/26", "dn1", "x"), table.claim("10.1.1.1", "", "x"),
              table.release("bogus", "dn1")):
        with pytest.raises(ValueError):
            ok(d)


# ----------------------------------------------------------------------
# replication over the peer link (embedded store: not shared)
# ----------------------------------------------------------------------
class FakeLink:
    """Two ends of a peer link: messages delivered when the test says, acked
    when the handler's Deferred fired."""

    def __init__(self, me, peer):
        self.me, self.peers = me, (peer,)
        self.other: FakeLink | None = None
        self.handlers, self.listeners, self.queue = {}, [], []
        self.up = False

    def on(self, channel, handler):
        self.handlers[channel] = handler

    def on_connection(self, listener):
        self.listeners.append(listener)

    def connected(self, peer):
        return self.up

    def send(self, peer, channel, body):
        d = defer.Deferred()
        self.queue.append((channel, json.loads(json.dumps(body)), d))
        return d

    def deliver(self):
        while self.queue:
            channel, body, d = self.queue.pop(0)
            r = self.other.handlers[channel](self.me, body)
            r.addCallback(d.callback)

    def connect(self):
        self.up = self.other.up = True
        for ln in self.listeners:
            ln(self.peers[0], True)
        for ln in self.other.listeners:
            ln(self.me, True)


def linked_pair(tmp_path, clock):
    la, lb = FakeLink("dn1", "esr"), FakeLink("esr", "dn1")
    la.other, lb.other = lb, la
    a, sa, _ = table_on(tmp_path, "a", clock, node_id="dn1", link=la)
    b, sb, _ = table_on(tmp_path, "b", clock, node_id="esr", link=lb)
    return (a, sa, la), (b, sb, lb)


def test_embedded_store_replicates_claims_over_the_peer_link(tmp_path):
    """On the embedded store a claim travels to the peer, lands in its store and its
    memory, and its watchers hear it; a release too."""
    from twisted.internet.task import Clock
    clock = Clock()
    clock.advance(T0)
    (a, sa, la), (b, sb, lb) = linked_pair(tmp_path, clock)
    assert a.replicating and b.replicating
    seen = []
    b.watch(lambda t, e: seen.append((t, e and (e["dn"], e["epoch"]))))
    ok(a.claim("10.200.0.5", "dn1", "x"))
    la.deliver()
    assert json.loads(sb.hgetall_now(MAP_KEY)["10.200.0.5"])["dn"] == "dn1"
    ok(a.release("10.200.0.5", "dn1"))
    la.deliver()
    clock.advance(0)
    assert seen == [("10.200.0.5", ("dn1", 1)), ("10.200.0.5", None)]
    assert json.loads(sb.get_now(GUARD_PREFIX + "10.200.0.5"))["epoch"] == 2
    assert CHANNEL in lb.handlers


def test_replication_converges_on_higher_epoch_then_dn_id(tmp_path):
    """Both sides claim the same target at the same epoch while apart: after the
    exchange both hold the larger DN id; an older version never overwrites a newer one."""
    from twisted.internet.task import Clock
    clock = Clock()
    clock.advance(T0)
    (a, sa, la), (b, sb, lb) = linked_pair(tmp_path, clock)
    ok(a.claim("10.200.0.6", "dn1", "x"))
    ok(b.claim("10.200.0.6", "dn2", "x"))      # b's own DN id for the test: "dn2"
    la.deliver()
    lb.deliver()
    clock.advance(0)
    assert a.lookup("10.200.0.6")["dn"] == b.lookup("10.200.0.6")["dn"] == "dn2"
    # a newer claim on a wins everywhere
    ok(a.claim("10.200.0.6", "dn1", "y"))
    la.deliver()
    assert b.lookup("10.200.0.6") == a.lookup("10.200.0.6")
    assert a.lookup("10.200.0.6")["epoch"] == 2


def test_full_sync_when_the_link_comes_up(tmp_path):
    """Changes made while the peer was away (messages lost) reach it with the full
    sync sent at link-up, tombstones included."""
    from twisted.internet.task import Clock
    clock = Clock()
    clock.advance(T0)
    (a, sa, la), (b, sb, lb) = linked_pair(tmp_path, clock)
    ok(a.claim("10.200.0.1", "dn1", "x"))
    ok(a.claim("10.200.0.2", "dn1", "x"))
    la.deliver()
    ok(a.release("10.200.0.1", "dn1"))
    ok(a.claim("10.200.0.64/26", "dn1", "slice"))
    la.queue.clear()                      # lost while apart
    assert b.lookup("10.200.0.1") is not None
    la.connect()
    clock.advance(0)
    la.deliver()
    lb.deliver()
    clock.advance(0)
    assert b.entries() == a.entries()
    assert set(b.entries()) == {"10.200.0.2", "10.200.0.64/26"}
    assert a.stats["full_syncs"] == 1
