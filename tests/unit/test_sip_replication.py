"""Registration replication on a Clock with two services, two embedded stores and a fake
peer link: sync mode holds the 200 until the backup stored the binding; deletes replicate;
a backup that is down or silent does not block the 200 and gets what it missed (delta)
when it returns; async answers at once."""

from __future__ import annotations

import gc

import pytest

from dataclasses import replace

from twisted.internet import defer

from services.sip.config import ReplicationConfig
from services.sip.replication import Replicator
from tests.unit.test_sip_service import Peer, make, req, settle


@pytest.fixture(autouse=True)
def _unfreeze():
    """A full resync freezes the heap (gc.freeze): give the next tests a normal one."""
    yield
    gc.unfreeze()


class FakeLink:
    """One side of a peer link: ordered, acknowledged after the far handler finished;
    messages sent while down wait and go when the link comes up (like the real one)."""

    def __init__(self, name):
        self.name = name
        self.other: FakeLink | None = None
        self.up = True
        self.silent = False          # deliver nothing, ack nothing
        self.handlers = {}
        self.listeners = []
        self.unacked = []

    def on(self, channel, handler):
        self.handlers[channel] = handler
        if self.other is not None and self.other.up and not self.other.silent:
            self.other._deliver()

    def on_connection(self, listener):
        self.listeners.append(listener)

    def connected(self, peer):
        return self.up

    def backlog(self, peer, channel=None):
        return len(self.unacked)

    def lag_s(self, peer):
        return 0.0

    def send(self, peer, channel, body, *, limit=None):
        d = defer.Deferred()
        self.unacked.append((channel, body, d))
        if self.up and not self.silent:
            self._deliver()
        return d

    def _deliver(self):
        while self.unacked and self.unacked[0][0] in self.other.handlers:
            channel, body, d = self.unacked.pop(0)
            r = defer.maybeDeferred(self.other.handlers[channel], self.name, body)
            r.addCallbacks(lambda _, d=d: d.callback(None), d.errback)

    def set_up(self, up):
        self.up = self.other.up = up
        for listener in self.listeners:
            listener(self.other.name, up)
        for listener in self.other.listeners:
            listener(self.name, up)
        if up and not self.silent:
            self._deliver()
            self.other._deliver()


def pair(tmp_path, mode="sync", timeout_s=2.0, **kw):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, clock_a, thread_a, store_a, _ = make(tmp_path / "a")
    b, clock_b, thread_b, store_b, _ = make(tmp_path / "b")
    link_a, link_b = FakeLink("a"), FakeLink("b")
    link_a.other, link_b.other = link_b, link_a
    a.config = replace(a.config, replication=ReplicationConfig(("b",), mode, timeout_s, 10))
    b.replicator = Replicator(clock_b, link_b, ("a",), mode, b.location)
    b.replicator.start()
    a.replicator = Replicator(clock_a, link_a, ("b",), mode, a.location, timeout_s=timeout_s,
                              batch=10, **kw)
    a.replicator.start()

    def settle_all():
        for _ in range(3):
            settle(clock_a, thread_a)
            settle(clock_b, thread_b)
    return a, b, link_a, clock_a, thread_a, thread_b, settle_all


def bindings(svc, aor="sip:alice@example.test"):
    return svc.location._read_now(aor)[0]


def test_sync_200_after_backup_stored_and_deletes_replicate(tmp_path):
    """The 200 leaves only once the backup's store committed the binding; an
    unregistration removes it on the backup too."""
    a, b, link, clock, thread_a, thread_b, settle_all = pair(tmp_path)
    peer = Peer()
    a.received(req("REGISTER", "sip:example.test", contacts=["<sip:alice@10.0.0.1>;q=0.7"]),
               peer.src, False)
    clock.advance(0)
    thread_a.run_all()
    clock.advance(0)
    assert peer.sent == []                             # local durable, backup not yet
    settle_all()
    assert peer.responses()[0].code == 200
    [mine] = bindings(a).values()
    [theirs] = bindings(b).values()
    assert (theirs.uri, theirs.expires, theirs.q, theirs.cseq) == (
        mine.uri, mine.expires, mine.q, mine.cseq)
    assert b.location.count == 1
    a.received(req("REGISTER", "sip:example.test", branch="z9hG4bK2", cseq=2,
                   contacts=["<sip:alice@10.0.0.1>;expires=0"]), peer.src, False)
    settle_all()
    assert peer.responses()[-1].code == 200 and bindings(b) == {} and b.location.count == 0
    caller = Peer(7000)
    b.received(req("INVITE", "sip:alice@example.test", branch="z9hG4bKi"), caller.src, False)
    assert caller.responses()[-1].code == 480          # known on the backup, no binding


