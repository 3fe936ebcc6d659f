"""Two real twistd nodes in namespaces on Redis owner leases (``[cluster.witness]
redis_lease = true``): a partition between the nodes (both still reach Redis)
never gives two VIP owners, polled in both namespaces every 50 ms; the lease
holder keeps answering the client.  The same partition without leases gives two
owners (the control, as before).

Redis runs in the root namespace on a Unix socket (a path: reachable from every
namespace without routing).  ``CLUSTER_PARTITION_S`` sets the partition length
(5 s in CI)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.integration.test_cluster_netns import ADDR, VIP, Pair, client_pings
from tests.support.cluster_lab import vip_pair_config, wait_for
from tests.support.node_process import ROOT, twistd_command
from tests.support.require import require_binary

SECONDS = float(os.environ.get("CLUSTER_PARTITION_S", "5"))


class LeasePair(Pair):
    def __init__(self, lab, tmp, sock: str | None):
        super().__init__(lab, tmp, preempt=True)
        self.sock = sock

    def config(self, node: str):
        path = self.tmp / f"{node}.toml"
        text = vip_pair_config(node, self.tmp, ADDR, f"{VIP}/24", preempt=True)
        if self.sock is not None:
            text = text.replace("[[vip]]", "[cluster.witness]\nredis_lease = true\n\n[[vip]]", 1)
            text += (f'\n[store]\nbackend = "redis"\nurl = "unix://{self.sock}?db=0"\n'
                     f'namespace = "lease-{self.tmp.name}"\n')
        path.write_text(text)
        return path

    def start(self, node: str):
        log = open(self.tmp / f"{node}.log", "a")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.procs[node] = self.lab.popen(node, *twistd_command(), "-c", str(self.config(node)),
                                          stdout=log, stderr=subprocess.STDOUT, env=env,
                                          cwd=str(self.tmp))

    def stop_all(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()


@pytest.fixture
def unix_redis(tmp_path):
    require_binary("redis-server")
    from tests.support.redis_server import RedisServer
    sock = tmp_path / "redis.sock"
    server = RedisServer(persistence="none",
                         extra_config=f"unixsocket {sock}\nunixsocketperm 700").start()
    try:
        yield str(sock)
    finally:
        server.stop()


def _partition_polls(lab, pair) -> tuple[int, int, int, set]:
    lab.drop_between("a", ADDR["b"])
    polls, doubles, none, seen = 0, 0, 0, set()
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        owners = pair.owners()
        polls += 1
        doubles += len(owners) > 1
        none += not owners
        seen.update(owners)
        time.sleep(0.05)
    return polls, doubles, none, seen


def test_partition_with_redis_leases_never_two_owners(two_nodes_lab, unix_redis, tmp_path):
    lab = two_nodes_lab
    pair = LeasePair(lab, tmp_path, unix_redis)
    try:
        pair.start("a")
        pair.start("b")
        wait_for(lambda: pair.owners() == ["a"] and client_pings(lab), 20,
                 "a to own the VIP\n" + pair.log("a")[-2000:])
        wait_for(lambda: pair.status("a")["quorum"].get("lease") is not None, 5,
                 "the lease in a's status")
        polls, doubles, none, seen = _partition_polls(lab, pair)
        assert not pair.status("b")["peers"]["a"]["alive"], "b no longer hears a"
        assert client_pings(lab), "the lease holder keeps serving"
        lab.undrop("a", ADDR["b"])
        for _ in range(40):
            owners = pair.owners()
            polls += 1
            doubles += len(owners) > 1
            time.sleep(0.05)
        print(f"\npartition {SECONDS:g}s with Redis leases: {polls} polls, {doubles} with two "
              f"owners, {none} with none, owners seen {sorted(seen)}")
        assert doubles == 0 and none == 0
        assert seen == {"a"}, "the holder keeps its lease: no move at all"
        wait_for(lambda: pair.owners() == ["a"] and client_pings(lab), 5, "one owner after heal")
    finally:
        pair.stop_all()


def test_partition_without_leases_has_two_owners(two_nodes_lab, tmp_path):
    """The control: the same partition, no lease: both own (2 nodes, no witness)."""
    lab = two_nodes_lab
    pair = LeasePair(lab, tmp_path, None)
    try:
        pair.start("a")
        pair.start("b")
        wait_for(lambda: pair.owners() == ["a"], 20, "a to own the VIP")
        lab.drop_between("a", ADDR["b"])
        wait_for(lambda: pair.owners() == ["a", "b"], 5, "both to own (no lease)")
        lab.undrop("a", ADDR["b"])
        wait_for(lambda: pair.owners() == ["a"], 5, "one owner after heal")
    finally:
        pair.stop_all()
