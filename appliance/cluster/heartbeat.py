"""Heartbeat wire format: authenticated, sequenced, replay-proof.

A datagram is ``MAGIC (4) | VERSION (1) | HMAC-SHA256 (32) | payload``; the
MAC covers version and payload.  The payload is compact JSON::

    {"n": node id, "i": incarnation, "s": sequence, "t": sender wall time,
     "h": [health flags], "r": {resource: [owner, epoch, manual]},
     "p": {peer: partner state}, "c": {resource: config digest},
     "cd": {resource: {setting: digest}} (every few beats only)}

The incarnation grows with every start of a node (wall-clock nanoseconds,
never below the previous start's), the sequence with every beat.  The
receiver keeps the highest (incarnation, sequence) per peer and drops
anything not newer, so a captured beat can never be believed twice.
Every drop has a reason, counted by :class:`HeartbeatVerifier`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

MAGIC = b"APHB"
VERSION = 1
_MAC_LEN = 32
HEADER_LEN = len(MAGIC) + 1 + _MAC_LEN
MAX_DATAGRAM = 8192

#: Reasons a received datagram is dropped (also the metric label values).
DROP_REASONS = ("truncated", "bad_magic", "bad_version", "bad_mac", "malformed",
                "unknown_peer", "own_node", "replayed", "reordered", "old_incarnation",
                "oversize")

#: Health flags a node may advertise; any of them makes it unable to serve.
UNABLE_FLAGS = ("maintenance", "interface_down", "service_failed", "store_down")


@dataclass(frozen=True)
class Heartbeat:
    node: str
    incarnation: int
    seq: int
    sent_at: float
    health: tuple[str, ...] = ()
    resources: dict[str, tuple[str, int, bool]] = field(default_factory=dict)
    partners: dict[str, str] = field(default_factory=dict)
    config: dict[str, str] = field(default_factory=dict)
    config_detail: dict[str, dict[str, str]] | None = None

    @property
    def able(self) -> bool:
        return not any(flag in UNABLE_FLAGS for flag in self.health)


class HeartbeatError(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def encode(hb: Heartbeat, key: bytes) -> bytes:
    body: dict[str, Any] = {"n": hb.node, "i": hb.incarnation, "s": hb.seq,
                            "t": round(hb.sent_at, 6), "h": list(hb.health),
                            "r": {k: [o, e, m] for k, (o, e, m) in hb.resources.items()},
                            "p": hb.partners, "c": hb.config}
    if hb.config_detail is not None:
        body["cd"] = hb.config_detail
    payload = bytes([VERSION]) + json.dumps(body, separators=(",", ":")).encode()
    mac = hmac.new(key, payload, hashlib.sha256).digest()
    return MAGIC + payload[:1] + mac + payload[1:]


def _str_map(value, what) -> dict:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise HeartbeatError("malformed", f"{what} is not a map")
    return value


def decode(datagram: bytes, key: bytes) -> Heartbeat:
    """Authenticate and parse; raise :class:`HeartbeatError` with a reason."""
    if len(datagram) > MAX_DATAGRAM:
        raise HeartbeatError("oversize", f"{len(datagram)} bytes")
    if len(datagram) < HEADER_LEN + 2:
        raise HeartbeatError("truncated", f"{len(datagram)} bytes")
    if datagram[:4] != MAGIC:
        raise HeartbeatError("bad_magic")
    version = datagram[4]
    mac = datagram[5:HEADER_LEN]
    payload = datagram[4:5] + datagram[HEADER_LEN:]
    if not hmac.compare_digest(mac, hmac.new(key, payload, hashlib.sha256).digest()):
        raise HeartbeatError("bad_mac")
    if version != VERSION:
        raise HeartbeatError("bad_version", str(version))
    try:
        body = json.loads(payload[1:])
        node, inc, seq, sent = body["n"], body["i"], body["s"], body["t"]
        if not (isinstance(node, str) and isinstance(inc, int) and isinstance(seq, int)
                and isinstance(sent, (int, float))):
            raise HeartbeatError("malformed", "header fields have wrong types")
        health = body.get("h", [])
        if not isinstance(health, list) or not all(isinstance(h, str) for h in health):
            raise HeartbeatError("malformed", "health is not a list of strings")
        resources = {}
        for name, claim in _str_map(body.get("r", {}), "resources").items():
            owner, epoch, manual = claim
            if not (isinstance(owner, str) and isinstance(epoch, int) and isinstance(manual, bool)):
                raise HeartbeatError("malformed", f"claim for {name}")
            resources[name] = (owner, epoch, manual)
        partners = {k: str(v) for k, v in _str_map(body.get("p", {}), "partners").items()}
        config = {k: str(v) for k, v in _str_map(body.get("c", {}), "config").items()}
        detail = body.get("cd")
        if detail is not None:
            detail = {k: {str(a): str(b) for a, b in _str_map(v, "detail").items()}
                      for k, v in _str_map(detail, "config detail").items()}
    except HeartbeatError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise HeartbeatError("malformed", str(e)) from None
    return Heartbeat(node, inc, seq, float(sent), tuple(health), resources, partners, config,
                     detail)


class HeartbeatVerifier:
    """Decodes datagrams from known peers, dropping stale ones; counts drops."""

    def __init__(self, key: bytes, own_id: str, peer_ids):
        self.key = key
        self.own_id = own_id
        self.peer_ids = set(peer_ids)
        self.latest: dict[str, tuple[int, int]] = {}
        self.drops: Counter[str] = Counter()

    def accept(self, datagram: bytes) -> Heartbeat | None:
        """The heartbeat if it is authentic and newer than any seen; else None."""
        try:
            hb = decode(datagram, self.key)
        except HeartbeatError as e:
            self.drops[e.reason] += 1
            return None
        if hb.node == self.own_id:
            self.drops["own_node"] += 1
            return None
        if hb.node not in self.peer_ids:
            self.drops["unknown_peer"] += 1
            return None
        last = self.latest.get(hb.node)
        if last is not None:
            inc, seq = last
            if hb.incarnation < inc:
                self.drops["old_incarnation"] += 1
                return None
            if hb.incarnation == inc and hb.seq <= seq:
                self.drops["replayed" if hb.seq == seq else "reordered"] += 1
                return None
        self.latest[hb.node] = (hb.incarnation, hb.seq)
        return hb


def config_digest(settings: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """``(overall digest, {setting: digest})`` of a resource's shared settings."""
    detail = {k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode())
              .hexdigest()[:8] for k, v in sorted(settings.items())}
    overall = hashlib.sha256(json.dumps(detail, sort_keys=True).encode()).hexdigest()[:12]
    return overall, detail
