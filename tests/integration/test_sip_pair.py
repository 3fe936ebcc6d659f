"""Two real nodes on loopback (127.0.0.1 / 127.0.0.2) with the TLS peer link, sip
replication in sync mode: every REGISTER sipp saw answered 200 by node a is stored on
node b when the 200 arrives; after kill -9 of a, b answers an INVITE for those users
with 302 to their contact.  (Not yet: the VIP moving, repeated failovers under load.)"""

from __future__ import annotations

import socket
import time

import pytest

from tests.integration.test_cluster_loopback import ADDR, cluster_body
from tests.support import sipp
from tests.support.cluster_lab import wait_for
from tests.support.node_process import NodeProcess, env_with_dropins, free_port
from tests.support.require import require_binary

pytestmark = pytest.mark.integration


def sip_body(me: str, other: str, port: int, extra: str = "", sip_extra: str = "") -> str:
    return f"""
[services.sip]
listen_address = "{ADDR[me]}"
port = {port}
domains = ["example.test"]
priority = {{ a = 200, b = 100 }}
{sip_extra}

[services.sip.replication]
peers = ["{other}"]
mode = "sync"
timeout_s = 2
""" + extra


@pytest.fixture
def sip_pair(tmp_path):
    nodes = make_pair(tmp_path)
    yield nodes
    for n in nodes.values():
        n.kill()


def make_pair(tmp_path, extra: str = "", sip_extra: str = ""):
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
                                + sip_body(me, other, sip_port, extra, sip_extra), node_id=me)
        nodes[me].sip_port = sip_port
    return nodes


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
    assert b.rpc("sip.stats")["result"]["role"] == "backup"
    early = invite(ADDR["b"], b.sip_port, "pair8")          # the backup redirects to a
    assert early.startswith("SIP/2.0 302") and f"@{ADDR['a']}:{b.sip_port}>" in early, early
    a.kill()
    wait_for(lambda: b.rpc("sip.stats")["result"]["role"] == "owner", 10, "b taking over")
    answer = invite(ADDR["b"], b.sip_port, "pair7")
    assert answer.startswith("SIP/2.0 302"), answer
    assert "<sip:pair7@127.0.0.1:" in answer


def _aors(node, prefix):
    rows = node.rpc("sip.bindings")["result"]["bindings"]
    return {row["aor"] for row in rows if row["aor"].startswith(prefix)}


def test_returning_backup_catches_up_while_sipp_registers(tmp_path):
    """b dies (-9) while a keeps registering; more than backlog_limit AORs are missed, so
    b gets a paged full resync when it returns -- while sipp keeps registering on a.
    Afterwards b holds exactly a's bindings and every 200 sipp saw is on b."""
    import threading
    nodes = make_pair(tmp_path, "backlog_limit = 150\npage = 100\nwindow = 2\n")
    a, b = nodes["a"].start(), nodes["b"].start()
    try:
        def link_up():
            return a.rpc("cluster.status")["result"]["peer_link"]["b"]["connected"]
        wait_for(link_up, 15, "the peer link")
        target = f"127.0.0.1:{a.sip_port}"
        r = sipp.run_sipp(tmp_path / "pre", sipp.register_only(prefix="pre"), target,
                          calls=200, rate=200)
        assert r.ok and r.successful == 200, (r.stdout, r.errors)
        b.kill()
        r = sipp.run_sipp(tmp_path / "away", sipp.register_only(prefix="away"), target,
                          calls=400, rate=200)
        assert r.ok and r.successful == 400, (r.stdout, r.errors)
        repl = a.rpc("sip.stats")["result"]["replication"]
        assert repl["full_resync_needed"]["b"] is True          # 400 missed > 150
        live = {}

        def load():
            live["r"] = sipp.run_sipp(tmp_path / "live", sipp.register_only(prefix="live"),
                                      target, calls=1200, rate=150)
        t = threading.Thread(target=load)
        t.start()
        time.sleep(1.5)
        b.start()                                  # returns while sipp registers
        t.join(60)
        r = live["r"]
        assert r.ok and r.successful == 1200, (r.stdout, r.errors)

        def caught_up():
            repl = a.rpc("sip.stats")["result"]["replication"]
            return (repl["backlog"]["b"] == 0 and not repl["full_resync_needed"]["b"]
                    and repl["full_resyncs"] >= 1)
        wait_for(caught_up, 20, "b caught up")
        for prefix, n in (("sip:pre", 200), ("sip:away", 400), ("sip:live", 1200)):
            on_a, on_b = _aors(a, prefix), _aors(b, prefix)
            assert len(on_a) == n and on_b == on_a, (prefix, len(on_a), len(on_b))
    finally:
        for n in nodes.values():
            n.kill()


