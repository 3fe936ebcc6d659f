"""SIP messages (RFC 3261 §7, §20, §25): parse and serialize, no I/O.

:func:`parse` turns bytes into a :class:`Message` or raises
:class:`Malformed` carrying a short reason and, when the bytes were a request
with enough of its headers to build a response (Via, From, To, Call-ID,
CSeq), the partly parsed request, so the caller can answer
``400 <reason>``; otherwise the caller counts a drop.  Nothing else escapes:
any other exception inside the parser is a bug and is turned into
``Malformed("unparseable")`` by :func:`parse` (tested with hypothesis).

What the parser accepts:

- header folding (a line starting with SP/HT continues the previous one);
- compact header forms (``v``, ``f``, ``t``, ``i``, ``m``, ``l``, ``c``, ...),
  stored under their long names;
- several values of a list header (Via, Contact, Route, Path, ...) on one line
  separated by commas outside quotes and ``<...>``, or on several lines;
- case-insensitive header names; names are kept in canonical spelling.

Headers are an ordered list of ``(name, value)``; list headers hold one
value per entry.  :meth:`Message.to_bytes` writes one line per entry and a
Content-Length computed from the body.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote

__all__ = ["Malformed", "Message", "NameAddr", "Via", "parse", "parse_name_addr", "parse_via",
           "split_list", "canonical_aor", "response_for", "REASONS"]

MAX_MESSAGE_BYTES = 65535

COMPACT = {"v": "Via", "f": "From", "t": "To", "i": "Call-ID", "m": "Contact",
           "l": "Content-Length", "c": "Content-Type", "e": "Content-Encoding",
           "k": "Supported", "s": "Subject", "o": "Event", "r": "Refer-To", "u": "Allow-Events",
           "x": "Session-Expires", "a": "Accept-Contact", "b": "Referred-By", "j": "Reject-Contact",
           "d": "Request-Disposition", "y": "Identity", "n": "Identity-Info"}

_CANONICAL = {n.lower(): n for n in (
    "Via", "From", "To", "Call-ID", "CSeq", "Contact", "Content-Length", "Content-Type",
    "Max-Forwards", "Expires", "Min-Expires", "Route", "Record-Route", "Path", "Allow",
    "Supported", "Require", "Proxy-Require", "Unsupported", "User-Agent", "Server", "Date",
    "Authorization", "Proxy-Authorization", "WWW-Authenticate", "Proxy-Authenticate",
    "Authentication-Info", "Retry-After", "Timestamp", "Content-Encoding", "Accept",
    "Event", "Subject", "Warning", "Service-Route")}
_CANONICAL["www-authenticate"] = "WWW-Authenticate"
_CANONICAL["cseq"] = "CSeq"
_CANONICAL["call-id"] = "Call-ID"

_KNOWN_SPELLINGS = frozenset(_CANONICAL.values())
#: header names as UAs usually write them -> canonical (skips the token check and the
#: case folding for them; anything else goes the long way)
_FAST_NAMES = {**{n: n for n in _KNOWN_SPELLINGS}, **COMPACT,
               **{k.upper(): v for k, v in COMPACT.items()},
               **{n.lower(): n for n in _KNOWN_SPELLINGS}}

#: Headers whose comma-separated values are separate entries (RFC 3261 §7.3.1).
LIST_HEADERS = frozenset({"Via", "Contact", "Route", "Record-Route", "Path", "Allow",
                          "Supported", "Require", "Proxy-Require", "Unsupported",
                          "Service-Route", "Accept"})

REASONS = {100: "Trying", 200: "OK", 302: "Moved Temporarily", 400: "Bad Request",
           401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 407: "Proxy Authentication Required",
           416: "Unsupported URI Scheme", 420: "Bad Extension", 423: "Interval Too Brief",
           480: "Temporarily Unavailable", 481: "Call/Transaction Does Not Exist",
           482: "Loop Detected", 483: "Too Many Hops", 500: "Server Internal Error",
           501: "Not Implemented", 503: "Service Unavailable", 505: "Version Not Supported",
           513: "Message Too Large"}

_TOKEN = re.compile(r"^[A-Za-z0-9\-.!%*_+`'~]+$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9\-.!%*_+`'~]+$")
_CODE = re.compile(r"^[1-6][0-9][0-9]$")
#: Headers a request needs before a response can be built for it.
RESPONSE_HEADERS = ("Via", "From", "To", "Call-ID", "CSeq")


class Malformed(Exception):
    """The bytes are not a usable SIP message.

    ``reason`` is short text for a ``400`` reason phrase or a drop counter;
    ``request`` is the partly parsed request when a response can be built.
    """

    def __init__(self, reason: str, request: "Message | None" = None):
        super().__init__(reason)
        self.reason = reason
        self.request = request


def canonical_name(name: str) -> str:
    if name in _KNOWN_SPELLINGS:
        return name
    low = name.lower()
    if low in COMPACT:
        return COMPACT[low]
    known = _CANONICAL.get(low)
    if known is not None:
        return known
    return "-".join(part[:1].upper() + part[1:].lower() for part in low.split("-"))


def split_list(value: str) -> list[str]:
    """Split on commas outside quoted strings and ``<...>``; strip each part."""
    if "," not in value:                  # the common case: one value, no scan
        value = value.strip()
        return [value] if value else []
    parts: list[str] = []
    depth = 0
    quoted = False
    escape = False
    start = 0
    for i, ch in enumerate(value):
        if escape:
            escape = False
            continue
        if quoted:
            if ch == "\\":
                escape = True
            elif ch == '"':
                quoted = False
            continue
        if ch == '"':
            quoted = True
        elif ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            parts.append(value[start:i].strip())
            start = i + 1
    parts.append(value[start:].strip())
    return [p for p in parts if p]


def _params(text: str) -> dict[str, str | None]:
    """``;a=1;b`` -> {"a": "1", "b": None} (names lower case, values kept)."""
    out: dict[str, str | None] = {}
    for part in _split_outside_quotes(text, ";"):
        part = part.strip()
        if not part:
            continue
        name, eq, val = part.partition("=")
        name = name.strip().lower()
        if not name:
            raise ValueError("empty parameter name")
        out[name] = val.strip() if eq else None
    return out


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    if '"' not in text:                   # nothing quoted: a plain split
        return text.split(sep)
    parts, start, quoted, escape = [], 0, False, False
    for i, ch in enumerate(text):
        if escape:
            escape = False
        elif quoted and ch == "\\":
            escape = True
        elif ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append(text[start:i])
            start = i + 1
    if quoted:
        raise ValueError("unterminated quoted string")
    parts.append(text[start:])
    return parts


# ---------------------------------------------------------------------------
# Via, name-addr, URIs
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Via:
    protocol: str             # "SIP/2.0/UDP"
    host: str
    port: int | None
    params: dict

    @property
    def transport(self) -> str:
        return self.protocol.rsplit("/", 1)[-1].upper()

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def sent_by(self) -> str:
        return f"{self.host}:{self.port}" if self.port is not None else self.host


_VIA = re.compile(r"^\s*(SIP\s*/\s*2\.0\s*/\s*[A-Za-z0-9\-.!%*_+`'~]+)\s+([^;\s]+)\s*(;.*)?$",
                  re.IGNORECASE)
_SPACES = re.compile(r"\s+")
_HOST = re.compile(r"^[A-Za-z0-9.\-\[\]:_]+$")
_LINE_END = re.compile(r"\r?\n")


def parse_via(value: str) -> Via:
    m = _VIA.match(value)
    if not m:
        raise ValueError("bad Via")
    protocol = m.group(1)
    if not protocol.isupper() or not protocol.isprintable() or " " in protocol:
        protocol = _SPACES.sub("", protocol).upper()
    host, port = _host_port(m.group(2))
    params = _params(m.group(3) or "")
    return Via(protocol, host, port, params)


def _host_port(text: str) -> tuple[str, int | None]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("bad IPv6 reference")
        host, rest = text[:end + 1], text[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError("bad host:port")
        port_text = rest[1:] if rest else None
    else:
        host, _, port_text = text.partition(":")
        port_text = port_text if ":" in text else None
    if not host or not _HOST.match(host):
        raise ValueError("bad host")
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError("bad port")
        port = int(port_text)
    return host.lower(), port


@dataclass(frozen=True)
class NameAddr:
    """``"Display" <uri>;params`` or ``uri;params`` (From, To, Contact, Path)."""

    display: str | None
    uri: str
    params: dict
    star: bool = False

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    def render(self, **extra) -> str:
        params = dict(self.params)
        params.update(extra)
        text = f"<{self.uri}>"
        if self.display:
            text = f"{self.display} {text}"
        for k, v in params.items():
            text += f";{k}" if v is None else f";{k}={v}"
        return text


def parse_name_addr(value: str) -> NameAddr:
    text = value.strip()
    if text == "*":
        return NameAddr(None, "*", {}, star=True)
    display = None
    lt = _find_unquoted(text, "<")
    if lt >= 0:
        display = text[:lt].strip() or None
        gt = text.find(">", lt)
        if gt < 0:
            raise ValueError("missing '>'")
        uri = text[lt + 1:gt].strip()
        params = _params(text[gt + 1:]) if text[gt + 1:].strip() else {}
        if text[gt + 1:].strip() and not text[gt + 1:].strip().startswith(";"):
            raise ValueError("junk after '>'")
    else:
        # addr-spec form: parameters after the URI belong to the header (§20.10)
        uri, _, rest = text.partition(";")
        uri = uri.strip()
        params = _params(rest) if rest else {}
    if ":" not in uri or " " in uri or not uri.split(":", 1)[0].isalpha():
        raise ValueError("bad URI")
    return NameAddr(display, uri, params)


def _find_unquoted(text: str, ch: str) -> int:
    if '"' not in text:
        return text.find(ch)
    quoted, escape = False, False
    for i, c in enumerate(text):
        if escape:
            escape = False
        elif quoted and c == "\\":
            escape = True
        elif c == '"':
            quoted = not quoted
        elif c == ch and not quoted:
            return i
    return -1


def canonical_aor(uri: str) -> str:
    """An address of record from a URI (RFC 3261 §10.3 step 5): scheme, unescaped
    user and lower-case host (with port if given); parameters and headers dropped.
    Raises ValueError for non-SIP URIs."""
    scheme, sep, rest = uri.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in ("sip", "sips"):
        raise ValueError(f"unsupported URI scheme {scheme!r}")
    rest = rest.split("?", 1)[0].split(";", 1)[0]
    user, at, hostport = rest.rpartition("@")
    if not hostport:
        raise ValueError("URI without host")
    host, port = _host_port(hostport)
    user = unquote(user.split(":", 1)[0]) if at else ""
    where = f"{host}:{port}" if port is not None else host
    return f"{scheme}:{user}@{where}" if user else f"{scheme}:{where}"


# ---------------------------------------------------------------------------
# messages
# ---------------------------------------------------------------------------
@dataclass
class Message:
    method: str | None = None          # requests
    uri: str | None = None
    code: int | None = None            # responses
    reason: str = ""
    headers: list = field(default_factory=list)     # [(canonical name, value)]
    body: bytes = b""

    @property
    def is_request(self) -> bool:
        return self.method is not None

    def _by_name(self) -> dict:
        index = self.__dict__.get("_index")
        if index is None or index[0] is not self.headers or index[1] != len(self.headers):
            table: dict[str, list[str]] = {}
            for n, v in self.headers:
                table.setdefault(n, []).append(v)
            index = (self.headers, len(self.headers), table)
            self.__dict__["_index"] = index
        return index[2]

    def get(self, name: str, default=None):
        values = self._by_name().get(canonical_name(name))
        return values[0] if values else default

    def get_all(self, name: str) -> list[str]:
        return list(self._by_name().get(canonical_name(name), ()))

    def add(self, name: str, value: str) -> None:
        self.headers.append((canonical_name(name), value))

    def set(self, name: str, value: str) -> None:
        name = canonical_name(name)
        self.headers = [(n, v) for n, v in self.headers if n != name]
        self.headers.append((name, value))

    def remove(self, name: str) -> None:
        name = canonical_name(name)
        self.headers = [(n, v) for n, v in self.headers if n != name]

    # -- parsed views ---------------------------------------------------
    @property
    def vias(self) -> list[Via]:
        raw = self.get_all("Via")
        cached = self.__dict__.get("_vias")
        if cached is None or cached[0] != raw:
            cached = (raw, [parse_via(v) for v in raw])
            self.__dict__["_vias"] = cached
        return cached[1]

    def _name_addr(self, name: str) -> NameAddr:
        """``name``'s (From, To) value parsed, cached while the value stays the same."""
        values = self._by_name().get(name)
        raw = values[0] if values else ""
        slot = "_na_" + name
        cached = self.__dict__.get(slot)
        if cached is None or cached[0] != raw:
            cached = (raw, parse_name_addr(raw))
            self.__dict__[slot] = cached
        return cached[1]

    @property
    def from_addr(self) -> NameAddr:
        return self._name_addr("From")

    @property
    def to_addr(self) -> NameAddr:
        return self._name_addr("To")

    @property
    def top_via(self) -> Via:
        vias = self.vias
        if not vias:
            raise IndexError("no Via")
        return vias[0]

    @property
    def call_id(self) -> str:
        return self.get("Call-ID", "")

    @property
    def cseq(self) -> tuple[int, str]:
        number, method = self.get("CSeq", "").split()
        return int(number), method.upper()

    def to_bytes(self) -> bytes:
        if self.is_request:
            lines = [f"{self.method} {self.uri} SIP/2.0"]
        else:
            lines = [f"SIP/2.0 {self.code} {self.reason}"]
        for name, value in self.headers:
            if name != "Content-Length":
                lines.append(f"{name}: {value}")
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + self.body


