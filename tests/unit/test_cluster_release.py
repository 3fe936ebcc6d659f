"""Break before make on the wire: a node letting go of a VIP advertises
``releasing:<name>`` until the address is really removed, and its peer adds
the VIP only after that (two managers on a Clock, a VIP manager whose removal
takes 300 ms, as a stuck netlink call would)."""

from __future__ import annotations

from twisted.internet import defer

from tests.unit.test_cluster_manager import (FakeVIPs, make_pair, owners, run, start,  # noqa: F401
                                             tmp_state)


class SlowVIPs(FakeVIPs):
    def __init__(self, clock, name):
        super().__init__()
        self.clock, self.name, self.held = clock, name, False

    def acquire(self, name, reason=""):
        self.held = True
        self.log.append(("acquire", name, round(self.clock.seconds(), 3)))
        return defer.succeed(True)

    def release(self, name, reason=""):
        d = defer.Deferred()

        def gone():
            self.held = False
            self.log.append(("released", name, round(self.clock.seconds(), 3)))
            d.callback(True)
        self.clock.callLater(0.3, gone)
        return d


def test_peer_adds_the_vip_only_after_the_owner_removed_it():
    clock, net, nodes = make_pair()
    vips = {n: SlowVIPs(clock, n) for n in nodes}
    for n, m in nodes.items():
        m.vip_manager = vips[n]
    start(clock, nodes)
    run(clock, 1.0)
    assert owners(nodes) == ["a"]
    nodes["a"].demote("vip1")
    both = []
    for _ in range(100):
        clock.advance(0.01)
        both.append(vips["a"].held and vips["b"].held)
    assert owners(nodes) == ["b"]
    assert not any(both), "the VIP was on both boxes"
    released = [t for op, _, t in vips["a"].log if op == "released"][0]
    acquired = [t for op, _, t in vips["b"].log if op == "acquire"][0]
    assert acquired >= released


def test_demote_of_the_preempting_owner_hands_over_and_sticks():
    """The old demote left a preempting natural owner's resource to nobody (the
    peer still elected it); now its peer takes it (manual) and keeps it."""
    clock, net, nodes = make_pair(preempt=True)
    start(clock, nodes)
    run(clock, 1.0)
    assert owners(nodes) == ["a"]
    nodes["a"].demote("vip1")
    run(clock, 0.3)
    assert owners(nodes) == ["b"]
    assert nodes["b"].resources["vip1"].mine.manual
    run(clock, 2.0)
    assert owners(nodes) == ["b"], "a does not preempt it back"
