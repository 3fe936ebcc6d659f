"""DNSClient against a real named (review M4): a lost datagram is sent again within
the server's timeout, the last server that answered is tried first, and host names
in ``servers`` are resolved off the reactor."""

from __future__ import annotations

import time

import dns.message
import dns.name
import dns.query
import dns.rdata
import dns.rdatatype
import dns.rrset
import pytest
import pytest_twisted
from twisted.internet import protocol, reactor
from twisted.internet.task import deferLater

from services.dns.client import DNSClient
from services.dns.message import make_update
from services.dns.tsigkey import parse_key_file

pytestmark = pytest.mark.integration

ZONE = "example.test."


class DropFirst(protocol.DatagramProtocol):
    """A UDP relay to named that drops the first ``drop`` datagrams from the client."""

    def __init__(self, target, drop=1):
        self.target, self.drop, self.client, self.seen = target, drop, None, 0

    def datagramReceived(self, data, addr):
        if addr == self.target:
            if self.client is not None:
                self.transport.write(data, self.client)
            return
        self.client = addr
        self.seen += 1
        if self.seen > self.drop:
            self.transport.write(data, self.target)


class Silent(protocol.DatagramProtocol):
    """A bound UDP port that never answers (a host that drops packets: no ICMP)."""

    def datagramReceived(self, data, addr):
        pass


def update(server, name, address):
    key = parse_key_file(server.key_file.read_text())[0]
    upd = make_update(dns.name.from_text(ZONE), key)
    upd.replace(name, 30, "A", address)
    return upd, key


@pytest_twisted.inlineCallbacks
def test_lost_datagram_is_sent_again_within_the_timeout(named_module):
    """The first datagram is dropped: the resend at 1/5 of the timeout gets the answer
    from the same server, well before the 1 s timeout (the old client timed out)."""
    server = named_module
    relay = DropFirst(("127.0.0.1", server.port))
    port = reactor.listenUDP(0, relay, interface="127.0.0.1")
    client = DNSClient(reactor, [("127.0.0.1", port.getHost().port)], 1.0)
    try:
        upd, key = update(server, "resend.example.test.", "10.9.0.5")
        t0 = time.monotonic()
        response, where = yield client.exchange(upd, ZONE, key.name)
        elapsed = time.monotonic() - t0
        assert response.rcode() == 0 and client.resends >= 1
        assert 0.15 < elapsed < 0.8, elapsed
    finally:
        yield client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_last_good_server_is_tried_first(named_module):
    """servers = [a silent host, named]: the first update waits out the silent one;
    the next goes straight to named (the old client waited every time)."""
    server = named_module
    silent = reactor.listenUDP(0, Silent(), interface="127.0.0.1")
    client = DNSClient(reactor, [("127.0.0.1", silent.getHost().port),
                                 ("127.0.0.1", server.port)], 0.3)
    try:
        upd, key = update(server, "sticky.example.test.", "10.9.0.6")
        t0 = time.monotonic()
        yield client.exchange(upd, ZONE, key.name)
        assert time.monotonic() - t0 >= 0.3
        assert client.good == ("127.0.0.1", server.port)
        upd, key = update(server, "sticky.example.test.", "10.9.0.7")
        t0 = time.monotonic()
        response, where = yield client.exchange(upd, ZONE, key.name)
        assert time.monotonic() - t0 < 0.2 and where == server.address
    finally:
        yield client.close()
        yield silent.stopListening()


@pytest_twisted.inlineCallbacks
def test_host_names_in_servers_are_resolved(named_module):
    """servers = ["localhost:PORT"]: resolved through the reactor's resolver (a thread),
    then used over UDP (the old client failed with InvalidAddressError every time)."""
    server = named_module
    client = DNSClient(reactor, [("localhost", server.port)], 1.0)
    try:
        upd, key = update(server, "byname.example.test.", "10.9.0.8")
        response, where = yield client.exchange(upd, ZONE, key.name)
        assert response.rcode() == 0 and where == f"localhost:{server.port}"
    finally:
        yield client.close()


@pytest_twisted.inlineCallbacks
def test_a_signed_truncated_answer_goes_to_tcp(named_module):
    """Review L2: a signed read whose answer does not fit 512 bytes: named answers TC
    (signed); dnspython's own truncation check (after the signature is verified) sends
    the client to TCP, where the whole rrset comes back."""
    from services.dns.message import answer_rdatas, make_query
    server = named_module
    key = parse_key_file(server.key_file.read_text())[0]
    name = dns.name.from_text("big-txt." + ZONE)
    upd = make_update(dns.name.from_text(ZONE), key)
    upd.replace(name, 30, "TXT", *[f'"{i:02d}-{"x" * 60}"' for i in range(12)])
    client = DNSClient(reactor, [("127.0.0.1", server.port)], 2.0)
    try:
        response, _ = yield client.exchange(upd, ZONE, key.name)
        assert response.rcode() == 0
        assert client.tcp_fallbacks == 0
        q = make_query(name, "TXT", key)
        response, _ = yield client.exchange(q, ZONE, key.name, "query")
        assert len(answer_rdatas(response, name, "TXT")) == 12
        assert client.tcp_fallbacks == 1, "the UDP answer was truncated"
    finally:
        yield client.close()


