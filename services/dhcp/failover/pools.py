"""Who answers a client, and from which addresses: pure functions, no I/O
(the failover core's pool rules, the same for every lease family).

**Address split.**  Each pool ``first..last`` (ints of the family) is cut in
two contiguous segments: the primary owns the lowest ``split`` percent of
the addresses (rounded to the nearest address), the secondary the rest
(:func:`split_range`, :func:`segments`) -- RFC 8156's split pools, and the
v4 design's (``services/dhcp/v4/pools.py`` has the whole story and the
RFC 3074 client hash, which is v4-only).  A server allocates new addresses
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
    "answers", "split_range", "segments", "my_ranges",
    "may_allocate_from_partner", "allocation_roles", "lease_time_cap",
]


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
