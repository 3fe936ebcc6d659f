"""DHCPv6 wire format (RFC 8415 sections 8, 9, 21; RFC 3646; RFC 4704), hand-written.

The hot path parses one datagram into a :class:`Message` (client/server
messages) or a :class:`RelayMessage` (RELAY-FORW / RELAY-REPL, whose
``inner`` is the relayed message, nested as deep as relays go, at most
``MAX_HOPS``).  Options the server acts on get typed fields; every other
option is kept raw in ``other`` (code -> list of values) so nothing is
lost.  Anything malformed raises :class:`MalformedMessage` with a short
``reason`` (one of ``DROP_REASONS``): the service counts and drops it.
:func:`encode` is the inverse: ``parse(encode(m)) == m`` for every message
the dataclasses can hold (hypothesis-tested in tests/unit/test_dhcp6_codec.py).

Addresses are kept as 16-byte ``bytes`` on the wire objects (no
``ipaddress`` objects on the hot path); :func:`ntop` / :func:`pton` convert.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

# message types (RFC 8415 section 7.3)
SOLICIT, ADVERTISE, REQUEST, CONFIRM, RENEW, REBIND, REPLY, RELEASE, DECLINE = range(1, 10)
RECONFIGURE, INFORMATION_REQUEST, RELAY_FORW, RELAY_REPL = 10, 11, 12, 13
MESSAGE_NAMES = {SOLICIT: "SOLICIT", ADVERTISE: "ADVERTISE", REQUEST: "REQUEST",
                 CONFIRM: "CONFIRM", RENEW: "RENEW", REBIND: "REBIND", REPLY: "REPLY",
                 RELEASE: "RELEASE", DECLINE: "DECLINE", RECONFIGURE: "RECONFIGURE",
                 INFORMATION_REQUEST: "INFORMATION-REQUEST", RELAY_FORW: "RELAY-FORW",
                 RELAY_REPL: "RELAY-REPL"}

# option codes (RFC 8415 section 21, RFC 3646, RFC 4704)
OPT_CLIENTID, OPT_SERVERID, OPT_IA_NA, OPT_IA_TA, OPT_IAADDR, OPT_ORO = 1, 2, 3, 4, 5, 6
OPT_PREFERENCE, OPT_ELAPSED_TIME, OPT_RELAY_MSG, OPT_STATUS_CODE = 7, 8, 9, 13
OPT_RAPID_COMMIT, OPT_INTERFACE_ID = 14, 18
OPT_DNS_SERVERS, OPT_DOMAIN_LIST, OPT_IA_PD, OPT_IAPREFIX, OPT_CLIENT_FQDN = 23, 24, 25, 26, 39

# status codes (RFC 8415 section 21.13)
SUCCESS, UNSPEC_FAIL, NO_ADDRS_AVAIL, NO_BINDING, NOT_ON_LINK, USE_MULTICAST = range(6)
NO_PREFIX_AVAIL = 6
STATUS_NAMES = {SUCCESS: "Success", UNSPEC_FAIL: "UnspecFail", NO_ADDRS_AVAIL: "NoAddrsAvail",
                NO_BINDING: "NoBinding", NOT_ON_LINK: "NotOnLink", USE_MULTICAST: "UseMulticast",
                NO_PREFIX_AVAIL: "NoPrefixAvail"}

INFINITY = 0xFFFFFFFF
MAX_HOPS = 32                  # HOP_COUNT_LIMIT (RFC 8415 section 7.6)
MAX_DUID = 130                 # 2-byte type + at most 128 octets (RFC 8415 section 11.1)
ZERO16 = bytes(16)

DROP_REASONS = ("short", "bad_option", "bad_ia", "bad_relay", "too_deep", "bad_name",
                "duplicate_option", "bad_duid", "unknown_type")


class MalformedMessage(ValueError):
    """The datagram is not a DHCPv6 message this server can read."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ---------------------------------------------------------------------------
# the objects
# ---------------------------------------------------------------------------

@dataclass
class Status:
    code: int = SUCCESS
    message: str = ""


