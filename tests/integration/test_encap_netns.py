"""End to end in namespaces (en, dn1, dn2, esr, server): the EN gets an address,
pings the server through the tunnel, a TCP download completes while its primary DN
is killed (kill -9 + link down) during a 100 packets/s ping; pings resume through
the other DN; replayed and forged tunnel datagrams are dropped and counted; the
killed DN returns and the EN moves back.  The ESR's neighbour entry for the EN
address (the L2 announce mode) follows the DN serving it at every step."""

from __future__ import annotations

import json
import re
import sys
import time

from tests.support.encap_lab import SERVER, EncapLab
from tests.support.netns import Lab

pytest_plugins = ["tests.support.netns"]

SENDER = r"""
import socket, sys, time
total, rate = int(sys.argv[1]), float(sys.argv[2])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[3], 5001)); srv.listen(1)
print("ready", flush=True)
conn, _ = srv.accept()
chunk = bytes(range(256)) * 256          # 64 KiB
sent, t0 = 0, time.monotonic()
while sent < total:
    n = min(len(chunk), total - sent)
    conn.sendall(chunk[:n]); sent += n
    ahead = sent / rate - (time.monotonic() - t0)
    if ahead > 0:
        time.sleep(ahead)
conn.close()
print("sent", sent, flush=True)
"""

RECEIVER = r"""
import hashlib, json, socket, sys, time
s = socket.create_connection((sys.argv[1], 5001), timeout=30)
h, n, t0 = hashlib.sha256(), 0, time.monotonic()
while True:
    data = s.recv(65536)
    if not data:
        break
    h.update(data); n += len(data)
print(json.dumps({"bytes": n, "sha256": h.hexdigest(), "seconds": time.monotonic() - t0}))
"""

ATTACKER = r"""
import socket, struct, sys, time
target, port = sys.argv[1], 7400
raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
raw.bind(("eth0", 0)); raw.settimeout(5)
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    frame = raw.recv(65535)
    if frame[12:14] != b"\x08\x00" or frame[23] != 17:
        continue
    ihl = (frame[14] & 15) * 4
    ip = frame[14:14 + ihl]
    udp = frame[14 + ihl:]
    if socket.inet_ntoa(ip[16:20]) != target or struct.unpack("!H", udp[2:4])[0] != port:
        continue
    payload = udp[8:]
    if payload[:1] != b"\x04":
        continue
    break
else:
    sys.exit("no tunnel record seen")
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
time.sleep(0.05)
for _ in range(3):
    u.sendto(payload, (target, port))             # replays
forged = bytearray(payload)
forged[5] ^= 0x7f                                  # a far-future sequence number ...
forged[-1] ^= 1                                    # ... and a broken tag
u.sendto(bytes(forged), (target, port))
print("sent")
"""


def _ping_summary(out: str) -> tuple[int, int, list[int]]:
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    seqs = [int(x) for x in re.findall(r"icmp_seq=(\d+) ", out)]
    return int(m.group(1)), int(m.group(2)), seqs


