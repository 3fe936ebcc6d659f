"""DHCPv4 leases: the failover core's lease store (``services/dhcp/failover/leases.py``)
with the ``DHCP4`` family -- store keys ``dhcp4:*``, dotted quads, client key
from the client identifier (option 61) else chaddr -- plus what only v4 has:
looking a client up by its hardware address (``dhcp4.lease {hwaddr}``).

Store layout, states, the write path, the free sets and the failover rules
(MCLT, pending-free, held addresses, merge) are documented in the core module.
"""

from __future__ import annotations

from twisted.internet import defer

from services.dhcp.failover import leases as _core
from services.dhcp.failover.family import DHCP4
from services.dhcp.failover.leases import (  # noqa: F401  (the v4 names of the core)
    ACTIVE_STATES, APPLIED, BACKUP, BOUND, CLIENT_PREFIX, CONFLICT_LOCAL_WON,
    CONFLICT_REMOTE_WON, DECLINED, EXPIRED, EXPIRY_KEY, FREE, FREE_STATES, HELD_KEY,
    INDEXED_STATES, LEASE_PREFIX, LOCAL_WON, MAX_SKEW_S, OFFERED, REJECTED, RELEASED,
    STALE, STATES, TIMED_STATES, VERSION_PREFIX, AddressUnavailable, DDNSState, FreeSet,
    Lease, LeaseError, UnknownSubnet, _aton, _canonical, _ntoa, client_index_key,
    client_key, lease_key, normalize_client_id, normalize_hwaddr, version_key)

FAMILY = DHCP4


class LeaseStore(_core.LeaseStore):
    """The core's LeaseStore of the ``DHCP4`` family (the constructor's
    arguments are the core's; ``config`` is a ``Dhcp4Config``)."""

    def __init__(self, store, config, node_id, now, **kw):
        kw.setdefault("family", DHCP4)
        super().__init__(store, config, node_id, now, **kw)

    @defer.inlineCallbacks
    def find_hwaddr(self, hwaddr: bytes | str):
        """Fire with the leases (any subnet) of a hardware address: found by
        the ``hw:`` index, or by the common client id ``01 + MAC``."""
        hw = normalize_hwaddr(hwaddr)
        out = []
        for sid in self._subnets:
            for cid in (None, "01" + hw.replace(":", "")):
                lease = yield self.find_client(sid, hw, cid)
                if lease is not None and lease not in out:
                    out.append(lease)
        return out
