"""Packet loss between two real nodes in namespaces (nft ``numgen random``; no netem):
no spurious takeover at dead_after = 3 with 100 ms heartbeats.

The standby (b) drops a share of what it exchanges with the owner (a), both ways
or one way, for ``CLUSTER_LOSS_S`` seconds per level (15 s in CI; set it to 180+
for the long runs).  Spurious takeovers are counted from b's own numbers: every
suspicion of a (``peers.a.suspected``) and every ownership change of b
(``stats.role_changes``); the VIP must stay on a throughout (polled).  With 3 beats
per interval a false suspicion needs 9 lost in a row: at 20 % about one a day."""

from __future__ import annotations

import os
import time

import pytest

from tests.integration.test_cluster_netns import ADDR, Pair  # noqa: F401 (fixture below)
from tests.support.cluster_lab import wait_for

SECONDS = float(os.environ.get("CLUSTER_LOSS_S", "15"))


@pytest.fixture
def pair(two_nodes_lab, tmp_path):
    p = Pair(two_nodes_lab, tmp_path, preempt=True)
    yield p
    for proc in p.procs.values():
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


@pytest.mark.parametrize("percent,direction", [(10, "both"), (20, "both"), (20, "in")]
                         + ([(5, "both")] if SECONDS > 60 else []))
def test_loss_causes_no_spurious_takeover(two_nodes_lab, pair, percent, direction):
    """At 5/10/20 % loss (both ways, or only a->b) b never suspects a and never owns."""
    lab = two_nodes_lab
    pair.start("a")
    pair.start("b")
    wait_for(lambda: pair.owners() == ["a"], 15, "a to own the VIP")
    wait_for(lambda: pair.status("b")["peers"]["a"]["alive"], 5, "b to hear a")
    before = pair.status("b")
    lab.drop_between("b", ADDR["a"], percent=percent, direction=direction)
    owners_seen = set()
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        owners_seen.update(pair.owners())
        time.sleep(0.2)
    dropped = lab.dropped("b", ADDR["a"])
    after = pair.status("b")
    late = pair.status("a")["heartbeat"]["late_beats"]
    lab.undrop("b", ADDR["a"])
    pa, pb = after["peers"]["a"], before["peers"]["a"]
    suspicions = pa["suspected"] - pb["suspected"]
    takeovers = after["stats"]["role_changes"] - before["stats"]["role_changes"]
    got, lost = pa["received"] - pb["received"], pa["lost"] - pb["lost"]
    # The share of a's beats b lost in this window, from the exact sequence-gap
    # counts.  (The test used to bound the smoothed figure, loss_ewma, alpha 0.01:
    # its standard deviation at 10 % loss is ~2.1 points, so it ended below the
    # 5 % bound in ~0.5 % of 15 s runs -- 27 of 5,000 simulated runs of the
    # detector's update, 0 of 5,000 for the window's counts, whose deviation is
    # ~1.4 points at 450 beats: the likely cause of the one CI rerun of
    # [10-both]; same bounds, a less noisy estimate of the same quantity.)
    share = lost / (got + lost) if got + lost else 0.0
    saw = (f"{percent}% {direction}: {SECONDS:g}s, {dropped} packets dropped by nft; b got "
           f"{got} of a's beats and lost {lost} (share {share:.1%}, smoothed loss "
           f"{pa['loss']:.1%}, jitter {pa['jitter_ms']} ms), suspicions {suspicions}, "
           f"takeovers {takeovers}, VIP owners seen {sorted(owners_seen)}, a's late beats "
           f"{late} (a stalled sender is silence, not loss)")
    print("\n" + saw)
    assert dropped > 0, saw
    assert suspicions == 0 and takeovers == 0, saw
    assert owners_seen == {"a"}, saw
    assert percent / 200 < share < percent / 50, saw