def test_encap_failover_end_to_end(netns_lab: Lab, tmp_path):
    el = EncapLab(netns_lab, tmp_path).build()
    lab = netns_lab
    el.start_dn("dn1")
    el.start_dn("dn2")
    el.start_en()
    st = el.wait_en(lambda s: s.get("configured") and s.get("confirmed"), what="EN address")
    address, primary = st["address"], st["primary"]
    other = "dn2" if primary == "dn1" else "dn1"
    assert address.startswith("10.200.0." if primary == "dn1" else "10.200.1.")

    # through the tunnel: ping the server
    ping = lab.run("en", "ping", "-c", "3", "-i", "0.2", "-W", "2", SERVER, check=False)
    assert " 0% packet loss" in ping.stdout, ping.stdout + ping.stderr
    assert lab.neighbour("esr", address)[0] == lab.mac(primary)
    sessions = el.rpc(primary, "encap.sessions")
    ens = [s for s in sessions["sessions"] if s["en"] == "en1"]   # (the watchdog probes too)
    assert [s["address"] for s in ens] == [address]
    assert ens[0]["rx_packets"] >= 3

    # a paced download (8 MB at 4 MB/s) and a 100 packets/s ping across the kill
    total = 8 * 1024 * 1024
    sender = lab.popen(lab.ns_name("server"), sys.executable, "-c", SENDER, str(total),
                       str(4 * 1024 * 1024), SERVER)
    line = sender.stdout.readline().strip()
    assert line == b"ready", line + sender.stderr.read()
    receiver = lab.popen("en", sys.executable, "-c", RECEIVER, SERVER)
    pinger = lab.popen("en", "ping", "-i", "0.01", "-c", "400", "-W", "1", SERVER)
    time.sleep(1.0)
    el.kill_dn(primary)
    out, err = pinger.communicate(timeout=30)
    sent, received, seqs = _ping_summary(out.decode())
    assert sent == 400
    assert seqs and max(seqs) >= 395, "pings did not resume"
    assert received >= sent - 100, f"{sent - received} of {sent} lost at 100 packets/s"
    result, _ = receiver.communicate(timeout=60)
    got = json.loads(result.decode().strip().splitlines()[-1])
    import hashlib
    expect = hashlib.sha256((bytes(range(256)) * 256 * (total // 65536 + 1))[:total]).hexdigest()
    assert got["bytes"] == total and got["sha256"] == expect

    st = el.en_status()
    assert st["primary"] == other and st["address"] == address
    assert st["stats"]["failovers"] >= 1
    assert lab.neighbour("esr", address)[0] == lab.mac(other)
    stats = el.rpc(other, "encap.stats")
    assert stats["stats"]["handoffs"] >= 1 and stats["stats"]["route_injections"] >= 1
    wd = stats["watchdog"]        # its probe session answered all along: healthy, no restart
    assert wd["healthy"] and wd["restarts"] == 0, wd
    assert f"{address}/32" in el.rpc(other, "encap.sessions")["routes"]
    entry = el.rpc(other, "encap.mappings")["entries"][address]
    assert entry["dn"] == other and entry["reason"] in ("keepalive_timeout", "probe_timeout",
                                                        "first_data", "icmp_unreachable")

    # replayed and forged tunnel datagrams from the EN's namespace
    attack = lab.run("en", sys.executable, "-c", ATTACKER, "10.99.0." + other[-1], check=False)
    assert attack.returncode == 0, attack.stderr
    time.sleep(0.3)
    drops = el.rpc(other, "encap.stats")["drops"]
    assert drops.get("replay", 0) >= 2, drops
    assert drops.get("forged", 0) >= 1, drops
    ping = lab.run("en", "ping", "-c", "3", "-i", "0.2", "-W", "2", SERVER, check=False)
    assert " 0% packet loss" in ping.stdout, "the session survived the attack"

    # the killed DN returns: the EN moves back (soft handoff), the other DN withdraws its
    # route; the echo stream goes on across the move (the bench counts what it loses:
    # usually nothing, but a DN process starting on this busy box can cost a few)
    pinger = lab.popen("en", "ping", "-i", "0.01", "-c", "400", "-W", "1", SERVER)
    time.sleep(0.5)
    el.revive_dn(primary)
    el.wait_en(lambda s: s.get("primary") == primary and s.get("confirmed"), timeout=20,
               what="EN back on its home DN")
    out, _ = pinger.communicate(timeout=30)
    sent, received, _ = _ping_summary(out.decode())
    assert sent - received < 100, (f"{sent - received} echoes lost moving back home",
                                  el.en_status()["events"], el.rpc(primary, "encap.stats"),
                                  el.rpc(other, "encap.stats"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        routes = el.rpc(other, "encap.sessions")["routes"]
        if not routes and lab.neighbour("esr", address)[0] == lab.mac(primary):
            break
        time.sleep(0.2)
    assert routes == []
    assert lab.neighbour("esr", address)[0] == lab.mac(primary)
    ping = lab.run("en", "ping", "-c", "3", "-i", "0.2", "-W", "2", SERVER, check=False)
    assert " 0% packet loss" in ping.stdout, ping.stdout


def test_cluster_declares_the_primary_dead_before_the_en_notices(netns_lab: Lab, tmp_path):
    """dn1 and dn2 are cluster peers (heartbeats every 100 ms, dead after 3): when dn1
    dies, dn2 owns the slice resource of dn1's subnet it backs, claims and routes the
    whole slice and tells the EN primary_down -- the EN (keepalives 200 ms x 10, no
    faster probing while active, so it would wait 2 s) switches on that notice; when dn1
    returns the slice goes back."""
    el = EncapLab(netns_lab, tmp_path, keepalive_ms=200, dead_after=10, active_keepalive_ms=0,
                  cluster=True).build()
    lab = netns_lab
    el.start_dn("dn1")
    el.start_dn("dn2")
    time.sleep(1.0)                       # the peers see each other before the EN comes
    el.start_en()
    st = el.wait_en(lambda s: s.get("configured") and s.get("confirmed") and
                    s["links"]["dn2"]["state"] == "up", what="EN address")
    primary = st["primary"]
    other = "dn2" if primary == "dn1" else "dn1"
    address = st["address"]
    resources = el.rpc(other, "cluster.status")["resources"]
    mine = [r for r in resources if r.startswith(f"encap:{primary}:")]
    assert mine and all(resources[r]["owner"] == primary for r in mine), resources
    lab.run("en", "ping", "-c", "2", "-W", "2", SERVER, check=False)

    pinger = lab.popen("en", "ping", "-i", "0.01", "-c", "250", "-W", "1", SERVER)
    time.sleep(1.0)
    el.kill_dn(primary)
    out, _ = pinger.communicate(timeout=30)
    sent, received, seqs = _ping_summary(out.decode())
    st = el.en_status()
    switches = [e for e in st["events"] if e["what"] == "switch"]
    assert switches and switches[-1]["reason"] == "primary_down", st["events"]
    assert st["primary"] == other
    assert sent - received < 150, f"{sent - received} lost: the 2 s EN timeout decided"
    taken = el.rpc(other, "encap.sessions")["slices_taken"]
    assert taken and all(t.startswith("10.200.") for t in taken)
    assert lab.neighbour("esr", address)[0] == lab.mac(other)

    el.revive_dn(primary)
    el.wait_en(lambda s: s.get("primary") == primary and s.get("confirmed"), timeout=25,
               what="EN back home")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and el.rpc(other, "encap.sessions")["slices_taken"]:
        time.sleep(0.2)
    assert el.rpc(other, "encap.sessions")["slices_taken"] == []


def test_watchdog_restarts_a_dn_whose_tun_device_is_gone(netns_lab: Lab, tmp_path):
    """Someone deletes the primary DN's TUN device: its writes fail, the watchdog
    declares the DN unhealthy and restarts the service (new TUN, new sockets); the EN
    is served again (meanwhile by the other DN, then back home)."""
    el = EncapLab(netns_lab, tmp_path).build()
    lab = netns_lab
    el.start_dn("dn1")
    el.start_dn("dn2")
    el.start_en()
    st = el.wait_en(lambda s: s.get("configured") and s.get("confirmed"), what="EN address")
    primary = st["primary"]
    lab.run(primary, "ip", "link", "del", "encap0")
    pinger = lab.popen("en", "ping", "-i", "0.05", "-c", "300", "-W", "1", SERVER)  # TUN writes
    deadline = time.monotonic() + 20
    wd = {}
    while time.monotonic() < deadline:
        time.sleep(0.5)
        wd = el.rpc(primary, "encap.stats").get("watchdog", {})
        if wd.get("restarts"):
            break
    pinger.terminate()
    assert wd.get("restarts", 0) >= 1, wd
    assert any("tun_" in r for h in wd["history"] for r in h["reasons"]), wd
    assert "encap0" in lab.run(primary, "ip", "link", "show", "encap0").stdout
    el.wait_en(lambda s: s.get("primary") == primary and s.get("confirmed"), timeout=20,
               what="EN served by its restarted home DN")
    # served again: a clean round of pings within a few seconds (the first echo
    # after the restart can wait on route/neighbour set-up on a busy box)
    deadline = time.monotonic() + 15
    while True:
        ping = lab.run("en", "ping", "-c", "3", "-i", "0.2", "-W", "2", SERVER, check=False)
        if " 0% packet loss" in ping.stdout or time.monotonic() > deadline:
            break
    assert " 0% packet loss" in ping.stdout, ping.stdout
