"""Lease families: what the failover core needs to know of an address kind.

A :class:`Family` names the store's key namespace (``dhcp4``, ``dhcp6:na``,
``dhcp6:pd``), the peer-link channel its partner updates travel on, and
converts the addresses of its kind between their canonical text (the store
keys, the wire) and ints (the free sets, the mirror, ordering).

* ``DHCP4``: dotted quads, 32-bit ints (``socket.inet_aton``: the hot path).
* ``DHCP6_NA``: IPv6 addresses, 128-bit ints, canonical text as
  ``ipaddress`` prints it (``2001:db8::5``).
* ``DHCP6_PD``: delegated prefixes ``2001:db8:1:100::/56``.  The int of a
  prefix of length ``L`` is ``L << 128 | network >> (128 - L)``: the
  prefixes of one length are consecutive ints (a pool of /56s out of a /48
  is 256 consecutive ints), and prefixes of different lengths never share
  an int.  :func:`prefix_int` / :func:`prefix_text` convert.

Client keys: the core keeps v4's two client fields.  DHCPv6 puts the DUID in
``hwaddr`` (colon hex: reservations by DUID match it) and DUID + IAID in
``client_id`` (:func:`v6_client`), so a client's identity is ``id:<duid
hex><iaid as 8 hex digits>`` -- one lease per IA, as RFC 8415 binds.
"""

from __future__ import annotations

import functools
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from typing import Any, Callable

__all__ = ["Family", "DHCP4", "DHCP6_NA", "DHCP6_PD", "family_for", "prefix_int",
           "prefix_text", "v6_client", "MAX_POOL_V6"]

#: the largest v6 pool (addresses or prefixes) a free set may cover: a free
#: set is a byte per address, so larger pools are refused by the config
MAX_POOL_V6 = 1 << 20


@dataclass(frozen=True)
class Family:
    """One lease family.  ``name`` prefixes every store key (``<name>:lease:<addr>``)."""

    name: str
    channel: str
    what: str                                   # "IPv4 address", for messages
    aton: Callable[[str], int]                  # canonical text -> int (fast, no checks)
    ntoa: Callable[[int], str]                  # int -> canonical text
    canonical: Callable[[Any], str]             # any accepted form -> canonical text, ValueError
    max_pool: int | None = None                 # largest pool a free set may cover
    #: DHCPv4: a client holds one active lease per subnet, so a partner's newer
    #: binding of the client ends the older one.  DHCPv6: both partners may answer
    #: one multicast rapid-commit SOLICIT and neither can know which REPLY the
    #: client took, so both bindings run to their own expiry (RFC 8415 18.3.1:
    #: the unused one is simply not renewed)
    one_lease_per_client: bool = True

    # store keys
    @property
    def lease_prefix(self) -> str:
        return self.name + ":lease:"

    @property
    def version_prefix(self) -> str:
        return self.name + ":lease-ver:"

    @property
    def client_prefix(self) -> str:
        return self.name + ":client:"

    @property
    def expiry_key(self) -> str:
        return self.name + ":expiry"

    @property
    def held_key(self) -> str:
        return self.name + ":held"

    #: the ipaddress type whose objects are this family's addresses (int() of one is ours)
    addr_type: type | None = None

    def as_int(self, value: Any) -> int:
        """An int of this family from an int, an address object or any text
        :attr:`canonical` accepts (ValueError otherwise)."""
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            return self.aton(self.canonical(value))
        if self.addr_type is not None and isinstance(value, self.addr_type):
            return int(value)                   # (the hot path: dhcp4's bind)
        if isinstance(value, (IPv4Address, IPv6Address, IPv6Network)):
            return self.aton(self.canonical(value))
        raise ValueError(f"{value!r} is not an {self.what}")

    def checked(self, value: Any) -> str:
        """``value`` as canonical text, ValueError if it is not one of ours."""
        try:
            return self.canonical(value)
        except (TypeError, OSError):
            raise ValueError(f"{value!r} is not an {self.what}") from None

    def subnet_range(self, subnet) -> tuple[int, int]:
        """The ints ``lo..hi`` a configured subnet covers (``subnet.network``;
        for prefixes also ``subnet.delegated_len``)."""
        net = subnet.network
        return int(net.network_address), int(net.broadcast_address)

    def in_subnet(self, subnet, a: int) -> bool:
        lo, hi = self.subnet_range(subnet)
        return lo <= a <= hi


# --- IPv4 -------------------------------------------------------------------

def _aton4(address: str) -> int:
    return int.from_bytes(socket.inet_aton(address), "big")


def _ntoa4(address: int) -> str:
    return socket.inet_ntoa(address.to_bytes(4, "big"))


def _canonical4(address) -> str:
    """A canonical dotted quad as it is, anything else through ipaddress."""
    if isinstance(address, str):
        try:
            if _ntoa4(_aton4(address)) == address:
                return address
        except OSError:
            pass
    if isinstance(address, int) and not isinstance(address, bool):
        return _ntoa4(address)
    return str(IPv4Address(address))


class _Family4(Family):
    def subnet_range(self, subnet) -> tuple[int, int]:
        net = subnet.network
        return net.network_address._ip, net.broadcast_address._ip


DHCP4 = _Family4("dhcp4", "dhcp4", "IPv4 address", _aton4, _ntoa4, _canonical4,
                 addr_type=IPv4Address)


# --- IPv6 addresses ---------------------------------------------------------

