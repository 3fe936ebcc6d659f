"""DHCPv4 DDNS through a real dhcp4 failover pair (two nodes on loopback, TLS peer link,
hot-standby) with the dns service against a real named (issue 13):

- a client with option 81 gets A + PTR + DHCID (the RFC 4701 value of its htype+chaddr)
  published, and its ACK answers option 81 with S set (not in its parameter list);
- it renames itself: the old A and DHCID are gone, the PTR names the new name;
- it releases: A and PTR are gone;
- hostile option 12 names (``a..b``, 300 octets, non-ASCII) are sanitized: the leases
  are ACKed, the sanitized names published, and every lease (with what DDNS published
  for it) reaches the partner.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from ipaddress import IPv4Address

import dns.message
import dns.name
import dns.query
import dns.rdatatype
import pytest

from services.dhcp.v4 import codec as C
from services.dhcp.v4.probe import exchange
from tests.integration.test_cluster_loopback import ADDR, cluster_body
from tests.support.cluster_lab import wait_for
from tests.support.node_process import NodeProcess, env_with_dropins, free_port

pytestmark = pytest.mark.integration

GIADDR = "10.9.0.1"
ZONE = "example.test."


def answer(named, name, rdtype="A"):
    q = dns.message.make_query(name, rdtype)
    r = dns.query.udp(q, "127.0.0.1", port=named.port, timeout=2)
    return [rr for rrset in r.answer for rr in rrset]


def texts(named, name, rdtype="A"):
    return sorted(rr.to_text() for rr in answer(named, name, rdtype))


def node_body(me, named, port):
    role = "primary" if me == "a" else "secondary"
    peer = "b" if me == "a" else "a"
    return f"""
[services.dns]
servers = ["127.0.0.1:{named.port}"]
tsig_key_file = "{named.key_file}"
zones = ["{ZONE}", "0.9.10.in-addr.arpa."]
ddns = {{ forward_zone = "{ZONE}", reverse_zone = "0.9.10.in-addr.arpa." }}

[services.dhcp4]
listen_address = "{ADDR[me]}"
port = {port}
failover = {{ peer = "{peer}", role = "{role}", mode = "hot-standby", split = 80, mclt_s = 30 }}

