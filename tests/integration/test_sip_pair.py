"""Two real nodes on loopback (127.0.0.1 / 127.0.0.2) with the TLS peer link, sip
replication in sync mode: every REGISTER sipp saw answered 200 by node a is stored on
node b when the 200 arrives; after kill -9 of a, b answers an INVITE for those users
with 302 to their contact.  (Not yet: the VIP moving, repeated failovers under load.)"""

from __future__ import annotations

import socket

import pytest

from tests.integration.test_cluster_loopback import ADDR, cluster_body
from tests.support import sipp
from tests.support.cluster_lab import wait_for
from tests.support.node_process import NodeProcess, env_with_dropins, free_port
from tests.support.require import require_binary

pytestmark = pytest.mark.integration


def sip_body(me: str, other: str, port: int) -> str:
    return f"""
[services.sip]
listen_address = "{ADDR[me]}"
port = {port}
domains = ["example.test"]

[services.sip.replication]
peers = ["{other}"]
mode = "sync"
timeout_s = 2
"""


@pytest.fixture
def sip_pair(tmp_path):
    import subprocess
    import sys
    require_binary("sipp")
    keys = tmp_path / "keys"
    out = subprocess.run([sys.executable, "-m", "appliance.cluster.keys", str(keys),
                          "--node", "a=127.0.0.1", "--node", "b=127.0.0.2"],
                         capture_output=True, text=True, env=env_with_dropins())
    assert out.returncode == 0, out.stderr
    hb, link, sip_port = free_port(), free_port(), free_port()
    nodes = {}
    for me, other in (("a", "b"), ("b", "a")):
        d = tmp_path / me
        d.mkdir()
        nodes[me] = NodeProcess(d, cluster_body(me, other, keys, hb, link)
                                + sip_body(me, other, sip_port), node_id=me)
        nodes[me].sip_port = sip_port
    yield nodes
    for n in nodes.values():
        n.kill()


def invite(address: str, port: int, user: str) -> str:
    data = (f"INVITE sip:{user}@example.test SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKpair{user}\r\n"
            f"From: <sip:caller@example.test>;tag=1\r\nTo: <sip:{user}@example.test>\r\n"
            f"Call-ID: pair-{user}\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n"
            f"Content-Length: 0\r\n\r\n").encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        s.sendto(data, (address, port))
        return s.recv(65535).decode()


def test_sync_replication_then_kill_primary(sip_pair, tmp_path):
    """200 OKs counted by sipp == bindings found on the backup; the backup redirects
    after the primary is killed."""
    a, b = sip_pair["a"].start(), sip_pair["b"].start()

    def link_up():
        sa = a.rpc("cluster.status")["result"]
        return sa["peer_link"]["b"]["connected"]
    wait_for(link_up, 15, "the peer link")
    calls = 200
    r = sipp.run_sipp(tmp_path / "load", sipp.register_only(prefix="pair"),
                      f"127.0.0.1:{a.sip_port}", calls=calls, rate=100)
    assert r.ok and r.successful == calls, (r.stdout, r.errors)
    # sync: each 200 left a only after b stored the binding -- no waiting here
    rows = b.rpc("sip.bindings")["result"]["bindings"]
    on_b = {row["aor"] for row in rows if row["aor"].startswith("sip:pair")}
    assert len(on_b) == calls, f"backup has {len(on_b)} of {calls} acknowledged bindings"
    repl = a.rpc("sip.stats")["result"]["replication"]
    assert repl["acked"] >= calls and repl["timeouts"] == 0
    a.kill()
    answer = invite(ADDR["b"], b.sip_port, "pair7")
    assert answer.startswith("SIP/2.0 302"), answer
    assert "<sip:pair7@127.0.0.1:" in answer
