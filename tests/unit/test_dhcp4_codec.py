"""DHCPv4 wire codec: golden bytes, round trips, malformed input, replies."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.dhcp.v4 import codec
from services.dhcp.v4.codec import (
    ACK,
    DHCPPacket,
    DISCOVER,
    DROP_REASONS,
    INFORM,
    NAK,
    OFFER,
    REQUEST,
    ClientFQDN,
    MalformedPacket,
    PacketTooLarge,
    build_reply,
    decode_option_value,
    encode,
    encode_option_value,
    encode_with_dropped,
    parse,
    reply_destination,
)

MAC = bytes.fromhex("000c29a1b2c3")
COOKIE = bytes([99, 130, 83, 99])
ZERO = IPv4Address("0.0.0.0")
BCAST = IPv4Address("255.255.255.255")
SERVER = IPv4Address("10.9.0.1")
RELAY = IPv4Address("10.20.0.1")

FAST = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


# -- helpers --------------------------------------------------------------------


def _header(op=1, htype=1, hlen=6, hops=0, xid=0x3903F326, secs=0, flags=0,
            ciaddr=b"\0" * 4, yiaddr=b"\0" * 4, siaddr=b"\0" * 4, giaddr=b"\0" * 4,
            chaddr=MAC, sname=b"", file=b"") -> bytes:
    """A BOOTP fixed header written out field by field (RFC 2131 figure 1)."""
    return (bytes([op, htype, hlen, hops]) + xid.to_bytes(4, "big")
            + secs.to_bytes(2, "big") + flags.to_bytes(2, "big")
            + ciaddr + yiaddr + siaddr + giaddr
            + chaddr.ljust(16, b"\0") + sname.ljust(64, b"\0") + file.ljust(128, b"\0"))


def _packet(options: bytes, **header) -> bytes:
    """Header + magic cookie + raw option bytes (no END added)."""
    return _header(**header) + COOKIE + options


def _request(mtype=REQUEST, *, prl=(1, 3, 6, 15, 51), options=None, **fields) -> DHCPPacket:
    """A client request as the parser would return it."""
    opts = {53: bytes([mtype])}
    if prl is not None:
        opts[55] = bytes(prl)
    opts.update(options or {})
    fields.setdefault("xid", 0xCAFE)
    fields.setdefault("chaddr", MAC)
    return DHCPPacket(options=opts, **fields)


SERVER_OPTIONS = {
    1: encode_option_value(1, "255.255.255.0"),
    3: encode_option_value(3, ["10.9.0.1"]),
    6: encode_option_value(6, ["10.9.0.1", "10.9.0.2"]),
    15: encode_option_value(15, "example.org"),
    28: encode_option_value(28, "10.9.0.255"),
    42: encode_option_value(42, b"\x0a\x09\x00\x01"),
    51: encode_option_value(51, 3600),
    58: encode_option_value(58, 1800),
    59: encode_option_value(59, 3150),
    56: b"wrong address",
}


# -- golden bytes ---------------------------------------------------------------

# A DISCOVER laid out by hand from RFC 2131 figure 1 and RFC 2132: broadcast bit
# set, options 53 (DISCOVER), 61 (type 1 + MAC), 50 (192.168.1.100),
# 55 (1, 3, 6, 15), END, zero padding to the 300-octet BOOTP minimum.
GOLDEN_DISCOVER = (
    b"\x01\x01\x06\x00"                      # op, htype, hlen, hops
    b"\x39\x03\xf3\x26"                      # xid
    b"\x00\x00\x80\x00"                      # secs, flags (broadcast)
    + b"\x00" * 16                           # ciaddr yiaddr siaddr giaddr
    + MAC + b"\x00" * 10                     # chaddr
    + b"\x00" * 64 + b"\x00" * 128           # sname, file
    + b"\x63\x82\x53\x63"                    # magic cookie
    + b"\x35\x01\x01"                        # 53 DISCOVER
    + b"\x3d\x07\x01" + MAC                  # 61 client identifier
    + b"\x32\x04\xc0\xa8\x01\x64"            # 50 requested IP
    + b"\x37\x04\x01\x03\x06\x0f"            # 55 PRL
    + b"\xff"                                # END
)
GOLDEN_DISCOVER += b"\x00" * (300 - len(GOLDEN_DISCOVER))

GOLDEN_PACKET = DHCPPacket(
    op=1, htype=1, hlen=6, hops=0, xid=0x3903F326, secs=0, flags=0x8000,
    chaddr=MAC, options={53: b"\x01", 61: b"\x01" + MAC, 50: bytes([192, 168, 1, 100]),
                         55: bytes([1, 3, 6, 15])})


def test_golden_discover_parses():
    """The hand-built DISCOVER parses into the expected fields and properties."""
    pkt = parse(GOLDEN_DISCOVER)
    assert pkt == GOLDEN_PACKET
    assert list(pkt.options) == [53, 61, 50, 55]
    assert pkt.message_type == DISCOVER
    assert pkt.message_type_name == "DISCOVER"
    assert pkt.hwaddr == MAC
    assert pkt.client_id == b"\x01" + MAC
    assert pkt.requested_ip == IPv4Address("192.168.1.100")
    assert pkt.parameter_request_list == [1, 3, 6, 15]
    assert pkt.broadcast is True
    assert pkt.server_id is None and pkt.hostname is None
    assert pkt.max_message_size is None and pkt.relay_agent_info is None


def test_golden_discover_encodes_byte_for_byte():
    """Encoding the parsed DISCOVER reproduces the hand-built bytes exactly."""
    assert encode(GOLDEN_PACKET) == GOLDEN_DISCOVER
    assert len(GOLDEN_DISCOVER) == 300


# -- round trips ----------------------------------------------------------------

_CHECKED = {50, 52, 53, 54, 57, 61, 118}
_ip = st.integers(0, 2**32 - 1).map(IPv4Address)
_nonul = st.binary(max_size=64).map(lambda b: b.replace(b"\0", b"x"))


@st.composite
def packets(draw):
    """Valid DHCPPackets: any header, free-form options plus well-formed checked ones."""
    htype = draw(st.sampled_from([1, 1, 6, 32, 255]))
    hlen = 6 if htype == 1 else draw(st.integers(0, 16))
    codes = st.integers(1, 254).filter(lambda c: c not in _CHECKED)
    options = draw(st.dictionaries(codes, st.binary(max_size=300), max_size=6))
    extras = {
        53: st.integers(1, 8).map(lambda v: bytes([v])),
        50: st.binary(min_size=4, max_size=4),
        54: st.binary(min_size=4, max_size=4),
        57: st.binary(min_size=2, max_size=2),
        61: st.binary(min_size=2, max_size=40),
        118: st.binary(min_size=4, max_size=4),
    }
    for code in draw(st.lists(st.sampled_from(sorted(extras)), unique=True)):
        options[code] = draw(extras[code])
    order = draw(st.permutations(list(options)))
    return DHCPPacket(
        op=draw(st.sampled_from([1, 2])), htype=htype, hlen=hlen,
        hops=draw(st.integers(0, 255)), xid=draw(st.integers(0, 2**32 - 1)),
        secs=draw(st.integers(0, 0xFFFF)), flags=draw(st.integers(0, 0xFFFF)),
        ciaddr=draw(_ip), yiaddr=draw(_ip), siaddr=draw(_ip), giaddr=draw(_ip),
        chaddr=draw(st.binary(min_size=hlen, max_size=hlen)),
        sname=draw(_nonul), file=draw(_nonul.map(lambda b: b * 2)),
        options={code: options[code] for code in order})


@FAST
@given(packets())
def test_round_trip_encode_parse(pkt):
    """encode -> parse gives back an equal packet with options in the same order."""
    wire = encode(pkt, max_size=65535)
    back = parse(wire, max_size=65535)
    assert back == pkt
    assert list(back.options) == list(pkt.options)
    assert len(wire) >= 300


def test_long_option_split_into_instances_and_rejoined():
    """A 600-octet option goes out as 255 + 255 + 90 instances and parses back whole."""
    value = bytes(range(256)) * 2 + bytes(88)
    pkt = DHCPPacket(chaddr=MAC, options={53: b"\x01", 77: value})
    wire = encode(pkt, max_size=1500)
    opts = wire[240:]
    assert opts[:3] == b"\x35\x01\x01"
    assert opts[3:5] == b"\x4d\xff" and opts[5:260] == value[:255]
    assert opts[260:262] == b"\x4d\xff" and opts[262:517] == value[255:510]
    assert opts[517:519] == bytes([77, 90]) and opts[519:609] == value[510:]
    assert opts[609] == 255
    assert parse(wire).options[77] == value


def test_repeated_option_instances_are_concatenated():
    """Several instances of one code are joined in order (RFC 3396); order of
    first appearance is kept."""
    raw = _packet(b"\x35\x01\x03" b"\x0c\x02ab" b"\x37\x01\x01" b"\x0c\x03cde"
                  b"\x37\x02\x03\x06" b"\xff")
    pkt = parse(raw)
    assert pkt.options == {53: b"\x03", 12: b"abcde", 55: b"\x01\x03\x06"}
    assert list(pkt.options) == [53, 12, 55]
    assert pkt.hostname == "abcde"


def test_pad_options_skipped_and_end_stops_reading():
    """PAD octets between options are skipped; anything after END is ignored."""
    raw = _packet(b"\x00\x00\x35\x01\x01\x00\x0c\x01h\xff\x0c\x05junk!garbage")
    assert parse(raw).options == {53: b"\x01", 12: b"h"}


def test_missing_end_option_is_accepted():
    """A packet whose options simply run to the end of the datagram parses."""
    pkt = parse(_packet(b"\x35\x01\x01\x3d\x07\x01" + MAC))
    assert pkt.message_type == DISCOVER and pkt.client_id == b"\x01" + MAC


def test_bootp_packet_without_message_type_parses():
    """A BOOTP request (cookie, no option 53) parses; the server decides."""
    pkt = parse(_packet(b"\xff"))
    assert pkt.message_type is None and pkt.message_type_name == "BOOTP"


def test_sname_and_file_cut_at_first_nul():
    """sname and file are NUL-terminated strings; bytes after the NUL are dropped."""
    raw = _packet(b"\x35\x01\x01\xff", sname=b"srv\0junk", file=b"boot.img\0xx")
    pkt = parse(raw)
    assert pkt.sname == b"srv" and pkt.file == b"boot.img"


# -- option overload ------------------------------------------------------------


@pytest.mark.parametrize("value, in_file, in_sname, expected", [
    (1, True, False, {53: b"\x01", 12: b"file-host"}),
    (2, False, True, {53: b"\x01", 15: b"sname.example"}),
    (3, True, True, {53: b"\x01", 12: b"file-host", 15: b"sname.example"}),
])
def test_overload_reads_file_then_sname(value, in_file, in_sname, expected):
    """Option 52 = 1/2/3 continues the options in file, sname or both; the
    overloaded fields come back empty and 52 itself is consumed."""
    file_opts = b"\x0c\x09file-host\xff"
    sname_opts = b"\x0f\x0dsname.example\xff"
    raw = _packet(b"\x35\x01\x01\x34\x01" + bytes([value]) + b"\xff",
                  file=file_opts, sname=sname_opts)
    pkt = parse(raw)
    assert pkt.options == expected
    assert 52 not in pkt.options
    assert pkt.file == (b"" if in_file else file_opts.split(b"\0")[0])
    assert pkt.sname == (b"" if in_sname else sname_opts.split(b"\0")[0])


def test_overload_concatenation_order_is_options_file_sname():
    """One option split over options, file and sname joins in that order
    (RFC 3396 section 7)."""
    raw = _packet(b"\x34\x01\x03\x0c\x02ab\xff", file=b"\x0c\x02cd\xff",
                  sname=b"\x0c\x02ef\xff")
    assert parse(raw).options == {12: b"abcdef"}


def test_overload_loop_is_not_followed():
    """An option 52 inside the overloaded fields (pointing back at them) is
    ignored: parsing terminates and each field is read once."""
    raw = _packet(b"\x34\x01\x03\x35\x01\x01\xff",
                  file=b"\x34\x01\x03\x0c\x01a\xff", sname=b"\x34\x01\x01\x0c\x01b\xff")
    pkt = parse(raw)
    assert pkt.options == {53: b"\x01", 12: b"ab"}


def test_overload_in_file_and_sname_with_bad_length_is_dropped():
    """An option running past the end of the overloaded file field is a
    bad_option_length even though the datagram goes on."""
    raw = _packet(b"\x34\x01\x03\xff", file=b"\0" * 119 + b"\x0c\x20abcdefg")
    with pytest.raises(MalformedPacket) as err:
        parse(raw)
    assert err.value.reason == "bad_option_length"
    assert "file" in err.value.detail


# -- malformed input ------------------------------------------------------------

_VALID_OPTS = b"\x35\x01\x01\xff"
MALFORMED = [
    ("empty datagram", b"", "truncated"),
    ("header cut short", _header()[:235], "truncated"),
    ("op 0", _packet(_VALID_OPTS, op=0), "bad_op"),
    ("op 3", _packet(_VALID_OPTS, op=3), "bad_op"),
    ("htype 0", _packet(_VALID_OPTS, htype=0, hlen=0, chaddr=b""), "bad_htype"),
    ("hlen 17", _packet(_VALID_OPTS, htype=6, hlen=17), "bad_hlen"),
    ("ethernet hlen 7", _packet(_VALID_OPTS, hlen=7), "bad_hlen"),
    ("ethernet hlen 0", _packet(_VALID_OPTS, hlen=0), "bad_hlen"),
    ("header only, no cookie", _header(), "no_magic_cookie"),
    ("half a cookie", _header() + COOKIE[:2], "no_magic_cookie"),
    ("wrong cookie", _header() + b"\x63\x82\x53\x64" + _VALID_OPTS, "no_magic_cookie"),
    ("length past the end", _packet(b"\x35\x01\x01\x0c\x10abc"), "bad_option_length"),
    ("code with no length octet", _packet(b"\x35\x01\x01\x0c"), "bad_option_length"),
    ("length past end in sname", _packet(b"\x34\x01\x02\xff", sname=b"\0" * 62 + b"\x0c\x05"),
     "bad_option_length"),
    ("overload value 4", _packet(b"\x34\x01\x04\xff"), "bad_overload"),
    ("overload two octets", _packet(b"\x34\x02\x01\x02\xff"), "bad_overload"),
    ("overload given twice", _packet(b"\x34\x01\x01\x34\x01\x02\xff"), "bad_overload"),
    ("message type 0", _packet(b"\x35\x01\x00\xff"), "bad_message_type"),
    ("message type 9", _packet(b"\x35\x01\x09\xff"), "bad_message_type"),
    ("message type empty", _packet(b"\x35\x00\xff"), "bad_message_type"),
    ("message type two octets", _packet(b"\x35\x02\x01\x01\xff"), "bad_message_type"),
    ("requested ip 3 octets", _packet(b"\x35\x01\x03\x32\x03\x0a\x00\x00\xff"),
     "bad_option_value"),
    ("server id 5 octets", _packet(b"\x35\x01\x03\x36\x05\x0a\x00\x00\x01\x01\xff"),
     "bad_option_value"),
    ("max size 1 octet", _packet(b"\x35\x01\x01\x39\x01\x05\xff"), "bad_option_value"),
    ("client id 1 octet", _packet(b"\x35\x01\x01\x3d\x01\x01\xff"), "bad_option_value"),
    ("subnet selection 2 octets", _packet(b"\x35\x01\x01\x76\x02\x0a\x00\xff"),
     "bad_option_value"),
    ("oversize", _packet(_VALID_OPTS + b"\0" * 5000), "oversize"),
]


@pytest.mark.parametrize("raw, reason", [(raw, reason) for _, raw, reason in MALFORMED],
                         ids=[name for name, _, _ in MALFORMED])
def test_malformed_packet_maps_to_reason(raw, reason):
    """Each malformed case raises MalformedPacket with its drop reason."""
    with pytest.raises(MalformedPacket) as err:
        parse(raw)
    assert err.value.reason == reason
    assert err.value.reason in DROP_REASONS


def test_every_drop_reason_is_exercised():
    """The malformed table covers every member of DROP_REASONS (no dead labels)."""
    assert {reason for _, _, reason in MALFORMED} == set(DROP_REASONS)


def test_oversize_limit_is_adjustable():
    """parse(max_size=...) sets the limit; exactly max_size octets still parse."""
    raw = _packet(_VALID_OPTS)
    assert parse(raw, max_size=len(raw)).message_type == DISCOVER
    with pytest.raises(MalformedPacket) as err:
        parse(raw, max_size=len(raw) - 1)
    assert err.value.reason == "oversize"


def test_malformed_packet_rejects_unknown_reason():
    """MalformedPacket only carries reasons from DROP_REASONS; str shows detail."""
    with pytest.raises(ValueError):
        MalformedPacket("made_up")
    exc = MalformedPacket("truncated", "12 octets")
    assert str(exc) == "truncated: 12 octets" and isinstance(exc, ValueError)


def test_parse_accepts_bytearray_and_memoryview():
    """Buffers other than bytes parse the same (the reactor may hand either)."""
    assert parse(bytearray(GOLDEN_DISCOVER)) == GOLDEN_PACKET
    assert parse(memoryview(GOLDEN_DISCOVER)) == GOLDEN_PACKET


def _parse_or_drop(raw: bytes) -> None:
    try:
        parse(raw)
    except MalformedPacket as exc:
        assert exc.reason in DROP_REASONS


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=700))
def test_arbitrary_bytes_only_raise_malformed(raw):
    """Random datagrams either parse or raise MalformedPacket, nothing else."""
    _parse_or_drop(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.binary(max_size=128), st.binary(max_size=400),
       st.integers(0, 255), st.integers(0, 20))
def test_arbitrary_options_after_valid_header_only_raise_malformed(sname, file, opts, htype,
                                                                    hlen):
    """A valid header + cookie followed by random options, sname and file
    (often with overload) parses or drops with a reason."""
    _parse_or_drop(_packet(opts, htype=htype, hlen=hlen, sname=sname, file=file))
    _parse_or_drop(_packet(b"\x34\x01\x03" + opts, sname=sname, file=file))


@FAST
@given(packets(), st.data())
def test_mutated_valid_packets_only_raise_malformed(pkt, data):
    """Valid packets with flipped octets, cuts and insertions parse or drop."""
    wire = bytearray(encode(pkt, max_size=65535))
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(wire) - 1))
        action = data.draw(st.sampled_from(["set", "cut", "insert"]))
        if action == "set":
            wire[pos] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del wire[pos:]
            if not wire:
                break
        else:
            wire[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
    _parse_or_drop(bytes(wire))


# -- encode ---------------------------------------------------------------------


def _reply_with_big_options() -> DHCPPacket:
    opts = {53: b"\x05", 54: SERVER.packed}
    for code in (100, 101, 102, 103):  # a PRL-ordered tail, 120 octets each
        opts[code] = bytes([code]) * 120
    opts[51] = (3600).to_bytes(4, "big")
    opts[82] = b"\x01\x04circ"
    return DHCPPacket(op=2, chaddr=MAC, options=opts)


def test_encode_drops_last_unprotected_options_to_fit_576():
    """At the default 576 limit whole options are dropped from the end of the
    order, protected ones (53, 54, 51, 61, 82) kept; the result fits 548 octets."""
    wire, dropped = encode_with_dropped(_reply_with_big_options())
    assert len(wire) <= 576 - 28
    assert dropped == [103, 102]
    pkt = parse(wire)
    assert list(pkt.options) == [53, 54, 100, 101, 51, 82]
    assert encode(_reply_with_big_options()) == wire


def test_encode_honours_larger_client_max_size():
    """With the client's option 57 at 1500 nothing needs dropping."""
    wire, dropped = encode_with_dropped(_reply_with_big_options(), max_size=1500)
    assert dropped == [] and 100 < len(wire) - 240 < 1500
    assert list(parse(wire).options) == [53, 54, 100, 101, 102, 103, 51, 82]


