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


# -- M8: a beat never goes out over the size budget when optional parts can go ------
def _big_beat(n=30, seq=1):
    from appliance.cluster.heartbeat import config_digest as cd
    names = [f"res-{i:03d}" for i in range(n)]
    detail = {name: cd({"address": f"10.0.{i}.1/24", "priority": {"a": 200, "b": 100},
                        "preempt": True})[1] for i, name in enumerate(names)}
    return Heartbeat("a", 1, seq, 1000.0, (), {}, {}, {name: "0123456789ab" for name in names},
                     detail, {"b": (1, 1)}, {name: 7 for name in names})


def test_oversize_beat_splits_its_config_detail_across_beats():
    from appliance.cluster.heartbeat import FIT_BUDGET, BeatFitter
    stats = {}
    fitter = BeatFitter(KEY, stats)
    big = _big_beat()
    assert len(encode(big, KEY)) > FIT_BUDGET
    seen = set()
    for i in range(40):
        hb = fitter.fit(big)
        assert len(encode(hb, KEY)) <= FIT_BUDGET
        assert hb.config == big.config and hb.max_epochs == big.max_epochs and hb.echo
        seen |= set(hb.config_detail or {})
        assert decode(encode(hb, KEY), KEY).config_detail == hb.config_detail
    assert seen == set(big.config_detail), "every resource's detail goes out in rotation"
    assert stats["beats_trimmed"] == 40


def test_beat_over_the_receivers_limit_drops_the_epoch_map_and_is_counted():
    from dataclasses import replace
    from appliance.cluster.heartbeat import BeatFitter
    stats, logged = {}, []
    fitter = BeatFitter(KEY, stats, budget=400, hard=1200, log=lambda msg, **kw: logged.append(msg))
    hb = fitter.fit(replace(_big_beat(40), config_detail=None))
    assert hb.max_epochs == {} and hb.config and len(encode(hb, KEY)) > 400
    assert stats["beats_trimmed_epochs"] == 1 and stats["oversize_built"] == 1
    assert len(logged) == 2


def test_manager_with_many_resources_builds_beats_within_the_budget():
    """The manager's detail beats (every 10th) with 30 resources went out at ~3.5 KB
    (only warned about: IP fragments); now each beat fits."""
    FIT_BUDGET = 1400          # one 1500-byte MTU datagram, no IP fragments
    from appliance.cluster.ownership import ResourceSpec
    from tests.unit.test_cluster_manager import make_pair
    clock, net, nodes = make_pair()
    m = nodes["a"]
    for i in range(30):
        m.add_resource(ResourceSpec(f"res-{i:03d}", {"a": 200, "b": 100}),
                       settings={"priority": {"a": 200, "b": 100}, "preempt": True,
                                 "address": f"10.0.{i}.1/24"})
    m.startService()
    sizes = [len(encode(m.build_heartbeat(), KEY)) for _ in range(25)]
    m.stopService()
    assert max(sizes) <= FIT_BUDGET, sizes
