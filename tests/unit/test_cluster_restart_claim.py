"""A restarted node whose claim is in flight when it first hears its peer
(seen in SIP runs: "peer a alive", then "b is now owner (epoch E): dead: a" at
a's own epoch E).  The claim started at the end of the start hold, before the
peer's beats got through; the store's answer came after the peer was heard
with its claim at the same epoch.  A claim whose epoch is no longer above every
epoch learned while it was in flight is dropped and the election runs again."""

from __future__ import annotations

from twisted.internet import defer

from tests.support.sync import MemStore
from tests.unit.test_cluster_manager import (ADDR, make_node, make_pair, owners,  # noqa: F401
                                             run, start, tmp_state)


class SlowStore(MemStore):
    """Answers after ``delay`` s on ``clock`` (a Redis round trip).  A shared
    store: every claim waits for its compare-and-set (a node-local store
    claims at a reserved epoch without a write on the path:
    test_cluster_epoch_reserve.py)."""

    def __init__(self, clock, delay):
        super().__init__(backend="redis")
        self.clock, self.delay = clock, delay

    def _later(self, value):
        d = defer.Deferred()
        self.clock.callLater(self.delay, d.callback, value)
        return d

    def get(self, key):
        return self._later(self.data.get(key))

    def cas(self, key, expected, new):
        if self.data.get(key) != expected:
            return self._later(False)
        self.data[key] = new
        return self._later(True)


def test_claim_in_flight_when_the_owner_is_heard_is_dropped():
    clock, net, nodes = make_pair()
    start(clock, nodes)
    run(clock, 1.0)
    assert owners(nodes) == ["a"]
    epoch = nodes["a"].resources["vip1"].mine.epoch
    # b restarts with its own store, which never saw a's epoch (b never claimed)
    nodes["b"].stopService()
    net.ports.pop(ADDR["b"], None)
    run(clock, 0.5)
    b = make_node(clock, net, "b", store=SlowStore(clock, 0.1))
    nodes["b"] = b
    # a's beats to b are lost for the start hold (dead_after + one interval)
    net.drop_next[(ADDR["a"], ADDR["b"])] = 13
    b.startService()
    samples = []
    for _ in range(1500):
        clock.advance(0.001)
        samples.append(tuple(owners(nodes)))
    assert b.peers["a"].alive
    assert all(s == ("a",) for s in samples), sorted(set(samples))
    assert ("owner", epoch) not in b.roles, "b took a's resource at a's own epoch"
    assert b.resources["vip1"].max_epoch >= epoch
