"""Three real nodes on loopback (127.0.0.1/.2/.3) with the TLS peer link, the sip
registrar sharded (shards = 6) and sync replication to both peers: a client that
follows 302s registers users through any node; every REGISTER for a shard the node
does not own is redirected (never stored there first); then the node owning shard 0 is
killed (-9), its shards move to the others, and every user that got a 200 is still
found: an INVITE to any survivor ends in 302 to the user's contact (no binding lost)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from tests.support.cluster_lab import wait_for
from tests.support.node_process import NodeProcess, env_with_dropins, free_port

pytestmark = pytest.mark.integration

ADDR3 = {"a": "127.0.0.1", "b": "127.0.0.2", "c": "127.0.0.3"}


def cluster3_body(me: str, keys, hb: int, link: int) -> str:
    peers = ", ".join(f'{{ id = "{p}", address = "{ADDR3[p]}" }}' for p in ADDR3 if p != me)
    return f"""
[cluster]
peers = [{peers}]
bind_address = "{ADDR3[me]}"
heartbeat_port = {hb}
heartbeat_interval_ms = 50
dead_after = 4
auth_key_file = "{keys}/cluster.key"
peer_link = "ssl:{link}"
tls = {{ cert = "{keys}/{me}.pem", key = "{keys}/{me}.key", ca = "{keys}/ca.pem" }}
auto_partner_down_s = 0
"""


class SipClient:
    """A tiny UDP user agent that follows 302 redirects to a shard owner."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(2)
        self.port = self.sock.getsockname()[1]
        self.n = 0

    def close(self):
        self.sock.close()

    def request(self, method: str, user: str, target: tuple[str, int], *,
                contact: str | None = None, tries: int = 3) -> tuple[int, str]:
        self.n += 1
        ruri = "sip:example.test" if method == "REGISTER" else f"sip:{user}@example.test"
        lines = [f"{method} {ruri} SIP/2.0",
                 f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch=z9hG4bKt{self.n}",
                 f"From: <sip:{user}@example.test>;tag=t{self.n}",
                 f"To: <sip:{user}@example.test>", f"Call-ID: shards-{user}-{self.n}",
                 f"CSeq: 1 {method}", "Max-Forwards: 70"]
        if contact:
            lines += [f"Contact: <{contact}>", "Expires: 3600"]
        data = ("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode()
        for _ in range(tries):
            self.sock.sendto(data, target)
            try:
                while True:
                    text = self.sock.recv(65535).decode()
                    if f"branch=z9hG4bKt{self.n}" in text:
                        return int(text.split(" ", 2)[1]), text
            except socket.timeout:
                continue
        return 0, ""

    def follow(self, method: str, user: str, target: tuple[str, int], **kw) -> tuple[int, str, list]:
        """Send; on 302 from a registrar (Contact without our user's contact) go there."""
        hops = [target]
        code, text = self.request(method, user, target, **kw)
        for _ in range(2):
            if code != 302 or "shard owner" not in text:
                break
            contact = header(text, "Contact")
            hostport = contact.strip("<>").split("@")[-1].removeprefix("sip:")
            host, _, port = hostport.partition(":")
            target = (host, int(port or 5060))
            hops.append(target)
            code, text = self.request(method, user, target, **kw)
        return code, text, hops


def header(text: str, name: str) -> str:
    for line in text.split("\r\n"):
        if line.lower().startswith(name.lower() + ":"):
            return line.split(":", 1)[1].strip()
    return ""


@pytest.fixture
def three(tmp_path):
    keys = tmp_path / "keys"
    out = subprocess.run([sys.executable, "-m", "appliance.cluster.keys", str(keys)]
                         + [a for n, ip in ADDR3.items() for a in ("--node", f"{n}={ip}")],
                         capture_output=True, text=True, env=env_with_dropins())
    assert out.returncode == 0, out.stderr
    hb, link, sip_port = free_port(), free_port(), free_port()
    nodes = {}
    for me in ADDR3:
        d = tmp_path / me
        d.mkdir()
        body = cluster3_body(me, keys, hb, link) + f"""
[services.sip]
listen_address = "{ADDR3[me]}"
port = {sip_port}
domains = ["example.test"]
shards = 6
preempt = true          # all three start empty: let each shard go to its preferred node

[services.sip.replication]
peers = [{", ".join(f'"{p}"' for p in ADDR3 if p != me)}]
mode = "sync"
timeout_s = 2
"""
        nodes[me] = NodeProcess(d, body, node_id=me)
        nodes[me].sip_port = sip_port
    yield nodes
    for n in nodes.values():
        n.kill()


def owners(node) -> list:
    return [row["owner"] for row in node.rpc("sip.shards")["result"]["shards"]]


def test_three_nodes_one_dies_no_binding_lost(three):
    """Sharded registrar on three nodes: redirects to shard owners, a node dies, its shards
    move to the survivors, every acknowledged binding is still there (sync)."""
    for n in three.values():
        n.start()
    a, b, c = three["a"], three["b"], three["c"]
    port = a.sip_port

    def settled():
        links = all(all(p["connected"] for p in n.rpc("cluster.status")["result"]
                        ["peer_link"].values()) for n in three.values())
        return links and all(None not in owners(n) for n in three.values())
    wait_for(settled, 20, "peer links up and every shard owned")
    table = owners(a)
    assert sorted(set(table)) == ["a", "b", "c"], table        # spread over the nodes
    client = SipClient()
    acked = {}
    redirected = 0
    try:
        for i in range(120):
            user = f"sh{i}"
            entry = (ADDR3["abc"[i % 3]], port)
            contact = f"sip:{user}@10.20.{i // 250}.{i % 250 + 1}:5060"
            code, _text, hops = client.follow("REGISTER", user, entry, contact=contact)
            redirected += len(hops) > 1
            if code == 200:
                acked[user] = contact
        assert len(acked) == 120 and redirected > 0
        stats = {n: three[n].rpc("sip.stats")["result"] for n in three}
        for n, s in stats.items():
            assert s["role"].startswith("owner of 2/6"), (n, s["role"])
            assert s["drops"].get("redirected_to_owner", 0) > 0
        victim = table[0]
        survivors = [n for n in ADDR3 if n != victim]
        three[victim].kill()
        t0 = time.monotonic()
        wait_for(lambda: all(all(o in survivors for o in owners(three[n])) for n in survivors),
                 15, f"{victim}'s shards owned by the survivors")
        moved_s = time.monotonic() - t0
        lost = []
        for i, (user, contact) in enumerate(sorted(acked.items())):
            entry = (ADDR3[survivors[i % 2]], port)
            code, text, _ = client.follow("INVITE", user, entry)
            if code != 302 or contact not in header(text, "Contact"):
                lost.append((user, code, header(text, "Contact")))
        assert lost == [], f"{len(lost)} of {len(acked)} acknowledged bindings lost: {lost[:5]}"
        assert moved_s < 15
    finally:
        client.close()