def response_for(request: Message, code: int, reason: str | None = None, *,
                 to_tag: str | None = None) -> Message:
    """A response copying Via, From, To (adding ``to_tag`` if it has none),
    Call-ID and CSeq from ``request`` (RFC 3261 §8.2.6.2)."""
    resp = Message(code=code, reason=reason or REASONS.get(code, "Unknown"))
    vias = request.__dict__.get("_vias")
    if vias is not None:
        resp.__dict__["_vias"] = vias     # the same Via values: their parsed form too
    for name, value in request.headers:
        if name in ("Via", "From", "Call-ID", "CSeq"):
            resp.headers.append((name, value))
        elif name == "To":
            if to_tag and code > 100 and ";tag=" not in value.replace(" ", "").lower():
                value = f"{value};tag={to_tag}"
            resp.headers.append((name, value))
    return resp


def _decode(head: bytes) -> str:
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed("not UTF-8") from None


def split_head(data: bytes) -> tuple[bytes, bytes] | None:
    """(head, rest) at the first blank line, or None if there is none yet."""
    i = data.find(b"\r\n\r\n")
    j = data.find(b"\n\n")
    if i < 0 and j < 0:
        return None
    if i >= 0 and (j < 0 or i <= j):
        return data[:i], data[i + 4:]
    return data[:j], data[j + 2:]


