"""DHCPv4 wire codec: RFC 2131 / RFC 2132 messages, nothing else.

Pure functions and plain data: no sockets, no Twisted, no clock, no logging.
The server turns bytes into a :class:`DHCPPacket` with :func:`parse`, decides,
builds the answer with :func:`build_reply`, turns it into bytes with
:func:`encode` and asks :func:`reply_destination` where to send it.

Decisions worth knowing (the server relies on them):

* :func:`parse` raises only :class:`MalformedPacket`; its ``reason`` is one of
  :data:`DROP_REASONS`, meant as a metrics label ("drops per reason").
* Missing END option: accepted (common in the wild); everything up to the end of
  the field is read. Data after END is padding and ignored.
* Option overload (option 52): options continue in ``file`` then ``sname``
  (RFC 3396 section 7 order: options, file, sname). Option 52 itself is consumed:
  it never appears in :attr:`DHCPPacket.options`, and the overloaded field(s) are
  returned empty. An option 52 found *inside* ``file``/``sname`` is ignored
  (RFC 2131 allows it only in the options field), so an overload can never loop.
* Options that appear several times are concatenated (RFC 3396), in the order
  they appear; the dict keeps first-appearance order.
* Options the server acts on are checked at parse time, so the convenience
  properties never see garbage: 53 (one octet, 1..8, else ``bad_message_type``),
  50, 54, 118 (four octets), 57 (two octets), 61 (two octets or more, RFC 2132
  section 9.14), 52 (one octet, 1..3). Everything else is accepted as raw bytes.
* A BOOTP packet (no option 53) parses; ``message_type`` is then ``None`` and the
  server decides (a DHCP-only server drops it).
* ``chaddr`` is ``hlen`` octets; ``sname``/``file`` are cut at their first NUL.
* :func:`encode` never emits option 52 (no overload on output). Options longer
  than 255 octets are split into several instances (RFC 3396). ``max_size`` is the
  client's maximum *IP datagram* size (option 57 counts the IP and UDP headers,
  as ISC dhcpd reads it), clamped to at least 576; the DHCP payload may use
  ``max_size - 28`` octets. When the options do not fit, whole options are
  dropped from the END of the option order backwards (so with
  :func:`build_reply`'s order: unrequested always-sent options first, then the
  parameter request list from its least preferred end), never the protected ones
  (:data:`PROTECTED_OPTIONS`: 53, 54, 51, 61, 82). If the protected ones alone do
  not fit, :class:`PacketTooLarge` (a ``ValueError``) is raised.
* :func:`reply_destination` cannot unicast to a client that has no address yet
  (that needs an ARP entry injected through a raw socket); unless the caller says
  it can (``raw_unicast=True``) that case is broadcast, which RFC 2131 section
  4.1 allows ("... or broadcast").
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

IPv4Address = ipaddress.IPv4Address

# -- constants ------------------------------------------------------------------

BOOTREQUEST = 1
BOOTREPLY = 2
HTYPE_ETHERNET = 1
MAGIC_COOKIE = b"\x63\x82\x53\x63"
SERVER_PORT = 67
CLIENT_PORT = 68
BROADCAST_FLAG = 0x8000
INFINITE_LEASE = 0xFFFFFFFF

ZERO = IPv4Address(0)
BROADCAST = IPv4Address("255.255.255.255")

#: Fixed BOOTP header (op .. file), then the 4-octet magic cookie.
HEADER_LEN = 236
OPTIONS_OFFSET = HEADER_LEN + 4
#: RFC 1542 section 2.1: BOOTP messages are at least 300 octets long.
BOOTP_MIN_LEN = 300
#: RFC 2131 section 2: every client accepts a 576-octet IP datagram.
MIN_MESSAGE_SIZE = 576
IP_UDP_OVERHEAD = 28
#: Largest datagram :func:`parse` accepts by default. Requests, even relayed with
#: option 82, stay well under one Ethernet MTU; this is a sanity bound. (Twisted's
#: UDP port reads at most ``maxPacketSize`` = 8192 octets.)
MAX_PACKET_SIZE = 4096

# Message types (RFC 2132 section 9.6).
DISCOVER = 1
OFFER = 2
REQUEST = 3
DECLINE = 4
ACK = 5
NAK = 6
RELEASE = 7
INFORM = 8
MESSAGE_TYPE_NAMES = {
    DISCOVER: "DISCOVER",
    OFFER: "OFFER",
    REQUEST: "REQUEST",
    DECLINE: "DECLINE",
    ACK: "ACK",
    NAK: "NAK",
    RELEASE: "RELEASE",
    INFORM: "INFORM",
}

# Option codes.
OPT_PAD = 0
OPT_SUBNET_MASK = 1
OPT_ROUTERS = 3
OPT_DNS_SERVERS = 6
OPT_HOST_NAME = 12
OPT_DOMAIN_NAME = 15
OPT_BROADCAST_ADDRESS = 28
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_OVERLOAD = 52
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAMETER_REQUEST_LIST = 55
OPT_MESSAGE = 56
OPT_MAX_MESSAGE_SIZE = 57
OPT_RENEWAL_TIME = 58
OPT_REBINDING_TIME = 59
OPT_VENDOR_CLASS_ID = 60
OPT_CLIENT_ID = 61
OPT_CLIENT_FQDN = 81
OPT_RELAY_AGENT_INFO = 82
OPT_SUBNET_SELECTION = 118
OPT_END = 255

OPTION_NAMES = {
    1: "subnet_mask", 3: "routers", 6: "dns_servers", 12: "host_name",
    15: "domain_name", 28: "broadcast_address", 50: "requested_ip", 51: "lease_time",
    52: "overload", 53: "message_type", 54: "server_id", 55: "parameter_request_list",
    56: "message", 57: "max_message_size", 58: "renewal_time", 59: "rebinding_time",
    60: "vendor_class_id", 61: "client_id", 81: "client_fqdn",
    82: "relay_agent_info", 118: "subnet_selection",
}

# Relay agent information sub-options (RFC 3046, RFC 3527, RFC 5107).
RAI_CIRCUIT_ID = 1
RAI_REMOTE_ID = 2
RAI_LINK_SELECTION = 5
RAI_SERVER_ID_OVERRIDE = 11

# Client FQDN flags (RFC 4702 section 2.1).
FQDN_S = 0x01  # client asks the server to do the A update
FQDN_O = 0x02  # server overrode the client's S choice
FQDN_E = 0x04  # domain name in canonical wire format (else deprecated ASCII)
FQDN_N = 0x08  # no DNS update by the server
FQDN_RCODE_SERVER = 255  # RFC 4702 section 2.2: what a server puts in RCODE1/2

#: Options :func:`encode` never drops to meet ``max_size``.
PROTECTED_OPTIONS = frozenset({OPT_MESSAGE_TYPE, OPT_SERVER_ID, OPT_LEASE_TIME,
                               OPT_CLIENT_ID, OPT_RELAY_AGENT_INFO})
#: Sent by :func:`build_reply` when present in ``options`` even if not requested.
ALWAYS_SENT = (OPT_LEASE_TIME, OPT_RENEWAL_TIME, OPT_REBINDING_TIME,
               OPT_SUBNET_MASK, OPT_ROUTERS, OPT_DNS_SERVERS)
_LEASE_OPTIONS = frozenset({OPT_LEASE_TIME, OPT_RENEWAL_TIME, OPT_REBINDING_TIME})
#: Never taken from the caller's ``options`` by :func:`build_reply`.
_RESERVED_IN_REPLY = frozenset({OPT_PAD, OPT_OVERLOAD, OPT_MESSAGE_TYPE, OPT_SERVER_ID,
                                OPT_CLIENT_ID, OPT_RELAY_AGENT_INFO, OPT_END})

#: Every value of :attr:`MalformedPacket.reason`, for pre-declared drop counters.
DROP_REASONS = (
    "oversize",           # datagram longer than parse()'s max_size
    "truncated",          # shorter than the 236-octet BOOTP header
    "bad_op",             # op not BOOTREQUEST (1) / BOOTREPLY (2)
    "bad_htype",          # htype 0 (reserved)
    "bad_hlen",           # hlen > 16, or Ethernet with hlen != 6
    "no_magic_cookie",    # no 99.130.83.99 after the header
    "bad_option_length",  # an option's length octet is missing or runs past its field
    "bad_overload",       # option 52 not one octet of 1, 2 or 3
    "bad_message_type",   # option 53 not one octet of 1..8
    "bad_option_value",   # 50/54/57/61/118 of the wrong size; option helper decode errors
)


class MalformedPacket(ValueError):
    """A datagram (or option) that is not a usable DHCPv4 message.

    ``reason`` is one of :data:`DROP_REASONS` (a metrics label), ``detail`` is
    free text for the log.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in DROP_REASONS:
            raise ValueError(f"unknown drop reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class PacketTooLarge(ValueError):
    """:func:`encode` cannot fit the protected options into ``max_size``."""


# -- the packet -----------------------------------------------------------------


@dataclass(slots=True)
class DHCPPacket:
    """One DHCPv4 message. ``options`` maps code -> raw value (order kept)."""

    op: int = BOOTREQUEST
    htype: int = HTYPE_ETHERNET
    hlen: int = 6
    hops: int = 0
    xid: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: IPv4Address = ZERO
    yiaddr: IPv4Address = ZERO
    siaddr: IPv4Address = ZERO
    giaddr: IPv4Address = ZERO
    chaddr: bytes = b"\x00" * 6
    sname: bytes = b""
    file: bytes = b""
    options: dict[int, bytes] = field(default_factory=dict)

    @property
    def message_type(self) -> int | None:
        """Option 53 as an int, ``None`` for BOOTP (or a mangled option)."""
        raw = self.options.get(OPT_MESSAGE_TYPE)
        if raw is None or len(raw) != 1:
            return None
        return raw[0]

    @property
    def message_type_name(self) -> str:
        """``"DISCOVER"`` ... ``"INFORM"``, ``"BOOTP"`` or ``"TYPE<n>"``."""
        mtype = self.message_type
        if mtype is None:
            return "BOOTP"
        return MESSAGE_TYPE_NAMES.get(mtype, f"TYPE{mtype}")

    @property
    def client_id(self) -> bytes | None:
        """Option 61 raw (type octet included), or ``None``."""
        return self.options.get(OPT_CLIENT_ID)

    @property
    def hwaddr(self) -> bytes:
        """The hardware address: ``chaddr[:hlen]``."""
        return bytes(self.chaddr[: self.hlen])

    @property
    def requested_ip(self) -> IPv4Address | None:
        """Option 50."""
        return self._ip_option(OPT_REQUESTED_IP)

    @property
    def server_id(self) -> IPv4Address | None:
        """Option 54."""
        return self._ip_option(OPT_SERVER_ID)

    @property
    def subnet_selection(self) -> IPv4Address | None:
        """Option 118 (RFC 3011)."""
        return self._ip_option(OPT_SUBNET_SELECTION)

    @property
    def parameter_request_list(self) -> list[int]:
        """Option 55 as a list of codes (empty when absent)."""
        return list(self.options.get(OPT_PARAMETER_REQUEST_LIST, b""))

    @property
    def hostname(self) -> str | None:
        """Option 12 as text (trailing NULs stripped, bad UTF-8 replaced)."""
        raw = self.options.get(OPT_HOST_NAME)
        if not raw:
            return None
        text = bytes(raw).rstrip(b"\x00").decode("utf-8", "replace")
        return text or None

    @property
    def max_message_size(self) -> int | None:
        """Option 57 as sent (the encoder clamps it to at least 576)."""
        raw = self.options.get(OPT_MAX_MESSAGE_SIZE)
        if raw is None or len(raw) != 2:
            return None
        return (raw[0] << 8) | raw[1]

    @property
    def relay_agent_info(self) -> bytes | None:
        """Option 82 raw, exactly as the relay sent it (for echoing)."""
        return self.options.get(OPT_RELAY_AGENT_INFO)

    @property
    def relay_suboptions(self) -> dict[int, bytes] | None:
        """Option 82 decoded into sub-options; ``None`` if absent or malformed."""
        raw = self.options.get(OPT_RELAY_AGENT_INFO)
        if raw is None:
            return None
        try:
            return _decode_rai(raw)
        except MalformedPacket:
            return None

    @property
    def link_selection(self) -> IPv4Address | None:
        """Option 82 sub-option 5 (RFC 3527), if well formed."""
        return self._rai_ip(RAI_LINK_SELECTION)

    @property
    def server_id_override(self) -> IPv4Address | None:
        """Option 82 sub-option 11 (RFC 5107), if well formed."""
        return self._rai_ip(RAI_SERVER_ID_OVERRIDE)

    @property
    def client_fqdn(self) -> ClientFQDN | None:
        """Option 81 decoded; ``None`` if absent or malformed."""
        raw = self.options.get(OPT_CLIENT_FQDN)
        if raw is None:
            return None
        try:
            return decode_option_value(OPT_CLIENT_FQDN, raw)
        except MalformedPacket:
            return None

    @property
    def broadcast(self) -> bool:
        """The BROADCAST bit (0x8000) of ``flags``."""
        return bool(self.flags & BROADCAST_FLAG)

    def _ip_option(self, code: int) -> IPv4Address | None:
        raw = self.options.get(code)
        if raw is None or len(raw) != 4:
            return None
        return _ip4(bytes(raw))

    def _rai_ip(self, sub: int) -> IPv4Address | None:
        subs = self.relay_suboptions
        raw = subs.get(sub) if subs else None
        if raw is None or len(raw) != 4:
            return None
        return IPv4Address(raw)


# -- parse ----------------------------------------------------------------------

_HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
assert _HEADER.size == HEADER_LEN

# Options checked at parse time: code -> (predicate on length, reason, text).
_CHECKED: dict[int, tuple[Any, str, str]] = {
    OPT_REQUESTED_IP: (lambda n: n == 4, "bad_option_value", "must be 4 octets"),
    OPT_SERVER_ID: (lambda n: n == 4, "bad_option_value", "must be 4 octets"),
    OPT_SUBNET_SELECTION: (lambda n: n == 4, "bad_option_value", "must be 4 octets"),
    OPT_MAX_MESSAGE_SIZE: (lambda n: n == 2, "bad_option_value", "must be 2 octets"),
    OPT_CLIENT_ID: (lambda n: n >= 2, "bad_option_value", "must be at least 2 octets"),
}


def _scan(data: bytes, start: int, end: int, parts: dict[int, list[bytes]],
          where: str, main: bool) -> None:
    """Read options in ``data[start:end]`` into ``parts`` (code -> instances)."""
    i = start
    while i < end:
        code = data[i]
        if code == OPT_PAD:
            i += 1
            continue
        if code == OPT_END:
            return
        if i + 1 >= end:
            raise MalformedPacket("bad_option_length",
                                  f"option {code} in {where} has no length octet")
        length = data[i + 1]
        stop = i + 2 + length
        if stop > end:
            raise MalformedPacket(
                "bad_option_length",
                f"option {code} in {where} claims {length} octets, {end - i - 2} left")
        if main or code != OPT_OVERLOAD:  # 52 outside the options field: ignored
            value = data[i + 2:stop]
            bucket = parts.get(code)
            if bucket is None:
                parts[code] = [value]
            else:
                bucket.append(value)
        i = stop
    # Running off the end without END is tolerated.


_IP_CACHE: dict[bytes, IPv4Address] = {}


def _ip4(raw: bytes) -> IPv4Address:
    """``IPv4Address(raw)`` for 4 octets, shared: relays, server ids and a
    client's requested address repeat from packet to packet."""
    ip = _IP_CACHE.get(raw)
    if ip is None:
        if len(_IP_CACHE) >= 4096:
            _IP_CACHE.clear()
        ip = _IP_CACHE[raw] = IPv4Address(raw)
    return ip


def _from_wire(raw: bytes) -> IPv4Address:
    return ZERO if raw == b"\x00\x00\x00\x00" else _ip4(raw)


def parse(data: bytes, *, max_size: int = MAX_PACKET_SIZE) -> DHCPPacket:
    """Decode one datagram; raises only :class:`MalformedPacket`."""
    data = bytes(data)
    size = len(data)
    if size > max_size:
        raise MalformedPacket("oversize", f"{size} octets > {max_size}")
    if size < HEADER_LEN:
        raise MalformedPacket("truncated", f"{size} octets < {HEADER_LEN}-octet header")
    (op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr,
     chaddr, sname, file_) = _HEADER.unpack_from(data)
    if op not in (BOOTREQUEST, BOOTREPLY):
        raise MalformedPacket("bad_op", f"op {op}")
    if htype == 0:
        raise MalformedPacket("bad_htype", "htype 0")
    if hlen > 16 or (htype == HTYPE_ETHERNET and hlen != 6):
        raise MalformedPacket("bad_hlen", f"hlen {hlen} for htype {htype}")
    if data[HEADER_LEN:OPTIONS_OFFSET] != MAGIC_COOKIE:
        raise MalformedPacket("no_magic_cookie",
                              data[HEADER_LEN:OPTIONS_OFFSET].hex() or "none")

    parts: dict[int, list[bytes]] = {}
    _scan(data, OPTIONS_OFFSET, size, parts, "options", True)
    overload = parts.pop(OPT_OVERLOAD, None)
    if overload is not None:
        value = b"".join(overload)
        if len(value) != 1 or value[0] not in (1, 2, 3):
            raise MalformedPacket("bad_overload", f"option 52 = {value.hex()}")
        if value[0] & 1:  # file first (RFC 3396 section 7)
            _scan(file_, 0, len(file_), parts, "file", False)
            file_ = b""
        if value[0] & 2:
            _scan(sname, 0, len(sname), parts, "sname", False)
            sname = b""

    options = {code: (vals[0] if len(vals) == 1 else b"".join(vals))
               for code, vals in parts.items()}

    mtype = options.get(OPT_MESSAGE_TYPE)
    if mtype is not None and (len(mtype) != 1 or not DISCOVER <= mtype[0] <= INFORM):
        raise MalformedPacket("bad_message_type", f"option 53 = {mtype.hex() or 'empty'}")
    for code, (ok, reason, text) in _CHECKED.items():
        raw = options.get(code)
        if raw is not None and not ok(len(raw)):
            raise MalformedPacket(reason, f"option {code} has {len(raw)} octets, {text}")

    return DHCPPacket(
        op=op, htype=htype, hlen=hlen, hops=hops, xid=xid, secs=secs, flags=flags,
        ciaddr=_from_wire(ciaddr), yiaddr=_from_wire(yiaddr),
        siaddr=_from_wire(siaddr), giaddr=_from_wire(giaddr),
        chaddr=chaddr[:hlen], sname=sname.split(b"\x00", 1)[0],
        file=file_.split(b"\x00", 1)[0], options=options)


# -- encode ---------------------------------------------------------------------


def _addr(value: Any) -> IPv4Address:
    """``IPv4Address(value)`` without the str round trip it does for addresses."""
    return value if isinstance(value, IPv4Address) else IPv4Address(value)


def _option_wire(code: int, value: bytes) -> bytes:
    """One option, split into 255-octet instances when longer (RFC 3396)."""
    n = len(value)
    if n <= 255:
        return bytes((code, n)) + value
    return b"".join(bytes((code, len(value[i:i + 255]))) + value[i:i + 255]
                    for i in range(0, n, 255))


def _effective_max_size(max_size: int | None) -> int:
    if max_size is None:
        return MIN_MESSAGE_SIZE
    return max(MIN_MESSAGE_SIZE, min(int(max_size), 65535))


_ZERO_PACKED = b"\x00\x00\x00\x00"


def _packed(value: Any) -> bytes:
    if value is ZERO:
        return _ZERO_PACKED
    return value.packed if value.__class__ is IPv4Address else _addr(value).packed


def _header(packet: DHCPPacket) -> bytes:
    chaddr, hlen = packet.chaddr, packet.hlen
    if len(chaddr) != hlen or hlen > 16:
        raise ValueError(f"chaddr is {len(chaddr)} octets, hlen {hlen}")
    if len(packet.sname) > 64 or len(packet.file) > 128:
        raise ValueError("sname is at most 64 octets, file at most 128")
    try:
        return _HEADER.pack(
            packet.op, packet.htype, hlen, packet.hops, packet.xid, packet.secs,
            packet.flags, _packed(packet.ciaddr), _packed(packet.yiaddr),
            _packed(packet.siaddr), _packed(packet.giaddr), bytes(chaddr),
            bytes(packet.sname), bytes(packet.file)) + MAGIC_COOKIE
    except struct.error as exc:
        raise ValueError(f"header field out of range: {exc}") from None


def encode_with_dropped(packet: DHCPPacket, *,
                        max_size: int | None = None) -> tuple[bytes, list[int]]:
    """Like :func:`encode`, also returning the option codes dropped to fit.

    Dropped codes are listed in the order they were dropped (last option first).
    """
    head = _header(packet)
    wires: list[tuple[int, bytes] | None] = []
    total = len(head) + 1                                   # + END
    for code, value in packet.options.items():
        if not 1 <= code <= 254 or code == OPT_OVERLOAD:
            raise ValueError(f"option code {code} cannot be encoded")
        cls = value.__class__
        if cls is not bytes:
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise TypeError(f"option {code} value must be bytes, not {cls.__name__}")
            value = bytes(value)
        n = len(value)
        wire = bytes((code, n)) + value if n <= 255 else _option_wire(code, value)
        wires.append((code, wire))
        total += len(wire)
    limit = _effective_max_size(max_size) - IP_UDP_OVERHEAD
    dropped: list[int] = []
    if total > limit:
        for idx in range(len(wires) - 1, -1, -1):
            code, wire = wires[idx]
            if code in PROTECTED_OPTIONS:
                continue
            wires[idx] = None
            dropped.append(code)
            total -= len(wire)
            if total <= limit:
                break
        if total > limit:
            raise PacketTooLarge(
                f"{total} octets with only protected options, limit {limit}")
        wires = [item for item in wires if item is not None]
    out = b"".join([head, *(item[1] for item in wires), b"\xff"])
    if len(out) < BOOTP_MIN_LEN:
        out += b"\x00" * (BOOTP_MIN_LEN - len(out))
    return out, dropped


def encode(packet: DHCPPacket, *, max_size: int | None = None) -> bytes:
    """BOOTP header + cookie + options + END, padded to 300 octets.

    ``max_size``: the client's maximum DHCP message size (option 57, an IP
    datagram size; ``None`` means 576). Raises ``ValueError`` for fields that do
    not fit the wire format and :class:`PacketTooLarge` when even the protected
    options exceed ``max_size``.
    """
    return encode_with_dropped(packet, max_size=max_size)[0]


# -- option values --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientFQDN:
    """Option 81 (RFC 4702).

    ``name`` is text: a fully qualified name ends with ``"."``, a partial one
    does not. In wire format (flag E) bytes other than printable ASCII, and
    ``.``/``\\`` inside a label, are written ``\\DDD`` (decimal, as in zone files).
    """

    name: str = ""
    flags: int = FQDN_E
    rcode1: int = 0
    rcode2: int = 0

    @property
    def s(self) -> bool:
        return bool(self.flags & FQDN_S)

    @property
    def o(self) -> bool:
        return bool(self.flags & FQDN_O)

    @property
    def e(self) -> bool:
        return bool(self.flags & FQDN_E)

    @property
    def n(self) -> bool:
        return bool(self.flags & FQDN_N)


def _bad(code: int, text: str) -> MalformedPacket:
    return MalformedPacket("bad_option_value", f"option {code}: {text}")


def _label_text(label: bytes) -> str:
    return "".join(chr(b) if 0x21 <= b <= 0x7E and b not in (0x2E, 0x5C) else f"\\{b:03d}"
                   for b in label)


def _name_from_wire(code: int, raw: bytes) -> str:
    labels: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        length = raw[i]
        if length == 0:
            if i + 1 != n:
                raise _bad(code, "data after the root label")
            return ".".join(labels) + "."
        if length > 63:
            raise _bad(code, f"label length {length} (compression is not allowed)")
        if i + 1 + length > n:
            raise _bad(code, "label runs past the option")
        labels.append(_label_text(raw[i + 1:i + 1 + length]))
        i += 1 + length
    return ".".join(labels)  # partial name: no root label


def _name_to_wire(name: str) -> bytes:
    if name == ".":
        return b"\x00"
    labels: list[bytes] = []
    cur = bytearray()
    i, n = 0, len(name)
    ends_with_dot = False
    while i < n:
        ch = name[i]
        ends_with_dot = False
        if ch == "\\":
            digits = name[i + 1:i + 4]
            if len(digits) == 3 and all(c in "0123456789" for c in digits):
                value = int(digits)
                if value > 255:
                    raise ValueError(f"bad escape \\{digits} in {name!r}")
                cur.append(value)
                i += 4
            elif i + 1 < n:
                cur += name[i + 1].encode("ascii")
                i += 2
            else:
                raise ValueError(f"dangling backslash in {name!r}")
        elif ch == ".":
            if not cur:
                raise ValueError(f"empty label in {name!r}")
            labels.append(bytes(cur))
            cur = bytearray()
            ends_with_dot = True
            i += 1
        else:
            cur += ch.encode("ascii")
            i += 1
    if cur:
        labels.append(bytes(cur))
    out = bytearray()
    for label in labels:
        if len(label) > 63:
            raise ValueError(f"label longer than 63 octets in {name!r}")
        out.append(len(label))
        out += label
    if ends_with_dot:
        out.append(0)
    if len(out) > 255:
        raise ValueError(f"name longer than 255 octets: {name!r}")
    return bytes(out)


def _decode_rai(raw: bytes) -> dict[int, bytes]:
    subs: dict[int, bytes] = {}
    i, n = 0, len(raw)
    while i < n:
        if i + 1 >= n:
            raise _bad(OPT_RELAY_AGENT_INFO, f"sub-option {raw[i]} has no length octet")
        sub, length = raw[i], raw[i + 1]
        if i + 2 + length > n:
            raise _bad(OPT_RELAY_AGENT_INFO, f"sub-option {sub} runs past the option")
        subs.setdefault(sub, bytes(raw[i + 2:i + 2 + length]))  # first one wins
        i += 2 + length
    return subs


def _uint(code: int, value: Any, octets: int) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"option {code} takes an int, not {type(value).__name__}")
    if not 0 <= value < 1 << (8 * octets):
        raise ValueError(f"option {code}: {value} does not fit {octets} octets")
    return value.to_bytes(octets, "big")