def test_backup_down_does_not_block_and_catches_up(tmp_path):
    """Backup link down: the 200 goes after the local write; the AOR is missed; when the
    link returns the backup receives its current state."""
    a, b, link, clock, thread_a, thread_b, settle_all = pair(tmp_path)
    link.up = False
    peer = Peer()
    for i in range(3):
        a.received(req("REGISTER", "sip:example.test", to=f"sip:u{i}@example.test",
                       branch=f"z9hG4bKd{i}", contacts=[f"<sip:u{i}@10.0.0.{i + 1}>"]),
                   peer.src, False)
    settle_all()
    assert [r.code for r in peer.responses()] == [200, 200, 200]
    assert a.replicator.missed["b"] == {f"sip:u{i}@example.test" for i in range(3)}
    link.set_up(True)
    settle_all()
    clock.advance(0)
    settle_all()
    assert a.replicator.missed["b"] == set()
    assert all(bindings(b, f"sip:u{i}@example.test") for i in range(3))


def test_silent_backup_times_out(tmp_path):
    """A connected backup that does not acknowledge within timeout_s: the 200 goes at the
    timeout and the AOR is remembered as missed."""
    a, b, link, clock, thread_a, thread_b, settle_all = pair(tmp_path, timeout_s=1.0)
    link.silent = True
    peer = Peer()
    a.received(req("REGISTER", "sip:example.test", contacts=["<sip:alice@h>"]), peer.src, False)
    settle_all()
    assert peer.sent == []
    clock.advance(1.0)
    assert peer.sent == []                      # the missed AOR is stored first
    settle_all()
    assert peer.responses()[0].code == 200
    assert a.replicator.missed["b"] == {"sip:alice@example.test"}
    assert a.replicator.stats["timeouts"] == 1


def test_async_answers_without_waiting(tmp_path):
    """async: the 200 leaves after the local write even if the backup never answers."""
    a, b, link, clock, thread_a, thread_b, settle_all = pair(tmp_path, mode="async")
    link.silent = True
    peer = Peer()
    a.received(req("REGISTER", "sip:example.test", contacts=["<sip:alice@h>"]), peer.src, False)
    settle(clock, thread_a)
    assert peer.responses()[0].code == 200


def _register_many(a, peer, users, settle_all, prefix="u"):
    for i in users:
        a.received(req("REGISTER", "sip:example.test", to=f"sip:{prefix}{i}@example.test",
                       branch=f"z9hG4bK{prefix}{i}", call_id=f"c{prefix}{i}",
                       contacts=[f"<sip:{prefix}{i}@10.0.0.{i % 250 + 1}>"]), peer.src, False)
    settle_all()


