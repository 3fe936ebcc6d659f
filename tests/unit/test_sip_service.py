"""The sip service on a Clock with the embedded store and fake transports: the 200
leaves only after the binding is durable, retransmissions get the same answer without a
second write, redirect 302/404/480, malformed input, TCP framing, expiry, RPC."""

from __future__ import annotations

import ipaddress

from prometheus_client import CollectorRegistry
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from appliance.admin.rpc import MethodRegistry
from appliance.plugin import NodeContext
from services.sip import message as M
from services.sip.config import SIPConfig
from services.sip.registrar import Limits
from services.sip.service import SIPService
from services.sip.transport import Source, StreamProtocol
from appliance.store.embedded import EmbeddedStore
from twisted.internet import defer
from twisted.internet.task import Clock

from tests.support.sync import ManualThread

T0 = 1_700_000_000.0


def started_store(tmp_path):
    """A loaded fsync=always EmbeddedStore on a Clock: ``(clock, thread, store)``."""
    clock = Clock()
    clock.advance(T0)
    thread = ManualThread()
    store = EmbeddedStore(clock, state_dir=tmp_path, fsync="always", run_in_thread=thread)
    store.startService()
    thread.run_all()
    return clock, thread, store


class Peer:
    """A fake UDP source that records what the service sends back."""

    def __init__(self, port=5061):
        self.sent: list[bytes] = []
        self.src = Source("udp", "127.0.0.1", port, self.sent.append, False)

    def responses(self):
        return [M.parse(b) for b in self.sent]


def settle(clock, thread):
    """Let the store start and finish its commit jobs."""
    for _ in range(3):
        clock.advance(0)
        thread.run_all()


def make(tmp_path, **limits):
    clock, thread, store = started_store(tmp_path)
    cfg = SIPConfig(ipaddress.ip_address("127.0.0.1"), 0, None, None, ("example.test",),
                    Limits(**{"default_expires": 3600, "min_expires": 60, "max_expires": 7200,
                              "max_contacts": 5, **limits}))
    rpc = MethodRegistry()
    ctx = NodeContext(reactor=clock, config=None, store=store, rpc=rpc,
                      metrics=CollectorRegistry(), cluster=None, state_dir=tmp_path)
    svc = SIPService(cfg, ctx)
    svc._register_rpc()
    svc.running = True
    return svc, clock, thread, store, rpc