_IP = frozenset({OPT_SUBNET_MASK, OPT_BROADCAST_ADDRESS, OPT_REQUESTED_IP, OPT_SERVER_ID,
                 OPT_SUBNET_SELECTION})
_IPS = frozenset({OPT_ROUTERS, OPT_DNS_SERVERS})
_TEXT = frozenset({OPT_HOST_NAME, OPT_DOMAIN_NAME})
_U32 = frozenset({OPT_LEASE_TIME, OPT_RENEWAL_TIME, OPT_REBINDING_TIME})


def encode_option_value(code: int, value: Any) -> bytes:
    """Typed value -> option payload (no code/length octets).

    1, 28, 50, 54, 118: ``IPv4Address`` or str; 3, 6: list of them (at least
    one); 12, 15: ASCII str; 51, 58, 59: int seconds (``INFINITE_LEASE``);
    53: int; 55: list of ints; 57: int >= 576; 61: bytes (>= 2 octets);
    81: :class:`ClientFQDN`; 82: ``{sub-option: bytes}``; anything else: bytes.
    Raises ``ValueError``/``TypeError`` for values that cannot be encoded.
    """
    if code in _IP:
        return _addr(value).packed
    if code in _IPS:
        if isinstance(value, (str, bytes, IPv4Address)):
            value = [value]
        addresses = [_addr(v).packed for v in value]
        if not addresses:
            raise ValueError(f"option {code} needs at least one address")
        return b"".join(addresses)
    if code in _TEXT:
        text = value.encode("ascii") if isinstance(value, str) else bytes(value)
        if not text:
            raise ValueError(f"option {code} cannot be empty")
        return text
    if code in _U32:
        return _uint(code, value, 4)
    if code == OPT_MESSAGE_TYPE:
        return _uint(code, value, 1)
    if code == OPT_MAX_MESSAGE_SIZE:
        if isinstance(value, int) and not isinstance(value, bool) and value < MIN_MESSAGE_SIZE:
            raise ValueError(f"option 57 must be at least {MIN_MESSAGE_SIZE}")
        return _uint(code, value, 2)
    if code == OPT_PARAMETER_REQUEST_LIST:
        return b"".join(_uint(code, c, 1) for c in value)
    if code == OPT_CLIENT_ID:
        raw = bytes(value)
        if len(raw) < 2:
            raise ValueError("option 61 must be at least 2 octets")
        return raw
    if code == OPT_CLIENT_FQDN:
        if not isinstance(value, ClientFQDN):
            raise TypeError("option 81 takes a ClientFQDN")
        head = _uint(code, value.flags, 1) + _uint(code, value.rcode1, 1) \
            + _uint(code, value.rcode2, 1)
        name = _name_to_wire(value.name) if value.e else value.name.encode("ascii")
        return head + name
    if code == OPT_RELAY_AGENT_INFO:
        out = bytearray()
        for sub, raw in value.items():
            raw = bytes(raw)
            out += _uint(code, sub, 1) + _uint(code, len(raw), 1) + raw
        return bytes(out)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"option {code} has no typed encoder; pass bytes")


