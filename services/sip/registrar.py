"""Registrar rules of RFC 3261 §10.3 as a pure function (no I/O, no clock).

:func:`decide` takes the bindings an AOR has now and a REGISTER, and
returns what to answer and what the bindings become.  The location service
(:mod:`services.sip.location`) reads and writes the store around it; this
module only decides, so every rule is tested on plain data.

Rules, with the RFC step:

- step 6: ``Contact: *`` must be alone and come with ``Expires: 0`` (else
  400); it removes every binding, except that a binding with the same
  Call-ID and a CSeq not lower than the request's aborts the request (500).
- step 6: each contact's expiry is its ``expires`` parameter, else the
  ``Expires`` header, else ``default_expires``; capped at ``max_expires``;
  0 removes; a non-zero expiry below ``min_expires`` fails the whole
  request with 423 and ``Min-Expires``.
- step 7: an existing binding with a different Call-ID is replaced (or
  removed); with the same Call-ID only a higher CSeq updates it, otherwise
  the whole request is aborted (500 "Out of order"); nothing is applied.
- ``q`` is a number 0..1 with at most three decimals (else 400).
- after the update an AOR may hold at most ``max_contacts`` bindings (else
  503 "Too Many Registered Contacts", Kamailio's answer; nothing applied).
- Path (RFC 3327) values of the REGISTER are stored with its bindings and
  echoed in the 200 when the UA said ``Supported: path``.
- step 8: the 200 lists every current binding with its remaining expiry.
"""

from __future__ import annotations

import json
import math
import re
from json.encoder import encode_basestring_ascii
from dataclasses import dataclass, field, replace

from services.sip.message import Message, NameAddr, parse_name_addr

_Q = re.compile(r"^(0(\.\d{0,3})?|1(\.0{0,3})?)$")


@dataclass(frozen=True)
class Binding:
    aor: str
    uri: str                   # the contact URI (binding identity)
    expires: float             # absolute (store clock seconds)
    q: float | None
    call_id: str
    cseq: int
    path: tuple[str, ...] = ()
    received: str = ""         # transport:host:port the REGISTER came from
    params: str = ""           # other contact params (e.g. +sip.instance), as text

    def to_record(self) -> dict:
        return {"uri": self.uri, "expires": self.expires, "q": self.q, "call_id": self.call_id,
                "cseq": self.cseq, "path": list(self.path), "received": self.received,
                "params": self.params}

    def to_json(self) -> str:
        """``to_record()`` as compact JSON (what ``json.dumps(..., separators=(",", ":"))``
        writes), formatted directly: this runs for every stored and replicated binding."""
        q = self.q
        return ('{"uri":' + _json_str(self.uri) + ',"expires":' + _json_num(self.expires)
                + ',"q":' + ("null" if q is None else _json_num(q))
                + ',"call_id":' + _json_str(self.call_id) + ',"cseq":' + _json_num(self.cseq)
                + ',"path":[' + ",".join(map(_json_str, self.path)) + '],"received":'
                + _json_str(self.received) + ',"params":' + _json_str(self.params) + "}")

    @classmethod
    def from_record(cls, aor: str, rec: dict) -> "Binding":
        return cls(aor, rec["uri"], float(rec["expires"]), rec.get("q"), rec.get("call_id", ""),
                   int(rec.get("cseq", 0)), tuple(rec.get("path", ())), rec.get("received", ""),
                   rec.get("params", ""))

    def contact_header(self, now: float) -> str:
        text = f"<{self.uri}>"
        if self.params:
            text += self.params
        if self.q is not None:
            text += f";q={format_q(self.q)}"
        return text + f";expires={max(0, int(math.ceil(self.expires - now)))}"


_json_str = encode_basestring_ascii
_json_compact = json.JSONEncoder(separators=(",", ":")).encode


def _json_num(v) -> str:
    if v.__class__ is float and math.isfinite(v):
        return float.__repr__(v)
    if v.__class__ is int:
        return int.__repr__(v)
    return _json_compact(v)          # anything else (inf, bool, a subclass): as json does


def format_q(q: float) -> str:
    return f"{q:.3f}".rstrip("0").rstrip(".") if q not in (0.0, 1.0) else f"{q:.1f}"


@dataclass(frozen=True)
class Limits:
    default_expires: int = 3600
    min_expires: int = 60
    max_expires: int = 7200
    max_contacts: int = 10


