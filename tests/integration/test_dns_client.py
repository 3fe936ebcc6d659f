"""DNSClient against a real named (review M4): a lost datagram is sent again within
the server's timeout, the last server that answered is tried first, and host names
in ``servers`` are resolved off the reactor."""

from __future__ import annotations

import time

import dns.name
import pytest
import pytest_twisted
from twisted.internet import protocol, reactor

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
