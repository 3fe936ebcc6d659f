"""DNSClient on a task.Clock with fake UDP ports (review L14: no unit tests for the
client): a silent server gets the message again at 1/5 and 3/5 of timeout_s and times
out after timeout_s, then the next server is asked; the last server that answered is
asked first; a refused port moves on at once; a busy message id is never reused."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode
import dns.tsigkeyring
from twisted.internet.task import Clock

from services.dns.client import DNSClient
from services.dns.message import TransportError


class FakePort:
    def __init__(self, reactor, proto):
        self.reactor, self.proto = reactor, proto
        self.peer = None
        self.sent: list[bytes] = []
        self.connected = True

    def connect(self, host, port):
        self.peer = (host, port)

    def write(self, data):
        self.sent.append(data)
        self.reactor.wire.append((self.peer, data))

    def stopListening(self):
        self.connected = False


class FakeReactor(Clock):
    """A Clock with listenUDP: every datagram sent is in ``wire`` as ``(server, bytes)``."""

    def __init__(self):
        super().__init__()
        self.wire: list = []
        self.ports: list[FakePort] = []

    def listenUDP(self, port, proto, interface="", maxPacketSize=8192):
        p = FakePort(self, proto)
        proto.makeConnection(p)
        self.ports.append(p)
        return p

    def port_of(self, server) -> FakePort:
        return next(p for p in reversed(self.ports) if p.peer == server and p.connected)

    def answer(self, server, rcode=dns.rcode.NOERROR, index=-1):
        """The server answers the ``index``-th message it got."""
        data = [d for s, d in self.wire if s == server][index]
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        response.set_rcode(rcode)
        self.port_of(server).proto.datagramReceived(response.to_wire(), server)


A, B = ("127.0.0.1", 5301), ("127.0.0.2", 5302)


def query():
    return dns.message.make_query("www.example.test.", "A")


def fired(d):
    out = []
    d.addBoth(out.append)
    return out


def test_silent_server_resent_then_timeout_then_next_server():
    reactor = FakeReactor()
    client = DNSClient(reactor, [A, B], timeout_s=1.0)
    result = fired(client.exchange(query(), "example.test.", None, "read"))
    assert [s for s, _ in reactor.wire] == [A]
    reactor.advance(0.2)
    reactor.advance(0.4)
    assert [s for s, _ in reactor.wire] == [A, A, A], "resent at 1/5 and 3/5 of timeout_s"
    assert client.resends == 2
    reactor.advance(0.4)                                  # timeout_s: on to B
    assert [s for s, _ in reactor.wire][-1] == B and not result
    reactor.answer(B)
    response, server = result[0]
    assert server == "127.0.0.2:5302" and response.rcode() == dns.rcode.NOERROR
    # B answered last: it is asked first next time
    fired(client.exchange(query(), "example.test.", None, "read"))
    assert [s for s, _ in reactor.wire][-1] == B


def test_no_server_answers_is_a_timeout_error_naming_them():
    reactor = FakeReactor()
    client = DNSClient(reactor, [A, B], timeout_s=0.5)
    result = fired(client.exchange(query(), "example.test.", None, "read"))
    reactor.pump([0.1] * 12)
    assert result and result[0].check(TransportError)
    assert "127.0.0.1:5301" in str(result[0].value) and "127.0.0.2:5302" in str(result[0].value)


def test_refused_port_moves_on_at_once():
    reactor = FakeReactor()
    client = DNSClient(reactor, [A, B], timeout_s=1.0)
    result = fired(client.exchange(query(), "example.test.", None, "read"))
    reactor.port_of(A).proto.connectionRefused()          # ICMP port unreachable
    assert [s for s, _ in reactor.wire][-1] == B and reactor.seconds() == 0
    reactor.answer(B)
    assert result[0][1] == "127.0.0.2:5302"


def signed(q):
    import dns.tsigkeyring
    q.use_tsig(dns.tsigkeyring.from_text({"k.": "c2VjcmV0c2VjcmV0c2VjcmV0"}), keyname="k.")
    return q


def test_a_message_id_in_flight_is_never_reused():
    """On the shared (signed) socket; unsigned exchanges have sockets of their own."""
    reactor = FakeReactor()
    client = DNSClient(reactor, [A], timeout_s=1.0)
    q1, q2 = signed(query()), signed(query())
    q2.id = q1.id
    fired(client.exchange(q1, "example.test.", None, "read"))
    fired(client.exchange(q2, "example.test.", None, "read"))
    ids = [int.from_bytes(d[:2], "big") for _, d in reactor.wire]
    assert len(ids) == 2 and ids[0] != ids[1]


def test_unsigned_messages_get_a_fresh_source_port_each():
    """Review L10: without TSIG a fixed source port and a 16-bit id are easy to spoof:
    every unsigned exchange uses a socket (random port) of its own, closed after it;
    signed ones share the server's connected socket."""
    reactor = FakeReactor()
    client = DNSClient(reactor, [A], timeout_s=1.0)
    for _ in range(2):
        r = fired(client.exchange(query(), "example.test.", None, "read"))
        reactor.answer(A)
        assert r and not hasattr(r[0], "check")
    assert len(reactor.ports) == 2 and not any(p.connected for p in reactor.ports)
    for _ in range(2):
        fired(client.exchange(signed(query()), "example.test.", "k.", "read"))
    assert len(reactor.ports) == 3, "signed: one shared socket"