def decode_option_value(code: int, raw: bytes) -> Any:
    """Option payload -> typed value (the inverse of :func:`encode_option_value`).

    Raises only :class:`MalformedPacket` (``bad_option_value``, or
    ``bad_message_type`` for 53), so client data can be decoded without guards.
    Unknown codes come back as bytes.
    """
    raw = bytes(raw)
    n = len(raw)
    if code in _IP:
        if n != 4:
            raise _bad(code, f"{n} octets, want 4")
        return IPv4Address(raw)
    if code in _IPS:
        if n == 0 or n % 4:
            raise _bad(code, f"{n} octets, want a positive multiple of 4")
        return [IPv4Address(raw[i:i + 4]) for i in range(0, n, 4)]
    if code in _TEXT:
        if n == 0:
            raise _bad(code, "empty")
        return raw.rstrip(b"\x00").decode("utf-8", "replace")
    if code in _U32:
        if n != 4:
            raise _bad(code, f"{n} octets, want 4")
        return int.from_bytes(raw, "big")
    if code == OPT_MESSAGE_TYPE:
        if n != 1:
            raise MalformedPacket("bad_message_type", f"option 53 has {n} octets")
        return raw[0]
    if code == OPT_MAX_MESSAGE_SIZE:
        if n != 2:
            raise _bad(code, f"{n} octets, want 2")
        return int.from_bytes(raw, "big")
    if code == OPT_PARAMETER_REQUEST_LIST:
        return list(raw)
    if code == OPT_CLIENT_ID:
        if n < 2:
            raise _bad(code, f"{n} octets, want at least 2")
        return raw
    if code == OPT_CLIENT_FQDN:
        if n < 3:
            raise _bad(code, f"{n} octets, want at least 3")
        flags, rcode1, rcode2 = raw[0], raw[1], raw[2]
        if flags & FQDN_E:
            name = _name_from_wire(code, raw[3:])
        else:
            name = raw[3:].rstrip(b"\x00").decode("ascii", "replace")
        return ClientFQDN(name=name, flags=flags, rcode1=rcode1, rcode2=rcode2)
    if code == OPT_RELAY_AGENT_INFO:
        return _decode_rai(raw)
    return raw