def test_backlog_survives_primary_restart(tmp_path):
    """What a down backup missed is in the store before the 200; a restarted primary
    (a new Replicator on the same store) still owes it and sends it when the link returns;
    then the stored backlog is empty."""
    from services.sip.replication import BACKLOG_PREFIX
    a, b, link, clock, thread_a, thread_b, settle_all = pair(tmp_path)
    peer = Peer()
    _register_many(a, peer, [0], settle_all, prefix="x")      # b holds data: delta, not full
    link.up = link.other.up = False
    _register_many(a, peer, range(3), settle_all)
    assert [r.code for r in peer.responses()] == [200, 200, 200, 200]
    users = {f"sip:u{i}@example.test" for i in range(3)}
    assert set(a.location.store.hgetall_now(BACKLOG_PREFIX + "b")) == users
    # the primary restarts: a fresh replicator reads the backlog from the store
    link.listeners.clear()
    a.replicator = Replicator(clock, link, ("b",), "sync", a.location, batch=10)
    d = a.replicator.load()
    settle_all()
    assert d.called and a.replicator.missed["b"] == users
    a.replicator.start()
    link.set_up(True)
    for _ in range(3):
        settle_all()
    assert all(bindings(b, u) for u in users)
    assert a.replicator.missed["b"] == set()
    assert a.location.store.hgetall_now(BACKLOG_PREFIX + "b") == {}
    assert a.replicator.stats["delta_resyncs"] == 1


def test_overflow_gives_paged_full_resync_that_removes_stale(tmp_path):
    """More missed AORs than backlog_limit: the backlog becomes a stored full-resync flag;
    on return the backup gets every AOR in pages, and AORs it holds that the primary no
    longer has (unregistered while it was away) are removed."""
    from services.sip.replication import BACKLOG_PREFIX, FULL_PREFIX
    a, b, link, clock, thread_a, thread_b, settle_all = pair(
        tmp_path, backlog_limit=3, page=2, window=1, pause_s=0.0)
    peer = Peer()
    _register_many(a, peer, [0], settle_all, prefix="gone")
    assert bindings(b, "sip:gone0@example.test")
    link.up = link.other.up = False
    a.received(req("REGISTER", "sip:example.test", to="sip:gone0@example.test", cseq=2,
                   branch="z9hG4bKx", call_id="cgone0", extra=["Expires: 0"],
                   contacts=["*"]), peer.src, False)
    _register_many(a, peer, range(7), settle_all)
    assert all(r.code == 200 for r in peer.responses())
    store = a.location.store
    assert a.replicator.full_needed["b"] and store.get_now(FULL_PREFIX + "b") == "1"
    assert store.hgetall_now(BACKLOG_PREFIX + "b") == {}
    link.set_up(True)
    for _ in range(12):
        settle_all()
    assert all(bindings(b, f"sip:u{i}@example.test") for i in range(7))
    assert bindings(b, "sip:gone0@example.test") == {}
    assert b.location.count == 7
    r = a.replicator
    assert r.stats["full_resyncs"] == 1 and r.stats["full_sent"] == 7
    assert not r.full_needed["b"] and store.get_now(FULL_PREFIX + "b") is None
    assert b.replicator.stats["full_removed"] == 1


def test_backup_without_data_gets_full_resync(tmp_path):
    """A backup whose hello says it holds no binding gets the paged full copy even
    though nothing is in the primary's backlog for it."""
    a, b, link, clock, thread_a, thread_b, settle_all = pair(tmp_path, page=3, pause_s=0.0)
    link.up = link.other.up = False
    peer = Peer()
    _register_many(a, peer, range(5), settle_all)
    a.replicator.missed["b"].clear()             # as if the backlog had been acked
    link.set_up(True)
    for _ in range(8):
        settle_all()
    assert a.replicator.stats["full_resyncs"] == 1
    assert a.replicator.stats["delta_resyncs"] == 0
    assert all(bindings(b, f"sip:u{i}@example.test") for i in range(5))


def test_full_resync_yields_to_live_registers(tmp_path):
    """Flow control: between two pages the reactor is free (pause_s), so a live REGISTER
    is answered (and replicated) while the full resync is still running."""
    a, b, link, clock, thread_a, thread_b, settle_all = pair(
        tmp_path, backlog_limit=1, page=4, window=1, pause_s=0.5)
    link.up = link.other.up = False
    peer = Peer()
    _register_many(a, peer, range(20), settle_all)
    link.set_up(True)
    settle_all()
    assert "b" in a.replicator.full_running
    live = Peer(6000)
    a.received(req("REGISTER", "sip:example.test", to="sip:live@example.test",
                   branch="z9hG4bKlive", call_id="clive", contacts=["<sip:live@10.9.0.1>"]),
               live.src, False)
    settle_all()
    assert live.responses()[-1].code == 200
    assert bindings(b, "sip:live@example.test")
    assert "b" in a.replicator.full_running          # the copy is not done yet
    for _ in range(10):
        clock.advance(0.5)
        settle_all()
    assert "b" not in a.replicator.full_running
    assert all(bindings(b, f"sip:u{i}@example.test") for i in range(20))


