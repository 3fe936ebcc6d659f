"""DDNS updater without sockets: RFC 4701 DHCID vectors, host names that must never
raise (review H2), option 81 flags (RFC 4702), per-name order, retries with backoff."""

from __future__ import annotations

import base64

import dns.message
import dns.name
import dns.opcode
import dns.rcode
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock

from appliance.ddns import (DHCID_CLIENT_ID, DHCID_DUID, DHCID_HWADDR, FQDN_N, FQDN_O, FQDN_S,
                            DDNSNameError, sanitize_hostname)
from services.dns.ddns import DDNSUpdater, dhcid_identity, dhcid_rdata
from services.dns.message import TransportError
from services.dns.metrics import DNSMetrics

FWD = dns.name.from_text("dhcp.example.test.")
REV = dns.name.from_text("0.9.10.in-addr.arpa.")


def test_rfc4701_vectors():
    """The three examples of RFC 4701 section 3.6, byte for byte."""
    cases = [
        (bytes.fromhex("000100064 12df1660102030405 06".replace(" ", "")), "chi6.example.com.",
         DHCID_DUID, "AAIBY2/AuCccgoJbsaxcQc9TUapptP69lOjxfNuVAA2kjEA="),
        (bytes.fromhex("0107 08090a0b0c".replace(" ", "")), "chi.example.com.", DHCID_CLIENT_ID,
         "AAEBOSD+XR3Os/0LozeXVqcNc7FwCfQdWL3b/NaiUDlW2No="),
        (bytes.fromhex("01 010203040506".replace(" ", "")), "client.example.com.", DHCID_HWADDR,
         "AAABxLmlskllE0MVjd57zHcWmEH3pCQ6VytcKD//7es/deY="),
    ]
    for identity, fqdn, kind, expected in cases:
        rd = dhcid_rdata(identity, dns.name.from_text(fqdn), kind)
        assert base64.b64encode(rd.data).decode() == expected, fqdn


def test_rfc4361_client_id_is_hashed_as_duid():
    """Option 61 of type 255 (IAID + DUID, RFC 4361) gives identifier type 2 over the DUID."""
    duid = bytes.fromhex("00010006412df166010203040506")
    assert dhcid_identity(b"\xff\x00\x00\x00\x01" + duid, DHCID_CLIENT_ID) == (duid, DHCID_DUID)
    assert dhcid_identity(b"\x01\x02\x03", DHCID_CLIENT_ID) == (b"\x01\x02\x03", DHCID_CLIENT_ID)


class Client:
    """Answers every message NOERROR (or as ``script`` says), records what was sent."""

    def __init__(self, script=()):
        self.sent: list[dns.message.Message] = []
        self.script = list(script)
        self.held: list[defer.Deferred] = []
        self.hold = False

    def exchange(self, request, zone, key, what="update"):
        self.sent.append(request)
        if self.hold:
            d = defer.Deferred()
            self.held.append((d, request))
            return d
        step = self.script.pop(0) if self.script else "NOERROR"
        if step == "timeout":
            return defer.fail(TransportError("no server answered", "timeout"))
        response = dns.message.make_response(request)
        response.set_rcode(dns.rcode.from_text(step))
        return defer.succeed((response, "127.0.0.1:53"))


def updater(client, clock=None, **kw):
    return DDNSUpdater(client, None, FWD, REV, DNSMetrics(), (FWD, REV), clock=clock or Clock(),
                       managed=[dns.name.from_text("www.dhcp.example.test.")], rng=lambda: 0.5,
                       **kw)


HOSTILE = ["a..b.dhcp.example.test.", ".", "", "x" * 64 + ".dhcp.example.test.",
           ("y" * 63 + ".") * 5 + "dhcp.example.test.", "a b.dhcp.example.test.",
           "evil.example.org.", "dhcp.example.test.", "www.dhcp.example.test.",
           "_appliance-owner.www.dhcp.example.test.", "*.dhcp.example.test.",
           "-x.dhcp.example.test.", None, b"bytes", 5]


def test_hostile_names_fail_the_deferred_and_send_nothing():
    """Review H2: names that are no host names (empty label, 64-octet label, over 255
    octets, outside the domains, managed or guard names...) never raise: the Deferred
    fails with DDNSNameError and no UPDATE is sent."""
    client = Client()
    up = updater(client)
    for fqdn in HOSTILE:
        for call in (lambda: up.lease_bound(fqdn, "10.9.0.5", b"\x01id", 300),
                     lambda: up.lease_released(fqdn, "10.9.0.5", b"\x01id")):
            d = call()
            f = d.result
            d.addErrback(lambda _: None)
            assert f.check(DDNSNameError), (fqdn, f)
    d = up.lease_bound("ok.dhcp.example.test.", "not an address", b"\x01", 300)
    assert d.result.check(DDNSNameError)
    d.addErrback(lambda _: None)
    d = up.lease_bound("ok.dhcp.example.test.", "10.9.0.5", object(), 300)   # not bytes
    assert isinstance(d, defer.Deferred)
    d.addErrback(lambda _: None)
    assert client.sent == []


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_option12_bytes_never_raise(raw):
    """Whatever bytes a client sends as its host name, the call returns a Deferred."""
    up = updater(Client())
    host = raw.decode("latin-1")
    for fqdn in (host, host + ".dhcp.example.test.", host + "."):
        d = up.lease_bound(fqdn, "10.9.0.5", b"\x01id", 300)
        assert isinstance(d, defer.Deferred)
        d.addErrback(lambda _: None)
        d = up.lease_released(fqdn, "10.9.0.5", b"\x01id")
        assert isinstance(d, defer.Deferred)
        d.addErrback(lambda _: None)
    clean = sanitize_hostname(raw)
    if clean is not None:
        d = up.lease_bound(clean + ".dhcp.example.test.", "10.9.0.5", b"\x01id", 300)
        d.addErrback(lambda f: f.trap(DDNSNameError) and None)   # too long in all: refused


