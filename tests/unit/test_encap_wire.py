"""The encap wire protocol: handshake, sealed records, replay window, malformed input."""

import struct

import pytest
from hypothesis import given, settings, strategies as st

from services.encap import wire as W

PSK = bytes(range(32))


def handshake(psk_i=PSK, psk_r=PSK):
    """Run one handshake; returns (initiator keys, responder keys, pending)."""
    ini = W.Initiator(psk_i, "en1")
    res = W.Responder(psk_r, "dn1")
    hello = W.decode(ini.hello())
    ch = W.decode(res.hello(hello, ("10.0.0.1", 1), now=0.0))
    confirm, ikeys, rid = ini.challenged(ch)
    pending, rkeys = res.confirm(W.decode(confirm), ("10.0.0.1", 1), now=0.1)
    assert rid == "dn1" and pending.peer_ident == "en1"
    return ikeys, rkeys, res


def test_handshake_derives_matching_keys_both_ways():
    """Both sides end with keys that open each other's records."""
    ikeys, rkeys, _ = handshake()
    packet = bytes([0x45]) + bytes(39)
    rec = W.decode(ikeys.seal(W.data_plain(7, packet)))
    assert W.parse_inner(rkeys.open(rec)) == (W.K_DATA, (7, packet))
    back = W.decode(rkeys.seal(W.control_plain({"t": "assign", "address": "10.200.0.5"})))
    kind, msg = W.parse_inner(ikeys.open(back))
    assert kind == W.K_CONTROL and msg["address"] == "10.200.0.5"


def test_responder_without_the_key_is_refused_by_the_initiator():
    """A DN that does not hold the PSK cannot complete the handshake (mutual auth, DN side)."""
    ini = W.Initiator(PSK, "en1")
    rogue = W.Responder(b"x" * 32, "dn1")
    ch = W.decode(rogue.hello(W.decode(ini.hello()), None, 0.0))
    with pytest.raises(W.Drop) as e:
        ini.challenged(ch)
    assert e.value.reason == "bad_mac"


def test_initiator_without_the_key_is_refused_by_the_responder():
    """An EN that does not hold the PSK gets no session (mutual auth, EN side)."""
    ini = W.Initiator(b"y" * 32, "en1")
    res = W.Responder(PSK, "dn1")
    ch = W.decode(res.hello(W.decode(ini.hello()), None, 0.0))
    # the rogue initiator cannot verify the DN's MAC, but may send a CONFIRM anyway
    forged = W.Confirm(ch.sender, b"\0" * 32).encode()
    with pytest.raises(W.Drop) as e:
        res.confirm(W.decode(forged), None, 0.1)
    assert e.value.reason == "bad_mac"


def test_replayed_confirm_and_expired_handshake():
    """A CONFIRM is good once; a late one is refused."""
    ini = W.Initiator(PSK, "en1")
    res = W.Responder(PSK, "dn1", timeout_s=1.0)
    ch = W.decode(res.hello(W.decode(ini.hello()), None, 0.0))
    confirm, _, _ = ini.challenged(ch)
    res.confirm(W.decode(confirm), None, 0.5)
    with pytest.raises(W.Drop) as e:
        res.confirm(W.decode(confirm), None, 0.6)
    assert e.value.reason == "unknown_session"
    ini2 = W.Initiator(PSK, "en1")
    ch2 = W.decode(res.hello(W.decode(ini2.hello()), None, 0.0))
    confirm2, _, _ = ini2.challenged(ch2)
    with pytest.raises(W.Drop) as e:
        res.confirm(W.decode(confirm2), None, 5.0)
    assert e.value.reason == "handshake_expired"


def test_pending_handshakes_are_bounded():
    """A HELLO flood keeps at most max_pending half-open handshakes."""
    res = W.Responder(PSK, "dn1", max_pending=8)
    for i in range(100):
        res.hello(W.Hello(i + 1, bytes(16), "en"), None, float(i))
    assert len(res.pending) == 8


def test_replay_and_forgery_dropped_and_window_not_moved_by_forgery():
    """Same record twice: replay; bit flipped: forged; a forged high seq leaves the window."""
    ikeys, rkeys, _ = handshake()
    packet = bytes([0x45]) + bytes(39)
    first = ikeys.seal(W.data_plain(1, packet))
    rkeys.open(W.decode(first))
    with pytest.raises(W.Drop) as e:
        rkeys.open(W.decode(first))
    assert e.value.reason == "replay"
    second = bytearray(ikeys.seal(W.data_plain(2, packet)))
    second[-1] ^= 1
    with pytest.raises(W.Drop) as e:
        rkeys.open(W.decode(bytes(second)))
    assert e.value.reason == "forged"
    # a forged record claiming a huge sequence number
    forged = W.RECORD_HEADER.pack(W.T_RECORD, rkeys.peer_index if False else 0, 10 ** 9) + bytes(40)
    with pytest.raises(W.Drop):
        rkeys.open(W.decode(forged))
    assert rkeys.window.top == 0
    # the real second record (unflipped) is still accepted: seq 1 is new
    ikeys.send_seq = 1
    rkeys.open(W.decode(ikeys.seal(W.data_plain(2, packet))))


def test_replay_window_out_of_order_and_too_old():
    """Out-of-order arrivals inside the window pass once; older than the window: replay_old."""
    w = W.ReplayWindow(64)
    for seq in (5, 3, 4, 100, 60):
        assert w.check(seq) is None
        w.accept(seq)
    assert w.check(3) == "replay_old"
    assert w.check(60) == "replay"
    assert w.check(61) is None
    assert w.check(100) == "replay"
    w.accept(100 + 10 ** 6)
    assert w.check(100) == "replay_old"


def test_header_is_authenticated():
    """Moving a record to another sequence number breaks its tag."""
    ikeys, rkeys, _ = handshake()
    sealed = bytearray(ikeys.seal(W.keepalive_plain(True)))
    struct.pack_into("!Q", sealed, 5, 99)
    with pytest.raises(W.Drop) as e:
        rkeys.open(W.decode(bytes(sealed)))
    assert e.value.reason == "forged"


@given(st.binary(max_size=300))
@settings(max_examples=400, deadline=None)
def test_malformed_datagrams_never_crash(data):
    """Any bytes: a decoded message or a Drop with a reason, nothing else."""
    try:
        msg = W.decode(data)
    except W.Drop as e:
        assert e.reason
        return
    assert isinstance(msg, (W.Hello, W.Challenge, W.Confirm, W.Record))


@given(st.binary(min_size=1, max_size=3000))
@settings(max_examples=300, deadline=None)
def test_malformed_inner_never_crash(plain):
    """Any plaintext after a good tag: parsed or a counted Drop."""
    try:
        W.parse_inner(plain)
    except W.Drop as e:
        assert e.reason


@given(st.binary(max_size=200))
@settings(max_examples=200, deadline=None)
def test_random_records_are_dropped_by_an_established_session(data):
    """Random bytes typed as RECORD never open."""
    _, rkeys, _ = handshake()
    try:
        rec = W.decode(bytes([W.T_RECORD]) + data)
        rkeys.open(rec)
    except W.Drop as e:
        assert e.reason in ("short", "forged", "replay", "replay_old")
    else:
        raise AssertionError("random bytes opened")
