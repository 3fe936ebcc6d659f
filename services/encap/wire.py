"""The encapsulation wire protocol: codec, handshake and sealed records.

Everything here is pure (no I/O, no reactor): bytes in, objects or
:class:`Drop` out.  The format is described in ``PROTOCOL.md`` beside this
file; in short, every UDP datagram starts with one *type* byte:

====  =========  ==========================================================
type  name       body
====  =========  ==========================================================
0x01  HELLO      ``version u8, sender u32, nonce[16], id_len u8, id``
0x02  CHALLENGE  ``receiver u32, sender u32, nonce[16], id_len u8, id, mac[32]``
0x03  CONFIRM    ``receiver u32, mac[32]``
0x04  RECORD     ``receiver u32, seq u64, AEAD(ciphertext || tag16)``
====  =========  ==========================================================

Handshake (pre-shared key ``psk``, both sides prove they hold it over the
other side's fresh nonce; no state on the responder is confirmed before the
initiator proved itself)::

    I -> R  HELLO      i_index, Ni, I_id
    R -> I  CHALLENGE  i_index, r_index, Nr, R_id,  HMAC(psk, "R" || transcript)
    I -> R  CONFIRM    r_index,                     HMAC(psk, "I" || transcript)

``transcript = version || Ni || Nr || len(I_id) I_id || len(R_id) R_id || i_index || r_index``.
Keys: ``HKDF-SHA256(psk, salt=Ni||Nr, info="appliance-encap v1" || transcript)``
-> 64 bytes, the first 32 seal initiator->responder records, the last 32
responder->initiator records.

A RECORD is sealed with ChaCha20-Poly1305, nonce = ``0u32 || seq u64`` (one
key per direction, seq never repeats within a session), associated data =
the 13 header bytes.  Its plaintext starts with a *kind* byte:

* ``K_DATA``  ``flow u64 || IP packet`` (``flow`` numbers the EN's packets
  across all its sessions, so copies sent on two DNs during a soft handoff
  carry the same number);
* ``K_KEEPALIVE`` ``u8 flags`` (bit 0: please echo) ``[u32 stamp]`` (echoed back) ;
* ``K_CONTROL`` ``JSON object`` with a ``"t"`` key (see :data:`CONTROL_TYPES`).
"""

from __future__ import annotations

import hmac
import json
import os
import struct
from dataclasses import dataclass
from hashlib import sha256

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION = 1

T_HELLO = 0x01
T_CHALLENGE = 0x02
T_CONFIRM = 0x03
T_RECORD = 0x04

K_DATA = 0x00
K_KEEPALIVE = 0x01
K_CONTROL = 0x02

KA_ECHO = 0x01      # keepalive flag: answer with a keepalive

NONCE_LEN = 16
MAC_LEN = 32
TAG_LEN = 16
MAX_ID_LEN = 64
RECORD_HEADER = struct.Struct("!BIQ")          # type, receiver, seq: 13 bytes
RECORD_INDEX_SEQ = struct.Struct("!IQ")         # receiver, seq (after the type byte)
MIN_RECORD = RECORD_HEADER.size + 16 + 1
HELLO_HEAD = struct.Struct("!BBI16sB")         # type, version, sender, nonce, id_len
CHALLENGE_HEAD = struct.Struct("!BII16sB")     # type, receiver, sender, nonce, id_len
CONFIRM = struct.Struct("!BI32s")
FLOW = struct.Struct("!Q")
STAMP = struct.Struct("!I")           # optional keepalive stamp (echoed by the DN)
#: Bytes a RECORD of kind DATA adds to the inner IP packet (plus IP 20 + UDP 8 outside).
DATA_OVERHEAD = RECORD_HEADER.size + 1 + FLOW.size + TAG_LEN
MAX_SEQ = (1 << 64) - 1
#: A session rekeys (new handshake) well before its sequence numbers run out.
REKEY_AFTER_SEQ = 1 << 60

