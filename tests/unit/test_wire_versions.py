"""Peers one release apart understand each other (issue 17, rolling upgrade).

Heartbeats: a node reads wire versions VERSION-1..VERSION+1 and emits VERSION;
a newer beat's unknown keys are ignored.  Peer link: the hello carries a
version and capabilities; an old hello (no version, no capabilities) is
version 1; a hello two versions ahead is refused; unknown frame types and
keys are ignored.  Store and replication records: read by key, so an older
node's record (fewer fields) and a newer one's (extra fields) both parse.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from appliance.cluster import heartbeat as hbm
from appliance.cluster import peerlink as plm
from appliance.cluster.heartbeat import Heartbeat, HeartbeatVerifier, decode, encode

KEY = b"k" * 32

#: A beat exactly as release 33b2f38 (exact-version check, VERSION 1) encodes
#: it: Heartbeat("b", 1700000000000000000, 42, 1764800000.5, ("maintenance",),
#: {"vip1": ("b", 3, False)}, {"a": "NORMAL"}, {"vip1": "abcdef012345"}, None,
#: {"a": (1700000000000000001, 7)}, {"vip1": 3}) with KEY.
OLD_RELEASE_BEAT = bytes.fromhex(
    "415048420115ab04db3a1369cfc4b010f059914d4ca1a3c49a8613acab834a43efe371a2197b226e223a2262"
    "222c2269223a313730303030303030303030303030303030302c2273223a34322c2274223a31373634383030"
    "3030302e352c2268223a5b226d61696e74656e616e6365225d2c2272223a7b2276697031223a5b2262222c33"
    "2c66616c73655d7d2c2270223a7b2261223a224e4f524d414c227d2c2263223a7b2276697031223a22616263"
    "646566303132333435227d2c2265223a7b2261223a5b313730303030303030303030303030303030312c375d"
    "7d2c226d223a7b2276697031223a337d7d")


def raw_beat(version: int, body: dict, key: bytes = KEY) -> bytes:
    """A signed datagram of any wire version and payload (what a future release may send)."""
    payload = bytes([version]) + json.dumps(body, separators=(",", ":")).encode()
    mac = hmac.new(key, payload, hashlib.sha256).digest()
    return hbm.MAGIC + payload[:1] + mac + payload[1:]


def body(seq=1, **extra) -> dict:
    return {"n": "b", "i": 5, "s": seq, "t": 1.0, "h": [], "r": {"vip1": ["b", 2, False]},
            "p": {"a": "NORMAL"}, "c": {"vip1": "d1"}, **extra}


def test_a_beat_one_version_ahead_is_accepted_and_its_new_keys_ignored():
    """VERSION+1 (the next release) with keys this release does not know: accepted,
    the known fields parsed (the exact-match check of 33b2f38 dropped it: the peers
    would have seen each other dead during an upgrade)."""
    v = HeartbeatVerifier(KEY, "a", ["b"])
    hb = v.accept(raw_beat(hbm.VERSION + 1, body(zz={"new": 1}, q=[1, 2])))
    assert hb is not None, dict(v.drops)
    assert hb.version == hbm.VERSION + 1
    assert hb.resources == {"vip1": ("b", 2, False)} and hb.partners == {"a": "NORMAL"}
    assert not v.drops


def test_two_versions_apart_or_below_the_oldest_is_dropped_as_bad_version():
    """VERSION+2 and MIN_VERSION-1 are not read (upgrade one release at a time)."""
    v = HeartbeatVerifier(KEY, "a", ["b"])
    assert v.accept(raw_beat(hbm.VERSION + 2, body(seq=1))) is None
    assert v.accept(raw_beat(hbm.MIN_VERSION - 1, body(seq=2))) is None
    assert v.drops["bad_version"] == 2
    assert v.accept(raw_beat(hbm.VERSION, body(seq=3))) is not None


def test_the_next_release_reads_this_release_and_this_release_reads_it(monkeypatch):
    """Simulate the next release (VERSION+1): it accepts this release's beats (its
    VERSION-1) and emits VERSION+1 beats that this release accepts."""
    current = hbm.VERSION
    ours = encode(Heartbeat("b", 5, 1, 1.0, resources={"vip1": ("b", 2, False)}), KEY)
    monkeypatch.setattr(hbm, "VERSION", current + 1)
    assert list(hbm.accepted_versions()) == [current, current + 1, current + 2]
    nxt = HeartbeatVerifier(KEY, "a", ["b"])
    hb = nxt.accept(ours)
    assert hb is not None and hb.version == current and hb.resources["vip1"] == ("b", 2, False)
    theirs = encode(Heartbeat("b", 5, 2, 2.0), KEY)
    assert theirs[4] == current + 1
    monkeypatch.setattr(hbm, "VERSION", current)
    hb = HeartbeatVerifier(KEY, "a", ["b"]).accept(theirs)
    assert hb is not None and hb.version == current + 1


def test_a_beat_encoded_by_the_old_release_decodes_field_by_field():
    """The exact bytes 33b2f38 sends still decode to the same beat."""
    hb = decode(OLD_RELEASE_BEAT, KEY)
    assert hb == Heartbeat("b", 1700000000000000000, 42, 1764800000.5, ("maintenance",),
                           {"vip1": ("b", 3, False)}, {"a": "NORMAL"}, {"vip1": "abcdef012345"},
                           None, {"a": (1700000000000000001, 7)}, {"vip1": 3})
    assert encode(hb, KEY) == OLD_RELEASE_BEAT       # and this release still sends it so


# -- peer link -------------------------------------------------------------------

def make_link(clock=None):
    link = plm.PeerLink(clock or Clock(), node_id="b", incarnation=1, peers={"a": "10.0.0.1"},
                        port=0, server_options=None, client_options=None)
    link.running = True
    return link


def frames(transport) -> list[dict]:
    data, out = transport.value(), []
    while len(data) >= 4:
        (n,) = struct.unpack("!I", data[:4])
        out.append(json.loads(data[4:4 + n]))
        data = data[4 + n:]
    return out


def connect(link, hello: dict):
    proto = plm.PeerProtocol(link, None)
    proto._cert_name = lambda: "a"           # the TLS layer vouched for "a"
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.stringReceived(json.dumps(hello).encode())
    return proto, transport


def test_our_hello_carries_the_version_and_the_advertised_capabilities():
    """A service's capability goes out in the hello, with the wire version."""
    link = make_link()
    link.advertise("dhcp4.stored")
    _, transport = connect(link, {"t": "hello", "node": "a", "inc": 3})
    hello = frames(transport)[0]
    assert hello["t"] == "hello" and hello["v"] == plm.VERSION
    assert hello["caps"] == ["dhcp4.stored"]