[[services.dhcp4.subnets]]
id = 1
subnet = "10.9.0.0/24"
pool = ["10.9.0.50", "10.9.0.89"]
lease_time_s = 600
"""


@pytest.fixture
def pair(tmp_path, named):
    keys = tmp_path / "keys"
    out = subprocess.run([sys.executable, "-m", "appliance.cluster.keys", str(keys),
                          "--node", "a=127.0.0.1", "--node", "b=127.0.0.2"],
                         capture_output=True, text=True, env=env_with_dropins())
    assert out.returncode == 0, out.stderr
    hb, link, port = free_port(), free_port(), free_port()
    nodes = {}
    try:
        for me, other in (("a", "b"), ("b", "a")):
            d = tmp_path / me
            d.mkdir()
            nodes[me] = NodeProcess(d, cluster_body(me, other, keys, hb, link)
                                    + node_body(me, named, port), node_id=me)
            nodes[me].dhcp_port = port
        for n in nodes.values():
            n.start()
        yield nodes
    finally:
        for n in nodes.values():
            n.kill()


def packet(mtype: int, mac: bytes, giaddr: str, xid: int, **opts) -> bytes:
    """probe.packet with room for a 300-octet host name (RFC 3396 split, 1500-octet packet)."""
    options = {C.OPT_MESSAGE_TYPE: bytes([mtype])}
    for code, value in opts.items():
        options[int(code.lstrip("o"))] = value
    pkt = C.DHCPPacket(op=1, htype=1, hlen=6, hops=1, xid=xid, giaddr=IPv4Address(giaddr),
                       chaddr=mac, options=options)
    return C.encode(pkt, max_size=1500)


def fqdn_option(name: str, flags: int) -> bytes:
    return C.encode_option_value(C.OPT_CLIENT_FQDN, C.ClientFQDN(name, flags))


class Client:
    """A relayed client (giaddr 10.9.0.1) talking to one server on loopback."""

    def __init__(self, server, mac: bytes):
        self.server, self.mac = server, mac
        self.xid = int.from_bytes(os.urandom(4), "big")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = self.server_id = None

    def dora(self, **opts) -> C.DHCPPacket:
        offer = exchange(self.sock, self.server, packet(C.DISCOVER, self.mac, GIADDR, self.xid),
                         C.OFFER, timeout=5)
        assert offer.message_type == C.OFFER, offer.message_type_name
        return self.request(offer.yiaddr, offer.server_id, **opts)

    def request(self, address=None, server_id=None, **opts) -> C.DHCPPacket:
        address = address or self.address
        server_id = server_id or self.server_id
        ack = exchange(self.sock, self.server, packet(
            C.REQUEST, self.mac, GIADDR, self.xid, o50=address.packed, o54=server_id.packed,
            **opts), C.ACK, timeout=5)
        assert ack.message_type == C.ACK, ack.message_type_name
        self.address, self.server_id = ack.yiaddr, ack.server_id
        return ack

    def release(self):
        rel = C.DHCPPacket(op=1, htype=1, hlen=6, hops=1, xid=self.xid + 1,
                           ciaddr=self.address, giaddr=IPv4Address(GIADDR), chaddr=self.mac,
                           options={C.OPT_MESSAGE_TYPE: bytes([C.RELEASE]),
                                    C.OPT_SERVER_ID: self.server_id.packed})
        self.sock.sendto(C.encode(rel), self.server)

    def close(self):
        self.sock.close()


def lease_on(node, address):
    return node.rpc("dhcp4.lease", {"address": str(address)}).get("result") or {}


def test_ddns_option81_rename_release_and_hostile_names_through_a_pair(pair, named):
    from services.dns.ddns import dhcid_rdata
    a, b = pair["a"], pair["b"]

    def normal():
        parts = [n.rpc("cluster.status")["result"].get("partners", {}) for n in (a, b)]
        return parts[0].get("b") == "NORMAL" and parts[1].get("a") == "NORMAL"
    wait_for(normal, 30, "both partners NORMAL\n" + a.output()[-2000:] + b.output()[-2000:])
    server = (ADDR["a"], a.dhcp_port)

    # 1. option 81 (S=1, wire format): A + DHCID + PTR, and the ACK answers option 81
    mac = bytes([2, 0, 0, 0, 0x81, 1])
    c = Client(server, mac)
    ack = c.dora(o81=fqdn_option("laptop", C.FQDN_S | C.FQDN_E))
    got = C.decode_option_value(C.OPT_CLIENT_FQDN, ack.options[C.OPT_CLIENT_FQDN])
    assert got.flags & C.FQDN_S and got.flags & C.FQDN_E and got.name == "laptop." + ZONE
    address = str(ack.yiaddr)
    wait_for(lambda: texts(named, "laptop." + ZONE) == [address], 10,
             "the A record\n" + a.output()[-3000:])
    ptr = IPv4Address(address).reverse_pointer + "."
    wait_for(lambda: texts(named, ptr, "PTR") == ["laptop." + ZONE], 10, "the PTR")
    dhcid, = answer(named, "laptop." + ZONE, "DHCID")
    want = dhcid_rdata(b"\x01" + mac, dns.name.from_text("laptop." + ZONE), 0)
    assert dhcid == want, "RFC 4701: identifier type 0, htype 1 + chaddr"
    wait_for(lambda: (lease_on(b, address).get("ddns") or {}).get("fqdn") == "laptop." + ZONE,
             10, "the lease and its DDNS state at the partner\n" + b.output()[-2000:])
    wait_for(lambda: (lease_on(a, address).get("ddns") or {}).get("done") is True, 10,
             "done recorded on the lease")

    # 2. rename: the old name's A and DHCID go, the PTR names the new one
    c.request(o81=fqdn_option("desk", C.FQDN_S | C.FQDN_E))
    wait_for(lambda: texts(named, "desk." + ZONE) == [address], 10, "the new A record")
    wait_for(lambda: texts(named, "laptop." + ZONE) == [], 10, "the old A record removed")
    assert texts(named, "laptop." + ZONE, "DHCID") == []
    wait_for(lambda: texts(named, ptr, "PTR") == ["desk." + ZONE], 10, "the PTR renamed")

    # 3. release: A and PTR gone
    c.release()
    wait_for(lambda: texts(named, "desk." + ZONE) == [], 10, "the A record removed")
    wait_for(lambda: texts(named, ptr, "PTR") == [], 10, "the PTR removed")
    wait_for(lambda: lease_on(b, address).get("state") == "released", 10,
             "the release at the partner")
    c.close()

    # 4. hostile host names: ACKed, sanitized names published, the leases at the partner
    hostile = [(b"a..b", "a." + ZONE), (b"y" * 300, "y" * 63 + "." + ZONE),
               ("Café".encode(), "caf." + ZONE)]
    for i, (name, published) in enumerate(hostile):
        h = Client(server, bytes([2, 0, 0, 0, 0x82, i]))
        ack = h.dora(o12=name)
        h.close()
        addr = str(ack.yiaddr)
        wait_for(lambda: texts(named, published) == [addr], 10,
                 f"{published} published\n" + a.output()[-3000:])
        wait_for(lambda: lease_on(b, addr).get("state") == "bound", 10,
                 f"the lease of {name[:10]!r} at the partner")
    for n in (a, b):
        status = n.rpc("system.status")["result"]["services"]
        assert status["dns"]["state"] == "running" and status["dhcp4"]["state"] == "running"
        assert "Traceback" not in n.output(), n.output()[-4000:]
