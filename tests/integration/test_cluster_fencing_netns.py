"""pre_takeover fencing with two real nodes in network namespaces.

Node b has ``[cluster] pre_takeover`` = a script that fails (exit 1) until
the test creates a file (the "power switch" answering), then succeeds.
Killing the owner a (kill -9 + link down): b does not take the VIP while the
fence fails (logged, retried, shown in cluster.status), and takes it once
the fence succeeds; the script got the peer and the resource as arguments.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration.test_cluster_netns import ADDR, VIP, Pair, client_pings
from tests.support.cluster_lab import vip_pair_config, wait_for

pytestmark = pytest.mark.integration

FENCE = """#!/bin/sh
echo "$@ $APPLIANCE_PEER $APPLIANCE_RESOURCE $APPLIANCE_NODE" >> {dir}/fence.calls
if [ -e {dir}/switch-ok ]; then echo "powered off $1"; exit 0; fi
echo "power switch unreachable" >&2
exit 1
"""


class FencedPair(Pair):
    def config(self, node: str) -> Path:
        path = self.tmp / f"{node}.toml"
        text = vip_pair_config(node, self.tmp, ADDR, f"{VIP}/24", interval_ms=self.interval_ms,
                               preempt=self.preempt)
        if node == "b":
            text = text.replace("dead_after = 3\n", "dead_after = 3\npre_takeover = { command = "
                                f'["{self.tmp}/fence.sh", "--off"], timeout_s = 5 }}\n', 1)
        path.write_text(text)
        return path


def test_owner_death_waits_for_the_fence_then_moves(two_nodes_lab, tmp_path):
    lab = two_nodes_lab
    fence = tmp_path / "fence.sh"
    fence.write_text(FENCE.format(dir=tmp_path))
    fence.chmod(0o755)
    pair = FencedPair(lab, tmp_path, preempt=True)
    try:
        pair.start("a")
        pair.start("b")
        wait_for(lambda: pair.owners() == ["a"] and client_pings(lab), 20, "a to own the VIP")
        wait_for(lambda: pair.status("b")["peers"]["a"]["alive"], 10, "b to hear a")
        assert not (tmp_path / "fence.calls").exists(), "no fence while a lives"
        pair.kill_box("a")
        # the fence fails: no takeover, retried (1 s, then 2 s)
        wait_for(lambda: (tmp_path / "fence.calls").exists()
                 and len((tmp_path / "fence.calls").read_text().splitlines()) >= 2, 10,
                 "the failed fence to be retried")
        assert not pair.holds_vip("b"), "b took the VIP although the fence failed"
        st = pair.status("b")
        assert st["fencing"]["peers"]["a"]["state"] in ("failed", "running")
        assert st["fencing"]["fence_failures"] >= 1
        assert "power switch unreachable" in pair.log("b")
        assert "NOT taking over" in pair.log("b")
        (tmp_path / "switch-ok").touch()
        t = time.monotonic()
        wait_for(lambda: pair.holds_vip("b") and client_pings(lab), 15,
                 "b to take over once the fence succeeds")
        assert time.monotonic() - t < 10       # within the retry backoff (<= 4 s) + a ping
        calls = (tmp_path / "fence.calls").read_text().splitlines()
        assert calls[0] == "--off a vip1 a vip1 b", calls
        assert pair.status("b")["fencing"]["fences"] == 1
    finally:
        for proc in pair.procs.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except Exception:
                    proc.kill()