def test_states_carry_versions_and_the_newest_wins(tmp_path):
    """Each REGISTER bumps the AOR's version (sip:mtime:<aor>) in the same commit and the
    state carries it; a replica ignores a state older than what it holds (a late resend,
    or the backlog of a node that was behind) and applies a newer one."""
    from services.sip.location import MTIME_PREFIX
    a, b, link, clock, thread_a, thread_b, settle_all = pair(tmp_path)
    peer = Peer()
    a.received(req("REGISTER", "sip:example.test", contacts=["<sip:alice@10.0.0.1>"]),
               peer.src, False)
    settle_all()
    v1 = float(a.location.store.get_now(MTIME_PREFIX + "sip:alice@example.test"))
    assert float(b.location.store.get_now(MTIME_PREFIX + "sip:alice@example.test")) == v1
    clock.advance(1)
    a.received(req("REGISTER", "sip:example.test", branch="z9hG4bK2", cseq=2,
                   contacts=["<sip:alice@10.0.0.2>"]), peer.src, False)
    settle_all()
    v2 = float(a.location.store.get_now(MTIME_PREFIX + "sip:alice@example.test"))
    assert v2 > v1 and set(bindings(b)) == {"sip:alice@10.0.0.1", "sip:alice@10.0.0.2"}
    rec = ('{"uri":"sip:old@10.9.9.9","expires":%f,"q":null,"call_id":"c","cseq":1,'
           '"path":[],"received":null,"params":""}' % (clock.seconds() + 600))
    stale = {"aor": "sip:alice@example.test", "set": {"sip:old@10.9.9.9": rec}, "del": [],
             "replace": True, "mtime": v1}
    b.replicator.apply("a", {"states": [stale]})
    settle_all()
    assert set(bindings(b)) == {"sip:alice@10.0.0.1", "sip:alice@10.0.0.2"}
    assert b.replicator.stats["stale_ignored"] == 1
    b.replicator.apply("a", {"states": [dict(stale, mtime=v2 + 1)]})
    settle_all()
    assert set(bindings(b)) == {"sip:old@10.9.9.9"}


def test_backup_back_again_during_a_resync_gets_another(tmp_path):
    """The backup says hello again (restarted, without bindings) while a full resync to
    it runs: a second full resync follows the first."""
    a, b, link, clock, thread_a, thread_b, settle_all = pair(
        tmp_path, backlog_limit=1, page=4, window=1, pause_s=0.5)
    link.up = link.other.up = False
    peer = Peer()
    _register_many(a, peer, range(12), settle_all)
    link.set_up(True)
    settle_all()
    assert "b" in a.replicator.full_running
    a.replicator._hello("b", {"bindings": 0})
    for _ in range(20):
        clock.advance(0.5)
        settle_all()
    assert a.replicator.stats["full_resyncs"] == 2
    assert not a.replicator.full_needed["b"] and "b" not in a.replicator.full_running


def test_returning_node_hears_synced_only_after_it_holds_what_it_missed(tmp_path):
    """b was away while a registered 25 users; when the link returns a sends the delta
    (batch 10: three steps) and then the synced marker: b's on_synced fires once, and
    at that moment b holds every missed AOR."""
    a, b, link, clock, thread_a, thread_b, settle_all = pair(tmp_path)
    seen = []

    def on_synced(peer):
        held = sum(1 for i in range(25) if bindings(b, f"sip:u{i}@example.test"))
        seen.append((peer, held))
    _register_many(a, Peer(), [0], settle_all, prefix="pre")     # b holds bindings: a delta
    b.replicator.on_synced = on_synced
    link.set_up(False)
    _register_many(a, Peer(), range(25), settle_all)
    assert len(a.replicator.missed["b"]) == 25
    link.set_up(True)
    for _ in range(20):
        settle_all()
        clock.advance(0)
    assert seen == [("a", 25)]
    assert b.replicator.synced_from == {"a"}
    assert a.replicator.stats["delta_resyncs"] == 1


