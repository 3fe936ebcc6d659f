"""Two heartbeat paths between two real nodes in namespaces: eth0 on the lab
bridge (10.77.0.x) and a direct veth pair eth1 (10.78.0.x); each node lists the
other's second address in ``addresses``.  One path down: no suspicion and one
VIP owner throughout (polled in both namespaces); both down: takeover."""

from __future__ import annotations

import time

from tests.integration.test_cluster_netns import ADDR, Pair
from tests.support.cluster_lab import wait_for

ADDR2 = {"a": "10.78.0.1", "b": "10.78.0.2"}


class TwoPathPair(Pair):
    def config(self, node):
        path = super().config(node)
        peer = "b" if node == "a" else "a"
        text = path.read_text()
        text = text.replace(f'peers = [{{ id = "{peer}", address = "{ADDR[peer]}" }}]',
                            f'peers = [{{ id = "{peer}", address = "{ADDR[peer]}", '
                            f'addresses = ["{ADDR2[peer]}"] }}]')
        # receive on both interfaces
        text = text.replace(f'bind_address = "{ADDR[node]}"\n', "")
        assert "addresses" in text and "bind_address" not in text
        path.write_text(text)
        return path


def _second_link(lab):
    a, b = lab.nodes["a"].ns, lab.nodes["b"].ns
    lab.host("ip", "-n", a, "link", "add", "eth1", "type", "veth", "peer", "name", "eth1",
             "netns", b)
    for node, ns in (("a", a), ("b", b)):
        lab.host("ip", "-n", ns, "addr", "add", f"{ADDR2[node]}/24", "dev", "eth1")
        lab.host("ip", "-n", ns, "link", "set", "eth1", "up")


def test_one_path_down_no_suspicion_both_down_takeover(two_nodes_lab, tmp_path):
    lab = two_nodes_lab
    _second_link(lab)
    pair = TwoPathPair(lab, tmp_path, preempt=True)
    try:
        pair.start("a")
        pair.start("b")
        wait_for(lambda: pair.owners() == ["a"], 15, "a to own the VIP")
        wait_for(lambda: all(x["last_seen_ms"] is not None and x["last_seen_ms"] < 500
                             for x in pair.status("b")["peers"]["a"]["paths"].values()),
                 5, "beats on both paths")
        suspected = pair.status("b")["peers"]["a"]["suspected"]

        lab.link_down("a", "eth1")               # the direct path breaks
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            assert pair.owners() == ["a"], "one path down must not move the VIP"
            time.sleep(0.05)
        st = pair.status("b")["peers"]["a"]
        assert st["alive"] and st["suspected"] == suspected
        assert st["paths"][ADDR2["a"]]["last_seen_ms"] >= 2500      # that path is silent
        assert st["paths"][ADDR["a"]]["last_seen_ms"] < 500

        lab.link_down("a", "eth0")               # now every path is down
        wait_for(lambda: pair.holds_vip("b"), 5, "b to take over when all paths are silent")
        assert pair.status("b")["peers"]["a"]["suspected"] == suspected + 1
    finally:
        for proc in pair.procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)