def test_encode_clamps_tiny_max_size_to_576():
    """A max_size below the RFC 2132 minimum is read as 576."""
    assert encode(_reply_with_big_options(), max_size=100) == encode(_reply_with_big_options())


def test_encode_raises_when_protected_options_do_not_fit():
    """If 53/54/51/61/82 alone exceed the limit, PacketTooLarge is raised."""
    pkt = DHCPPacket(op=2, chaddr=MAC, options={53: b"\x05", 82: b"\x01" * 400})
    with pytest.raises(PacketTooLarge):
        encode(pkt)
    assert parse(encode(pkt, max_size=1500)).options[82] == b"\x01" * 400


def test_encode_pads_to_300_and_ends_with_end():
    """A minimal packet is padded with zeros to 300 octets after the END option."""
    wire = encode(DHCPPacket(chaddr=MAC, options={53: b"\x01"}))
    assert len(wire) == 300
    assert wire[236:240] == COOKIE and wire[240:244] == b"\x35\x01\x01\xff"
    assert wire[244:] == b"\0" * 56


@pytest.mark.parametrize("pkt, exc", [
    (DHCPPacket(chaddr=MAC, options={52: b"\x01"}), ValueError),
    (DHCPPacket(chaddr=MAC, options={0: b""}), ValueError),
    (DHCPPacket(chaddr=MAC, options={255: b""}), ValueError),
    (DHCPPacket(chaddr=MAC, options={12: "host"}), TypeError),
    (DHCPPacket(chaddr=MAC + b"\0"), ValueError),
    (DHCPPacket(chaddr=MAC, sname=b"s" * 65), ValueError),
    (DHCPPacket(chaddr=MAC, xid=2**32), ValueError),
])
def test_encode_rejects_unencodable_packets(pkt, exc):
    """Codes 0/52/255, non-bytes values, chaddr != hlen, long sname and
    out-of-range fields are programming errors: ValueError/TypeError."""
    with pytest.raises(exc):
        encode(pkt)


