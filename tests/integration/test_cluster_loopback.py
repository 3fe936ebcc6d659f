"""Two real nodes on loopback (127.0.0.1 / 127.0.0.2) with keys from appliance-keys:
heartbeats, the TLS peer link, partner-down refusal, maintenance, orderly handover."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.cluster_lab import wait_for
from tests.support.node_process import NodeProcess, env_with_dropins, free_port

ADDR = {"a": "127.0.0.1", "b": "127.0.0.2"}


def cluster_body(me: str, other: str, keys, hb_port: int, link_port: int) -> str:
    return f"""
[cluster]
peers = [{{ id = "{other}", address = "{ADDR[other]}" }}]
bind_address = "{ADDR[me]}"
heartbeat_port = {hb_port}
heartbeat_interval_ms = 50
dead_after = 4
auth_key_file = "{keys}/cluster.key"
peer_link = "ssl:{link_port}"
tls = {{ cert = "{keys}/{me}.pem", key = "{keys}/{me}.key", ca = "{keys}/ca.pem" }}
auto_partner_down_s = 0
"""


@pytest.fixture
def pair(tmp_path):
    keys = tmp_path / "keys"
    out = subprocess.run([sys.executable, "-m", "appliance.cluster.keys", str(keys),
                          "--node", "a=127.0.0.1", "--node", "b=127.0.0.2"],
                         capture_output=True, text=True, env=env_with_dropins())
    assert out.returncode == 0, out.stderr
    assert (keys / "cluster.key").stat().st_mode & 0o777 == 0o600
    assert (keys / "a.key").stat().st_mode & 0o777 == 0o600
    hb, link = free_port(), free_port()
    nodes = {}
    for me, other in (("a", "b"), ("b", "a")):
        d = tmp_path / me
        d.mkdir()
        nodes[me] = NodeProcess(d, cluster_body(me, other, keys, hb, link), node_id=me)
    yield nodes
    for n in nodes.values():
        n.kill()


def test_heartbeats_and_peer_link_up(pair):
    """Both nodes see each other alive and the mutual-TLS peer link connects."""
    pair["a"].start()
    pair["b"].start()

    def both_up():
        sa = pair["a"].rpc("cluster.status")["result"]
        sb = pair["b"].rpc("cluster.status")["result"]
        return (sa["peers"]["b"]["alive"] and sb["peers"]["a"]["alive"]
                and sa["peer_link"]["b"]["connected"] and sb["peer_link"]["a"]["connected"])

    wait_for(both_up, 10, "heartbeats and the peer link")
    status = pair["a"].rpc("cluster.status")["result"]
    assert status["drops"] == {} or sum(status["drops"].values()) == 0
    assert abs(status["peers"]["b"]["skew_s"]) < 1.0
    table = pair["a"].ctl("cluster")
    assert table.returncode == 0 and "PEER" in table.stdout and "yes" in table.stdout


def test_operator_commands(pair):
    """partner-down of a live peer is refused; unknown resources give a clear error;
    maintenance is reflected in the peer's view."""
    pair["a"].start()
    pair["b"].start()
    wait_for(lambda: pair["a"].rpc("cluster.status")["result"]["peers"]["b"]["alive"], 10, "b alive")
    refused = pair["a"].ctl("partner-down", "b")
    assert refused.returncode == 1
    assert "peer b is alive" in refused.stderr
    unknown = pair["a"].ctl("promote", "nope")
    assert unknown.returncode == 1 and "unknown resource 'nope'" in unknown.stderr
    assert pair["a"].ctl("maintenance", "on").returncode == 0
    wait_for(lambda: "maintenance" in pair["b"].rpc("cluster.status")["result"]["peers"]["a"]["health"],
             5, "b to see a in maintenance")
    # maintenance survives a restart (kill -9 and start again): kept in the state dir
    mark = pair["a"].state_dir / "cluster.maintenance"
    assert mark.exists()
    pair["a"].kill()
    pair["a"].start()
    assert pair["a"].rpc("cluster.status")["result"]["maintenance"] is True
    assert "starts in MAINTENANCE" in pair["a"].output()
    wait_for(lambda: "maintenance" in pair["b"].rpc("cluster.status")["result"]["peers"]["a"]["health"],
             10, "b to see the restarted a in maintenance")
    assert pair["a"].ctl("maintenance", "off").returncode == 0
    assert not mark.exists()
    assert pair["a"].rpc("cluster.status")["result"]["maintenance"] is False


def test_peer_death_detected(pair):
    """kill -9 of one node: the other marks it dead within a second."""
    pair["a"].start()
    pair["b"].start()
    wait_for(lambda: pair["a"].rpc("cluster.status")["result"]["peers"]["b"]["alive"], 10, "b alive")
    pair["b"].kill()
    wait_for(lambda: not pair["a"].rpc("cluster.status")["result"]["peers"]["b"]["alive"], 1.0,
             "a to suspect b")
    assert "peer b suspected dead" in pair["a"].output()
