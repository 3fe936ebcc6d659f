"""The dhcp4 service in a real node: relayed DORA on loopback, malformed input,
admin methods; and busybox udhcpc in a client namespace over a veth."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.dhcp.v4 import probe
from tests.support.cluster_lab import wait_for
from tests.support.node_process import ROOT, NodeProcess, free_port, twistd_command
from tests.support.require import require_binary

SUBNET = """
[[services.dhcp4.subnets]]
id = 1
subnet = "10.9.0.0/24"
pool = ["10.9.0.50", "10.9.0.59"]
routers = ["10.9.0.1"]
dns_servers = ["10.9.0.1"]
lease_time_s = 600
"""


@pytest.fixture
def node(tmp_path):
    port = free_port()
    n = NodeProcess(tmp_path, f"""
[services.dhcp4]
listen_address = "127.0.0.1"
port = {port}
{SUBNET}""")
    n.dhcp_port = port
    n.start()
    yield n
    n.kill()


def mac(i: int) -> bytes:
    return bytes([2, 0, 0, 0, 0, i])


def test_relayed_dora_release_and_admin(node):
    """A relayed client gets an address from the giaddr's subnet, keeps it on a second
    DORA, releases it; dhcp4.leases / lease / scopes / stats show it; release by RPC."""
    server = ("127.0.0.1", node.dhcp_port)
    first = probe.run(server, "10.9.0.1", mac(1), release=False, out=lambda *_: None)
    assert first is not None and str(first).startswith("10.9.0.5")
    again = probe.run(server, "10.9.0.1", mac(1), release=False, out=lambda *_: None)
    assert again == first, "the same client gets the same address back"
    other = probe.run(server, "10.9.0.1", mac(2), release=True, out=lambda *_: None)
    assert other is not None and other != first
    wait_for(lambda: node.rpc("dhcp4.lease", {"address": str(other)})["result"]["state"]
             == "released", 3, "the RELEASE to be applied")
    leases = node.rpc("dhcp4.leases", {"state": "bound"})["result"]["leases"]
    assert [lease["address"] for lease in leases] == [str(first)]
    assert leases[0]["hwaddr"] == "02:00:00:00:00:01"
    by_mac = node.rpc("dhcp4.lease", {"hwaddr": "02:00:00:00:00:01"})["result"]
    assert by_mac["address"] == str(first)
    scopes = node.rpc("dhcp4.scopes")["result"]["scopes"]
    assert scopes[0]["subnet"] == "10.9.0.0/24"
    assert node.rpc("dhcp4.release", {"address": str(first)})["result"]["state"] == "released"
    missing = node.rpc("dhcp4.lease", {"address": "10.9.0.99"})["error"]
    assert missing["code"] == -32040
    table = node.ctl("leases")
    assert table.returncode == 0 and str(first) in table.stdout


def test_unknown_subnet_and_exhaustion(node):
    """A relay from an unknown network gets no answer; the 10-address pool runs out
    and the 11th client gets nothing (counted), not a crash."""
    server = ("127.0.0.1", node.dhcp_port)
    with pytest.raises(socket.timeout):
        probe.run(server, "192.0.2.1", mac(9), release=False, out=lambda *_: None)
    got = [probe.run(server, "10.9.0.1", mac(10 + i), release=False, out=lambda *_: None)
           for i in range(10)]
    assert len(set(got)) == 10
    with pytest.raises(socket.timeout):
        probe.run(server, "10.9.0.1", mac(99), release=False, out=lambda *_: None)
    drops = node.rpc("dhcp4.stats")["result"]["packets"]
    assert drops.get("drop_no_subnet", 0) >= 1 and drops.get("drop_no_address", 0) >= 1


def test_malformed_packets_are_counted_drops(node):
    """Garbage, truncated and bad-option packets are dropped per reason; service still answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        good = probe.packet(1, mac(3), "10.9.0.1", 7)
        for data in (b"", b"x" * 10, good[:200], b"\x02" + good[1:],
                     good[:240] + b"\x35\x05\x01", os.urandom(600)):
            s.sendto(data, ("127.0.0.1", node.dhcp_port))
    time.sleep(0.3)
    drops = node.rpc("dhcp4.stats")["result"]["drops"]
    assert sum(drops.values()) >= 5, drops
    assert probe.run(("127.0.0.1", node.dhcp_port), "10.9.0.1", mac(3), release=False,
                     out=lambda *_: None) is not None
    metrics = subprocess.run(["curl", "-s", f"http://127.0.0.1:{node.port}/metrics"],
                             capture_output=True, text=True).stdout
    assert "appliance_dhcp4_dropped_total" in metrics
    commits = [line for line in metrics.splitlines()
               if line.startswith('appliance_store_events_total{backend="memory",event="commits"}')]
    assert commits and float(commits[0].split()[-1]) >= 1, "the ACKed leases were committed"
    assert "slow_commits" in metrics