def test_no_synced_marker_to_a_peer_that_does_not_read_it(tmp_path):
    """An older peer's hello has no caps: it gets no synced marker (it would park it)."""
    a, b, link, clock, thread_a, thread_b, settle_all = pair(tmp_path)
    link.set_up(False)
    a.replicator._hello("b", {"bindings": 0})
    for _ in range(5):
        settle_all()
        clock.advance(0)
    assert a.replicator.stats["synced_sent"] == 0


class _Cluster:
    def __init__(self):
        self.reports = []

    def service_failed(self, name, reason):
        self.reports.append((name, reason))


def test_sync_gate_unable_until_every_peer_synced_or_gone():
    from services.sip.syncgate import SyncGate
    now = [100.0]
    linked = {"b": True, "c": False}
    alive = {"b": True, "c": True}
    cluster = _Cluster()
    gate = SyncGate(cluster, ("b", "c"), now=lambda: now[0], connected=linked.get,
                    alive=alive.get, grace_s=5, max_s=60)
    gate.begin()
    assert cluster.reports == [("sip", "syncing")] and gate.syncing
    gate.synced("b")
    now[0] += 10
    gate.tick()                        # c alive (heartbeats) though not linked: still waited for
    assert gate.syncing and gate.waiting == {"c"}
    alive["c"] = False
    gate.tick()                        # c down past the grace: not waited for
    assert not gate.syncing and cluster.reports[-1] == ("sip", None)
    assert gate.status()["not_waited_for"] == ["c"]
    # an older peer that never sends the marker: at most max_s
    cluster2 = _Cluster()
    gate2 = SyncGate(cluster2, ("b",), now=lambda: now[0], connected=lambda p: True,
                     alive=lambda p: True, grace_s=5, max_s=60)
    gate2.begin()
    now[0] += 59
    gate2.tick()
    assert gate2.syncing
    now[0] += 1
    gate2.tick()
    assert cluster2.reports == [("sip", "syncing"), ("sip", None)]


def test_service_is_unable_from_construction_until_synced(tmp_path):
    """The sip service with replication peers in a cluster reports 'syncing' when it is
    built (before the cluster's first election) and clears it on the peer's marker."""
    import ipaddress
    from prometheus_client import CollectorRegistry
    from twisted.internet.task import Clock

    from appliance.admin.rpc import MethodRegistry
    from appliance.plugin import NodeContext
    from services.sip.config import ClusterRoles, SIPConfig
    from services.sip.registrar import Limits
    from services.sip.service import SIPService

    class Peer_:
        alive = True

    class Cluster(_Cluster):
        peers = {"b": Peer_()}
        resources: dict = {}
        node_id = "a"

        def register_resource(self, *a, **kw):
            pass
    cluster = Cluster()
    cfg = SIPConfig(ipaddress.ip_address("127.0.0.1"), 0, None, None, ("example.test",),
                    Limits(), replication=ReplicationConfig(("b",), "sync", 2.0, 10),
                    roles=ClusterRoles())
    ctx = NodeContext(reactor=Clock(), config=None, store=None, rpc=MethodRegistry(),
                      metrics=CollectorRegistry(), cluster=cluster, state_dir=tmp_path)
    svc = SIPService(cfg, ctx)
    assert cluster.reports == [("sip", "syncing")]
    svc.syncgate.synced("b")
    assert cluster.reports == [("sip", "syncing"), ("sip", None)]


