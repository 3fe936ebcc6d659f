"""Digest authentication for the registrar (RFC 3261 §22, RFC 8760, RFC 7616).

Algorithms ``MD5``, ``SHA-256`` and ``SHA-512-256`` (RFC 8760), ``qop=auth``
only (a response without qop is refused with a new challenge).  The 401
carries one ``WWW-Authenticate`` per configured algorithm, in the configured
order (RFC 8760 §2.4: preferred first).

Nonces are stateless: ``base64(issued_at | counter | HMAC(secret, both)[:16])``
with a secret made at start, so any nonce this process did not issue, or one
older than ``nonce_ttl_s``, is refused with ``stale=true`` (the UA retries with
the new nonce without asking its user; a node restart costs one extra round
trip per UA, nothing more).  Replay protection: per nonce, the highest
nonce-count seen; a count not above it is refused (``stale=true``).  The
table of counts holds only live nonces (swept with the nonce lifetime).

Credentials come from LDAP (:mod:`services.sip.ldap_credentials`, lookups
return Deferreds) or from an HA1 file (:class:`HA1File`): lines
``user:realm:HA1`` (htdigest, MD5) or ``user:realm:ALGORITHM:HA1``; ``#``
starts a comment.  An HA1 is ``H(user:realm:password)`` with the algorithm's
hash, so the file holds no password.

Outcomes (``Verdict.result``), also the ``appliance_sip_auth`` counter labels:
``ok``, ``challenged`` (no credentials), ``stale`` (expired or foreign nonce),
``replay`` (nonce-count not increasing), ``wrong_password``, ``unknown_user``,
``user_mismatch`` (authenticated as someone else than the To user; 403),
``malformed`` (400).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred

ALGORITHMS = {
    "MD5": lambda b: hashlib.md5(b).hexdigest(),
    "SHA-256": lambda b: hashlib.sha256(b).hexdigest(),
    "SHA-512-256": lambda b: hashlib.new("sha512_256", b).hexdigest(),
}


def ha1(algorithm: str, user: str, realm: str, password: str) -> str:
    """``H(user:realm:password)`` in hex for ``algorithm``."""
    return ALGORITHMS[algorithm](f"{user}:{realm}:{password}".encode())


class HA1FileError(ValueError):
    pass


class HA1File:
    """``(user, realm, algorithm) -> HA1`` read from a file of lines
    ``user:realm:HA1`` (MD5) or ``user:realm:ALGORITHM:HA1``."""

    def __init__(self, entries: dict[tuple[str, str, str], str]):
        self.entries = entries

    @classmethod
    def parse(cls, text: str, name: str = "<ha1 file>") -> "HA1File":
        entries = {}
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split(":")
            if len(parts) == 3:
                user, realm, value = parts
                algorithm = "MD5"
            elif len(parts) == 4:
                user, realm, algorithm, value = parts
                algorithm = algorithm.upper()
            else:
                raise HA1FileError(f"{name}:{n}: expected user:realm:HA1 or "
                                   "user:realm:ALGORITHM:HA1")
            if algorithm not in ALGORITHMS:
                raise HA1FileError(f"{name}:{n}: unknown algorithm {algorithm!r} "
                                   f"(known: {', '.join(ALGORITHMS)})")
            want = len(ALGORITHMS[algorithm](b""))
            value = value.strip().lower()
            if len(value) != want or any(c not in "0123456789abcdef" for c in value):
                raise HA1FileError(f"{name}:{n}: the {algorithm} HA1 must be {want} hex digits")
            entries[(user.strip(), realm.strip(), algorithm)] = value
        return cls(entries)

    def lookup(self, user: str, realm: str, algorithm: str) -> str | None:
        return self.entries.get((user, realm, algorithm))


def parse_auth_params(value: str) -> tuple[str, dict[str, str]]:
    """``Digest a="x", b=y`` -> ("digest", {"a": "x", "b": "y"}); raises ValueError."""
    scheme, _, rest = value.strip().partition(" ")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t,":
            i += 1
        if i >= n:
            break
        eq = rest.find("=", i)
        if eq < 0:
            raise ValueError("parameter without '='")
        name = rest[i:eq].strip().lower()
        i = eq + 1
        while i < n and rest[i] in " \t":
            i += 1
        if i < n and rest[i] == '"':
            i += 1
            out = []
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    i += 1
                out.append(rest[i])
                i += 1
            if i >= n:
                raise ValueError("unterminated quoted string")
            i += 1
            val = "".join(out)
        else:
            end = rest.find(",", i)
            end = n if end < 0 else end
            val = rest[i:end].strip()
            i = end
        if not name:
            raise ValueError("empty parameter name")
        params[name] = val
    return scheme.lower(), params


@dataclass
class Verdict:
    result: str
    code: int = 0                 # 0: authenticated; else the response code
    headers: list = field(default_factory=list)
    user: str | None = None


class DigestAuth:
    """Challenges and checks ``Authorization`` headers for one realm."""

    def __init__(self, realm: str, credentials, *, algorithms=("SHA-256", "MD5"),
                 nonce_ttl_s: float = 300.0, now=None, secret: bytes | None = None):
        self.realm = realm
        self.credentials = credentials
        self.algorithms = tuple(algorithms)
        self.nonce_ttl_s = nonce_ttl_s
        self.now = now
        self.secret = secret or os.urandom(32)
        self._counter = 0
        self.counts: dict[str, tuple[float, int]] = {}     # nonce -> (issued, highest nc)
        self.results: dict[str, int] = {}

    # -- nonces -----------------------------------------------------------
    def make_nonce(self) -> str:
        self._counter = (self._counter + 1) & 0xFFFFFFFF
        body = struct.pack("!dI", self.now(), self._counter)
        mac = hmac.new(self.secret, body, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(body + mac).decode().rstrip("=")

    def nonce_issued(self, nonce: str) -> float | None:
        """When this process issued ``nonce``, or None if it did not."""
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except (ValueError, TypeError):
            return None
        if len(raw) != 28:
            return None
        body, mac = raw[:12], raw[12:]
        if not hmac.compare_digest(mac, hmac.new(self.secret, body, hashlib.sha256).digest()[:16]):
            return None
        return struct.unpack("!dI", body)[0]

    def sweep(self) -> None:
        limit = self.now() - self.nonce_ttl_s
        for nonce in [n for n, (issued, _) in self.counts.items() if issued < limit]:
            del self.counts[nonce]

    # -- challenge and check -------------------------------------------------
    def challenge(self, result: str, stale: bool = False) -> Verdict:
        nonce = self.make_nonce()
        headers = []
        for algorithm in self.algorithms:
            value = (f'Digest realm="{self.realm}", nonce="{nonce}", algorithm={algorithm}, '
                     f'qop="auth"')
            if stale:
                value += ", stale=true"
            headers.append(("WWW-Authenticate", value))
        return self._count(Verdict(result, 401, headers))

    def _count(self, verdict: Verdict) -> Verdict:
        self.results[verdict.result] = self.results.get(verdict.result, 0) + 1
        return verdict

    def check(self, method: str, authorizations: list[str], expected_user: str | None):
        """Authenticate a request with these ``Authorization`` values;
        ``expected_user``: the user part the credentials must name (None: any).
        A :class:`Verdict`, or a Deferred firing with one when the credentials
        come from a directory (failing with its error when it cannot answer)."""
        mine = []
        for value in authorizations:
            try:
                scheme, params = parse_auth_params(value)
            except ValueError:
                return self._count(Verdict("malformed", 400, [], None))
            if scheme == "digest" and params.get("realm") == self.realm:
                mine.append(params)
        if not mine:
            return self.challenge("challenged")
        p = mine[0]
        algorithm = (p.get("algorithm") or "MD5").upper()
        needed = ("username", "nonce", "uri", "response")
        if any(k not in p for k in needed) or algorithm not in self.algorithms:
            return self._count(Verdict("malformed", 400, [], None))
        if p.get("qop", "").lower() != "auth" or "nc" not in p or "cnonce" not in p:
            return self.challenge("challenged")
        try:
            nc = int(p["nc"], 16)
        except ValueError:
            return self._count(Verdict("malformed", 400, [], None))
        nonce = p["nonce"]
        issued = self.nonce_issued(nonce)
        now = self.now()
        if issued is None or now - issued > self.nonce_ttl_s or issued > now + 1:
            return self.challenge("stale", stale=True)
        user = p["username"]
        if expected_user is not None and user != expected_user:
            return self._count(Verdict("user_mismatch", 403, [], user))
        secret = self.credentials.lookup(user, self.realm, algorithm)
        if isinstance(secret, Deferred):       # a directory: the verdict comes later
            return secret.addCallback(self._verify, method, p, algorithm, nonce, nc, issued, user)
        return self._verify(secret, method, p, algorithm, nonce, nc, issued, user)

    def _verify(self, secret, method, p, algorithm, nonce, nc, issued, user) -> Verdict:
        if secret is None:
            return self.challenge("unknown_user")
        h = ALGORITHMS[algorithm]
        ha2 = h(f"{method}:{p['uri']}".encode())
        want = h(f"{secret}:{nonce}:{p['nc']}:{p['cnonce']}:auth:{ha2}".encode())
        if not hmac.compare_digest(want, p["response"].lower()):
            return self.challenge("wrong_password")
        _issued, seen = self.counts.get(nonce, (issued, 0))
        if nc <= seen:
            return self.challenge("replay", stale=True)
        self.counts[nonce] = (issued, nc)
        return self._count(Verdict("ok", 0, [], user))