class SecondaryOnly(protocol.DatagramProtocol):
    """A secondary for example.test. that answers its SOA (MNAME ns1.example.test.) and
    the MNAME's address, and refuses every UPDATE (NOTAUTH, as a secondary without
    update forwarding does)."""

    def __init__(self):
        self.updates = 0

    def datagramReceived(self, data, addr):
        import dns.opcode
        import dns.rcode
        q = dns.message.from_wire(data, keyring=False)
        r = dns.message.make_response(q)
        if q.opcode() == dns.opcode.UPDATE:
            self.updates += 1
            r.set_rcode(dns.rcode.NOTAUTH)
        else:
            question = q.question[0]
            if question.rdtype == dns.rdatatype.SOA:
                r.answer.append(dns.rrset.from_text(
                    question.name, 60, "IN", "SOA",
                    "ns1.example.test. hostmaster.example.test. 1 3600 600 86400 0"))
            elif question.rdtype == dns.rdatatype.A and \
                    question.name == dns.name.from_text("ns1.example.test."):
                r.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A", "127.0.0.1"))
        self.transport.write(r.to_wire(), addr)


@pytest_twisted.inlineCallbacks
def test_the_primary_is_found_from_the_soa_mname(named_module, tmp_path):
    """Review M11 (SOA MNAME discovery, as nsupdate does): a zone configured with a
    secondary only and discover_primary = true: the dns service asks it for the zone's
    SOA and the MNAME's address, and sends its UPDATEs to the primary (named, at
    primary_port); the secondary never gets one.  (Old code: discover_primary unknown;
    updates went to the secondary and were refused.)"""
    from prometheus_client import CollectorRegistry
    from types import SimpleNamespace
    from appliance.admin.rpc import MethodRegistry
    from appliance.config import config_from_string
    from appliance.plugin import NodeContext
    from services.dns.plugin import dns_plugin
    from services.dns.service import DNSService
    server = named_module
    fake = SecondaryOnly()
    port = reactor.listenUDP(0, fake, interface="127.0.0.1")
    secondary = f"127.0.0.1:{port.getHost().port}"
    toml = f"""
[node]
id = "demo"
state_dir = "{tmp_path}/state"
[[vip]]
name = "vip1"
address = "10.9.0.100/24"
interface = "lo"
priority = {{ demo = 100 }}
[services.dns]
tsig_key_file = "{server.key_file}"
zones = [{{ name = "{ZONE}", servers = ["{secondary}"], discover_primary = true, primary_port = {server.port} }}]
timeout_s = 0.5
[[services.dns.records]]
name = "found.{ZONE}"
type = "A"
resource = "vip1"
values = {{ demo = "10.9.0.77" }}
"""
    cfg = config_from_string(toml, f"{tmp_path}/demo.toml", plugins={"dns": dns_plugin})
    cluster = SimpleNamespace(resources={}, single=True, status=lambda: {"resources": {}},
                              role=lambda name: "owner", listeners={})
    cluster.register_resource = lambda name, listener, **kw: cluster.listeners.setdefault(
        name, listener)
    context = NodeContext(reactor=reactor, config=cfg, store=None, rpc=MethodRegistry(),
                          metrics=CollectorRegistry(), cluster=cluster, state_dir=tmp_path)
    service = DNSService(cfg.services["dns"].config, context)
    service.startService()
    try:
        cluster.listeners["vip1"]("vip1", "owner", 1)
        want = {dns.rdata.from_text("IN", "A", "10.9.0.77")}
        for _ in range(200):
            q = dns.message.make_query(f"found.{ZONE}", "A")
            r = dns.query.udp(q, "127.0.0.1", port=server.port, timeout=1)
            if {rd for rr in r.answer for rd in rr} == want:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        else:
            raise AssertionError(f"not published at the primary: {service.records()}")
        assert fake.updates == 0, "the secondary got an UPDATE"
        zone = service.records()["zones"][ZONE]
        assert zone["primary"] == "ns1.example.test." and zone["error"] is None
    finally:
        yield service.stopService()
        yield port.stopListening()