# -- replies --------------------------------------------------------------------


def build_reply(request: DHCPPacket, message_type: int, *,
                yiaddr: IPv4Address | str | None = None,
                server_id: IPv4Address | str,
                options: Mapping[int, bytes],
                siaddr: IPv4Address | str | None = None,
                always_send: Iterable[int] = (),
                echo_client_id: bool = True) -> DHCPPacket:
    """The server's answer to ``request`` (RFC 2131 section 4.3, table 3).

    Option order: 53, 54, then what the client asked for in option 55 (in its
    order), then :data:`ALWAYS_SENT` and ``always_send`` codes present in
    ``options``; then 61 echoed when the request had it (RFC 6842, unless
    ``echo_client_id`` is false); option 82 echoed unchanged, last (RFC 3046).
    Codes in ``options`` that are neither requested nor always sent are left out.
    ``options`` holds encoded values (see :func:`encode_option_value`); its 52,
    53, 54, 61, 82 entries are ignored.

    NAK: yiaddr/ciaddr/siaddr zero, only option 56 (message) from ``options``,
    and the broadcast bit set when relayed (RFC 2131 section 4.3.2). An ACK to
    an INFORM carries no lease-time options (51, 58, 59) and yiaddr zero.
    ``ciaddr`` is copied from the request in ACKs only.
    """
    nak = message_type == NAK
    inform_ack = message_type == ACK and request.message_type == INFORM
    out: dict[int, bytes] = {
        OPT_MESSAGE_TYPE: bytes((message_type,)),
        OPT_SERVER_ID: _addr(server_id).packed,
    }
    candidates: list[int] = request.parameter_request_list
    candidates += ALWAYS_SENT
    candidates += always_send
    if nak:
        candidates.append(OPT_MESSAGE)
    for code in candidates:
        if code in out or code in _RESERVED_IN_REPLY or code not in options:
            continue
        if nak and code != OPT_MESSAGE:
            continue
        if inform_ack and code in _LEASE_OPTIONS:
            continue
        value = options[code]
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"option {code} value must be encoded bytes, "
                            f"not {type(value).__name__}")
        out[code] = bytes(value)
    if echo_client_id and request.client_id is not None:
        out[OPT_CLIENT_ID] = request.client_id
    if request.relay_agent_info is not None:
        out[OPT_RELAY_AGENT_INFO] = request.relay_agent_info

    flags = request.flags
    if nak and request.giaddr != ZERO:
        flags |= BROADCAST_FLAG
    no_address = nak or inform_ack or yiaddr is None
    return DHCPPacket(
        op=BOOTREPLY, htype=request.htype, hlen=request.hlen, hops=0, xid=request.xid,
        secs=0, flags=flags,
        ciaddr=request.ciaddr if message_type == ACK else ZERO,
        yiaddr=ZERO if no_address else _addr(yiaddr),
        siaddr=ZERO if nak or siaddr is None else _addr(siaddr),
        giaddr=request.giaddr, chaddr=bytes(request.chaddr), options=out)


