"""Heartbeat authentication: forged, replayed, reordered, truncated beats are dropped and counted."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given, settings

from appliance.cluster.heartbeat import (Heartbeat, HeartbeatVerifier, config_digest, decode,
                                         encode)

KEY = b"k" * 32


def beat(node="b", inc=1, seq=1, **kw) -> bytes:
    return encode(Heartbeat(node, inc, seq, 1000.0, **kw), KEY)


def verifier() -> HeartbeatVerifier:
    return HeartbeatVerifier(KEY, "a", ["b", "c"])


def test_round_trip():
    """Every field survives encode/decode."""
    hb = Heartbeat("b", 7, 3, 12.5, ("maintenance",), {"vip": ("b", 4, True)},
                   {"a": "NORMAL"}, {"vip": "abc"}, {"vip": {"priority": "12345678"}})
    assert decode(encode(hb, KEY), KEY) == hb
    assert not hb.able


def test_forged_with_wrong_key_dropped():
    """A beat signed with another key is dropped as bad_mac."""
    v = verifier()
    forged = encode(Heartbeat("b", 1, 1, 0.0), b"x" * 32)
    assert v.accept(forged) is None
    assert v.drops["bad_mac"] == 1


def test_tampered_payload_dropped():
    """Flipping a payload byte breaks the MAC."""
    v = verifier()
    data = bytearray(beat())
    data[-3] ^= 1
    assert v.accept(bytes(data)) is None
    assert v.drops["bad_mac"] == 1


def test_replayed_and_reordered_dropped():
    """The same beat twice, or an older sequence number, is never believed."""
    v = verifier()
    first, second = beat(seq=1), beat(seq=2)
    assert v.accept(first) is not None
    assert v.accept(second) is not None
    assert v.accept(second) is None
    assert v.accept(first) is None
    assert v.drops["replayed"] == 1 and v.drops["reordered"] == 1


def test_new_incarnation_resets_sequence_old_one_rejected():
    """After a restart (higher incarnation) seq starts over; old incarnations stay dead."""
    v = verifier()
    assert v.accept(beat(inc=5, seq=100))
    assert v.accept(beat(inc=6, seq=1))
    assert v.accept(beat(inc=5, seq=101)) is None
    assert v.drops["old_incarnation"] == 1


def test_truncated_magic_unknown_and_own_dropped():
    """Short datagrams, wrong magic, unknown peers and our own beats are counted."""
    v = verifier()
    good = beat()
    assert v.accept(good[:20]) is None
    assert v.accept(b"XXXX" + good[4:]) is None
    assert v.accept(beat(node="z")) is None
    assert v.accept(beat(node="a")) is None
    assert v.accept(b"") is None
    assert dict(v.drops) == {"truncated": 2, "bad_magic": 1, "unknown_peer": 1, "own_node": 1}


def test_authentic_but_malformed_body_dropped():
    """A correctly signed but nonsensical payload is 'malformed', not a crash."""
    import hashlib
    import hmac
    v = verifier()
    payload = bytes([1]) + b'{"n": 5, "i": "x"}'
    mac = hmac.new(KEY, payload, hashlib.sha256).digest()
    assert v.accept(b"APHB" + payload[:1] + mac + payload[1:]) is None
    assert v.drops["malformed"] == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_crash(data):
    """Arbitrary datagrams are dropped with a reason, never raise."""
    v = verifier()
    assert v.accept(data) is None
    assert sum(v.drops.values()) == 1


def test_config_digest_names_differing_setting():
    """Digests differ per setting so a mismatch can be named."""
    a_all, a = config_digest({"address": "10.0.0.1/24", "preempt": True})
    b_all, b = config_digest({"address": "10.0.0.1/24", "preempt": False})
    assert a_all != b_all
    assert [k for k in a if a[k] != b[k]] == ["preempt"]