def parse(data: bytes, *, stream: bool = False) -> Message:
    """Parse one message.  ``stream``: the bytes were framed by Content-Length
    already (TCP); on a datagram a body longer than Content-Length is cut."""
    try:
        return _parse(data, stream)
    except Malformed:
        raise
    except Exception:       # a parser bug must not take the server down
        raise Malformed("unparseable") from None


def _parse(data: bytes, stream: bool) -> Message:
    if len(data) > MAX_MESSAGE_BYTES:
        raise Malformed("message too large")
    data = data.lstrip(b"\r\n")
    if not data:
        raise Malformed("empty")
    parts = split_head(data)
    if parts is None:
        head, body = data, b""
        if not data.endswith(b"\n"):
            raise Malformed("no end of headers")
    else:
        head, body = parts
    text = _decode(head)
    raw_lines = _LINE_END.split(text)
    start = raw_lines[0]
    msg = Message()
    bits = start.split(" ", 2)
    if len(bits) == 3 and bits[0] == "SIP/2.0":
        if not _CODE.match(bits[1]):
            raise Malformed("bad status code")
        msg.code = int(bits[1])
        msg.reason = bits[2]
    elif len(bits) == 3 and bits[2] == "SIP/2.0":
        if not _TOKEN.match(bits[0]):
            raise Malformed("bad method")
        uri = bits[1]
        if ":" not in uri or " " in uri or (not uri.isprintable()
                                            and any(c.isspace() for c in uri)):
            raise Malformed("bad Request-URI")
        msg.method, msg.uri = bits[0].upper(), bits[1]
    elif len(bits) == 3 and (bits[2].startswith("SIP/") or bits[0].startswith("SIP/")):
        raise Malformed("unsupported SIP version")
    else:
        raise Malformed("bad start line")
    # unfold, then split into headers
    lines: list[str] = []
    if "\n " not in text and "\n\t" not in text:
        lines = [line for line in raw_lines[1:] if line]       # nothing folded
    else:
        for line in raw_lines[1:]:
            if line[:1] in (" ", "\t"):
                if not lines:
                    raise Malformed("continuation line before any header")
                lines[-1] = lines[-1].rstrip() + " " + line.strip()
            elif line:
                lines.append(line)
    problem = None
    for line in lines:
        name, colon, value = line.partition(":")
        name = name.strip()
        known = _FAST_NAMES.get(name) if colon else None
        if known is not None:
            name = known                  # a usual spelling: valid, canonical already known
        elif not colon or not _HEADER_NAME.match(name):
            problem = problem or "bad header line"
            continue
        else:
            name = canonical_name(name)
        value = value.strip()
        if name in LIST_HEADERS:
            for item in split_list(value):
                msg.headers.append((name, item))
        else:
            msg.headers.append((name, value))
    # Content-Length and body
    cl = msg.get_all("Content-Length")
    if cl:
        if len(cl) > 1 and len(set(cl)) > 1:
            problem = problem or "conflicting Content-Length"
        elif not cl[0].isdigit():
            problem = problem or "bad Content-Length"
        else:
            length = int(cl[0])
            if length > len(body):
                problem = problem or "body shorter than Content-Length"
            else:
                body = body[:length]
    elif stream:
        problem = problem or "missing Content-Length"
    msg.body = body
    if msg.is_request:
        problem = problem or _check_request(msg)
    elif problem is None:
        problem = _check_response(msg)
    if problem is not None:
        can_answer = msg.is_request and _respondable(msg)
        raise Malformed(problem, msg if can_answer else None)
    return msg