def reply_destination(request: DHCPPacket, reply: DHCPPacket,
                      server_port: int = SERVER_PORT, client_port: int = CLIENT_PORT,
                      *, raw_unicast: bool = False) -> tuple[IPv4Address, int, bool]:
    """Where ``reply`` goes: ``(ip, port, broadcast)`` (RFC 2131 section 4.1).

    1. giaddr set: to the relay, ``(giaddr, server_port)``.
    2. NAK (giaddr zero): broadcast.
    3. ciaddr set: unicast to ciaddr.
    4. broadcast bit set: broadcast.
    5. otherwise unicast to yiaddr at chaddr, which needs an ARP entry the
       server cannot add without raw sockets: broadcast, unless the caller
       passes ``raw_unicast=True`` (it then unicasts to ``yiaddr`` itself).
    ``broadcast`` is True exactly when ip is 255.255.255.255.
    """
    if request.giaddr != ZERO:
        return request.giaddr, server_port, False
    if reply.message_type == NAK:
        return BROADCAST, client_port, True
    if request.ciaddr != ZERO:
        return request.ciaddr, client_port, False
    if request.flags & BROADCAST_FLAG:
        return BROADCAST, client_port, True
    if raw_unicast and reply.yiaddr != ZERO:
        return reply.yiaddr, client_port, False
    return BROADCAST, client_port, True