@dataclass
class IAAddress:
    address: bytes                     # 16 bytes
    preferred: int = 0
    valid: int = 0
    status: Status | None = None


@dataclass
class IAPrefix:
    prefix: bytes                      # 16 bytes (bits beyond prefix_len as sent)
    prefix_len: int = 64
    preferred: int = 0
    valid: int = 0
    status: Status | None = None


@dataclass
class IA:
    """An IA_NA (``addresses``) or IA_PD (``prefixes``)."""

    iaid: int
    t1: int = 0
    t2: int = 0
    addresses: list[IAAddress] = field(default_factory=list)
    prefixes: list[IAPrefix] = field(default_factory=list)
    status: Status | None = None


@dataclass
class ClientFQDN:
    """Option 39 (RFC 4704): flags (S=1, O=2, N=4) and a name; ``partial``
    when the name has no terminating root label (the client gave a host name only)."""

    flags: int = 0
    name: str = ""
    partial: bool = False


@dataclass
class Message:
    msg_type: int
    txid: int = 0                       # 24 bits
    client_id: bytes | None = None
    server_id: bytes | None = None
    ia_na: list[IA] = field(default_factory=list)
    ia_pd: list[IA] = field(default_factory=list)
    oro: tuple[int, ...] | None = None
    preference: int | None = None
    elapsed: int | None = None          # hundredths of a second
    status: Status | None = None
    rapid_commit: bool = False
    dns_servers: tuple[bytes, ...] | None = None
    domain_list: tuple[str, ...] | None = None
    fqdn: ClientFQDN | None = None
    other: dict[int, list[bytes]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return MESSAGE_NAMES.get(self.msg_type, str(self.msg_type))


@dataclass
class RelayMessage:
    msg_type: int                       # RELAY_FORW or RELAY_REPL
    hop_count: int = 0
    link_address: bytes = ZERO16
    peer_address: bytes = ZERO16
    inner: "Message | RelayMessage | None" = None
    interface_id: bytes | None = None
    other: dict[int, list[bytes]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return MESSAGE_NAMES[self.msg_type]

    def innermost(self) -> Message:
        m = self.inner
        while isinstance(m, RelayMessage):
            m = m.inner
        return m

    def chain(self) -> list["RelayMessage"]:
        """The relay layers, outermost first."""
        out, m = [], self
        while isinstance(m, RelayMessage):
            out.append(m)
            m = m.inner
        return out


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def ntop(b: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6, b)


def pton(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_OPTHDR = struct.Struct("!HH")
_IAHDR = struct.Struct("!III")
_ADDR_LT = struct.Struct("!II")
_PREFIX_HDR = struct.Struct("!IIB")


def _options(data: bytes, start: int, end: int):
    """(code, value) pairs of ``data[start:end]``."""
    i = start
    while i < end:
        if i + 4 > end:
            raise MalformedMessage("bad_option", "truncated option header")
        code, length = _OPTHDR.unpack_from(data, i)
        i += 4
        if i + length > end:
            raise MalformedMessage("bad_option", f"option {code} overruns the message")
        yield code, data[i:i + length]
        i += length


def decode_name(data: bytes, *, allow_partial: bool = True) -> tuple[str, bool]:
    """One uncompressed DNS wire-format name (RFC 1035 3.1; RFC 8415 10):
    ``(text, partial)``; ``partial`` when it lacks the terminating root label."""
    labels, i = [], 0
    while i < len(data):
        n = data[i]
        i += 1
        if n == 0:
            if i != len(data):
                raise MalformedMessage("bad_name", "data after the root label")
            return ".".join(labels), False
        if n > 63 or i + n > len(data):
            raise MalformedMessage("bad_name", "bad label length")
        try:
            labels.append(data[i:i + n].decode("ascii"))
        except UnicodeDecodeError:
            raise MalformedMessage("bad_name", "non-ASCII label") from None
        i += n
    if not allow_partial:
        raise MalformedMessage("bad_name", "name without root label")
    return ".".join(labels), True


def _name_list(data: bytes) -> tuple[str, ...]:
    """A sequence of complete names (option 24)."""
    out, i = [], 0
    while i < len(data):
        j = i
        while True:
            if j >= len(data):
                raise MalformedMessage("bad_name", "name without root label")
            n = data[j]
            if n == 0:
                break
            j += 1 + n
        out.append(decode_name(data[i:j + 1], allow_partial=False)[0])
        i = j + 1
    return tuple(out)


def encode_name(name: str, partial: bool = False) -> bytes:
    name = name.rstrip(".") if not partial else name
    out = bytearray()
    if name:
        for label in name.split("."):
            raw = label.encode("ascii")
            if not 0 < len(raw) <= 63:
                raise ValueError(f"bad DNS label in {name!r}")
            out.append(len(raw))
            out += raw
    if not partial:
        out.append(0)
    if len(out) > 255:
        raise ValueError(f"DNS name too long: {name!r}")
    return bytes(out)


def _status(value: bytes) -> Status:
    if len(value) < 2:
        raise MalformedMessage("bad_option", "short status code")
    return Status(_U16.unpack_from(value)[0], value[2:].decode("utf-8", "replace"))


def _ia(value: bytes, pd: bool) -> IA:
    if len(value) < 12:
        raise MalformedMessage("bad_ia", "short IA option")
    iaid, t1, t2 = _IAHDR.unpack_from(value)
    ia = IA(iaid, t1, t2)
    for code, sub in _options(value, 12, len(value)):
        if code == OPT_IAADDR and not pd:
            if len(sub) < 24:
                raise MalformedMessage("bad_ia", "short IAADDR")
            pref, valid = _ADDR_LT.unpack_from(sub, 16)
            st = None
            for c2, v2 in _options(sub, 24, len(sub)):
                if c2 == OPT_STATUS_CODE:
                    st = _status(v2)
            ia.addresses.append(IAAddress(sub[:16], pref, valid, st))
        elif code == OPT_IAPREFIX and pd:
            if len(sub) < 25:
                raise MalformedMessage("bad_ia", "short IAPREFIX")
            pref, valid, plen = _PREFIX_HDR.unpack_from(sub)
            if plen > 128:
                raise MalformedMessage("bad_ia", "prefix length over 128")
            st = None
            for c2, v2 in _options(sub, 25, len(sub)):
                if c2 == OPT_STATUS_CODE:
                    st = _status(v2)
            ia.prefixes.append(IAPrefix(sub[9:25], plen, pref, valid, st))
        elif code == OPT_STATUS_CODE:
            ia.status = _status(sub)
    return ia


def _duid(value: bytes) -> bytes:
    if not 3 <= len(value) <= MAX_DUID:
        raise MalformedMessage("bad_duid", f"DUID of {len(value)} octets")
    return value


# ---------------------------------------------------------------------------
# parse
# ---------------------------------------------------------------------------

def parse(data: bytes, _depth: int = 0) -> "Message | RelayMessage":
    """One datagram -> a message; :class:`MalformedMessage` if it is not one."""
    if len(data) < 4:
        raise MalformedMessage("short", f"{len(data)} octets")
    mtype = data[0]
    if mtype in (RELAY_FORW, RELAY_REPL):
        return _parse_relay(data, _depth)
    if mtype not in MESSAGE_NAMES:
        raise MalformedMessage("unknown_type", str(mtype))
    m = Message(mtype, int.from_bytes(data[1:4], "big"))
    seen: set[int] = set()
    for code, value in _options(data, 4, len(data)):
        if code == OPT_IA_NA:
            m.ia_na.append(_ia(value, False))
            continue
        if code == OPT_IA_PD:
            m.ia_pd.append(_ia(value, True))
            continue
        if code in _SINGLE:
            if code in seen:
                raise MalformedMessage("duplicate_option", str(code))
            seen.add(code)
        if code == OPT_CLIENTID:
            m.client_id = _duid(value)
        elif code == OPT_SERVERID:
            m.server_id = _duid(value)
        elif code == OPT_ORO:
            if len(value) % 2:
                raise MalformedMessage("bad_option", "odd ORO length")
            m.oro = struct.unpack(f"!{len(value) // 2}H", value)
        elif code == OPT_PREFERENCE:
            if len(value) != 1:
                raise MalformedMessage("bad_option", "preference length")
            m.preference = value[0]
        elif code == OPT_ELAPSED_TIME:
            if len(value) != 2:
                raise MalformedMessage("bad_option", "elapsed time length")
            m.elapsed = _U16.unpack(value)[0]
        elif code == OPT_STATUS_CODE:
            m.status = _status(value)
        elif code == OPT_RAPID_COMMIT:
            if value:
                raise MalformedMessage("bad_option", "rapid commit with data")
            m.rapid_commit = True
        elif code == OPT_DNS_SERVERS:
            if len(value) % 16:
                raise MalformedMessage("bad_option", "DNS servers length")
            m.dns_servers = tuple(value[i:i + 16] for i in range(0, len(value), 16))
        elif code == OPT_DOMAIN_LIST:
            m.domain_list = _name_list(value)
        elif code == OPT_CLIENT_FQDN:
            if len(value) < 1:
                raise MalformedMessage("bad_option", "empty client FQDN")
            name, partial = decode_name(value[1:]) if len(value) > 1 else ("", True)
            m.fqdn = ClientFQDN(value[0], name, partial)
        else:
            m.other.setdefault(code, []).append(value)
    return m


_SINGLE = frozenset((OPT_CLIENTID, OPT_SERVERID, OPT_ORO, OPT_PREFERENCE, OPT_ELAPSED_TIME,
                     OPT_STATUS_CODE, OPT_RAPID_COMMIT, OPT_DNS_SERVERS, OPT_DOMAIN_LIST,
                     OPT_CLIENT_FQDN))


#: client messages that must name the server (RFC 8415 section 16): one naming another
#: server is not for us
TO_A_SERVER = frozenset((REQUEST, RENEW, RELEASE, DECLINE))


def peek_server_id(data: bytes) -> bytes | None:
    """The Server Identifier of a REQUEST / RENEW / RELEASE / DECLINE (``TO_A_SERVER``),
    direct or inside RELAY-FORW layers, found by a walk over the option headers only
    (no parse); None when there is none, the message is of another type, or anything
    looks wrong (then :func:`parse` decides).  In a pair every client message reaches
    both partners (multicast): half the REQUESTs name the partner and are dropped here."""
    depth = 0
    while True:
        n = len(data)
        if n < 4:
            return None
        mtype = data[0]
        if mtype == RELAY_FORW:
            if depth >= MAX_HOPS or n < 34:
                return None
            i, inner = 34, None
            while i + 4 <= n:
                code, length = _OPTHDR.unpack_from(data, i)
                if code == OPT_RELAY_MSG:
                    inner = data[i + 4:i + 4 + length]
                    break
                i += 4 + length
            if inner is None:
                return None
            data, depth = inner, depth + 1
            continue
        if mtype not in TO_A_SERVER:
            return None
        i = 4
        while i + 4 <= n:
            code, length = _OPTHDR.unpack_from(data, i)
            if code == OPT_SERVERID:
                end = i + 4 + length
                return data[i + 4:end] if end <= n else None
            i += 4 + length
        return None


def _parse_relay(data: bytes, depth: int) -> RelayMessage:
    if depth >= MAX_HOPS:
        raise MalformedMessage("too_deep", f"more than {MAX_HOPS} relay layers")
    if len(data) < 34:
        raise MalformedMessage("short", "relay header")
    r = RelayMessage(data[0], data[1], data[2:18], data[18:34])
    inner = None
    for code, value in _options(data, 34, len(data)):
        if code == OPT_RELAY_MSG:
            if inner is not None:
                raise MalformedMessage("duplicate_option", "relay message")
            inner = value
        elif code == OPT_INTERFACE_ID:
            if r.interface_id is not None:
                raise MalformedMessage("duplicate_option", "interface-id")
            r.interface_id = value
        else:
            r.other.setdefault(code, []).append(value)
    if inner is None:
        raise MalformedMessage("bad_relay", "no relay message option")
    r.inner = parse(inner, depth + 1)
    return r


# ---------------------------------------------------------------------------
# encode
# ---------------------------------------------------------------------------

def _opt(code: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"option {code} too long")
    return _OPTHDR.pack(code, len(value)) + value


def _enc_status(st: Status) -> bytes:
    return _opt(OPT_STATUS_CODE, _U16.pack(st.code) + st.message.encode("utf-8"))


def _enc_ia(ia: IA, pd: bool) -> bytes:
    parts = [_IAHDR.pack(ia.iaid, ia.t1, ia.t2)]
    for a in ia.addresses if not pd else ():
        sub = a.address + _ADDR_LT.pack(a.preferred, a.valid)
        if a.status is not None:
            sub += _enc_status(a.status)
        parts.append(_opt(OPT_IAADDR, sub))
    for p in ia.prefixes if pd else ():
        sub = _PREFIX_HDR.pack(p.preferred, p.valid, p.prefix_len) + p.prefix
        if p.status is not None:
            sub += _enc_status(p.status)
        parts.append(_opt(OPT_IAPREFIX, sub))
    if ia.status is not None:
        parts.append(_enc_status(ia.status))
    return _opt(OPT_IA_PD if pd else OPT_IA_NA, b"".join(parts))


def encode(m: "Message | RelayMessage") -> bytes:
    """A message to bytes (ValueError/TypeError if a field cannot be encoded)."""
    if isinstance(m, RelayMessage):
        parts = [bytes((m.msg_type, m.hop_count)), m.link_address, m.peer_address]
        if len(m.link_address) != 16 or len(m.peer_address) != 16:
            raise ValueError("relay addresses must be 16 octets")
        if m.interface_id is not None:
            parts.append(_opt(OPT_INTERFACE_ID, m.interface_id))
        for code, values in m.other.items():
            for v in values:
                parts.append(_opt(code, v))
        parts.append(_opt(OPT_RELAY_MSG, encode(m.inner)))
        return b"".join(parts)
    parts = [bytes((m.msg_type,)) + (m.txid & 0xFFFFFF).to_bytes(3, "big")]
    if m.client_id is not None:
        parts.append(_opt(OPT_CLIENTID, m.client_id))
    if m.server_id is not None:
        parts.append(_opt(OPT_SERVERID, m.server_id))
    for ia in m.ia_na:
        parts.append(_enc_ia(ia, False))
    for ia in m.ia_pd:
        parts.append(_enc_ia(ia, True))
    if m.oro is not None:
        parts.append(_opt(OPT_ORO, struct.pack(f"!{len(m.oro)}H", *m.oro)))
    if m.preference is not None:
        parts.append(_opt(OPT_PREFERENCE, bytes((m.preference,))))
    if m.elapsed is not None:
        parts.append(_opt(OPT_ELAPSED_TIME, _U16.pack(m.elapsed)))
    if m.status is not None:
        parts.append(_enc_status(m.status))
    if m.rapid_commit:
        parts.append(_opt(OPT_RAPID_COMMIT, b""))
    if m.dns_servers is not None:
        parts.append(_opt(OPT_DNS_SERVERS, b"".join(m.dns_servers)))
    if m.domain_list is not None:
        parts.append(_opt(OPT_DOMAIN_LIST, b"".join(encode_name(n) for n in m.domain_list)))
    if m.fqdn is not None:
        parts.append(_opt(OPT_CLIENT_FQDN, bytes((m.fqdn.flags,))
                          + (encode_name(m.fqdn.name, m.fqdn.partial)
                             if m.fqdn.name or not m.fqdn.partial else b"")))
    for code, values in m.other.items():
        for v in values:
            parts.append(_opt(code, v))
    return b"".join(parts)


def relay_reply(forw: RelayMessage, reply: Message) -> RelayMessage:
    """The RELAY-REPL chain answering ``forw`` (RFC 8415 19.3): every layer's
    hop count, link and peer address and interface-id echoed, ``reply`` innermost."""
    inner: Message | RelayMessage = reply
    for layer in reversed(forw.chain()):
        inner = RelayMessage(RELAY_REPL, layer.hop_count, layer.link_address,
                             layer.peer_address, inner, layer.interface_id)
    return inner