def _respondable(msg: Message) -> bool:
    try:
        if any(len(msg.get_all(h)) == 0 for h in RESPONSE_HEADERS):
            return False
        msg.top_via
        return True
    except Exception:
        return False


def _check_request(msg: Message) -> str | None:
    table = msg._by_name()           # one lookup per header, not one get_all each
    for h in RESPONSE_HEADERS:
        if not table.get(h):
            return f"missing {h}"
    for h in ("From", "To", "Call-ID", "CSeq"):
        if len(table[h]) > 1:
            return f"more than one {h}"
    try:
        msg.vias
    except ValueError:
        return "bad Via"
    try:
        number, method = msg.cseq
    except ValueError:
        return "bad CSeq"
    if not 0 <= number < 2 ** 31:
        return "bad CSeq"
    if method != msg.method:
        return "CSeq method does not match the request"
    try:
        msg.from_addr
        msg.to_addr
    except ValueError:
        return "bad From or To"
    mf = table.get("Max-Forwards")
    if mf is not None and not mf[0].isdigit():
        return "bad Max-Forwards"
    if not table["Call-ID"][0]:
        return "empty Call-ID"
    return None


def _check_response(msg: Message) -> str | None:
    try:
        msg.top_via
        msg.cseq
    except (ValueError, IndexError):
        return "bad response"
    return None
