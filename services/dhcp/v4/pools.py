"""Who answers a client, and from which addresses: pure functions, no I/O.

Three failover modes (``failover.mode``), one model underneath:

* **Address split (every mode).**  Each pool ``first..last`` is cut in two
  contiguous segments: the primary owns the lowest ``split`` percent of the
  addresses (rounded to the nearest address), the secondary the rest
  (:func:`split_range`, :func:`segments`).  A server allocates *new*
  addresses only from its own segment in NORMAL and COMMUNICATIONS-INTERRUPTED,
  so the two partners never hand out the same free address even while they
  cannot talk (lazy updates: the partner learns of a lease after the ACK).
  In a *confirmed* PARTNER-DOWN (operator, the witness's quorum, a partner
  in maintenance or recovering -- never heartbeat silence alone) the
  survivor keeps allocating from its own segment first, and from the
  partner's segment only after the MCLT safety period
  (:func:`may_allocate_from_partner`).  That is safe because every lease in
  every failover state is capped at ``max(partner-acked potential expiry,
  now) + mclt_s`` (``LeaseStore.expiry_for``, draft-ietf-dhc-failover-12):
  a lease the dead partner gave without telling us has run out MCLT after it
  stopped.  Expired and released addresses stay *pending-free* until the
  partner acknowledges them (``LeaseStore``), since the partner may have
  renewed the client meanwhile.
  In ``hot-standby`` the secondary's segment is its reserve for the first
  MCLT of PARTNER-DOWN (Microsoft's ``ReservePercent``, dhcpd's backup pool):
  give it e.g. ``split = 90``.

* **Client ownership** (who answers a client at once):

  - ``load-balancing``: the RFC 3074 hash of the client key (client
    identifier, else chaddr) picks a bucket 0..255; the primary owns buckets
    ``0 .. round(split * 256 / 100) - 1`` (dhcpd's ``split`` semantics with
    percent instead of /256).
  - ``split-scope``: a client whose known address lies in a segment is owned
    by that segment's server (it keeps renewing where it was served);
    a new client is owned by its hash bucket, as in load balancing.
  - ``hot-standby``: the primary owns every client.

* **Answering** (:func:`answers`): in COMMUNICATIONS-INTERRUPTED a server
  answers everybody (new clients from its own segment; renewals and rebinds
  of the partner's clients within the MCLT rule), so a dead partner's
  clients are served as soon as it is suspected.  In NORMAL the owner
  answers at once; in ``split-scope`` and ``load-balancing`` the
  non-owner answers too once the client's ``secs`` field is ``>= delay_s``
  (the owner looks silent: dhcpd's "load balance max seconds", the
  configurable delay of split-scope servers), from its *own* segment.  The
  rule applies in NORMAL as well, because a partner can be alive on the
  peer link yet not serve clients; ``delay_s = 0`` disables it.  In
  ``hot-standby`` the standby never answers before PARTNER-DOWN.  In
  PARTNER-DOWN a server answers everybody.  In STARTUP, RECOVER and
  RECOVER-DONE it answers nobody (it syncs first).

Without failover (single node) a server owns and answers everything, and
:func:`segments` gives the whole pool to the role ``None``.
"""

from __future__ import annotations

from services.dhcp.failover.pools import (COMM_INTERRUPTED, LOADB_MX_TBL,  # noqa: F401
                                          NORMAL, PARTNER_DOWN, PRIMARY, RECOVER,
                                          RECOVER_DONE, SECONDARY, SERVING_STATES, STARTUP,
                                          Segment, allocation_roles, answers, bucket_owner,
                                          hash_owner, lease_time_cap,
                                          may_allocate_from_partner, my_ranges,
                                          primary_buckets, rfc3074_hash, segments,
                                          split_range)

MODES = ("split-scope", "load-balancing", "hot-standby")

__all__ = [
    "LOADB_MX_TBL", "PRIMARY", "SECONDARY", "SERVING_STATES", "Segment",
    "STARTUP", "NORMAL", "COMM_INTERRUPTED", "PARTNER_DOWN", "RECOVER", "RECOVER_DONE",
    "rfc3074_hash", "client_hash_key", "primary_buckets", "bucket_owner", "hash_owner",
    "serves", "owner_of", "answers", "split_range", "segments", "my_ranges",
    "may_allocate_from_partner", "allocation_roles", "lease_time_cap",
]

# ---------------------------------------------------------------------------
# RFC 3074 load balancing (the hash itself is the core's: dhcp6 load balancing hashes the DUID)
# ---------------------------------------------------------------------------

def client_hash_key(client_id: bytes | None, chaddr: bytes) -> bytes:
    """The RFC 3074 service transaction id: the client identifier option's
    value when present and non-empty, else the hardware address (``hlen``
    bytes of chaddr, without htype)."""
    return bytes(client_id) if client_id else bytes(chaddr)



def serves(client_key: bytes, role: str, split: int, partner_state: str) -> bool:
    """Load balancing: does the server of ``role`` answer this client at once?

    ``partner_state`` is this server's failover state (NORMAL, ...).  In
    NORMAL/COMMUNICATIONS-INTERRUPTED only the bucket's owner serves; in
    PARTNER-DOWN everybody; otherwise (STARTUP, RECOVER...) nobody.
    """
    if partner_state == PARTNER_DOWN:
        return True
    if partner_state not in (NORMAL, COMM_INTERRUPTED):
        return False
    return hash_owner(client_key, split) == role


def owner_of(mode: str | None, client_key: bytes, split: int,
             address_role: str | None = None) -> str:
    """The role that owns a client (answers it without delay).

    ``address_role`` is the segment role of the client's known address
    (its lease), used by ``split-scope`` only.
    """
    if mode == "hot-standby":
        return PRIMARY
    if mode == "split-scope" and address_role in (PRIMARY, SECONDARY):
        return address_role
    return hash_owner(client_key, split)