@dataclass
class Decision:
    code: int
    reason: str | None = None
    headers: list = field(default_factory=list)       # extra response headers
    #: the bindings after the request (None: nothing changes)
    bindings: dict[str, Binding] | None = None
    added: list[Binding] = field(default_factory=list)     # new or refreshed
    removed: list[Binding] = field(default_factory=list)

    @property
    def changes(self) -> bool:
        return bool(self.added or self.removed)


def _fail(code: int, reason: str | None = None, headers=None) -> Decision:
    return Decision(code, reason, list(headers or []))


def _expires_header(msg: Message) -> int | None:
    value = msg.get("Expires")
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit():
        raise ValueError("bad Expires header")
    return min(int(value), 2 ** 32 - 1)


def _param_text(na: NameAddr) -> str:
    out = ""
    for k, v in na.params.items():
        if k in ("q", "expires"):
            continue
        out += f";{k}" if v is None else f";{k}={v}"
    return out


def decide(aor: str, existing: dict[str, Binding], msg: Message, now: float, limits: Limits,
           received: str = "") -> Decision:
    """The registrar's answer to ``msg`` (a REGISTER for ``aor``) given the
    AOR's ``existing`` bindings (uri -> Binding; expired ones already left out)."""
    try:
        header_expires = _expires_header(msg)
    except ValueError as e:
        return _fail(400, str(e)[:1].upper() + str(e)[1:])
    call_id = msg.call_id
    cseq = msg.cseq[0]
    try:
        contacts = [parse_name_addr(v) for v in msg.get_all("Contact")]
    except ValueError:
        return _fail(400, "Bad Contact")
    if not contacts:                                   # a query
        return _ok(existing, now, msg, [], [], changed=False)
    if any(c.star for c in contacts):
        if len(contacts) != 1:
            return _fail(400, "Wildcard Contact with other contacts")
        if header_expires != 0:
            return _fail(400, "Wildcard Contact needs Expires: 0")
        for b in existing.values():
            if b.call_id == call_id and b.cseq >= cseq:
                return _fail(500, "Out of order request")
        return _ok({}, now, msg, [], list(existing.values()))
    path = tuple(msg.get_all("Path"))
    after = dict(existing)
    added: list[Binding] = []
    removed: list[Binding] = []
    seen: set[str] = set()
    for c in contacts:
        uri = c.uri
        value = c.params.get("expires")
        if value is not None:
            if not value.isdigit():
                return _fail(400, "Bad expires parameter")
            expires = min(int(value), 2 ** 32 - 1)
        elif header_expires is not None:
            expires = header_expires
        else:
            expires = limits.default_expires
        q = None
        if "q" in c.params:
            text = c.params["q"] or ""
            if not _Q.match(text):
                return _fail(400, "Bad q value")
            q = float(text)
        if 0 < expires < limits.min_expires:
            return _fail(423, None, [("Min-Expires", str(limits.min_expires))])
        expires = min(expires, limits.max_expires)
        old = after.get(uri)
        if old is not None and old.call_id == call_id and old.cseq >= cseq and uri not in seen:
            return _fail(500, "Out of order request")
        seen.add(uri)
        if expires == 0:
            if old is not None:
                del after[uri]
                removed.append(old)
            continue
        b = Binding(aor, uri, now + expires, q, call_id, cseq, path, received, _param_text(c))
        after[uri] = b
        added.append(b)
    if len(after) > limits.max_contacts:
        return _fail(503, "Too Many Registered Contacts")
    added = [b for b in added if after.get(b.uri) is b]
    return _ok(after, now, msg, added, removed)


def _ok(bindings: dict[str, Binding], now: float, msg: Message, added, removed, *,
        changed: bool = True) -> Decision:
    headers = [("Contact", b.contact_header(now)) for b in
               sorted(bindings.values(), key=lambda b: (-(b.q if b.q is not None else 1.0), b.uri))]
    supported = {v.strip().lower() for v in msg.get_all("Supported")}
    if "path" in supported:
        headers.extend(("Path", p) for p in msg.get_all("Path"))
    return Decision(200, None, headers, bindings if changed else None, added, removed)


def unexpired(bindings: dict[str, Binding], now: float) -> dict[str, Binding]:
    return {u: b for u, b in bindings.items() if b.expires > now}


__all__ = ["Binding", "Limits", "Decision", "decide", "unexpired", "format_q", "replace"]
