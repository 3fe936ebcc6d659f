"""The DHCPv6 handler's view of leases: :class:`Lease6` and the :class:`Allocator` interface.

The handler (``handler.py``) is written against :class:`Allocator`:
``find`` / ``offer`` / ``bind`` / ``release`` / ``decline`` per IA (an
IA_NA address or an IA_PD prefix: ``kind`` ``"na"`` / ``"pd"``), ``writes``
and ``durable`` for the REPLY-after-durable rule, ``reclaim`` for what is
due.  The one implementation is ``failover.py``'s ``CoreAllocator``: the
DHCP failover core's lease stores (services/dhcp/failover/), one per lease
type (store keys ``dhcp6:na:*`` and ``dhcp6:pd:*``), for a single server
(no ``failover``) as for a pair -- v4 and v6 share one lease engine.

Addresses are canonical text (``2001:db8::5``), prefixes ``net/len``
(``2001:db8:100::/56``, host bits clear); :func:`parse_key` /
:func:`key_text` convert with ``socket.inet_pton`` (no ``ipaddress`` on the
hot path).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import defer

from services.dhcp.v6.config import Subnet

NA, PD = "na", "pd"
KINDS = (NA, PD)
STATES = ("offered", "bound", "declined", "released", "expired")


class Unavailable(Exception):
    """The address/prefix is held by another client (or outside every pool)."""


@dataclass
class Lease6:
    kind: str                 # "na" | "pd"
    address: str              # "2001:db8::5" or "2001:db8:100::/56"
    subnet_id: int
    duid: str = ""            # hex
    iaid: int = 0
    state: str = "offered"
    expires: float = 0.0      # end of the valid lifetime (or hold / quarantine)
    preferred_until: float = 0.0
    cltt: float = 0.0
    owner: str = ""
    hostname: str = ""        # client FQDN (DDNS), if any
    ddns: str = ""            # what DDNS published, JSON text ("" none)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prefix" if self.kind == PD else "address": self.address,
                               "type": self.kind, "duid": self.duid, "iaid": self.iaid,
                               "state": self.state, "expires": self.expires, "cltt": self.cltt,
                               "owner": self.owner, "subnet": self.subnet_id}
        if self.hostname:
            out["hostname"] = self.hostname
        return out


class Allocator(Protocol):
    """What the handler needs from a lease store (one per node)."""

    writes: int

    def find(self, kind: str, subnet_id: int, duid: str, iaid: int) -> list[Lease6]: ...
    def get(self, kind: str, address: str) -> Lease6 | None: ...
    def offer(self, kind: str, subnet: Subnet, duid: str, iaid: int,
              hints: list[str] = ...) -> Lease6 | None: ...
    def bind(self, kind: str, subnet: Subnet, duid: str, iaid: int, address: str,
             preferred_s: int, valid_s: int, hostname: str = "") -> Lease6: ...
    def release(self, kind: str, address: str, duid: str | None = None,
                iaid: int | None = None) -> Lease6 | None: ...
    def decline(self, kind: str, address: str, duid: str, iaid: int) -> Lease6 | None: ...
    def durable(self) -> defer.Deferred: ...
    def reclaim(self, limit: int = ...) -> list[Lease6]: ...


_MASK128 = (1 << 128) - 1


def parse_key(kind: str, text: str) -> tuple[int, int | None]:
    """``(int, None)`` for an address (NA), ``(network int, length)`` for a prefix (PD);
    ValueError if not one (socket.inet_pton: the hot path avoids ``ipaddress``)."""
    try:
        if kind == NA:
            return int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big"), None
        net, _, plen_text = text.partition("/")
        plen = int(plen_text)
        if not 0 <= plen <= 128 or not plen_text.isdigit():
            raise ValueError(text)
        a = int.from_bytes(socket.inet_pton(socket.AF_INET6, net), "big")
        return a & (_MASK128 ^ ((1 << (128 - plen)) - 1)), plen
    except (OSError, TypeError, AttributeError):
        raise ValueError(f"{text!r} is not an IPv6 {'address' if kind == NA else 'prefix'}") \
            from None


def key_text(a: int, plen: int | None = None) -> str:
    text = socket.inet_ntop(socket.AF_INET6, a.to_bytes(16, "big"))
    return text if plen is None else f"{text}/{plen}"


def address_key(kind: str, text: str) -> str:
    """Canonical text of an address (NA) or prefix (PD, ``net/len``, host bits cleared)."""
    return key_text(*parse_key(kind, text))
