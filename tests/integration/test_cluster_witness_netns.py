"""A witness in its own namespace: a partition between the two nodes never gives two
VIP owners (polled in both namespaces every 50 ms), and the VIP answers throughout.

Nodes a (10.77.0.1), b (10.77.0.2), witness w (10.77.0.3), client (10.77.0.10).
``CLUSTER_PARTITION_S`` sets the partition length (8 s in CI, 30 s for the bench)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.integration.test_cluster_netns import ADDR, VIP, Pair, client_pings
from tests.support.cluster_lab import vip_pair_config, wait_for, witness_config
from tests.support.node_process import ROOT, twistd_command

W_ADDR = "10.77.0.3"
SECONDS = float(os.environ.get("CLUSTER_PARTITION_S", "8"))


class WitnessPair(Pair):
    def config(self, node: str):
        path = self.tmp / f"{node}.toml"
        if node == "w":
            path.write_text(witness_config("w", self.tmp, W_ADDR, ADDR))
        else:
            path.write_text(vip_pair_config(node, self.tmp, ADDR, f"{VIP}/24",
                                            preempt=self.preempt, witness=("w", W_ADDR)))
        return path

    def start(self, node: str):
        log = open(self.tmp / f"{node}.log", "a")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.procs[node] = self.lab.popen(node, *twistd_command(), "-c", str(self.config(node)),
                                          stdout=log, stderr=subprocess.STDOUT, env=env,
                                          cwd=str(self.tmp))


@pytest.fixture
def wpair(two_nodes_lab, tmp_path):
    two_nodes_lab.add_node("w", f"{W_ADDR}/24")
    p = WitnessPair(two_nodes_lab, tmp_path, preempt=True)
    yield p
    for proc in p.procs.values():
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_partition_with_witness_never_two_owners(two_nodes_lab, wpair):
    """Cut a<->b (both still reach the witness): one VIP owner at every poll, during the
    partition and after the heal; the owner keeps answering the client."""
    lab = two_nodes_lab
    for node in ("w", "a", "b"):
        wpair.start(node)
    wait_for(lambda: wpair.owners() == ["a"], 20, "a to own the VIP\n" + wpair.log("a")[-2000:])
    wait_for(lambda: wpair.status("a")["quorum"]["has"], 5, "a to have quorum")
    lab.drop_between("a", ADDR["b"])
    polls, doubles, owners_seen = 0, 0, set()
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        owners = wpair.owners()
        polls += 1
        doubles += len(owners) > 1
        owners_seen.update(owners)
        time.sleep(0.05)
    assert client_pings(lab), "the witness-backed side keeps serving"
    lab.undrop("a", ADDR["b"])
    for _ in range(40):
        owners = wpair.owners()
        polls += 1
        doubles += len(owners) > 1
        time.sleep(0.05)
    print(f"\npartition {SECONDS:g}s with witness: {polls} polls, {doubles} with two owners, "
          f"owners seen {sorted(owners_seen)}")
    assert doubles == 0
    wait_for(lambda: wpair.owners() == ["a"] and client_pings(lab), 5, "one owner after heal")


def test_owner_death_with_witness_hands_over(two_nodes_lab, wpair):
    """kill -9 + link down of the owner: b (now backed by the witness) takes over and
    answers the client; the takeover waits for the witness's vote (about
    dead_after + 2 intervals)."""
    lab = two_nodes_lab
    for node in ("w", "a", "b"):
        wpair.start(node)
    wait_for(lambda: wpair.owners() == ["a"], 20, "a to own the VIP")
    t0 = time.monotonic()
    wpair.kill_box("a")
    wait_for(lambda: wpair.holds_vip("b") and client_pings(lab), 5, "b to take over")
    print(f"\ntakeover with witness: {time.monotonic() - t0:.2f}s")