# v6 texts go through ipaddress (RFC 5952 canonical form), which is slow: the same
# few thousand addresses and prefixes come back all the time, so the conversions are cached
_cached = functools.lru_cache(maxsize=1 << 16)


@_cached
def _aton6(address: str) -> int:
    return int.from_bytes(socket.inet_pton(socket.AF_INET6, address), "big")


#: below this the top 80 bits are zero: the IPv4-mapped / -compatible forms, where
#: inet_ntop's dotted quad and ipaddress's text differ -- those go through ipaddress
_V4_FORMS = 1 << 48
_MASK128 = (1 << 128) - 1


@_cached
def _ntoa6(address: int) -> str:
    # inet_ntop prints RFC 5952 text as ipaddress does (the longest run of two or more
    # zero groups compressed, the first of equal runs, lower case), at a tenth of the cost
    if _V4_FORMS <= address <= _MASK128:
        return socket.inet_ntop(socket.AF_INET6, address.to_bytes(16, "big"))
    return str(IPv6Address(address))


def _pton6(text: str) -> int:
    """An IPv6 text as an int; ValueError if it is not one."""
    try:
        return int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
    except (OSError, TypeError):
        raise ValueError(f"{text!r} is not an IPv6 address") from None


def _canonical6(address) -> str:
    if isinstance(address, str):
        return _canonical6_text(address)
    if isinstance(address, int) and not isinstance(address, bool):
        return _ntoa6(address)
    if isinstance(address, str) and "/" in address:
        raise ValueError(f"{address!r} is not an IPv6 address")
    return str(IPv6Address(address))


@_cached
def _canonical6_text(address: str) -> str:
    if "/" in address:
        raise ValueError(f"{address!r} is not an IPv6 address")
    return _ntoa6(_pton6(address))


DHCP6_NA = Family("dhcp6:na", "dhcp6", "IPv6 address", _aton6, _ntoa6, _canonical6,
                  max_pool=MAX_POOL_V6, one_lease_per_client=False, addr_type=IPv6Address)


# --- IPv6 delegated prefixes ------------------------------------------------

def prefix_int(network: IPv6Network | str) -> int:
    """``L << 128 | network >> (128 - L)`` for a prefix of length ``L``."""
    net = network if isinstance(network, IPv6Network) else IPv6Network(network)
    plen = net.prefixlen
    return (plen << 128) | (int(net.network_address) >> (128 - plen))


@_cached
def prefix_text(value: int) -> str:
    plen = value >> 128
    if not 1 <= plen <= 128:
        raise ValueError(f"{value!r} is not a prefix int")
    net = (value & _MASK128) << (128 - plen)
    return f"{_ntoa6(net)}/{plen}"


def _parse_prefix(value: str) -> tuple[int, int]:
    """``net/len`` text as (network int, length), strict as IPv6Network: host bits set
    is an error (ValueError), without ipaddress's cost."""
    net, slash, plen_text = value.partition("/")
    if not slash or not plen_text.isdigit() or not plen_text.isascii():
        raise ValueError(f"{value!r} is not an IPv6 prefix")
    plen = int(plen_text)
    if plen > 128:
        raise ValueError(f"{value!r} is not an IPv6 prefix")
    a = _pton6(net)
    if a & (_MASK128 >> plen):
        raise ValueError(f"{value!r} has host bits set")
    return a, plen


def _canonical_pd(value) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return prefix_text(value)
    if isinstance(value, IPv6Network):
        return str(value)
    if isinstance(value, str) and "/" in value:
        return _canonical_pd_text(value)
    raise ValueError(f"{value!r} is not an IPv6 prefix")


@_cached
def _canonical_pd_text(value: str) -> str:
    a, plen = _parse_prefix(value)              # strict: host bits set is an error
    return f"{_ntoa6(a)}/{plen}"


@_cached
def _aton_pd(text: str) -> int:
    a, plen = _parse_prefix(text)
    return (plen << 128) | (a >> (128 - plen))


class _FamilyPD(Family):
    def in_subnet(self, subnet, a: int) -> bool:
        """A prefix belongs to a scope when one of its pools (or reservations)
        holds it: a scope may have pools of several delegated lengths."""
        for p in subnet.pools:
            if self.as_int(p.first) <= a <= self.as_int(p.last):
                return True
        return any(self.as_int(r.address) == a for r in getattr(subnet, "reservations", ()))

    def subnet_range(self, subnet) -> tuple[int, int]:
        """A prefix pool's parent network cut in prefixes of ``delegated_len``."""
        net, plen = subnet.network, subnet.delegated_len
        shift = 128 - plen
        tag = plen << 128
        return (tag | (int(net.network_address) >> shift),
                tag | (int(net.broadcast_address) >> shift))


DHCP6_PD = _FamilyPD("dhcp6:pd", "dhcp6", "IPv6 prefix", _aton_pd, prefix_text, _canonical_pd,
                     max_pool=MAX_POOL_V6, one_lease_per_client=False)


def family_for(name: str) -> Family:
    return {"dhcp4": DHCP4, "dhcp6:na": DHCP6_NA, "dhcp6:pd": DHCP6_PD}[name]


def v6_client(duid: bytes, iaid: int) -> tuple[str, str]:
    """The lease's ``(hwaddr, client_id)`` for a DHCPv6 IA: the DUID in colon
    hex (reservations by DUID match it) and DUID + IAID in hex (the key)."""
    return duid.hex(":"), duid.hex() + (iaid & 0xFFFFFFFF).to_bytes(4, "big").hex()