def test_discovers_queued_while_the_box_was_stuck_are_shed_as_stale(node):
    """The node is frozen (SIGSTOP: a box busy or paused) while 30 DISCOVERs queue
    in its socket; after it resumes they are older than discover_max_age_ms
    (2 s): dropped and counted as stale, not answered late -- and a fresh
    client is served at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        os.kill(node.proc.pid, signal.SIGSTOP)
        try:
            for i in range(30):
                s.sendto(probe.packet(1, mac(100 + i), "10.9.0.1", 1000 + i),
                         ("127.0.0.1", node.dhcp_port))
            time.sleep(2.3)
        finally:
            os.kill(node.proc.pid, signal.SIGCONT)
    wait_for(lambda: node.rpc("dhcp4.stats")["result"]["drops"].get("stale") == 30, 5,
             "the 30 queued DISCOVERs to be shed")
    assert probe.run(("127.0.0.1", node.dhcp_port), "10.9.0.1", mac(4), release=False,
                     out=lambda *_: None) is not None
    packets = node.rpc("dhcp4.stats")["result"]["packets"]
    assert packets.get("in_DISCOVER") == 1, "only the fresh DISCOVER reached the handler"



def test_every_acked_lease_survives_kill_9(node):
    """Ten clients' REQUESTs sent at once (one journal job, one fsync for
    several leases); the node is killed (-9) the moment the last ACK arrives;
    after a restart every ACKed lease is there, with its client."""
    from services.dhcp.v4 import codec as C
    server = ("127.0.0.1", node.dhcp_port)
    macs = [mac(200 + i) for i in range(10)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        for i, m in enumerate(macs):
            s.sendto(probe.packet(C.DISCOVER, m, "10.9.0.1", 5000 + i), server)
        offers = {}
        while len(offers) < len(macs):
            reply = C.parse(s.recvfrom(2048)[0])
            if reply.message_type == C.OFFER:
                offers[bytes(reply.chaddr)] = reply
        for i, m in enumerate(macs):
            o = offers[m]
            s.sendto(probe.packet(C.REQUEST, m, "10.9.0.1", 6000 + i, o50=o.yiaddr.packed,
                                  o54=o.server_id.packed), server)
        acked = {}
        while len(acked) < len(macs):
            reply = C.parse(s.recvfrom(2048)[0])
            if reply.message_type == C.ACK:
                acked[str(reply.yiaddr)] = bytes(reply.chaddr).hex(":")
    node.kill()                                   # SIGKILL: no orderly flush
    node.start()
    leases = node.rpc("dhcp4.leases", {"state": "bound"})["result"]["leases"]
    assert {lease["address"]: lease["hwaddr"] for lease in leases} == acked


UDHCPC_SCRIPT = """#!/bin/sh
# udhcpc hook: record what we got, never touch the system's resolv.conf
case "$1" in
  bound|renew) echo "$1 $ip $subnet $router $lease $serverid" >> "{out}";
               ip addr flush dev "$interface"; ip addr add "$ip/24" dev "$interface" ;;
esac
exit 0
"""


def test_udhcpc_gets_renews_and_releases_on_a_veth(two_nodes_lab, tmp_path):
    """busybox udhcpc in the client namespace gets a lease from a node in namespace a
    (direct, broadcast), renews it with the same address, and releases it."""
    require_binary("busybox")
    lab = two_nodes_lab
    port_state = tmp_path / "state"
    cfg = tmp_path / "a.toml"
    cfg.write_text(f"""
[node]
id = "a"
state_dir = "{port_state}"

[admin]
listen = "tcp:8740:interface=127.0.0.1"
token_file = "{port_state}/admin.token"

[services.dhcp4]
interface = "eth0"

[[services.dhcp4.subnets]]
id = 7
subnet = "10.77.0.0/24"
pool = ["10.77.0.100", "10.77.0.109"]
routers = ["10.77.0.1"]
dns_servers = ["10.77.0.1"]
lease_time_s = 600
""")
    log = open(tmp_path / "a.log", "w")
    lab.popen("a", *twistd_command(), "-c", str(cfg), stdout=log, stderr=subprocess.STDOUT,
              env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(tmp_path))
    wait_for(lambda: "dhcp4 serving" in (tmp_path / "a.log").read_text(), 15, "dhcp4 to start")
    lab.run("client", "ip", "addr", "flush", "dev", "eth0")
    out = tmp_path / "udhcpc.out"
    script = tmp_path / "udhcpc.sh"
    script.write_text(UDHCPC_SCRIPT.format(out=out))
    script.chmod(0o755)
    client = lab.popen("client", "busybox", "udhcpc", "-i", "eth0", "-s", str(script), "-f",
                       "-t", "3", "-T", "2", text=True)
    wait_for(lambda: out.exists() and "bound" in out.read_text(), 15,
             "udhcpc to get a lease:\n" + (tmp_path / "a.log").read_text())
    first = out.read_text().split()
    assert first[0] == "bound" and first[1].startswith("10.77.0.10") and first[5] == "10.77.0.1"
    assert first[3] == "10.77.0.1" and first[4] == "600"
    address = first[1]

    def lease_state():
        res = lab.run("a", sys.executable, "-m", "appliance.admin.ctl", "--url",
                      "http://127.0.0.1:8740/rpc", "--token-file", str(port_state / "admin.token"),
                      "--json", "call", "dhcp4.lease", f'{{"address": "{address}"}}', check=False)
        return json.loads(res.stdout)["state"] if res.returncode == 0 else res.stderr

    assert lease_state() == "bound"
    client.send_signal(signal.SIGUSR1)            # renew (unicast REQUEST with ciaddr)
    wait_for(lambda: "renew" in out.read_text(), 10, "the renewal")
    assert out.read_text().split()[7] == address, "renewed on the same address"
    client.send_signal(signal.SIGUSR2)            # release
    wait_for(lambda: lease_state() == "released", 10, "the RELEASE")
    client.terminate()
    client.wait(timeout=10)
    assert Path(tmp_path / "a.log").read_text().count("Traceback") == 0
