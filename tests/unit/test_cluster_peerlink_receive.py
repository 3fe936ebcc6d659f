"""The peer link's receive side on a fake transport and a Clock: never an ack past a
failed handler, retries with backoff, poison messages parked, keepalive, bounded queue."""

from __future__ import annotations

import json
import struct

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from appliance.cluster.peerlink import RECV_HIGH, PeerLink, PeerLinkError, PeerProtocol


def make_link(clock, **kw):
    link = PeerLink(clock, node_id="b", incarnation=1, peers={"a": "10.0.0.1"}, port=0,
                    server_options=None, client_options=None, **kw)
    link.running = True
    return link


def connect(link, clock, inc=7):
    proto = PeerProtocol(link, None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.peer = link.peers["a"]
    link._attached(proto.peer, proto, inc)
    return proto, transport


def frames(transport):
    data, out = transport.value(), []
    while len(data) >= 4:
        (n,) = struct.unpack("!I", data[:4])
        out.append(json.loads(data[4:4 + n]))
        data = data[4 + n:]
    return out


def acks(transport):
    return [f["seq"] for f in frames(transport) if f["t"] == "ack"]


def msg(seq, body=None):
    return json.dumps({"t": "msg", "ch": "ch", "seq": seq, "body": body or seq}).encode()


def test_no_ack_past_a_failed_handler_and_the_failed_message_is_retried():
    """H2: the handler fails once on seq 5 while 6 and 7 are queued: 5 is retried after a
    backoff, nothing past 4 is acked before 5 succeeds, then 5, 6, 7 in order."""
    clock = Clock()
    link = make_link(clock)
    handled, failed_once = [], set()

    def handler(peer, body):
        if body == 5 and 5 not in failed_once:
            failed_once.add(5)
            return defer.fail(RuntimeError("store hiccup"))
        handled.append(body)

    link.on("ch", handler)
    proto, transport = connect(link, clock)
    for seq in (4, 5, 6, 7):
        proto.stringReceived(msg(seq))
    assert handled == [4]
    assert acks(transport) == [4]
    assert max(link.peers["a"].delivered.values()) == 4
    clock.advance(0.2)
    assert handled == [4, 5, 6, 7]
    assert acks(transport) == [4, 5, 6, 7]
    assert link.stats["handler_failures"] == 1 and link.stats["parked"] == 0
    assert transport.connected, "a transient failure does not cost the connection"


def test_resend_after_reconnect_is_handled_not_acked_as_duplicate():
    """The failed message arrives again on a new connection: it is handled (not treated
    as a duplicate), and frames of the dead connection are never handled."""
    clock = Clock()
    link = make_link(clock)
    handled, fail = [], {"on": True}

    def handler(peer, body):
        if body == 2 and fail["on"]:
            raise RuntimeError("boom")
        handled.append(body)

    link.on("ch", handler)
    proto, transport = connect(link, clock)
    for seq in (1, 2, 3):
        proto.stringReceived(msg(seq))
    assert handled == [1]
    proto.connectionLost(type("R", (), {"getErrorMessage": lambda self: "gone"})())
    fail["on"] = False
    proto2, transport2 = connect(link, clock)
    for seq in (2, 3):
        proto2.stringReceived(msg(seq))
    clock.advance(1)
    assert handled == [1, 2, 3]
    assert acks(transport2)[-1] == 3
    assert 3 not in acks(transport)


def test_poison_message_parked_counted_and_acked_in_order():
    """A message that always fails is retried with backoff, then parked (kept, counted,
    shown in status) and acked; the next message is then handled."""
    clock = Clock()
    link = make_link(clock, poison_after=4)
    handled = []

    def handler(peer, body):
        if body == "poison":
            raise ValueError("cannot apply")
        handled.append(body)

    link.on("ch", handler)
    proto, transport = connect(link, clock)
    proto.stringReceived(msg(1, "poison"))
    proto.stringReceived(msg(2, "fine"))
    for _ in range(35):              # retries at 0.1 and 0.3 s: three failures
        clock.advance(0.01)
    assert handled == [] and acks(transport) == [] and link.stats["parked"] == 0
    for _ in range(40):              # the fourth at 0.7 s parks it
        clock.advance(0.01)
    assert link.stats["parked"] == 1
    parked = link.status()["a"]["parked"]
    assert parked[0]["seq"] == 1 and "cannot apply" in parked[0]["error"]
    assert link.peers["a"].parked[0]["body"] == "poison"
    assert handled == ["fine"] and acks(transport) == [1, 2]


def test_keepalive_aborts_a_silent_connection():
    """M4: pings go out every keepalive_s; nothing received for idle_timeout_s aborts."""
    clock = Clock()
    link = make_link(clock, keepalive_s=0.1, idle_timeout_s=0.35)
    proto, transport = connect(link, clock)
    clock.advance(0.1)
    assert any(f["t"] == "ping" for f in frames(transport))
    proto.stringReceived(b'{"t":"pong"}')
    clock.advance(0.3)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting and link.stats["idle_timeouts"] == 1


def test_receive_queue_bounded_by_pausing_the_transport():
    """M5: a slow handler and a flood: reading pauses at RECV_HIGH and resumes."""
    clock = Clock()
    link = make_link(clock)
    waits = []
    link.on("ch", lambda peer, body: waits.append(defer.Deferred()) or waits[-1])
    proto, transport = connect(link, clock)
    for seq in range(1, RECV_HIGH + 2):
        proto.stringReceived(msg(seq))
    assert transport.producerState == "paused"
    while waits:
        waits.pop(0).callback(None)
    assert transport.producerState == "producing"


def test_oversize_send_refused_and_stop_fails_unacked():
    """A body over the frame limit fails at send; stop errbacks every unacked send."""
    clock = Clock()
    link = make_link(clock)
    errors = []
    link.send("a", "ch", "x" * (5 * 1024 * 1024)).addErrback(errors.append)
    pending = link.send("a", "ch", "small")
    pending.addErrback(errors.append)
    link.stopService()
    assert len(errors) == 2 and all(e.check(PeerLinkError) for e in errors)
