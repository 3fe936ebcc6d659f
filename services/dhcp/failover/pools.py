"""Who answers a client, and from which addresses: pure functions, no I/O
(the failover core's pool rules, the same for every lease family).

**Address split.**  Each pool ``first..last`` (ints of the family) is cut in
two contiguous segments: the primary owns the lowest ``split`` percent of
the addresses (rounded to the nearest address), the secondary the rest
(:func:`split_range`, :func:`segments`) -- RFC 8156's split pools, and the
v4 design's (``services/dhcp/v4/pools.py`` has the whole story).  The RFC
3074 client hash (:func:`hash_owner`) names who owns a client in
``load-balancing``: dhcp4 hashes the client id or chaddr, dhcp6 the DUID (as
Kea's HA load balancing does).  A server allocates new addresses
only from its own segment in NORMAL and COMMUNICATIONS-INTERRUPTED; from the
partner's only in a confirmed PARTNER-DOWN past the MCLT
(:func:`allocation_roles`).  :func:`answers` is who answers a client in
each state.  Without failover, :func:`segments` gives the whole pool to the
role ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from appliance.cluster.partner import (COMM_INTERRUPTED, NORMAL, PARTNER_DOWN, RECOVER,
                                       RECOVER_DONE, STARTUP)

PRIMARY = "primary"
SECONDARY = "secondary"
SERVING_STATES = (NORMAL, COMM_INTERRUPTED, PARTNER_DOWN)

__all__ = [
    "PRIMARY", "SECONDARY", "SERVING_STATES", "Segment",
    "STARTUP", "NORMAL", "COMM_INTERRUPTED", "PARTNER_DOWN", "RECOVER", "RECOVER_DONE",
    "answers", "split_range", "LOADB_MX_TBL", "rfc3074_hash", "primary_buckets",
    "bucket_owner", "hash_owner", "segments", "my_ranges",
    "may_allocate_from_partner", "allocation_roles", "lease_time_cap",
]


# ---------------------------------------------------------------------------
# RFC 3074 load balancing: who owns a client (dhcp4: client id or chaddr, dhcp6: DUID)
# ---------------------------------------------------------------------------

#: RFC 3074 section 6: "A 'mixing table' of 256 distinct values, in
#: pseudo-random order" (same table in ISC dhcpd failover.c and Kea
#: query_filter.cc).
LOADB_MX_TBL: tuple[int, ...] = (
    251, 175, 119, 215, 81, 14, 79, 191, 103, 49, 181, 143, 186, 157, 0,
    232, 31, 32, 55, 60, 152, 58, 17, 237, 174, 70, 160, 144, 220, 90, 57,
    223, 59, 3, 18, 140, 111, 166, 203, 196, 134, 243, 124, 95, 222, 179,
    197, 65, 180, 48, 36, 15, 107, 46, 233, 130, 165, 30, 123, 161, 209, 23,
    97, 16, 40, 91, 219, 61, 100, 10, 210, 109, 250, 127, 22, 138, 29, 108,
    244, 67, 207, 9, 178, 204, 74, 98, 126, 249, 167, 116, 34, 77, 193,
    200, 121, 5, 20, 113, 71, 35, 128, 13, 182, 94, 25, 226, 227, 199, 75,
    27, 41, 245, 230, 224, 43, 225, 177, 26, 155, 150, 212, 142, 218, 115,
    241, 73, 88, 105, 39, 114, 62, 255, 192, 201, 145, 214, 168, 158, 221,
    148, 154, 122, 12, 84, 82, 163, 44, 139, 228, 236, 205, 242, 217, 11,
    187, 146, 159, 64, 86, 239, 195, 42, 106, 198, 118, 112, 184, 172, 87,
    2, 173, 117, 176, 229, 247, 253, 137, 185, 99, 164, 102, 147, 45, 66,
    231, 52, 141, 211, 194, 206, 246, 238, 56, 110, 78, 248, 63, 240, 189,
    93, 92, 51, 53, 183, 19, 171, 72, 50, 33, 104, 101, 69, 8, 252, 83, 120,
    76, 135, 85, 54, 202, 125, 188, 213, 96, 235, 136, 208, 162, 129, 190,
    132, 156, 38, 47, 1, 7, 254, 24, 4, 216, 131, 89, 21, 28, 133, 37, 153,
    149, 80, 170, 68, 6, 169, 234, 151,
)


def rfc3074_hash(key: bytes) -> int:
    """RFC 3074 ``loadb_p_hash``: Pearson hash of ``key``, 0..255.

    ``hash = len; for i = len-1 .. 0: hash = T[hash ^ key[i]]`` (the length
    is taken modulo 256, as the C ``unsigned char`` does).
    """
    h = len(key) & 0xFF
    table = LOADB_MX_TBL
    for byte in reversed(key):
        h = table[h ^ byte]
    return h


def primary_buckets(split: int) -> int:
    """How many of the 256 buckets the primary owns for ``split`` percent."""
    if not 0 <= split <= 100:
        raise ValueError(f"split must be 0..100, not {split!r}")
    return (split * 256 + 50) // 100


def bucket_owner(bucket: int, split: int) -> str:
    """``primary`` for buckets below :func:`primary_buckets`, else ``secondary``."""
    return PRIMARY if bucket < primary_buckets(split) else SECONDARY


def hash_owner(client_key: bytes, split: int) -> str:
    return bucket_owner(rfc3074_hash(client_key), split)


def answers(mode: str | None, role: str | None, state: str, owner: str,
            secs: int = 0, delay_s: float = 0) -> bool:
    """Whether this server answers a DISCOVER/REQUEST of a client owned by ``owner``.

    ``mode is None`` means no failover: always True.  See the module
    docstring for the table.
    """
    if mode is None:
        return True
    if state in (PARTNER_DOWN, COMM_INTERRUPTED):
        return True
    if state != NORMAL:
        return False
    if owner == role:
        return True
    if mode == "hot-standby":
        return False
    return delay_s > 0 and secs >= delay_s


# ---------------------------------------------------------------------------
# address split
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Segment:
    """Addresses ``first..last`` (ints, inclusive) allocated by ``role``
    (``None``: no failover, anybody)."""

    first: int
    last: int
    role: str | None

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def __contains__(self, address: int) -> bool:
        return self.first <= address <= self.last


def split_range(first: int, last: int, split: int) -> tuple[tuple[int, int] | None,
                                                            tuple[int, int] | None]:
    """``(primary_range, secondary_range)`` of ``first..last`` (ints, inclusive).

    The primary gets the lowest ``round(size * split / 100)`` addresses; an
    empty share is ``None``.  The two never overlap and together cover the
    range exactly.
    """
    if first > last:
        raise ValueError("first > last")
    if not 0 <= split <= 100:
        raise ValueError(f"split must be 0..100, not {split!r}")
    size = last - first + 1
    n = (size * split + 50) // 100
    primary = (first, first + n - 1) if n > 0 else None
    secondary = (first + n, last) if n < size else None
    return primary, secondary


def segments(first: int, last: int, split: int | None) -> list[Segment]:
    """A pool cut in segments; ``split=None`` (no failover): one segment of role None."""
    if split is None:
        return [Segment(first, last, None)]
    p, s = split_range(first, last, split)
    out = []
    if p:
        out.append(Segment(p[0], p[1], PRIMARY))
    if s:
        out.append(Segment(s[0], s[1], SECONDARY))
    return out


def may_allocate_from_partner(state: str, since_partner_down_s: float | None,
                              mclt_s: float) -> bool:
    """True once PARTNER-DOWN has lasted the MCLT (the partner's unreported
    leases have then expired)."""
    return (state == PARTNER_DOWN and since_partner_down_s is not None
            and since_partner_down_s >= mclt_s)


def allocation_roles(role: str | None, state: str, since_partner_down_s: float | None = None,
                     mclt_s: float = 3600, *, failover: bool = True,
                     confirmed: bool = True) -> tuple[str, ...] | None:
    """The segment roles this server may take *new* addresses from.

    ``None`` means every segment (no failover).  An empty tuple means none
    (not a serving state).  Renewing an existing lease is not allocation
    and is not restricted by this.  ``confirmed``: the PARTNER-DOWN is known
    to be real (not just heartbeat silence, which a partition also gives).
    """
    if not failover or role is None:
        return None
    if state not in SERVING_STATES:
        return ()
    if confirmed and may_allocate_from_partner(state, since_partner_down_s, mclt_s):
        return (PRIMARY, SECONDARY)
    return (role,)


def my_ranges(first: int, last: int, split: int, role: str, state: str,
              since_partner_down_s: float | None = None,
              mclt_s: float = 3600) -> list[tuple[int, int]]:
    """The sub-ranges of pool ``first..last`` this node allocates from now."""
    roles = allocation_roles(role, state, since_partner_down_s, mclt_s)
    return [(seg.first, seg.last) for seg in segments(first, last, split)
            if roles is None or seg.role in roles]


def lease_time_cap(lease_time_s: float, state: str, mclt_s: float,
                   capped_states: Iterable[str] = (COMM_INTERRUPTED,)) -> float:
    """An upper bound of the lease time when nothing is known of the
    address (a new client): the MCLT in the given states.  The lease store
    applies the real rule per address (``LeaseStore.expiry_for``: at most
    MCLT beyond the partner-acked potential expiry, in every state)."""
    if state in tuple(capped_states):
        return min(lease_time_s, mclt_s)
    return lease_time_s