def test_backlog_survives_primary_restart(tmp_path):
    """b down; a acknowledges 100 REGISTERs (b missed them), then a is killed -9 and
    restarted before b returns: the missed AORs were in a's store, so b gets them when it
    comes back (the old in-memory set died with a)."""
    nodes = make_pair(tmp_path)
    a, b = nodes["a"].start(), nodes["b"].start()
    try:
        wait_for(lambda: a.rpc("cluster.status")["result"]["peer_link"]["b"]["connected"],
                 15, "the peer link")
        target = f"127.0.0.1:{a.sip_port}"
        r = sipp.run_sipp(tmp_path / "pre", sipp.register_only(prefix="pre"), target,
                          calls=50, rate=100)
        assert r.ok and r.successful == 50, (r.stdout, r.errors)
        b.kill()
        r = sipp.run_sipp(tmp_path / "owed", sipp.register_only(prefix="owed"), target,
                          calls=100, rate=100)
        assert r.ok and r.successful == 100, (r.stdout, r.errors)
        a.kill()
        a.start()
        wait_for(lambda: a.rpc("sip.stats")["result"]["role"] == "owner", 10, "a owning again")
        assert a.rpc("sip.stats")["result"]["replication"]["missed"]["b"] == 100
        b.start()

        def caught_up():
            repl = a.rpc("sip.stats")["result"]["replication"]
            return repl["backlog"]["b"] == 0 and repl["delta_resyncs"] >= 1
        wait_for(caught_up, 20, "b caught up")
        assert _aors(b, "sip:owed") == _aors(a, "sip:owed") and len(_aors(a, "sip:owed")) == 100
    finally:
        for n in nodes.values():
            n.kill()


def test_returning_node_does_not_preempt_before_it_is_synced(tmp_path):
    """preempt = true, a preferred: a is killed, b takes over and acknowledges 300 new
    users (more than backlog_limit: a gets a paged full resync, slowed to >= 3 s by
    page = 10, pause_ms = 100).  a restarts: while b's resync runs a reports 'syncing'
    (unable), so b keeps the registrar; a takes it back only once it holds every binding
    (every sample where a owns it shows all of them), and then serves them."""
    nodes = make_pair(tmp_path, "backlog_limit = 50\npage = 10\npause_ms = 100\n",
                      "preempt = true")
    a, b = nodes["a"].start(), nodes["b"].start()
    try:
        wait_for(lambda: a.rpc("cluster.status")["result"]["peer_link"]["b"]["connected"],
                 15, "the peer link")
        wait_for(lambda: a.rpc("sip.stats")["result"]["role"] == "owner", 15, "a owning")
        r = sipp.run_sipp(tmp_path / "pre", sipp.register_only(prefix="pre"),
                          f"127.0.0.1:{a.sip_port}", calls=20, rate=100)
        assert r.ok and r.successful == 20, (r.stdout, r.errors)
        a.kill()
        wait_for(lambda: b.rpc("sip.stats")["result"]["role"] == "owner", 15, "b taking over")
        r = sipp.run_sipp(tmp_path / "away", sipp.register_only(prefix="away"),
                          f"{ADDR['b']}:{b.sip_port}", calls=300, rate=300)
        assert r.ok and r.successful == 300, (r.stdout, r.errors)
        assert b.rpc("sip.stats")["result"]["replication"]["full_resync_needed"]["a"] is True
        total = b.rpc("sip.stats")["result"]["bindings"]
        assert total >= 320
        a.start()
        samples = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = a.rpc("sip.stats")["result"]
            samples.append((st["role"], st["bindings"], (st.get("sync") or {}).get("syncing")))
            if st["role"] == "owner":
                break
            time.sleep(0.05)
        owning = [s for s in samples if s[0] == "owner"]
        assert owning, f"a never took the registrar back: {samples[-3:]}"
        early = [s for s in owning if s[1] < total]
        assert not early, (f"a owned the registrar holding {early[0][1]} of {total} bindings "
                           f"(before its resync finished)")
        assert any(s[2] for s in samples), "a never reported syncing"
        assert b.rpc("sip.stats")["result"]["replication"]["full_resyncs"] >= 1
        wait_for(lambda: b.rpc("sip.stats")["result"]["role"] == "backup", 10, "b backing up")
        answer = invite(ADDR["a"], a.sip_port, "away7")
        assert answer.startswith("SIP/2.0 302") and "<sip:away7@127.0.0.1:" in answer, answer
    finally:
        for n in nodes.values():
            n.kill()