def test_states_queued_behind_the_window_leave_as_one_message(tmp_path):
    """At most WINDOW messages unacknowledged: REGISTERs of later turns wait and leave
    together as one message when an ack opens the window; each 200 still waits for the
    ack of its own state."""
    a, b, link, clock, thread_a, thread_b, settle_all = pair(tmp_path, timeout_s=5.0)
    link.silent = True                      # b stores nothing, acks nothing for now
    peer = Peer()
    for turn in range(5):                   # five reactor turns, two REGISTERs each
        for k in range(2):
            i = 2 * turn + k
            a.received(req("REGISTER", "sip:example.test", to=f"sip:w{i}@example.test",
                           branch=f"z9hG4bKw{i}", call_id=f"cw{i}",
                           contacts=[f"<sip:w{i}@10.0.0.{i + 1}>"]), peer.src, False)
        settle_all()
    assert a.replicator.WINDOW == 2
    in_flight = [body for _ch, body, _d in link.unacked if "states" in body]
    assert a.replicator.stats["messages"] == 2 and len(in_flight) == 2
    assert peer.sent == []                  # sync: nothing answered before b stored it
    link.silent = False
    link._deliver()
    for _ in range(5):
        settle_all()
        clock.advance(0)
    assert a.replicator.stats["messages"] == 3          # the six queued went as one
    assert [r.code for r in peer.responses()] == [200] * 10
    assert all(bindings(b, f"sip:w{i}@example.test") for i in range(10))
    assert a.replicator.missed["b"] == set() and a.replicator.stats["timeouts"] == 0


def test_states_stuck_behind_a_silent_backup_time_out(tmp_path):
    """The window is full and the backup acks nothing for timeout_s: the queued states'
    200s go (the AORs are missed for it), and they are still sent when it answers."""
    a, b, link, clock, thread_a, thread_b, settle_all = pair(tmp_path, timeout_s=1.0)
    link.silent = True
    peer = Peer()
    for i in range(4):
        a.received(req("REGISTER", "sip:example.test", to=f"sip:s{i}@example.test",
                       branch=f"z9hG4bKs{i}", call_id=f"cs{i}",
                       contacts=[f"<sip:s{i}@10.0.0.{i + 1}>"]), peer.src, False)
        settle_all()
    assert a.replicator.stats["messages"] == 2 and peer.sent == []
    clock.advance(1.0)
    settle_all()
    assert [r.code for r in peer.responses()] == [200] * 4
    assert a.replicator.missed["b"] == {f"sip:s{i}@example.test" for i in range(4)}
    link.silent = False
    link._deliver()
    for _ in range(5):
        settle_all()
        clock.advance(0)
    assert a.replicator.stats["messages"] == 3
    assert all(bindings(b, f"sip:s{i}@example.test") for i in range(4))


def test_sync_state_leaves_before_the_local_commit_and_200_waits_for_both(tmp_path):
    """The backup gets the AOR's state in the reactor turn the REGISTER was decided, while
    the primary's own commit is still running (the two run side by side: a sync 200 waits
    for the slower, not their sum); the 200 leaves only once both are durable."""
    a, b, link, clock, thread_a, thread_b, settle_all = pair(tmp_path)
    peer = Peer()
    a.received(req("REGISTER", "sip:example.test", contacts=["<sip:alice@10.0.0.1>"]),
               peer.src, False)
    clock.advance(0)                     # the turn ends: queued states leave; no commit ran
    assert a.replicator.stats["sent"] == 1
    assert list(bindings(b)) == ["sip:alice@10.0.0.1"]        # in the backup's mirror
    thread_b.run_all()                   # the backup's commit: durable there, acked
    clock.advance(0)
    assert peer.sent == []               # ... but the primary's own commit has not run
    thread_a.run_all()
    clock.advance(0)
    settle_all()
    assert [r.code for r in peer.responses()] == [200]
    # a failed local commit still answers 500, never 200
    a.location.store._file.apply = _broken
    a.received(req("REGISTER", "sip:example.test", to="sip:bob@example.test",
                   branch="z9hG4bK2", call_id="c2", contacts=["<sip:bob@10.0.0.2>"]),
               peer.src, False)
    settle_all()
    assert [r.code for r in peer.responses()] == [200, 500]


def _broken(batch):
    raise OSError("disk gone")