#: Control message types (the ``"t"`` of a K_CONTROL JSON object).
C_INFO = "info"            # EN -> DN: who I am, my DNs, my address, the role I give you
C_ASSIGN = "assign"        # DN -> EN: your address (address, prefixlen, mtu)
C_SECONDARY = "secondary"  # DN -> EN: I am (only) a secondary DN for you
C_PROMOTE = "promote"      # EN -> DN: you are my primary now (soft handoff start)
C_PROMOTED = "promoted"    # DN -> EN: I hold your route: the new path is confirmed
C_DEMOTE = "demote"        # EN -> DN: you are secondary again (I moved back)
C_PRIMARY_DOWN = "primary_down"   # DN -> EN: the cluster declared your primary DN dead
C_PRIMARY_BACK = "primary_back"   # DN -> EN: your primary DN is alive again
C_ERROR = "error"          # DN -> EN: refused (reason)
CONTROL_TYPES = frozenset({C_INFO, C_ASSIGN, C_SECONDARY, C_PROMOTE, C_PROMOTED, C_DEMOTE,
                           C_PRIMARY_DOWN, C_PRIMARY_BACK, C_ERROR})
MAX_CONTROL = 2048


class Drop(Exception):
    """A datagram we do not act on; ``reason`` is the metric label."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------
# handshake messages
# ----------------------------------------------------------------------
@dataclass(frozen=True)
class Hello:
    sender: int
    nonce: bytes
    ident: str
    version: int = VERSION

    def encode(self) -> bytes:
        ident = self.ident.encode()
        return HELLO_HEAD.pack(T_HELLO, self.version, self.sender, self.nonce, len(ident)) + ident


@dataclass(frozen=True)
class Challenge:
    receiver: int
    sender: int
    nonce: bytes
    ident: str
    mac: bytes

    def encode(self) -> bytes:
        ident = self.ident.encode()
        return (CHALLENGE_HEAD.pack(T_CHALLENGE, self.receiver, self.sender, self.nonce, len(ident))
                + ident + self.mac)


@dataclass(frozen=True)
class Confirm:
    receiver: int
    mac: bytes

    def encode(self) -> bytes:
        return CONFIRM.pack(T_CONFIRM, self.receiver, self.mac)


class Record:
    """A RECORD datagram, split (no copy of the body until decryption)."""

    __slots__ = ("receiver", "seq", "header", "sealed")

    def __init__(self, receiver: int, seq: int, header: bytes, sealed: bytes):
        self.receiver = receiver
        self.seq = seq
        self.header = header       # the 13 bytes, the AEAD's associated data
        self.sealed = sealed       # ciphertext || tag


def _ident(raw: bytes) -> str:
    try:
        ident = raw.decode("ascii")
    except UnicodeDecodeError:
        raise Drop("bad_identity") from None
    if not ident or not ident.isprintable():
        raise Drop("bad_identity")
    return ident


def decode(data: bytes):
    """One datagram -> :class:`Hello` | :class:`Challenge` | :class:`Confirm`
    | :class:`Record`; raises :class:`Drop` (never anything else)."""
    if not data:
        raise Drop("empty")
    kind = data[0]
    n = len(data)
    if kind == T_RECORD:
        if n < RECORD_HEADER.size + TAG_LEN + 1:
            raise Drop("short")
        _, receiver, seq = RECORD_HEADER.unpack_from(data)
        return Record(receiver, seq, data[:RECORD_HEADER.size], data[RECORD_HEADER.size:])
    if kind == T_HELLO:
        if n < HELLO_HEAD.size:
            raise Drop("short")
        _, version, sender, nonce, id_len = HELLO_HEAD.unpack_from(data)
        if version != VERSION:
            raise Drop("version")
        if id_len == 0 or id_len > MAX_ID_LEN or n != HELLO_HEAD.size + id_len:
            raise Drop("bad_length")
        return Hello(sender, nonce, _ident(data[HELLO_HEAD.size:]), version)
    if kind == T_CHALLENGE:
        if n < CHALLENGE_HEAD.size:
            raise Drop("short")
        _, receiver, sender, nonce, id_len = CHALLENGE_HEAD.unpack_from(data)
        if id_len == 0 or id_len > MAX_ID_LEN or n != CHALLENGE_HEAD.size + id_len + MAC_LEN:
            raise Drop("bad_length")
        end = CHALLENGE_HEAD.size + id_len
        return Challenge(receiver, sender, nonce, _ident(data[CHALLENGE_HEAD.size:end]),
                         data[end:])
    if kind == T_CONFIRM:
        if n != CONFIRM.size:
            raise Drop("bad_length")
        _, receiver, mac = CONFIRM.unpack(data)
        return Confirm(receiver, mac)
    raise Drop("unknown_type")


# ----------------------------------------------------------------------
# keys
# ----------------------------------------------------------------------
def transcript(ni: bytes, nr: bytes, i_id: str, r_id: str, i_index: int, r_index: int) -> bytes:
    a, b = i_id.encode(), r_id.encode()
    return (bytes([VERSION]) + ni + nr + bytes([len(a)]) + a + bytes([len(b)]) + b
            + struct.pack("!II", i_index, r_index))


def handshake_mac(psk: bytes, role: bytes, script: bytes) -> bytes:
    return hmac.new(psk, role + script, sha256).digest()


def derive_keys(psk: bytes, ni: bytes, nr: bytes, script: bytes) -> tuple[bytes, bytes]:
    """``(initiator->responder key, responder->initiator key)``."""
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=ni + nr,
               info=b"appliance-encap v1" + script).derive(psk)
    return okm[:32], okm[32:]


def new_nonce() -> bytes:
    return os.urandom(NONCE_LEN)


def new_index() -> int:
    return struct.unpack("!I", os.urandom(4))[0] or 1


# ----------------------------------------------------------------------
# replay window
# ----------------------------------------------------------------------
class ReplayWindow:
    """Sliding window over 64-bit sequence numbers (RFC 6479 in spirit):
    accepts each number at most once, and nothing older than ``size``
    behind the highest seen.  :meth:`check` before decrypting (cheap),
    :meth:`accept` after the tag verified (so forgeries never move it)."""

    __slots__ = ("size", "top", "bits")

    def __init__(self, size: int = 2048):
        self.size = size
        self.top = -1          # highest accepted
        self.bits = 0          # bit i set: top - i accepted

    def check(self, seq: int) -> str | None:
        """None if ``seq`` may be new; else the drop reason."""
        if seq > self.top:
            return None
        off = self.top - seq
        if off >= self.size:
            return "replay_old"
        if (self.bits >> off) & 1:
            return "replay"
        return None

    def accept(self, seq: int) -> None:
        top = self.top
        if seq > top:
            shift = seq - top
            if shift < self.size:
                bits = (self.bits << shift) | 1
                # bits beyond the window are never read: trim them only now and then
                if bits.bit_length() > 2 * self.size:
                    bits &= (1 << self.size) - 1
                self.bits = bits
            else:
                self.bits = 1
            self.top = seq
        else:
            self.bits |= 1 << (top - seq)


# ----------------------------------------------------------------------
# an established session's crypto state
# ----------------------------------------------------------------------
class SessionKeys:
    """Seal and open RECORDs of one session (one key per direction)."""

    __slots__ = ("_send", "_recv", "peer_index", "send_seq", "window")

    def __init__(self, send_key: bytes, recv_key: bytes, peer_index: int, window: int = 2048):
        self._send = ChaCha20Poly1305(send_key)
        self._recv = ChaCha20Poly1305(recv_key)
        self.peer_index = peer_index
        self.send_seq = 0
        self.window = ReplayWindow(window)

    def seal(self, plaintext: bytes) -> bytes:
        seq = self.send_seq
        if seq >= MAX_SEQ:
            raise OverflowError("sequence numbers exhausted: rekey")
        self.send_seq = seq + 1
        header = RECORD_HEADER.pack(T_RECORD, self.peer_index, seq)
        return header + self._send.encrypt(b"\0\0\0\0" + header[5:], plaintext, header)

    def open_datagram(self, data: bytes, seq: int) -> bytes:
        """:meth:`open` on a raw RECORD datagram whose ``seq`` the caller read
        (the hot path: no :class:`Record` object)."""
        window = self.window
        if seq <= window.top:
            why = window.check(seq)
            if why is not None:
                raise Drop(why)
        try:
            plain = self._recv.decrypt(b"\0\0\0\0" + data[5:13], data[13:], data[:13])
        except InvalidTag:
            raise Drop("forged") from None
        window.accept(seq)
        if not plain:
            raise Drop("empty_record")
        return plain

    def open(self, rec: Record) -> bytes:
        """The plaintext of ``rec``; raises :class:`Drop` (``replay``,
        ``replay_old``, ``forged``) and only then moves the window."""
        why = self.window.check(rec.seq)
        if why is not None:
            raise Drop(why)
        try:
            plain = self._recv.decrypt(b"\0\0\0\0" + rec.header[5:], rec.sealed, rec.header)
        except InvalidTag:
            raise Drop("forged") from None
        self.window.accept(rec.seq)
        if not plain:
            raise Drop("empty_record")
        return plain


# plaintext helpers ------------------------------------------------------
def data_plain(flow: int, packet: bytes) -> bytes:
    return b"\0" + FLOW.pack(flow) + packet


def keepalive_plain(echo: bool, stamp: int = 0) -> bytes:
    """A keepalive; ``stamp`` (1 .. 2^32-1, optional) is the EN's probe time, which
    the DN's answer carries back (the EN's round-trip sample, matched to its probe)."""
    flags = bytes([K_KEEPALIVE, KA_ECHO if echo else 0])
    return flags + STAMP.pack(stamp) if stamp else flags


def control_plain(msg: dict) -> bytes:
    return bytes([K_CONTROL]) + json.dumps(msg, separators=(",", ":")).encode()


def parse_inner(plain: bytes):
    """``(kind, value)``: DATA -> ``(flow, packet)``; KEEPALIVE -> flags;
    CONTROL -> dict.  Raises :class:`Drop`."""
    kind = plain[0]
    if kind == K_DATA:
        if len(plain) < 1 + FLOW.size + 20:
            raise Drop("short_packet")
        packet = plain[1 + FLOW.size:]
        if packet[0] >> 4 not in (4, 6):
            raise Drop("not_ip")
        return K_DATA, (FLOW.unpack_from(plain, 1)[0], packet)
    if kind == K_KEEPALIVE:
        if len(plain) == 2:
            return K_KEEPALIVE, plain[1]
        if len(plain) == 2 + STAMP.size:
            # the stamp in the bits above the flags (value & KA_ECHO stays the flag)
            return K_KEEPALIVE, plain[1] | STAMP.unpack_from(plain, 2)[0] << 8
        raise Drop("bad_keepalive")
    if kind == K_CONTROL:
        if len(plain) > MAX_CONTROL + 1:
            raise Drop("control_too_long")
        try:
            msg = json.loads(plain[1:].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise Drop("bad_control") from None
        if not isinstance(msg, dict) or msg.get("t") not in CONTROL_TYPES:
            raise Drop("bad_control")
        return K_CONTROL, msg
    raise Drop("unknown_kind")


# ----------------------------------------------------------------------
# the handshake as two small state machines
# ----------------------------------------------------------------------
class Initiator:
    """The EN side of one handshake."""

    def __init__(self, psk: bytes, ident: str, index: int | None = None,
                 nonce: bytes | None = None):
        self.psk = psk
        self.ident = ident
        self.index = index if index is not None else new_index()
        self.nonce = nonce if nonce is not None else new_nonce()

    def hello(self) -> bytes:
        return Hello(self.index, self.nonce, self.ident).encode()

    def challenged(self, ch: Challenge) -> tuple[bytes, SessionKeys, str]:
        """``(CONFIRM datagram, keys, responder id)``; raises :class:`Drop`
        (``unknown_session``, ``bad_mac``)."""
        if ch.receiver != self.index:
            raise Drop("unknown_session")
        script = transcript(self.nonce, ch.nonce, self.ident, ch.ident, self.index, ch.sender)
        if not hmac.compare_digest(ch.mac, handshake_mac(self.psk, b"R", script)):
            raise Drop("bad_mac")
        k_ir, k_ri = derive_keys(self.psk, self.nonce, ch.nonce, script)
        confirm = Confirm(ch.sender, handshake_mac(self.psk, b"I", script)).encode()
        return confirm, SessionKeys(k_ir, k_ri, ch.sender), ch.ident


@dataclass
class PendingResponse:
    """A CHALLENGE sent, waiting for the CONFIRM (responder side)."""
    index: int
    peer_index: int
    peer_ident: str
    script: bytes
    ni: bytes
    nr: bytes
    addr: tuple
    created: float
    key: bytes = b""             # the key of peer_ident's handshake


class KeyRing:
    """Which key opens a session for which EN id, on the DN side.

    * one pre-shared key for every EN (``psk``: the lab mode -- any holder of the
      key may use any id and claim any address);
    * per-EN keys (``ens``: ``{en_id: key}``): the handshake of an id uses that id's
      key (the id is in the transcript both MACs cover), so a session proves the EN
      holds *its own* key; ids without a key are refused at HELLO.  Then the DNs
      also bind addresses to ids: the home DN hands the EN an address *ticket*
      (:meth:`ticket`, an HMAC under ``ticket_key``, a secret of the DNs only) that
      the EN shows to the other DNs, which accept its claim to that address only
      with a valid ticket (:meth:`ticket_ok`).

    ``local(ident)`` gives a key for a DN's own in-process peer (the watchdog's
    probe), never one of the ENs'."""

    def __init__(self, psk: bytes | None = None, ens: dict[str, bytes] | None = None,
                 ticket_key: bytes | None = None):
        if (psk is None) == (ens is None):
            raise ValueError("a KeyRing has either one psk or per-EN keys")
        if ens is not None and ticket_key is None:
            raise ValueError("per-EN keys need the DNs' ticket key")
        self.psk = psk
        self.ens = dict(ens) if ens is not None else None
        self.ticket_key = ticket_key
        self._local: dict[str, bytes] = {}

    @property
    def per_en(self) -> bool:
        return self.ens is not None

    def key_for(self, ident: str) -> bytes | None:
        if self.ens is None:
            return self.psk
        key = self._local.get(ident)
        return key if key is not None else self.ens.get(ident)

    def local(self, ident: str) -> bytes:
        if self.ens is None:
            return self.psk
        if ident in self.ens:
            raise ValueError(f"{ident!r} is an EN id of the keys file")
        return self._local.setdefault(ident, os.urandom(32))

    def ticket(self, en: str, address: str, home: str) -> str | None:
        """The address ticket of ``en`` for ``address`` from DN ``home`` (hex), or
        None in the single-key mode."""
        if self.ticket_key is None:
            return None
        msg = b"appliance-encap ticket v1\0" + "\0".join((en, address, home)).encode()
        return hmac.new(self.ticket_key, msg, sha256).hexdigest()

    def ticket_ok(self, en: str, address: str, home: str, ticket) -> bool:
        if self.ticket_key is None:
            return True
        if not isinstance(ticket, str) or len(ticket) != 64:
            return False
        return hmac.compare_digest(ticket, self.ticket(en, address, home))


