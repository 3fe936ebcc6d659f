"""Heartbeat wire format: authenticated, sequenced, replay-proof.

A datagram is ``MAGIC (4) | VERSION (1) | HMAC-SHA256 (32) | payload``; the
MAC covers version and payload.  The payload is compact JSON::

    {"n": node id, "i": incarnation, "s": sequence, "t": sender wall time,
     "h": [health flags], "r": {resource: [owner, epoch, manual]},
     "p": {peer: partner state}, "c": {resource: config digest},
     "cd": {resource: {setting: digest}} (every few beats only)}

``"m": {resource: epoch}`` is the highest epoch the sender knows for each
resource (a node that restarts, or lost a contest, learns it: the owner
always re-claims above it).  ``"v": node`` is a witness's vote.  ``"e": {peer: [incarnation, seq]}`` echoes, for each receiver, the last
authentic beat the sender heard from it.

The incarnation grows with every start of a node (wall-clock nanoseconds,
never below the previous start's), the sequence with every beat.  Within
one incarnation the receiver keeps the highest sequence per peer and drops
anything not newer, so a captured beat can never be believed twice.

A beat of an incarnation the receiver has not accepted yet (the peer's
first beat after either side started, or after the peer restarted) is
believed only if it *echoes the receiver's current incarnation* with a
recent sequence: it must have been sent after the sender heard this very
run of the receiver.  So a recorded beat can never be replayed into a
restarted receiver (it cannot echo an incarnation that did not exist),
and a peer that restarts with a *lower* incarnation (state dir lost, clock
behind) is re-admitted at once instead of being dropped forever.  Until
the echo arrives the beat is dropped as ``unechoed`` (its sender is still
recorded, so our next beat echoes it and the handshake completes within a
round trip; counted per peer in ``unechoed``, apart from the drops).  Beats without an ``e`` field (a peer running an older
version) fall back to the old rule: never a lower incarnation.

Every drop has a reason, counted by :class:`HeartbeatVerifier`.

Wire versions (rolling upgrades, issue 17): a node reads beats of
:func:`accepted_versions` -- ``VERSION - 1`` (not below :data:`MIN_VERSION`)
to ``VERSION + 1`` -- and always emits ``VERSION``.  The payload is read by
key and unknown keys are ignored, so a version may only *add* keys: a key
never changes its meaning (a new meaning gets a new key), and a reader one
version behind parses what it knows of a newer beat correctly.  A release
may raise ``VERSION`` to N+1 only when the release before it reads N+1
(every release from this rule on does; the exact-match releases up to
33b2f38 do not, so they must be upgraded to a release that still emits 1
first).  Peers one release apart therefore always understand each other;
two apart may not (``bad_version``): upgrade one release at a time.
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
#: The oldest wire version still read (1 was the first).
MIN_VERSION = 1
_MAC_LEN = 32
HEADER_LEN = len(MAGIC) + 1 + _MAC_LEN
MAX_DATAGRAM = 8192

#: Reasons a received datagram is dropped (also the metric label values).
DROP_REASONS = ("truncated", "bad_magic", "bad_version", "bad_mac", "malformed",
                "unknown_peer", "own_node", "replayed", "reordered", "old_incarnation",
                "oversize")

#: Health flags a node may advertise; any of them makes it unable to serve.
UNABLE_FLAGS = ("maintenance", "interface_down", "service_failed", "store_down",
                "gateway_down")


def accepted_versions(current: int | None = None) -> range:
    """The wire versions a node at ``current`` (default :data:`VERSION`) reads:
    one version apart either way (see the module docstring)."""
    v = VERSION if current is None else current
    return range(max(MIN_VERSION, v - 1), v + 2)


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
    echo: dict[str, tuple[int, int]] | None = None
    max_epochs: dict[str, int] = field(default_factory=dict)
    vote: str | None = None          # a witness's vote (the one node it backs)
    version: int | None = None       # wire version if not the current VERSION (None)

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
    if hb.echo is not None:
        body["e"] = {k: [i, q] for k, (i, q) in hb.echo.items()}
    if hb.max_epochs:
        body["m"] = hb.max_epochs
    if hb.vote is not None:
        body["v"] = hb.vote
    version = VERSION if hb.version is None else hb.version
    payload = bytes([version]) + json.dumps(body, separators=(",", ":")).encode()
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
    if version not in accepted_versions():
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
        echo = body.get("e")
        if echo is not None:
            parsed = {}
            for k, v in _str_map(echo, "echo").items():
                inc_e, seq_e = v
                if not (isinstance(inc_e, int) and isinstance(seq_e, int)):
                    raise HeartbeatError("malformed", f"echo for {k}")
                parsed[k] = (inc_e, seq_e)
            echo = parsed
        max_epochs = _str_map(body.get("m", {}), "max epochs")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in max_epochs.values()):
            raise HeartbeatError("malformed", "max epochs are not integers")
        vote = body.get("v")
        if vote is not None and not isinstance(vote, str):
            raise HeartbeatError("malformed", "vote is not a node id")
    except HeartbeatError:
        raise
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise HeartbeatError("malformed", str(e)[:200]) from None
    return Heartbeat(node, inc, seq, float(sent), tuple(health), resources, partners, config,
                     detail, echo, max_epochs, vote, None if version == VERSION else version)


class HeartbeatVerifier:
    """Decodes datagrams from known peers, dropping stale ones; counts drops.

    ``incarnation`` is this node's own (None: no echo check, the pre-echo
    rule); the sender keeps :attr:`sent_seq` current so that an echo can be
    judged recent (within ``window`` beats)."""

    def __init__(self, key: bytes, own_id: str, peer_ids, *, incarnation: int | None = None,
                 window: int = 64, previous_keys: tuple[bytes, ...] = ()):
        self.key = key
        # Key rotation (review M7): beats signed with one of these are
        # accepted too (counted per key in ``accepted_by_key``); ours are
        # signed with ``key`` only.
        self.previous_keys = tuple(previous_keys)
        self.accepted_by_key: Counter[str] = Counter()
        self.own_id = own_id
        self.peer_ids = set(peer_ids)
        self.incarnation = incarnation
        self.window = window
        self.sent_seq = 0
        self.latest: dict[str, tuple[int, int]] = {}
        self.heard: dict[str, tuple[int, int]] = {}     # what our beats echo, per peer
        self.drops: Counter[str] = Counter()
        self.unechoed: Counter[str] = Counter()   # per peer: beats waiting for our echo

    def echo(self) -> dict[str, tuple[int, int]]:
        return dict(self.heard)

    def _decode(self, datagram: bytes) -> Heartbeat:
        try:
            hb = decode(datagram, self.key)
            which = "current"
        except HeartbeatError as e:
            if e.reason != "bad_mac" or not self.previous_keys:
                raise
            for i, key in enumerate(self.previous_keys):
                try:
                    hb = decode(datagram, key)
                except HeartbeatError as again:
                    if again.reason != "bad_mac":
                        raise
                    continue
                which = "previous" if i == 0 else f"previous{i + 1}"
                break
            else:
                raise
        self.accepted_by_key[which] += 1
        return hb

    def accept(self, datagram: bytes) -> Heartbeat | None:
        """The heartbeat if it is authentic and newer than any seen; else None."""
        try:
            hb = self._decode(datagram)
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
        if last is not None and hb.incarnation == last[0]:
            if hb.seq <= last[1]:
                self.drops["replayed" if hb.seq == last[1] else "reordered"] += 1
                return None
        elif self.incarnation is not None and hb.echo is not None:
            # A new incarnation (or the first beat heard): believed only if
            # it echoes this run of ours, recently.
            e = hb.echo.get(self.own_id)
            if not (e is not None and e[0] == self.incarnation
                    and self.sent_seq - self.window < e[1] <= self.sent_seq):
                if last is None or hb.incarnation > last[0] or self.heard.get(hb.node) is None:
                    self.heard[hb.node] = (hb.incarnation, hb.seq)
                if last is None or hb.incarnation > last[0]:
                    # The handshake's normal first step, not an attack: counted
                    # per peer apart from the drops.
                    self.unechoed[hb.node] += 1
                else:
                    self.drops["old_incarnation"] += 1
                return None
        elif last is not None and hb.incarnation < last[0]:
            self.drops["old_incarnation"] += 1
            return None
        self.latest[hb.node] = (hb.incarnation, hb.seq)
        self.heard[hb.node] = (hb.incarnation, hb.seq)
        return hb


#: Above this a beat is IP-fragmented on a 1500-byte MTU path (one lost
#: fragment loses the beat): optional parts are shed to stay under it.
FIT_BUDGET = 1400


class BeatFitter:
    """Keeps every beat within a size budget (review M8) by shedding optional
    parts instead of sending what does not fit: the per-setting config
    detail (``cd``) is split across beats (as many resources as fit, in
    rotation, so every resource's detail still goes out); past the hard
    limit (what a receiver accepts, :data:`MAX_DATAGRAM`) the highest-epoch
    map (``m``) goes too.  Claims, digests, partner states and echoes are
    never dropped.  ``stats`` counts ``beats_trimmed`` and
    ``oversize_sent``; each kind of shedding is logged once."""

    def __init__(self, key: bytes, stats: dict, *, budget: int = FIT_BUDGET,
                 hard: int = MAX_DATAGRAM, log=None):
        self.key, self.stats, self.budget, self.hard = key, stats, budget, hard
        self.cursor = 0
        self.log = log
        self._logged: set[str] = set()

    def _note(self, counter: str, message: str, **kw):
        self.stats[counter] = self.stats.get(counter, 0) + 1
        if counter not in self._logged and self.log is not None:
            self._logged.add(counter)
            self.log(message, **kw)

    def fit(self, hb: Heartbeat) -> Heartbeat:
        from dataclasses import replace
        size = len(encode(hb, self.key))
        if size <= self.budget:
            return hb
        if hb.max_epochs and hb.resources:
            # Lossless first: an epoch the claims already carry.
            m = {k: v for k, v in hb.max_epochs.items()
                 if not (k in hb.resources and hb.resources[k][1] >= v)}
            if len(m) < len(hb.max_epochs):
                hb = replace(hb, max_epochs=m)
                size = len(encode(hb, self.key))
                if size <= self.budget:
                    return hb
        if hb.config_detail:
            names = sorted(hb.config_detail)
            start = self.cursor % len(names)
            order = names[start:] + names[:start]
            base = replace(hb, config_detail={})
            room = self.budget - len(encode(base, self.key))
            part: dict[str, dict[str, str]] = {}
            for name in order:
                cost = len(json.dumps({name: hb.config_detail[name]}, separators=(",", ":"))) + 1
                if cost > room:
                    break
                part[name] = hb.config_detail[name]
                room -= cost
            self.cursor = start + len(part)
            hb = replace(hb, config_detail=part or None)
            self._note("beats_trimmed", "heartbeat of {n} bytes over the {budget}-byte budget: "
                       "the config detail goes out split across beats ({k} of {total} "
                       "resources per beat)", n=size, budget=self.budget, k=len(part),
                       total=len(names))
            size = len(encode(hb, self.key))
        if size > self.hard and hb.max_epochs:
            hb = replace(hb, max_epochs={}, config_detail=None)
            self._note("beats_trimmed_epochs", "heartbeat of {n} bytes over the receivers' "
                       "{hard}-byte limit: the highest-epoch map is left out", n=size,
                       hard=self.hard)
            size = len(encode(hb, self.key))
        if size > self.budget:
            self._note("oversize_built", "heartbeat of {n} bytes even without its optional "
                       "parts ({what}): fewer resources per node, or shorter names",
                       n=size, what="IP fragments" if size <= self.hard
                       else "RECEIVERS DROP IT")
        return hb


def config_digest(settings: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """``(overall digest, {setting: digest})`` of a resource's shared settings."""
    detail = {k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode())
              .hexdigest()[:8] for k, v in sorted(settings.items())}
    overall = hashlib.sha256(json.dumps(detail, sort_keys=True).encode()).hexdigest()[:12]
    return overall, detail
