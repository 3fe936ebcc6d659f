"""Heartbeats through a userspace delay shim: delay below the dead time never causes a
failover; delay above it is a suspected peer; back to normal when the delay goes."""

from __future__ import annotations

import pytest

from tests.support.cluster_lab import poll, wait_for
from tests.support.delay_shim import DelayShim
from tests.support.node_process import NodeProcess, free_port

# a reaches b only through the shim on 127.0.0.3; b reaches a directly.
ADDR = {"a": "127.0.0.1", "b": "127.0.0.2", "shim": "127.0.0.3"}


def body(me, peer_addr, hb_port, key) -> str:
    other = "b" if me == "a" else "a"
    return f"""
[cluster]
peers = [{{ id = "{other}", address = "{peer_addr}" }}]
bind_address = "{ADDR[me]}"
heartbeat_port = {hb_port}
heartbeat_interval_ms = 50
dead_after = 4
auth_key_file = "{key}"
"""


@pytest.fixture
def delayed_pair(tmp_path):
    key = tmp_path / "cluster.key"
    key.write_text("d" * 64)
    port = free_port()
    shim = DelayShim((ADDR["shim"], port), (ADDR["b"], port), delay_s=0.0).start()
    nodes = {}
    for me, peer_addr in (("a", ADDR["shim"]), ("b", ADDR["a"])):
        d = tmp_path / me
        d.mkdir()
        nodes[me] = NodeProcess(d, body(me, peer_addr, port, key), node_id=me)
    yield shim, nodes
    shim.stop()
    for n in nodes.values():
        n.kill()


def peer_alive(node, peer) -> bool:
    return node.rpc("cluster.status")["result"]["peers"][peer]["alive"]


def peer_status(node, peer) -> dict:
    return node.rpc("cluster.status")["result"]["peers"][peer]


def test_delay_below_dead_time_is_tolerated(delayed_pair):
    """150 ms of one-way delay (dead time 200 ms) keeps the peer alive throughout;
    a jump of the delay by more than the dead time (150 -> 600 ms: no beat for
    450 ms) makes it suspected; removing the delay brings it back.  (A steady delay
    is invisible to a heartbeat detector: only the gap when it grows is.)"""
    shim, nodes = delayed_pair
    nodes["a"].start()
    nodes["b"].start()
    wait_for(lambda: peer_alive(nodes["b"], "a"), 10, "b to hear a")
    shim.set_delay(0.15)
    assert not poll(lambda: not peer_alive(nodes["b"], "a"), 2.0, 0.05), \
        "a delay below dead_after x interval must not look like a death"
    assert peer_status(nodes["b"], "a")["suspected"] == 0
    shim.set_delay(0.6)
    wait_for(lambda: peer_status(nodes["b"], "a")["suspected"] >= 1, 3,
             "b to suspect a when the delay jumps by 450 ms")
    shim.set_delay(0.0)
    wait_for(lambda: peer_alive(nodes["b"], "a"), 3, "b to hear a again")
    assert shim.forwarded > 20