class Responder:
    """The DN side: answers HELLOs, verifies CONFIRMs.  Pending handshakes
    are bounded (oldest evicted) and expire, so a HELLO flood costs memory
    proportional to ``max_pending`` only.  ``keys``: one pre-shared key (bytes)
    or a :class:`KeyRing` (per-EN keys: a HELLO from an id without a key is a
    counted ``unknown_en`` drop, answered with nothing)."""

    def __init__(self, keys, ident: str, max_pending: int = 1024, timeout_s: float = 5.0):
        self.keys = keys if isinstance(keys, KeyRing) else KeyRing(psk=keys)
        self.ident = ident
        self.max_pending = max_pending
        self.timeout_s = timeout_s
        self.pending: dict[int, PendingResponse] = {}

    @property
    def psk(self) -> bytes | None:
        return self.keys.psk

    def hello(self, h: Hello, addr, now: float, index: int | None = None,
              nonce: bytes | None = None) -> bytes:
        if len(self.pending) >= self.max_pending:
            oldest = min(self.pending.values(), key=lambda p: p.created)
            del self.pending[oldest.index]
        key = self.keys.key_for(h.ident)
        if key is None:
            raise Drop("unknown_en")
        index = index if index is not None else new_index()
        while index in self.pending:
            index = new_index()
        nr = nonce if nonce is not None else new_nonce()
        script = transcript(h.nonce, nr, h.ident, self.ident, h.sender, index)
        self.pending[index] = PendingResponse(index, h.sender, h.ident, script, h.nonce, nr,
                                              addr, now, key)
        return Challenge(h.sender, index, nr, self.ident,
                         handshake_mac(key, b"R", script)).encode()

    def confirm(self, c: Confirm, addr, now: float) -> tuple[PendingResponse, SessionKeys]:
        p = self.pending.get(c.receiver)
        if p is None:
            raise Drop("unknown_session")
        if now - p.created > self.timeout_s:
            del self.pending[c.receiver]
            raise Drop("handshake_expired")
        if not hmac.compare_digest(c.mac, handshake_mac(p.key, b"I", p.script)):
            raise Drop("bad_mac")
        del self.pending[c.receiver]
        k_ir, k_ri = derive_keys(p.key, p.ni, p.nr, p.script)
        return p, SessionKeys(k_ri, k_ir, p.peer_index)

    def expire(self, now: float) -> int:
        old = [i for i, p in self.pending.items() if now - p.created > self.timeout_s]
        for i in old:
            del self.pending[i]
        return len(old)


