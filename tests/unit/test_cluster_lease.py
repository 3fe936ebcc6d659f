"""The Redis owner-lease witness on the simulator's Clock: real managers, a
simulated Redis (SimRedis: SET NX PX, compare-and-renew, compare-and-delete on
its own clock) reached over per-node links that can be cut, delayed or frozen."""

from __future__ import annotations

import pytest

from appliance.cluster.lease_witness import CLOCK_RATE_MARGIN, LeaseWitness
from appliance.config import ConfigError, config_from_string
from tests.sim.world import World

KEY = "cluster:lease:vip1"


def _settle(w, seconds, watch=None):
    samples = []
    for _ in range(int(round(seconds / 0.01))):
        w.clock.advance(0.01)
        samples.append(tuple(w.owners()))
        if watch is not None:
            watch()
    return samples


def _world(n=2):
    w = World(seed=1, n_nodes=n, preempt=True, lease=True)
    for nid in w.ids:
        w.start(nid)
    assert _settle(w, 1.5)[-1] == ("a",)
    assert w.redis.holder(KEY).startswith("a/")
    return w


def _partition(w, x, y):
    w.net.links[(x, y)].cut = w.net.links[(y, x)].cut = True


def test_partition_keeps_the_lease_holder_the_only_owner():
    """a|b cut, both reach Redis: b suspects a but cannot take the lease a
    renews, so exactly one owner at every 10 ms sample."""
    w = _world()
    _partition(w, "a", "b")
    during = _settle(w, 5.0)
    assert all(s == ("a",) for s in during), [s for s in during if s != ("a",)][:3]
    assert not w.nodes["b"].manager.peers["a"].alive
    w.net.heal()
    assert all(s == ("a",) for s in _settle(w, 1.0))


def test_owner_cut_from_redis_lets_go_before_its_lease_expires():
    """a's Redis link cut (and a|b partitioned, so b claims as soon as it can):
    a drops the resource while the key still holds its value in Redis (before
    the TTL ran out there); b takes over only after that; never two owners."""
    w = _world()
    _partition(w, "a", "b")
    w.redis.links["a"].cut = True
    dropped = {}

    def watch():
        if "at" not in dropped and "a" not in w.owners():
            dropped["at"] = w.clock.seconds()
            dropped["holder"] = w.redis.holder(KEY)
    samples = _settle(w, 3.0, watch)
    assert all(len(s) <= 1 for s in samples), [s for s in samples if len(s) > 1][:3]
    assert dropped["holder"] is not None and dropped["holder"].startswith("a/")
    assert samples[-1] == ("b",)
    lease = w.nodes["a"].manager.lease
    assert lease.stats["expired_locally"] >= 1
    assert "store_down" in w.nodes["a"].manager.health_flags()


def test_redis_frozen_changes_no_owner_then_one_owner():
    """Redis stopped (kill -STOP) for 3 s: the owner lets go before its lease
    can expire, nobody else can claim meanwhile, and after kill -CONT exactly
    one node owns again."""
    w = _world()
    w.redis.paused = True
    samples = _settle(w, 3.0)
    assert all(len(s) <= 1 for s in samples)
    assert samples[-1] == ()
    w.redis.resume()
    after = _settle(w, 2.0)
    assert all(len(s) <= 1 for s in after)
    assert len(after[-1]) == 1


def test_owner_killed_peer_takes_over_once_the_lease_expired():
    """kill -9 of the owner (no release): b owns once the key expired in Redis."""
    w = _world()
    w.kill("a")
    held = []
    samples = _settle(w, 2.0, lambda: held.append(w.redis.holder(KEY)))
    assert samples[-1] == ("b",)
    first_b = next(i for i, s in enumerate(samples) if s == ("b",))
    assert held[first_b - 1] is None or held[first_b - 1].startswith("b/")
    assert any(h is not None and h.startswith("a/") for h in held[:5])


def test_orderly_stop_releases_the_lease_at_once():
    w = _world()
    m = w.nodes["a"].manager
    m.stopService()
    w.nodes["a"].up = False
    _settle(w, 0.05)
    assert w.redis.holder(KEY) is None or w.redis.holder(KEY).startswith("b/")
    assert m.lease.stats["released"] >= 1
    held = w.redis.holder("cluster:lease-quorum")
    assert held is None or not held.startswith("a/"), "the quorum lease is released too"


def test_three_nodes_one_owner_and_one_quorum_holder():
    w = _world(n=3)
    _partition(w, "a", "b")
    _partition(w, "a", "c")
    samples = _settle(w, 3.0)
    assert all(s == ("a",) for s in samples)
    holders = [n for n in w.node_ids if w.nodes[n].manager.lease.holds_quorum()]
    assert len(holders) == 1
    allowed = [n for n in w.node_ids if w.nodes[n].manager.quorum.allow_auto_partner_down()]
    assert allowed == holders


# -- the lease's own deadline ------------------------------------------------------------
class _Store:
    def __init__(self):
        from twisted.internet import defer
        self.defer = defer
        self.calls = []

    def lease_acquire(self, key, value, ttl_ms):
        d = self.defer.Deferred()
        self.calls.append(("acquire", key, value, ttl_ms, d))
        return d

    def lease_renew(self, key, old, new, ttl_ms):
        d = self.defer.Deferred()
        self.calls.append(("renew", key, new, ttl_ms, d))
        return d

    def lease_release(self, key, value):
        d = self.defer.Deferred()
        self.calls.append(("release", key, value, None, d))
        return d