class TCPRecordingReactor(FakeReactor):
    def __init__(self):
        super().__init__()
        self.tcp: list = []

    def connectTCP(self, host, port, factory, timeout=30, bindAddress=None):
        from types import SimpleNamespace
        self.tcp.append((host, port))
        return SimpleNamespace(stopConnecting=lambda: None, disconnect=lambda: None)


def tc_answer(reactor, server, sign_with=None):
    data = [d for s, d in reactor.wire if s == server][-1]
    q = dns.message.from_wire(data, keyring=False)
    response = dns.message.make_response(q)
    response.flags |= dns.flags.TC
    if sign_with is not None:
        response.use_tsig(dns.tsigkeyring.from_text(sign_with), keyname="k.")
    reactor.port_of(server).proto.datagramReceived(response.to_wire(), server)


def test_a_forged_truncated_answer_to_a_signed_query_is_not_obeyed():
    """Review L2: the TC bit is read by dnspython after the TSIG check, not from the raw
    byte: an unsigned (or wrongly signed) TC answer to a signed query is refused like
    any unverifiable answer, it does not send the client to TCP.  (Old client: TCP.)"""
    from services.dns.message import DNSError
    for forged in (None, {"k.": "d3JvbmdrZXl3cm9uZ2tleXdyb25n"}):
        reactor = TCPRecordingReactor()
        client = DNSClient(reactor, [A], timeout_s=1.0)
        result = fired(client.exchange(signed(query()), "example.test.", "k.", "read"))
        tc_answer(reactor, A, sign_with=forged)
        reactor.advance(1.0)
        assert reactor.tcp == [] and client.tcp_fallbacks == 0, forged
        assert result and result[0].check(DNSError), result


def test_primary_discovery_falls_back_and_does_not_ask_at_every_exchange():
    """discover_primary: when the configured server gives no SOA, the exchange goes to
    the configured servers, and the lookup is not repeated at every exchange (one
    lookup per RETRY_DISCOVER_S); with an SOA, the MNAME's address (from the same
    server) at primary_port is asked first."""
    import dns.rrset
    from services.dns.client import PrimaryDiscoveryClient
    reactor = FakeReactor()
    client = PrimaryDiscoveryClient(reactor, "example.test.", [A], timeout_s=1.0,
                                    primary_port=5399)

    def sent():
        return [(s, dns.message.from_wire(d, keyring=False).question[0].to_text())
                for s, d in reactor.wire]
    fired(client.exchange(signed(query()), "example.test.", "k.", "read"))
    assert sent() == [(A, "example.test. IN SOA")]
    reactor.answer(A)                                    # no SOA in the answer
    assert sent()[1:] == [(A, "www.example.test. IN A")] and client.primary is None
    fired(client.exchange(signed(query()), "example.test.", "k.", "read"))
    assert len(sent()) == 3, "no second lookup"
    reactor.advance(PrimaryDiscoveryClient.RETRY_DISCOVER_S)
    fired(client.exchange(signed(query()), "example.test.", "k.", "read"))
    assert sent()[-1] == (A, "example.test. IN SOA"), "looked up again after the retry time"

    def reply(rrset_text):
        data = [d for s, d in reactor.wire if s == A][-1]
        q = dns.message.from_wire(data, keyring=False)
        resp = dns.message.make_response(q)
        resp.answer.append(dns.rrset.from_text(*rrset_text))
        reactor.port_of(A).proto.datagramReceived(resp.to_wire(), A)
    reply(("example.test.", 60, "IN", "SOA", "ns1.example.test. h.example.test. 1 2 3 4 5"))
    assert sent()[-1] == (A, "ns1.example.test. IN A")
    reply(("ns1.example.test.", 60, "IN", "A", "127.0.0.9"))
    assert client.primary == ("127.0.0.9", 5399) and client.mname == "ns1.example.test."
    assert sent()[-1] == (("127.0.0.9", 5399), "www.example.test. IN A"), "the primary first"
    assert client.order() == [("127.0.0.9", 5399), A]