# -- option values --------------------------------------------------------------

TYPED = [
    (1, IPv4Address("255.255.255.0"), b"\xff\xff\xff\x00"),
    (3, [IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2")], b"\x0a\0\0\x01\x0a\0\0\x02"),
    (6, [IPv4Address("9.9.9.9")], b"\x09\x09\x09\x09"),
    (12, "host-1", b"host-1"),
    (15, "example.org", b"example.org"),
    (28, IPv4Address("10.0.0.255"), b"\x0a\0\0\xff"),
    (50, IPv4Address("10.0.0.5"), b"\x0a\0\0\x05"),
    (51, 3600, b"\0\0\x0e\x10"),
    (51, codec.INFINITE_LEASE, b"\xff\xff\xff\xff"),
    (53, ACK, b"\x05"),
    (54, IPv4Address("10.0.0.1"), b"\x0a\0\0\x01"),
    (55, [1, 3, 6, 15, 119], b"\x01\x03\x06\x0f\x77"),
    (57, 1500, b"\x05\xdc"),
    (58, 1800, b"\0\0\x07\x08"),
    (59, 3150, b"\0\0\x0c\x4e"),
    (61, b"\x01" + MAC, b"\x01" + MAC),
    (81, ClientFQDN("host.example.com.", flags=codec.FQDN_E | codec.FQDN_S),
     b"\x05\0\0\x04host\x07example\x03com\x00"),
    (81, ClientFQDN("host", flags=codec.FQDN_E), b"\x04\0\0\x04host"),
    (81, ClientFQDN("host.example.com", flags=0, rcode1=255, rcode2=255),
     b"\x00\xff\xffhost.example.com"),
    (82, {1: b"eth0/1", 2: b"\x00\x11"}, b"\x01\x06eth0/1\x02\x02\x00\x11"),
    (118, IPv4Address("10.20.0.0"), b"\x0a\x14\0\0"),
    (200, b"\xde\xad", b"\xde\xad"),
]


@pytest.mark.parametrize("code, value, raw", TYPED, ids=[f"opt{c}-{i}" for i, (c, _, _)
                                                          in enumerate(TYPED)])
def test_option_value_helpers_golden(code, value, raw):
    """encode_option_value gives the RFC wire form; decode_option_value inverts it."""
    assert encode_option_value(code, value) == raw
    assert decode_option_value(code, raw) == value


def test_option_helpers_accept_strings_for_addresses():
    """Addresses may be given as text; a single address works for list options."""
    assert encode_option_value(54, "10.0.0.1") == b"\x0a\0\0\x01"
    assert encode_option_value(3, "10.0.0.1") == b"\x0a\0\0\x01"


@pytest.mark.parametrize("code, raw, reason", [
    (1, b"\xff\xff\xff", "bad_option_value"),
    (3, b"", "bad_option_value"),
    (6, b"\x01\x02\x03\x04\x05", "bad_option_value"),
    (12, b"", "bad_option_value"),
    (51, b"\0\0\x0e", "bad_option_value"),
    (53, b"", "bad_message_type"),
    (57, b"\x05", "bad_option_value"),
    (61, b"\x01", "bad_option_value"),
    (81, b"\x04\0", "bad_option_value"),
    (81, b"\x04\0\0\x04host\x00\x01", "bad_option_value"),
    (81, b"\x04\0\0\xc0\x0c", "bad_option_value"),
    (81, b"\x04\0\0\x09host", "bad_option_value"),
    (82, b"\x01\x05ab", "bad_option_value"),
    (82, b"\x01", "bad_option_value"),
    (118, b"\x0a\x14\0", "bad_option_value"),
])
def test_option_value_decode_errors(code, raw, reason):
    """Undecodable option payloads raise MalformedPacket with a drop reason."""
    with pytest.raises(MalformedPacket) as err:
        decode_option_value(code, raw)
    assert err.value.reason == reason


@pytest.mark.parametrize("code, value", [
    (3, []), (12, ""), (51, -1), (51, 2**32), (53, 256), (57, 500), (61, b"\x01"),
    (55, [256]), (82, {1: b"x" * 256}), (1, "10.0.0.300"), (51, "3600"),
    (81, ClientFQDN("a..b")), (81, ClientFQDN("x" * 64 + ".com")),
    (81, ClientFQDN("bad\\")), (81, "host"), (15, "exämple.org"), (200, 5),
])
def test_option_value_encode_errors(code, value):
    """Values that cannot be encoded raise ValueError or TypeError."""
    with pytest.raises((ValueError, TypeError)):
        encode_option_value(code, value)


_label = st.binary(min_size=1, max_size=63)


@FAST
@given(st.lists(_label, max_size=4), st.booleans(), st.integers(0, 255),
       st.integers(0, 255), st.integers(0, 255))
def test_fqdn_wire_names_round_trip(labels, fully, flags, rcode1, rcode2):
    """Any wire-format name (any label octets, escaped as \\DDD) survives
    decode -> encode unchanged."""
    name = b"".join(bytes([len(lab)]) + lab for lab in labels)
    if fully:
        name += b"\0"
    raw = bytes([flags | codec.FQDN_E, rcode1, rcode2]) + name
    fqdn = decode_option_value(81, raw)
    assert fqdn.e
    assert encode_option_value(81, fqdn) == raw


def test_fqdn_escapes_dots_inside_labels():
    """A dot inside a label is written \\046 and encodes back into one label."""
    fqdn = decode_option_value(81, b"\x04\0\0\x03a.b\x03com\x00")
    assert fqdn.name == "a\\046b.com."
    assert encode_option_value(81, ClientFQDN("a\\.b.com.")) == b"\x04\0\0\x03a.b\x03com\x00"


@FAST
@given(st.dictionaries(st.integers(0, 255), st.binary(max_size=40), max_size=6))
def test_relay_agent_suboptions_round_trip(subs):
    """Option 82 sub-option dicts survive encode -> decode with order kept."""
    back = decode_option_value(82, encode_option_value(82, subs))
    assert back == subs and list(back) == list(subs)


def test_packet_convenience_properties():
    """Properties decode their options and return None when absent or mangled."""
    rai = encode_option_value(82, {1: b"port1", 5: bytes([10, 30, 0, 0]),
                                   11: bytes([10, 9, 0, 100])})
    pkt = DHCPPacket(chaddr=MAC, flags=0x0001, options={
        12: b"laptop\0", 54: SERVER.packed, 57: b"\x05\xdc", 82: rai,
        118: bytes([10, 40, 0, 0]), 81: b"\x01\0\0laptop.example."})
    assert pkt.hostname == "laptop"
    assert pkt.server_id == SERVER
    assert pkt.max_message_size == 1500
    assert pkt.relay_agent_info == rai
    assert pkt.relay_suboptions == {1: b"port1", 5: bytes([10, 30, 0, 0]),
                                    11: bytes([10, 9, 0, 100])}
    assert pkt.link_selection == IPv4Address("10.30.0.0")
    assert pkt.server_id_override == IPv4Address("10.9.0.100")
    assert pkt.subnet_selection == IPv4Address("10.40.0.0")
    assert pkt.client_fqdn == ClientFQDN("laptop.example.", flags=1)
    assert pkt.broadcast is False and pkt.message_type is None
    assert pkt.parameter_request_list == [] and pkt.client_id is None
    mangled = DHCPPacket(chaddr=MAC, options={82: b"\x01\x09x", 81: b"\x04", 12: b"\0"})
    assert mangled.relay_suboptions is None and mangled.link_selection is None
    assert mangled.client_fqdn is None and mangled.hostname is None


# -- build_reply ----------------------------------------------------------------


def test_reply_orders_options_by_parameter_request_list():
    """53, 54 first, then requested options in PRL order, then unrequested
    always-sent ones (51, 58, 59, 1, 3, 6); other unrequested options left out."""
    req = _request(DISCOVER, prl=(15, 6, 28, 3, 99))
    reply = build_reply(req, OFFER, yiaddr="10.9.0.50", server_id=SERVER,
                        options=SERVER_OPTIONS)
    assert list(reply.options) == [53, 54, 15, 6, 28, 3, 51, 58, 59, 1]
    assert reply.options[53] == bytes([OFFER]) and reply.options[54] == SERVER.packed
    assert reply.options[15] == b"example.org"
    assert 42 not in reply.options and 56 not in reply.options
    wire_order = list(parse(encode(reply, max_size=1500)).options)
    assert wire_order == list(reply.options)


def test_reply_copies_request_fields():
    """op=2; xid, flags, giaddr, chaddr, htype, hlen copied; yiaddr/siaddr set;
    ciaddr zero in an OFFER, copied in an ACK."""
    req = _request(DISCOVER, xid=0xDEADBEEF, flags=0x8000, giaddr=RELAY, hops=1,
                   secs=7, ciaddr=IPv4Address("10.9.0.77"))
    offer = build_reply(req, OFFER, yiaddr="10.9.0.50", server_id=SERVER,
                        options=SERVER_OPTIONS, siaddr="10.9.0.9")
    assert (offer.op, offer.xid, offer.flags, offer.giaddr) == (2, 0xDEADBEEF, 0x8000, RELAY)
    assert (offer.chaddr, offer.htype, offer.hlen, offer.hops) == (MAC, 1, 6, 0)
    assert offer.yiaddr == IPv4Address("10.9.0.50")
    assert offer.siaddr == IPv4Address("10.9.0.9")
    assert offer.ciaddr == ZERO
    ack = build_reply(req, ACK, yiaddr="10.9.0.77", server_id=SERVER, options=SERVER_OPTIONS)
    assert ack.ciaddr == IPv4Address("10.9.0.77") and ack.siaddr == ZERO


def test_reply_echoes_option_82_last_and_client_id():
    """Option 82 is echoed unchanged as the last option; 61 is echoed (RFC 6842)."""
    rai = b"\x01\x04eth1\x02\x06" + MAC
    req = _request(REQUEST, options={61: b"\x01" + MAC, 82: rai}, giaddr=RELAY)
    ack = build_reply(req, ACK, yiaddr="10.20.0.5", server_id=SERVER, options=SERVER_OPTIONS,
                      always_send=(15,))
    assert list(ack.options)[-1] == 82 and ack.options[82] == rai
    assert ack.options[61] == b"\x01" + MAC
    assert list(parse(encode(ack)).options)[-1] == 82
    quiet = build_reply(req, ACK, yiaddr="10.20.0.5", server_id=SERVER,
                        options=SERVER_OPTIONS, echo_client_id=False)
    assert 61 not in quiet.options


def test_reply_ignores_caller_values_for_reserved_codes():
    """53/54/61/82/52 come from the arguments and the request, never from options."""
    req = _request(REQUEST, prl=(53, 54, 61, 82, 52, 1))
    opts = dict(SERVER_OPTIONS)
    opts.update({53: b"\x02", 54: b"\0\0\0\0", 61: b"xx", 82: b"\x01\x00", 52: b"\x03"})
    ack = build_reply(req, ACK, yiaddr="10.9.0.5", server_id=SERVER, options=opts)
    assert ack.options[53] == bytes([ACK]) and ack.options[54] == SERVER.packed
    assert not {61, 82, 52} & set(ack.options)


def test_reply_always_send_adds_unrequested_options():
    """Codes in always_send go after the always-sent ones even if not requested."""
    req = _request(DISCOVER, prl=(1,))
    offer = build_reply(req, OFFER, yiaddr="10.9.0.50", server_id=SERVER,
                        options=SERVER_OPTIONS, always_send=(42, 15))
    assert list(offer.options) == [53, 54, 1, 51, 58, 59, 3, 6, 42, 15]


def test_reply_rejects_unencoded_option_values():
    """options must hold encoded bytes, not typed values (bytes(3600) would be zeros)."""
    with pytest.raises(TypeError):
        build_reply(_request(), ACK, yiaddr="10.9.0.5", server_id=SERVER, options={51: 3600})


def test_nak_shape():
    """A NAK has no yiaddr/ciaddr/siaddr and no lease options: just 53, 54,
    an optional 56 message, 61 and 82 echoed; relayed NAKs get the broadcast bit."""
    rai = b"\x01\x02p1"
    req = _request(REQUEST, options={61: b"\x01" + MAC, 82: rai}, giaddr=RELAY,
                   ciaddr=IPv4Address("10.9.0.77"))
    nak = build_reply(req, NAK, yiaddr="10.9.0.77", server_id=SERVER,
                      options=SERVER_OPTIONS, siaddr="10.9.0.9")
    assert list(nak.options) == [53, 54, 56, 61, 82]
    assert nak.message_type == NAK and nak.options[56] == b"wrong address"
    assert nak.yiaddr == ZERO and nak.ciaddr == ZERO and nak.siaddr == ZERO
    assert nak.broadcast
    direct = build_reply(_request(REQUEST), NAK, yiaddr=None, server_id=SERVER, options={})
    assert list(direct.options) == [53, 54] and not direct.broadcast


def test_inform_ack_has_no_lease_options():
    """An ACK to an INFORM copies ciaddr, leaves yiaddr zero and carries no
    51/58/59 (RFC 2131 section 4.3.5)."""
    req = _request(INFORM, prl=(1, 3, 51, 58, 6), ciaddr=IPv4Address("10.9.0.44"))
    ack = build_reply(req, ACK, yiaddr="10.9.0.44", server_id=SERVER, options=SERVER_OPTIONS)
    assert list(ack.options) == [53, 54, 1, 3, 6]
    assert ack.yiaddr == ZERO and ack.ciaddr == IPv4Address("10.9.0.44")


# -- reply_destination ----------------------------------------------------------


def _dest(req: DHCPPacket, mtype: int, **kw):
    reply = build_reply(req, mtype, yiaddr="10.9.0.50", server_id=SERVER,
                        options=SERVER_OPTIONS)
    return reply_destination(req, reply, **kw)


def test_destination_relay_when_giaddr_set():
    """giaddr set: to the relay on the server port, for ACKs and NAKs alike."""
    req = _request(REQUEST, giaddr=RELAY, ciaddr=IPv4Address("10.20.0.5"), flags=0x8000)
    assert _dest(req, ACK) == (RELAY, 67, False)
    assert _dest(req, NAK) == (RELAY, 67, False)
    assert _dest(req, ACK, server_port=1067) == (RELAY, 1067, False)


def test_destination_nak_broadcast_without_giaddr():
    """A NAK with giaddr zero is broadcast, even if ciaddr is set."""
    req = _request(REQUEST, ciaddr=IPv4Address("10.9.0.77"))
    assert _dest(req, NAK) == (BCAST, 68, True)


def test_destination_unicast_to_ciaddr():
    """A renewing client (ciaddr set) gets its reply unicast to ciaddr."""
    req = _request(REQUEST, ciaddr=IPv4Address("10.9.0.77"), flags=0x8000)
    assert _dest(req, ACK) == (IPv4Address("10.9.0.77"), 68, False)
    assert _dest(req, ACK, client_port=1068) == (IPv4Address("10.9.0.77"), 1068, False)


def test_destination_broadcast_bit():
    """No giaddr/ciaddr and the broadcast bit set: broadcast."""
    req = _request(DISCOVER, flags=0x8000)
    assert _dest(req, OFFER) == (BCAST, 68, True)


def test_destination_unicast_yiaddr_needs_raw_sockets():
    """No giaddr/ciaddr/broadcast bit: RFC 2131 wants unicast to yiaddr at chaddr;
    without raw unicast support we broadcast, with it we unicast to yiaddr."""
    req = _request(DISCOVER)
    assert _dest(req, OFFER) == (BCAST, 68, True)
    assert _dest(req, OFFER, raw_unicast=True) == (IPv4Address("10.9.0.50"), 68, False)