def _lone_lease():
    from twisted.internet.task import Clock

    class M:
        pass
    m = M()
    m.clock, m.node_id, m.incarnation, m.beat_period = Clock(), "a", 7, 0.05
    m.resources, m.running, m.is_witness, m.hold_until = {}, True, False, 0.0
    m.health = M()
    m.health.flags_set = set()
    m.changed = lambda: None
    store = _Store()
    return LeaseWitness(m, store, ttl_s=1.0), m, store


def test_lease_deadline_counts_from_the_send_time_with_the_clock_margin():
    lease, m, store = _lone_lease()
    results = []
    lease.acquire("r", 3).addCallback(results.append)
    assert store.calls[0][:4] == ("acquire", "cluster:lease:r", "a/7/3", 1000)
    m.clock.advance(0.08)                  # the answer takes 80 ms
    store.calls[0][4].callback(True)
    assert results == [True]
    until = 1.0 * (1 - CLOCK_RATE_MARGIN) - 0.05
    assert lease.leases["r"].valid_until == pytest.approx(until)   # from 0, not from 0.08
    m.clock.advance(until - 0.08 - 0.001)
    assert lease.holds("r")
    m.clock.advance(0.002)
    assert not lease.holds("r")
    assert lease.stats["expired_locally"] == 1


def test_a_late_answer_within_the_window_still_counts_from_its_send_time():
    """No answer within two beats: the next command may go; the late "OK" of
    the first still makes the lease ours until its send time + window."""
    lease, m, store = _lone_lease()
    results = []
    lease.acquire("r", 1).addCallback(results.append)
    m.clock.advance(0.2)
    assert results == [False] and not lease.leases["r"].inflight
    store.calls[0][4].callback(True)
    assert lease.holds("r")
    assert lease.leases["r"].valid_until == pytest.approx(lease.window)


def test_an_answer_after_the_window_does_not_make_it_ours():
    lease, m, store = _lone_lease()
    results = []
    lease.acquire("r", 1).addCallback(results.append)
    m.clock.advance(lease.window + 0.01)
    assert results == [False]              # timed out
    store.calls[0][4].callback(True)       # late "OK": too late to own anything
    assert not lease.holds("r")
    # the value may be in Redis: the next attempt compares-and-renews it
    lease.acquire("r", 2)
    assert store.calls[-1][0] == "renew"


# -- config ---------------------------------------------------------------------------
_BASE = """
[node]
id = "a"
state_dir = "/tmp/x"
[store]
backend = "{backend}"
{url}
[cluster]
peers = [{{ id = "b", address = "10.9.0.2" }}]
auth_key_file = "k"
[cluster.witness]
{witness}
"""


def _cfg(witness, backend="redis"):
    url = 'url = "redis://127.0.0.1:6379/0"' if backend == "redis" else ""
    return config_from_string(_BASE.format(backend=backend, url=url, witness=witness), "t.toml")


def test_config_redis_lease():
    c = _cfg("redis_lease = true\nlease_ttl_ms = 400")
    assert c.cluster.redis_lease and c.cluster.lease_ttl_ms == 400
    assert c.cluster.witness is None
    assert not _cfg('id = "w"\naddress = "10.9.0.3"').cluster.redis_lease


@pytest.mark.parametrize("witness,backend,why", [
    ("redis_lease = true", "memory", "needs the Redis store"),
    ('redis_lease = true\nid = "w"', "redis", "has no id or address"),
    ("redis_lease = true\nlease_ttl_ms = 50", "redis", "below two heartbeat intervals"),
])
def test_config_redis_lease_errors(witness, backend, why):
    with pytest.raises(ConfigError, match=why):
        _cfg(witness, backend)


def test_a_claim_while_a_renewal_is_in_flight_waits_for_it():
    """Simulator seed 20566 --lease: the re-assert at a new epoch always met the
    beat's renewal in flight and was refused, for ever (the owner kept a stale
    epoch).  Now it queues behind it."""
    lease, m, store = _lone_lease()
    lease.acquire("r", 1)
    store.calls[0][4].callback(True)
    m.resources["r"] = type("R", (), {"mine": object(), "claiming": False})()
    lease.tick(m.clock.seconds())                # a renewal goes out
    assert [c[0] for c in store.calls if c[1] == "cluster:lease:r"] == ["acquire", "renew"]
    assert lease.leases["r"].inflight
    results = []
    lease.acquire("r", 2).addCallback(results.append)
    assert results == []                         # queued, not refused
    renewal = [c for c in store.calls if c[0] == "renew"][0]
    renewal[4].callback(True)
    assert store.calls[-1][:3] == ("renew", "cluster:lease:r", "a/7/2")
    store.calls[-1][4].callback(True)
    assert results == [True]


@pytest.mark.parametrize("seed", [20566])
def test_regression_seeds(seed):
    World(seed, 2, lease=True).run(30.0)


def test_a_late_renewal_answer_after_a_release_does_not_revive_the_lease():
    """The delete goes out behind the renewal: Redis runs the renewal, then the
    delete; the renewal's late "1" must not make the lease ours again."""
    lease, m, store = _lone_lease()
    lease.acquire("r", 1)
    store.calls[0][4].callback(True)
    m.resources["r"] = type("R", (), {"mine": object(), "claiming": False})()
    lease.tick(m.clock.seconds())
    renewal = [c for c in store.calls if c[0] == "renew"][0]
    m.clock.advance(0.2)                          # no answer: abandoned
    lease.release("r")
    assert store.calls[-1][0] == "release"
    renewal[4].callback(True)                     # the late answer
    assert not lease.holds("r")