def test_an_old_release_hello_is_version_1_without_capabilities():
    """33b2f38's hello has no version and no capabilities: accepted as version 1 with
    none (a service falls back to the old protocol)."""
    link = make_link()
    assert link.peer_capabilities("a") is None          # nothing connected yet
    proto, transport = connect(link, {"t": "hello", "node": "a", "inc": 3})
    assert proto.peer is link.peers["a"] and link.connected("a")
    assert link.peer_version("a") == 1
    assert link.peer_capabilities("a") == frozenset()
    assert link.status()["a"]["version"] == 1 and link.status()["a"]["caps"] == []


def test_a_hello_one_version_ahead_is_accepted_and_unknown_frames_ignored():
    """The next release's hello (VERSION+1, extra keys, capabilities) is accepted; a
    frame type and frame keys this release does not know are ignored, messages flow."""
    link = make_link()
    got = []
    link.on("ch", lambda peer, b: got.append(b))
    proto, transport = connect(link, {"t": "hello", "node": "a", "inc": 3,
                                      "v": plm.VERSION + 1, "caps": ["x.y", 7], "new": True})
    assert link.connected("a") and link.peer_capabilities("a") == frozenset({"x.y"})
    assert link.peer_version("a") == plm.VERSION + 1
    proto.stringReceived(json.dumps({"t": "future-kind", "what": 1}).encode())
    proto.stringReceived(json.dumps({"t": "msg", "ch": "ch", "seq": 1, "body": "x",
                                     "prio": 3}).encode())
    assert got == ["x"] and transport.connected
    assert [f["seq"] for f in frames(transport) if f["t"] == "ack"] == [1]


def test_a_hello_two_versions_ahead_is_refused():
    """Two releases apart: refused with a reason (counted), never half-understood."""
    link = make_link()
    proto, transport = connect(link, {"t": "hello", "node": "a", "inc": 3,
                                      "v": plm.VERSION + 2})
    assert proto.peer is None and not link.connected("a")
    assert link.stats["refused"] == 1 and transport.disconnecting


# -- store and replication records -----------------------------------------------

def test_dhcp4_lease_records_of_an_older_and_a_newer_release_parse():
    """A lease hash without the later fields (pexp, acked, synced, ddns) and one with a
    field this release does not know both parse; likewise the replication form."""
    from services.dhcp.v4.leases import Lease
    old = {"address": "10.0.0.5", "subnet": "1", "state": "bound", "hwaddr": "02:00:00:00:00:05",
           "client_id": "", "hostname": "", "expires": "2000.0", "cltt": "1000.0",
           "owner": "a", "updated_by": "a", "version": "3"}
    lease = Lease.from_hash(old)
    assert lease is not None and lease.state == "bound" and lease.pexp == 2000.0
    assert Lease.from_hash({**old, "future_field": "x"}) == lease
    wire = {**lease.to_wire(), "future_field": [1]}
    del wire["pexp"], wire["ddns"]
    assert Lease.from_wire(wire).address == "10.0.0.5"


def test_sip_binding_records_of_an_older_and_a_newer_release_parse():
    """A binding record with only the required keys, and one with an unknown key."""
    from services.sip.registrar import Binding
    b = Binding.from_record("sip:u@x", {"uri": "sip:u@10.0.0.9", "expires": 99.0})
    assert b.uri == "sip:u@10.0.0.9" and b.cseq == 0
    assert Binding.from_record("sip:u@x", {"uri": "sip:u@10.0.0.9", "expires": 99.0,
                                           "future": 1}) == b
