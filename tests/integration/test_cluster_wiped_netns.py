"""A node restarted with its state directory wiped (incarnation file and
embedded store gone) rejoins without split brain: its epochs continue above
the peer's and exactly one node holds the VIP at every poll (addresses read
in both namespaces).  Two real nodes in namespaces (tests/integration/
test_cluster_netns.py's lab), preempt on."""

from __future__ import annotations

import shutil
import time

from tests.integration.test_cluster_netns import Pair, client_pings
from tests.support.cluster_lab import wait_for


DEAD: set[str] = set()      # killed boxes (link down; a kill -9 leaves the address)


def _owners(pair):
    return [n for n in pair.owners() if n not in DEAD]


def _watch(pair, seconds, until=None):
    """Poll both namespaces for ``seconds`` (or until ``until()``): every
    sample has at most one VIP owner among the live boxes; returns the samples."""
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        owners = _owners(pair)
        samples.append(tuple(owners))
        assert len(owners) <= 1, f"two VIP owners {owners} after {len(samples)} polls"
        if until is not None and until(owners):
            break
    return samples


def _epoch(pair, node):
    return pair.status(node)["resources"]["vip1"]["epoch"]


def test_wiped_state_dir_rejoins_without_split_brain(two_nodes_lab, tmp_path):
    lab = two_nodes_lab
    pair = Pair(lab, tmp_path, preempt=True)
    DEAD.clear()
    try:
        pair.start("a")
        pair.start("b")
        wait_for(lambda: pair.owners() == ["a"], 15, "a to own the VIP")
        e1 = _epoch(pair, "a")

        # the owner dies and comes back with nothing: no incarnation, no store
        pair.kill_box("a")
        DEAD.add("a")
        wait_for(lambda: _owners(pair) == ["b"], 5, "b to take over")
        e2 = _epoch(pair, "b")
        assert e2 > e1
        shutil.rmtree(tmp_path / "state-a")
        pair.revive("a")
        DEAD.discard("a")
        _watch(pair, 20, until=lambda o: o == ["a"])
        assert pair.owners() == ["a"], "a (preempt, priority 200) takes the VIP back"
        _watch(pair, 2.0)
        e3 = _epoch(pair, "a")
        assert e3 > e2, f"a claimed at epoch {e3}, not above b's {e2} (its store was wiped)"
        assert pair.status("b")["resources"]["vip1"]["owner"] == "a"
        assert client_pings(lab)

        # the standby dies and comes back wiped: it claims nothing
        pair.kill_box("b")
        DEAD.add("b")
        shutil.rmtree(tmp_path / "state-b")
        _watch(pair, 1.0)
        pair.revive("b")
        DEAD.discard("b")
        def b_hears_a():
            try:
                return pair.status("b")["peers"]["a"]["alive"]
            except RuntimeError:          # not answering yet
                return False
        samples = _watch(pair, 20, until=lambda o: b_hears_a())   # owners polled meanwhile
        assert b_hears_a(), "b never heard a"
        samples += _watch(pair, 3.0)
        assert set(samples) == {("a",)}
        assert _epoch(pair, "b") >= e3, "b learned the epoch from a's heartbeats"
    finally:
        for proc in pair.procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)
