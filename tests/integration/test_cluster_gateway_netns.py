"""track_gateway with two real nodes in namespaces: the client's address is
the "gateway"; a loses it (nft drop between a and the client), flags
gateway_down and the VIP moves to b; healed, a takes it back (preempt)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_cluster_netns import ADDR, VIP, Pair, client_pings
from tests.support.cluster_lab import vip_pair_config, wait_for

pytestmark = pytest.mark.integration

GATEWAY = "10.77.0.10"


class GatewayPair(Pair):
    def config(self, node: str) -> Path:
        path = self.tmp / f"{node}.toml"
        text = vip_pair_config(node, self.tmp, ADDR, f"{VIP}/24", interval_ms=self.interval_ms,
                               preempt=self.preempt)
        text = text.replace("dead_after = 3\n", "dead_after = 3\ntrack_gateway = { address = "
                            f'"{GATEWAY}", interval_s = 0.3, fall = 2, rise = 2 }}\n', 1)
        path.write_text(text)
        return path


def test_gateway_loss_moves_the_vip_and_heal_brings_it_back(two_nodes_lab, tmp_path):
    lab = two_nodes_lab
    pair = GatewayPair(lab, tmp_path, preempt=True)
    try:
        pair.start("a")
        pair.start("b")
        wait_for(lambda: pair.owners() == ["a"] and client_pings(lab), 20, "a to own the VIP")
        wait_for(lambda: pair.status("a")["gateway"]["checks"] >= 2, 10, "a's gateway checks")
        assert pair.status("a")["gateway"]["down"] is False
        lab.drop_between("a", GATEWAY)
        wait_for(lambda: pair.owners() == ["b"], 10, "the VIP to move to b")
        wait_for(lambda: client_pings(lab), 5, "the client to reach the VIP on b")
        st = pair.status("a")
        assert st["gateway"]["down"] is True and "gateway_down" in st["health"]
        assert "gateway_down" in pair.log("a") or "unreachable" in pair.log("a")
        lab.undrop("a", GATEWAY)
        wait_for(lambda: pair.owners() == ["a"], 10, "a to take the VIP back")
        wait_for(lambda: client_pings(lab), 5, "the client to reach the VIP on a")
    finally:
        for proc in pair.procs.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except Exception:
                    proc.kill()
