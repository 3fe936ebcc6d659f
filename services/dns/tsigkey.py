"""Read TSIG keys from a file in BIND's key format (what ``tsig-keygen`` prints)::

    key "appliance-key" {
        algorithm hmac-sha256;
        secret "base64...";
    };

Pure: takes text, returns :class:`TSIGKey` objects or raises :class:`KeyFileError`.
Comments (``#``, ``//``, ``/* */``) are allowed; a file may hold several keys.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from functools import cached_property

import dns.name
import dns.tsig

#: Algorithms accepted in key files (RFC 8945 section 6).
ALGORITHMS = {
    "hmac-sha256": dns.tsig.HMAC_SHA256,
    "hmac-sha384": dns.tsig.HMAC_SHA384,
    "hmac-sha512": dns.tsig.HMAC_SHA512,
    "hmac-sha224": dns.tsig.HMAC_SHA224,
    "hmac-sha1": dns.tsig.HMAC_SHA1,
    "hmac-md5": dns.tsig.HMAC_MD5,
}


class KeyFileError(ValueError):
    """The key file cannot be used; the message says why."""


@dataclass(frozen=True)
class TSIGKey:
    name: str                # as written in the file, e.g. "appliance-key"
    algorithm: str           # e.g. "hmac-sha256"
    secret: str = field(repr=False)      # base64 as in the file; never in logs (review L4)

    def dns_key(self) -> dns.tsig.Key:
        """The dnspython key, built once (review: it was rebuilt for every message)."""
        return self._key

    @cached_property
    def _key(self) -> dns.tsig.Key:
        return dns.tsig.Key(dns.name.from_text(self.name), self.secret, ALGORITHMS[self.algorithm])

    @cached_property
    def keyname(self) -> dns.name.Name:
        return dns.name.from_text(self.name)


_COMMENT = re.compile(r'"[^"]*"|/\*.*?\*/|//[^\n]*|#[^\n]*', re.S)   # strings kept intact
_KEY = re.compile(r'key\s+"?([A-Za-z0-9._-]+)"?\s*\{(.*?)\}\s*;', re.S)
_STMT = re.compile(r'\s*([a-z-]+)\s+"?([^";]*)"?\s*;')


def parse_key_file(text: str) -> list[TSIGKey]:
    """Every key in ``text``; raises :class:`KeyFileError` when there is none or one is bad."""
    body = _COMMENT.sub(lambda m: m.group(0) if m.group(0).startswith('"') else " ", text)
    keys: list[TSIGKey] = []
    end = 0
    for m in _KEY.finditer(body):
        if body[end:m.start()].strip():
            raise KeyFileError(f"unexpected text {body[end:m.start()].strip()[:30]!r}")
        end = m.end()
        name, inner = m.group(1), m.group(2)
        fields: dict[str, str] = {}
        pos = 0
        for s in _STMT.finditer(inner):
            if inner[pos:s.start()].strip():
                break
            fields[s.group(1)] = s.group(2).strip()
            pos = s.end()
        if inner[pos:].strip():
            raise KeyFileError(f'key "{name}": cannot read {inner[pos:].strip()[:30]!r}')
        algorithm = fields.get("algorithm", "").lower()
        if not algorithm:
            raise KeyFileError(f'key "{name}": missing "algorithm"')
        if algorithm not in ALGORITHMS:
            raise KeyFileError(f'key "{name}": algorithm {algorithm!r} is not one of '
                               f'{", ".join(ALGORITHMS)}')
        secret = fields.get("secret")
        if not secret:
            raise KeyFileError(f'key "{name}": missing "secret"')
        try:
            raw = base64.b64decode(secret, validate=True)
        except (binascii.Error, ValueError):
            raise KeyFileError(f'key "{name}": secret is not base64') from None
        if len(raw) < 10:
            raise KeyFileError(f'key "{name}": secret is shorter than 10 bytes')
        unknown = set(fields) - {"algorithm", "secret"}
        if unknown:
            raise KeyFileError(f'key "{name}": unknown statement {sorted(unknown)[0]!r}')
        keys.append(TSIGKey(name, algorithm, secret))
    if body[end:].strip():
        raise KeyFileError(f"unexpected text {body[end:].strip()[:30]!r}")
    if not keys:
        raise KeyFileError('no key "NAME" { algorithm ...; secret "..."; }; found')
    return keys


def select_key(keys: list[TSIGKey], name: str | None) -> TSIGKey:
    """The key called ``name`` or, without a name, the only key."""
    if name is None:
        if len(keys) > 1:
            raise KeyFileError(f"holds {len(keys)} keys ({', '.join(k.name for k in keys)}); "
                               "set tsig_key_name")
        return keys[0]
    for key in keys:
        if key.name.rstrip(".") == name.rstrip("."):
            return key
    raise KeyFileError(f"has no key {name!r} (found: {', '.join(k.name for k in keys)})")
