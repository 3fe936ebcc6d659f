"""Epoch reservation with a node-local store (appliance/cluster/resources.py):
a standby keeps ``max_epoch + 1`` durably reserved, so a takeover claims at
once instead of waiting for its epoch's write (an fsync and two thread hops
on the takeover's path), and a restart still claims above every epoch the
node may have used.  A shared store (Redis) keeps the compare-and-set on the
path."""

from __future__ import annotations

from twisted.internet import defer

from tests.support.sync import MemStore
from tests.unit.test_cluster_manager import (ADDR, make_node, make_pair, owners,  # noqa: F401
                                             run, start, tmp_state)


class StallingStore(MemStore):
    """A node-local store whose writes stop answering once ``stall`` is set
    (a disk stall): what was written before is durable, nothing after is."""

    def __init__(self, backend="memory"):
        super().__init__(backend=backend)
        self.stall = False
        self.pending: list = []

    def _maybe(self, value):
        if not self.stall:
            return defer.succeed(value)
        d = defer.Deferred()
        self.pending.append((d, value))
        return d

    def get(self, key):
        return self._maybe(self.data.get(key))

    def set(self, key, value):
        if self.stall:
            d = defer.Deferred()
            self.pending.append((d, None))
            d.addCallback(lambda _: self.data.__setitem__(key, value))
            return d
        return super().set(key, value)

    def cas(self, key, expected, new):
        if self.stall:
            d = defer.Deferred()
            self.pending.append((d, None))
            d.addCallback(lambda _: super(StallingStore, self).cas(key, expected, new))
            return d
        return super().cas(key, expected, new)

    def release(self):
        self.stall = False
        pending, self.pending = self.pending, []
        for d, value in pending:
            d.callback(value)


def pair_with(store_b):
    clock, net, nodes = make_pair()
    nodes["b"].stopService()
    net.ports.pop(ADDR["b"], None)
    nodes["b"] = make_node(clock, net, "b", store=store_b)
    return clock, net, nodes


def test_standby_reserves_the_next_epoch_and_takes_over_without_a_write():
    """With its store stalled, the standby still takes over at once at its
    reserved epoch (the old code waited for the claim's own write: no owner
    until the disk answered)."""
    store_b = StallingStore()
    clock, net, nodes = pair_with(store_b)
    start(clock, nodes)
    run(clock, 1.0)
    assert owners(nodes) == ["a"]
    epoch_a = nodes["a"].resources["vip1"].mine.epoch
    assert store_b.data["cluster:epoch-reserved:vip1"] == str(epoch_a + 1)
    store_b.stall = True
    net.cut.add(ADDR["a"])                        # a dies
    run(clock, 0.5)
    assert nodes["b"].role("vip1") == "owner"
    assert ("owner", epoch_a + 1) in nodes["b"].roles
    assert nodes["b"].table.stats["fast_claims"] == 1
    store_b.release()                              # the claimed epoch is recorded afterwards
    run(clock, 0.1)
    assert store_b.data["cluster:epoch:vip1"] == str(epoch_a + 1)
    assert int(store_b.data["cluster:epoch-reserved:vip1"]) == epoch_a + 2


def test_a_restart_claims_above_the_reservation():
    """A reservation may have been claimed without its own write: after a
    restart it counts as a used epoch, so the next claim is above it."""
    store_b = MemStore()
    store_b.data["cluster:epoch:vip1"] = "5"
    store_b.data["cluster:epoch-reserved:vip1"] = "7"
    clock, net, nodes = pair_with(store_b)
    nodes["a"].stopService()                      # b alone
    net.ports.pop(ADDR["a"], None)
    start(clock, {"b": nodes["b"]})
    run(clock, 1.0)
    assert nodes["b"].role("vip1") == "owner"
    assert nodes["b"].resources["vip1"].mine.epoch == 8


def test_a_failed_reservation_leaves_the_claim_on_its_own_write():
    """No reservation durable (the disk stalled before it was written): the
    claim waits for its own write, as before."""
    store_b = StallingStore()
    store_b.stall = True
    clock, net, nodes = pair_with(store_b)
    start(clock, nodes)
    run(clock, 1.0)
    net.cut.add(ADDR["a"])
    run(clock, 0.5)
    assert nodes["b"].role("vip1") != "owner"     # its claim waits for the disk
    assert nodes["b"].table.stats["fast_claims"] == 0
    store_b.release()
    run(clock, 0.2)
    assert nodes["b"].role("vip1") == "owner"


def test_a_shared_store_never_reserves():
    """Redis (shared): the compare-and-set arbitrates every claim; no reservation."""
    store = MemStore(backend="redis")
    clock, net, nodes = make_pair(shared_store=store)
    start(clock, nodes)
    run(clock, 1.0)
    net.cut.add(ADDR["a"])
    run(clock, 0.5)
    assert nodes["b"].role("vip1") == "owner"
    assert not any(k.startswith("cluster:epoch-reserved:") for k in store.data)
    assert nodes["b"].table.stats["fast_claims"] == 0
