"""DHCPv6 codec (RFC 8415 wire format): round trips, known bytes, malformed input (hypothesis)."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from services.dhcp.v6 import codec as C

addr16 = st.binary(min_size=16, max_size=16)
u32 = st.integers(0, 2**32 - 1)
duid = st.binary(min_size=3, max_size=C.MAX_DUID)
label = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)
name = st.lists(label, min_size=1, max_size=4).map(".".join)
status = st.builds(C.Status, st.integers(0, 65535), st.text(max_size=20))
ia_na = st.builds(C.IA, u32, u32, u32,
                  st.lists(st.builds(C.IAAddress, addr16, u32, u32, st.none() | status),
                           max_size=3),
                  st.just([]), st.none() | status)
ia_pd = st.builds(C.IA, u32, u32, u32, st.just([]),
                  st.lists(st.builds(C.IAPrefix, addr16, st.integers(0, 128), u32, u32,
                                     st.none() | status), max_size=3),
                  st.none() | status)
fqdn = st.builds(C.ClientFQDN, st.integers(0, 255), name, st.booleans())
other_code = st.integers(0, 65535).filter(lambda c: c not in (
    1, 2, 3, 6, 7, 8, 13, 14, 23, 24, 25, 39))
message = st.builds(
    C.Message, st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]),
    st.integers(0, 2**24 - 1), st.none() | duid, st.none() | duid,
    st.lists(ia_na, max_size=2), st.lists(ia_pd, max_size=2),
    st.none() | st.lists(st.integers(0, 65535), max_size=5).map(tuple),
    st.none() | st.integers(0, 255), st.none() | st.integers(0, 65535),
    st.none() | status, st.booleans(),
    st.none() | st.lists(addr16, max_size=3).map(tuple),
    st.none() | st.lists(name, max_size=3).map(tuple), st.none() | fqdn,
    st.dictionaries(other_code, st.lists(st.binary(max_size=20), min_size=1, max_size=2),
                    max_size=2))


def relay_of(inner_strategy):
    return st.builds(C.RelayMessage, st.just(C.RELAY_FORW), st.integers(0, 255), addr16, addr16,
                     inner_strategy, st.none() | st.binary(max_size=16), st.just({}))


any_message = st.recursive(message, relay_of, max_leaves=3)


@settings(max_examples=120, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(any_message)
def test_round_trip(m):
    """parse(encode(m)) == m for every message and relay chain the dataclasses can hold."""
    assert C.parse(C.encode(m)) == m


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash(data):
    """Random bytes parse or raise MalformedMessage with a known reason, nothing else."""
    try:
        C.parse(data)
    except C.MalformedMessage as e:
        assert e.reason in C.DROP_REASONS


@settings(max_examples=120, deadline=None)
@given(any_message, st.data())
def test_mutated_messages_never_crash(m, data):
    """A valid message with a byte flipped or cut short parses or raises MalformedMessage."""
    raw = bytearray(C.encode(m))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    for blob in (bytes(raw), bytes(raw[:cut])):
        try:
            C.parse(blob)
        except C.MalformedMessage as e:
            assert e.reason in C.DROP_REASONS


def test_known_solicit_bytes():
    """A SOLICIT as dhclient sends it (client ID, IA_NA, ORO, elapsed time) decodes field by field."""
    raw = bytes.fromhex(
        "01abcdef"                                  # SOLICIT, txid
        "0001000a00030001525400000001"              # CLIENTID DUID-LL
        "0003000c000000010000000000000000"          # IA_NA iaid 1, T1 T2 0
        "000600040017" "0018"                       # ORO 23, 24
        "000800020000")                             # ELAPSED_TIME 0
    m = C.parse(raw)
    assert (m.msg_type, m.txid, m.client_id.hex()) == (C.SOLICIT, 0xABCDEF, "00030001525400000001")
    assert m.ia_na == [C.IA(1)] and m.oro == (23, 24) and m.elapsed == 0
    assert C.encode(m) == raw


def test_relay_reply_echoes_every_layer():
    """relay_reply builds RELAY-REPL layers echoing hop count, addresses and interface-id."""
    inner = C.RelayMessage(C.RELAY_FORW, 0, b"\x20" + bytes(15), b"\xfe\x80" + bytes(14),
                           C.Message(C.SOLICIT, 1, client_id=b"\x00\x03\x00\x01ab"), b"if-a")
    outer = C.RelayMessage(C.RELAY_FORW, 1, bytes(16), b"\xfe\x80" + bytes(13) + b"\x02",
                           inner, None)
    rep = C.relay_reply(outer, C.Message(C.REPLY, 1))
    assert rep.msg_type == C.RELAY_REPL and rep.hop_count == 1 and rep.interface_id is None
    assert rep.inner.msg_type == C.RELAY_REPL and rep.inner.interface_id == b"if-a"
    assert rep.inner.link_address == inner.link_address and rep.innermost().msg_type == C.REPLY
    assert C.parse(C.encode(rep)) == rep


@pytest.mark.parametrize("raw,reason", [
    (b"\x01\x00", "short"),
    (bytes.fromhex("01000001" "0001"), "bad_option"),
    (bytes.fromhex("01000001" "0001000a0003"), "bad_option"),
    (bytes.fromhex("01000001" "00010001" "00"), "bad_duid"),
    (bytes.fromhex("01000001" "0003000400000000"), "bad_ia"),
    (bytes.fromhex("01000001" "00080001" "00"), "bad_option"),
    (bytes.fromhex("01000001" "000e000100"), "bad_option"),
    (bytes.fromhex("01000001" "0018000203616263"), "bad_name"),
    (bytes.fromhex("01000001" "000800020000" "000800020000"), "duplicate_option"),
    (bytes.fromhex("63000001"), "unknown_type"),
    (bytes([12, 0]) + bytes(32), "bad_relay"),
    (bytes([12, 0]) + bytes(31), "short"),
])
def test_malformed_reasons(raw, reason):
    """Each kind of malformed input raises MalformedMessage with its reason."""
    with pytest.raises(C.MalformedMessage) as e:
        C.parse(raw)
    assert e.value.reason == reason


def test_relay_depth_limited():
    """More than 32 nested RELAY-FORW layers: too_deep, not a recursion error."""
    m = C.Message(C.SOLICIT, 1)
    for _ in range(40):
        m = C.RelayMessage(C.RELAY_FORW, 0, bytes(16), bytes(16), m)
    with pytest.raises(C.MalformedMessage) as e:
        C.parse(C.encode(m))
    assert e.value.reason == "too_deep"


_RELAYED = st.builds(lambda m, link: C.RelayMessage(C.RELAY_FORW, 0, link, bytes(16), m),
                     message, st.sampled_from([bytes(16), bytes.fromhex("20010db8000100000000000000000001"),
                                               bytes.fromhex("20010db8000900000000000000000001")]))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.lists(_RELAYED, min_size=1, max_size=6), st.data())
def test_handler_never_raises_on_any_message(tmp_path, msgs, data):
    """Any decodable message (random IAs, hints, server ids -- some ours), relayed or not,
    goes through the handler and the core's lease stores without an exception; a reply
    it builds always encodes."""
    from tests.unit.test_dhcp6_server import SERVER, Lab
    lab = Lab(tmp_path / str(data.draw(st.integers(0, 10**9))))
    for r in msgs:
        if data.draw(st.booleans()):
            r.inner.server_id = SERVER
        for ia in r.inner.ia_na:                     # some hints inside the lab's pool
            for a in ia.addresses:
                if data.draw(st.booleans()):
                    a.address = bytes.fromhex("20010db8000100000000000000000100")[:15] + \
                        bytes([data.draw(st.integers(0, 5))])
        for ia in r.inner.ia_pd:
            for p in ia.prefixes:
                if data.draw(st.booleans()):
                    p.prefix, p.prefix_len = bytes.fromhex("20010db8010000000000000000000000"), \
                        data.draw(st.sampled_from([48, 56, 64]))
        for m in (r, r.inner):
            out = lab.h.handle(C.parse(C.encode(m)))
            if out is not None:
                C.parse(C.encode(out))


def _innermost(m):
    while isinstance(m, C.RelayMessage):
        m = m.inner
    return m


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(any_message)
def test_peek_server_id_agrees_with_parse(m):
    """peek_server_id (a walk over option headers, through RELAY-FORW layers) finds the
    Server Identifier parse finds, for the messages that must name a server; None for
    every other type."""
    inner = _innermost(m)
    want = inner.server_id if inner.msg_type in C.TO_A_SERVER else None
    assert C.peek_server_id(C.encode(m)) == want


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_peek_server_id_never_crashes(data):
    """Random bytes: peek_server_id returns bytes or None, never raises; when parse reads
    the datagram as a message that must name a server, both agree."""
    got = C.peek_server_id(data)
    assert got is None or isinstance(got, bytes)
    try:
        m = C.parse(data)
    except C.MalformedMessage:
        return
    inner = _innermost(m)
    if inner.msg_type in C.TO_A_SERVER:
        assert got == inner.server_id


def test_peek_server_id_known_bytes():
    """A REQUEST naming server 00010203 directly and inside two relays; a SOLICIT, a
    REQUEST without one and a cut-short one give None."""
    req = C.Message(C.REQUEST, 7, client_id=b"\x00\x03\x00\x01abcdef", server_id=b"\x00\x01\x02\x03")
    raw = C.encode(req)
    assert C.peek_server_id(raw) == b"\x00\x01\x02\x03"
    relay = C.RelayMessage(C.RELAY_FORW, 0, bytes(16), bytes(16), req, b"if")
    twice = C.RelayMessage(C.RELAY_FORW, 1, bytes(16), bytes(16), relay, None)
    assert C.peek_server_id(C.encode(twice)) == b"\x00\x01\x02\x03"
    assert C.peek_server_id(C.encode(C.Message(C.SOLICIT, 7, client_id=b"\x00\x03\x00\x01ab",
                                               server_id=b"\x00\x01\x02"))) is None
    assert C.peek_server_id(C.encode(C.Message(C.REQUEST, 7, client_id=b"\x00\x03ab"))) is None
    assert C.peek_server_id(raw[:-2]) is None