def req(method, uri, *, to="sip:alice@example.test", branch="z9hG4bK1", cseq=1,
        call_id="c1", contacts=(), extra=()):
    lines = [f"{method} {uri} SIP/2.0", f"Via: SIP/2.0/UDP 127.0.0.1:5061;branch={branch};rport",
             f"From: <sip:alice@example.test>;tag=f1", f"To: <{to}>", f"Call-ID: {call_id}",
             f"CSeq: {cseq} {method}", "Max-Forwards: 70"]
    lines += [f"Contact: {c}" for c in contacts] + list(extra)
    return ("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode()


def call(rpc, method, params=None, clock=None, thread=None):
    results = []
    rpc.dispatch(method, params).addBoth(results.append)
    if clock is not None:
        settle(clock, thread)
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


def test_200_only_after_durable_and_retransmission_same_answer(tmp_path):
    """No 200 before the store's commit job ran; a retransmission meanwhile is absorbed;
    after the 200, a retransmission gets the same bytes and writes nothing."""
    svc, clock, thread, store, rpc = make(tmp_path)
    peer = Peer()
    data = req("REGISTER", "sip:example.test", contacts=["<sip:alice@127.0.0.1:5061>"])
    svc.received(data, peer.src, False)
    assert peer.sent == []                                   # waiting for the commit
    svc.received(data, peer.src, False)                      # retransmission
    assert peer.sent == [] and svc.stats["retransmissions_absorbed"] == 1
    settle(clock, thread)
    [ok] = peer.responses()
    assert ok.code == 200 and ok.get("Contact") == "<sip:alice@127.0.0.1:5061>;expires=3600"
    assert "rport=5061" in ok.get("Via") and ";tag=" in ok.get("To")
    writes = store.stats["writes"]
    svc.received(data, peer.src, False)
    settle(clock, thread)
    assert peer.sent[1] == peer.sent[0] and store.stats["writes"] == writes
    rows = call(rpc, "sip.bindings", {"aor": "alice@example.test"})["bindings"]
    assert [(r["contact"], r["cseq"], r["expires"]) for r in rows] == [
        ("sip:alice@127.0.0.1:5061", 1, clock.seconds() + 3600)]


def test_redirect_302_404_480_and_ack(tmp_path):
    """INVITE to a registered AOR: 302 with its contacts; never registered: 404; registered
    but no binding left: 480.  The 302 is retransmitted on UDP until the ACK."""
    svc, clock, thread, store, rpc = make(tmp_path)
    peer = Peer()
    svc.received(req("REGISTER", "sip:example.test",
                     contacts=["<sip:alice@10.0.0.1>;q=0.5", "<sip:alice@10.0.0.2>;q=1.0"]),
                 peer.src, False)
    settle(clock, thread)
    caller = Peer(6000)
    svc.received(req("INVITE", "sip:alice@example.test", branch="z9hG4bKinv"), caller.src, False)
    [moved] = caller.responses()
    assert moved.code == 302
    assert [c.split(";")[0] for c in moved.get_all("Contact")] == [
        "<sip:alice@10.0.0.2>", "<sip:alice@10.0.0.1>"]
    clock.advance(0.5)
    assert len(caller.sent) == 2 and caller.sent[1] == caller.sent[0]    # Timer G
    svc.received(req("ACK", "sip:alice@example.test", branch="z9hG4bKinv"), caller.src, False)
    clock.advance(10)
    assert len(caller.sent) == 2 and svc.stats["acks_matched"] == 1
    svc.received(req("INVITE", "sip:bob@example.test", branch="z9hG4bKb"), caller.src, False)
    assert caller.responses()[-1].code == 404
    assert call(rpc, "sip.unregister", {"aor": "sip:alice@example.test"}, clock, thread)["removed"] == 2
    settle(clock, thread)
    svc.received(req("INVITE", "sip:alice@example.test", branch="z9hG4bKc"), caller.src, False)
    assert caller.responses()[-1].code == 480


def test_expired_bindings_are_not_served_and_are_swept(tmp_path):
    """After its expiry a binding is not returned (480) and the sweep deletes it."""
    svc, clock, thread, store, rpc = make(tmp_path)
    peer = Peer()
    svc.received(req("REGISTER", "sip:example.test", contacts=["<sip:alice@h>;expires=60"]),
                 peer.src, False)
    settle(clock, thread)
    assert svc.location.count == 1
    clock.advance(61)
    svc.received(req("INVITE", "sip:alice@example.test", branch="z9hG4bK2"), peer.src, False)
    assert peer.responses()[-1].code == 480
    swept = []
    svc.location.sweep().addCallback(swept.append)
    settle(clock, thread)
    assert swept == [1] and store.hgetall_now("sip:aor:sip:alice@example.test") == {}
    assert svc.location.count == 0


def test_malformed_400_or_drop_options_and_405(tmp_path):
    """A request with its headers but a bad CSeq gets 400 with the reason; garbage is a
    counted drop; OPTIONS is 200 with Allow; an unknown method is 405."""
    svc, clock, thread, store, rpc = make(tmp_path)
    peer = Peer()
    bad = req("REGISTER", "sip:example.test").replace(b"Max-Forwards: 70", b"Max-Forwards: x")
    svc.received(bad, peer.src, False)
    assert (peer.responses()[0].code, peer.responses()[0].reason) == (400, "bad Max-Forwards")
    svc.received(b"\x00\x01garbage", peer.src, False)
    assert svc.drops["malformed"] == 1 and len(peer.sent) == 1
    svc.received(req("OPTIONS", "sip:example.test", branch="z9hG4bKo"), peer.src, False)
    assert peer.responses()[-1].code == 200 and "REGISTER" in peer.responses()[-1].get("Allow")
    svc.received(req("SUBSCRIBE", "sip:example.test", branch="z9hG4bKs"), peer.src, False)
    assert peer.responses()[-1].code == 405
    svc.received(req("REGISTER", "sip:other.test", branch="z9hG4bKd",
                     to="sip:alice@other.test"), peer.src, False)
    assert peer.responses()[-1].code == 404
    svc.received(req("REGISTER", "sip:example.test", branch="z9hG4bKr",
                     extra=["Require: gruu"]), peer.src, False)
    assert peer.responses()[-1].code == 420
    stats = call(rpc, "sip.stats")
    assert stats["responses"]["400"] == 1 and stats["drops"]["malformed"] == 1


def test_tcp_framing(tmp_path):
    """Two messages in one segment, one split across segments, a CRLF keep-alive ping
    (answered with a pong), and a head without Content-Length (400, connection closed)."""
    svc, clock, thread, store, rpc = make(tmp_path)
    proto = StreamProtocol(svc, "tcp")
    tr = StringTransport()
    proto.makeConnection(tr)
    one = req("OPTIONS", "sip:example.test", branch="z9hG4bKt1")
    two = req("OPTIONS", "sip:example.test", branch="z9hG4bKt2")
    proto.dataReceived(one + two[:30])
    proto.dataReceived(two[30:] + b"\r\n\r\n")
    out = tr.value()
    assert out.count(b"SIP/2.0 200 OK") == 2 and out.endswith(b"\r\n\r\n\r\n")
    tr.clear()
    proto.dataReceived(req("OPTIONS", "sip:example.test", branch="z9hG4bKt3")
                       .replace(b"Content-Length: 0\r\n", b""))
    assert tr.value().startswith(b"SIP/2.0 400 missing Content-Length") and tr.disconnecting


def test_metrics_collect(tmp_path):
    """The collector yields request, response, drop and binding families."""
    svc, clock, thread, store, rpc = make(tmp_path)
    svc.received(req("OPTIONS", "sip:example.test"), Peer().src, False)
    names = {m.name for m in svc.collect()}
    assert {"appliance_sip_requests", "appliance_sip_responses", "appliance_sip_bindings",
            "appliance_sip_dropped"} <= names


def test_store_failure_no_200(tmp_path):
    """A failed commit: the REGISTER gets 500 with Retry-After, never a 200; counted."""
    svc, clock, thread, store, rpc = make(tmp_path)
    peer = Peer()
    svc.received(req("REGISTER", "sip:example.test", contacts=["<sip:alice@h>"]), peer.src, False)
    clock.advance(0)
    thread.run_all(fail=True)
    clock.advance(0)
    [answer] = peer.responses()
    assert answer.code == 500 and answer.get("Retry-After") == "5"
    assert svc.drops["store_error"] == 1


def test_overload_503(tmp_path):
    """Past max_pending REGISTERs waiting for the store, new ones get 503 + Retry-After."""
    svc, clock, thread, store, rpc = make(tmp_path)
    svc.admission.max_pending = 1
    peer = Peer()
    svc.received(req("REGISTER", "sip:example.test", contacts=["<sip:alice@h>"]), peer.src, False)
    svc.received(req("REGISTER", "sip:example.test", to="sip:bob@example.test",
                     branch="z9hG4bKo2", contacts=["<sip:bob@h>"]), peer.src, False)
    [busy] = peer.responses()
    assert busy.code == 503 and busy.get("Retry-After") == "1" and svc.drops["overload"] == 1
    settle(clock, thread)
    assert peer.responses()[-1].code == 200 and svc.pending == 0