def test_sanitize_hostname():
    assert sanitize_hostname("My_Laptop") == "my-laptop"
    assert sanitize_hostname("a..b") == "a.b"
    assert sanitize_hostname("x" * 70) == "x" * 63
    assert sanitize_hostname("---") is None
    assert sanitize_hostname(b"\xff\xfeok") == "ok"


def test_option81_flags():
    """RFC 4702: N=1 no update; S=0 PTR only; S=0 with override: both, O=1; S=1 both."""
    client = Client()
    up = updater(client)
    d = up.lease_bound("n.dhcp.example.test.", "10.9.0.5", b"\x01id", 300, fqdn_flags=FQDN_N)
    assert d.result["forward"] == "skipped" and d.result["flags"] == FQDN_N and client.sent == []
    d = up.lease_bound("s0.dhcp.example.test.", "10.9.0.6", b"\x01id", 300, fqdn_flags=0)
    assert d.result["forward"] == "client" and d.result["flags"] == 0
    assert [m.zone[0].name for m in client.sent] == [REV]
    client.sent.clear()
    d = up.lease_bound("s1.dhcp.example.test.", "10.9.0.7", b"\x01id", 300, fqdn_flags=FQDN_S)
    assert d.result["forward"] == "added" and d.result["flags"] == FQDN_S
    assert [m.zone[0].name for m in client.sent] == [FWD, REV]
    over = updater(Client(), override_client_update=True)
    d = over.lease_bound("o.dhcp.example.test.", "10.9.0.8", b"\x01id", 300, fqdn_flags=0)
    assert d.result["flags"] == FQDN_S | FQDN_O and d.result["forward"] == "added"


def test_timeouts_are_retried_with_backoff():
    """Two timeouts, then an answer: sent again after 0.25 s and 0.5 s; the bind succeeds."""
    clock = Clock()
    client = Client(["timeout", "timeout"])
    up = updater(client, clock)
    d = up.lease_bound("r.dhcp.example.test.", "10.9.0.5", b"\x01id", 300)
    assert len(client.sent) == 1
    clock.advance(0.25)
    assert len(client.sent) == 2
    clock.advance(0.5)
    assert d.result["forward"] == "added" and len(client.sent) == 4   # A+DHCID, then PTR


def test_operations_on_one_name_run_in_call_order():
    """A release called while the bind of the same name is in flight waits for it."""
    client = Client()
    client.hold = True
    up = updater(client)
    bound = up.lease_bound("o.dhcp.example.test.", "10.9.0.5", b"\x01id", 300)
    released = up.lease_released("o.dhcp.example.test.", "10.9.0.5", b"\x01id")
    other = up.lease_bound("p.dhcp.example.test.", "10.9.0.6", b"\x01id", 300)
    assert len(client.held) == 2           # o's bind and p's bind; not o's release
    client.hold = False
    while client.held:
        d, request = client.held.pop(0)
        d.callback((dns.message.make_response(request), "127.0.0.1:53"))
    assert bound.result["forward"] == "added"
    assert released.result["forward"] == "removed"
    assert other.result["forward"] == "added"


def test_no_retry_after_the_service_stopped():
    """A retry waiting when the service stops sends nothing more and fails the Deferred."""
    clock = Clock()
    client = Client(["timeout"])
    up = updater(client, clock)
    d = up.lease_bound("s.dhcp.example.test.", "10.9.0.5", b"\x01id", 300)
    up.stopped = True
    clock.advance(10)
    assert len(client.sent) == 1 and d.result.check(TransportError)
    d.addErrback(lambda _: None)


def test_one_send_path_counts_answers_and_failures():
    """Review L15: the updater and DDNS send through services.dns.updater.send_update,
    which counts every answer (rcode, latency) and every failure (rcode) once."""
    from prometheus_client import CollectorRegistry
    from services.dns.updater import send_update
    metrics = DNSMetrics(CollectorRegistry())
    clock = Clock()
    q = dns.message.make_query("x.dhcp.example.test.", "A")

    class OneClient:
        def __init__(self, result):
            self.result = result

        def exchange(self, request, zone, key, what="update"):
            return defer.succeed(self.result) if not isinstance(self.result, Exception) \
                else defer.fail(self.result)
    out = []
    send_update(OneClient((dns.message.make_response(q), "s:53")), q, "z.", None, clock,
                metrics).addBoth(out.append)
    assert out[0][1:3] == ("s:53", "NOERROR")
    send_update(OneClient(TransportError("gone", "timeout")), q, "z.", None, clock,
                metrics).addBoth(out.append)
    assert out[1].check(TransportError)
    own = metrics.own
    assert own.get_sample_value("appliance_dns_updates_total", {"rcode": "NOERROR"}) == 1
    assert own.get_sample_value("appliance_dns_update_failures_total",
                                {"rcode": "timeout"}) == 1
    assert own.get_sample_value("appliance_dns_update_latency_seconds_count") == 1