def load_en_keys(path: str) -> dict[str, bytes]:
    """Per-EN keys: a file of ``en-id key`` lines (key: 64+ hex digits; blank lines
    and ``#`` comments skipped), or a directory with one file per EN named by its
    id holding its key (as :func:`load_psk` reads it).  Raises ValueError naming the
    file and line of a mistake."""
    keys: dict[str, bytes] = {}
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if name.startswith(".") or not os.path.isfile(full):
                continue
            if not _ident_ok(name):
                raise ValueError(f"{full}: {name!r} is not an EN id (1-64 printable ASCII)")
            keys[name] = load_psk(full)
        return keys
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{n}: expected 'en-id hex-key'")
            ident, hexkey = parts
            if not _ident_ok(ident):
                raise ValueError(f"{path}:{n}: {ident!r} is not an EN id (1-64 printable ASCII)")
            try:
                key = bytes.fromhex(hexkey)
            except ValueError:
                raise ValueError(f"{path}:{n}: the key of {ident} is not hex") from None
            if len(key) < 32:
                raise ValueError(f"{path}:{n}: the key of {ident} has fewer than 32 bytes "
                                 "(64 hex digits)")
            if ident in keys:
                raise ValueError(f"{path}:{n}: {ident} appears twice")
            keys[ident] = key
    return keys


def _ident_ok(ident: str) -> bool:
    return 0 < len(ident) <= MAX_ID_LEN and all(33 <= ord(c) < 127 for c in ident)


def load_psk(path: str) -> bytes:
    """A pre-shared key file: hex (64+ hex digits) or at least 32 raw bytes."""
    raw = open(path, "rb").read().strip()
    try:
        key = bytes.fromhex(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = raw
    if len(key) < 32:
        raise ValueError(f"{path}: a pre-shared key needs at least 32 bytes (64 hex digits)")
    return key
