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

from services.dhcp.failover.pools import (COMM_INTERRUPTED, NORMAL, PARTNER_DOWN,  # noqa: F401
                                          PRIMARY, RECOVER, RECOVER_DONE, SECONDARY,
                                          SERVING_STATES, STARTUP, Segment, allocation_roles,
                                          answers, lease_time_cap, may_allocate_from_partner,
                                          my_ranges, segments, split_range)

MODES = ("split-scope", "load-balancing", "hot-standby")

__all__ = [
    "LOADB_MX_TBL", "PRIMARY", "SECONDARY", "SERVING_STATES", "Segment",
    "STARTUP", "NORMAL", "COMM_INTERRUPTED", "PARTNER_DOWN", "RECOVER", "RECOVER_DONE",
    "rfc3074_hash", "client_hash_key", "primary_buckets", "bucket_owner", "hash_owner",
    "serves", "owner_of", "answers", "split_range", "segments", "my_ranges",
    "may_allocate_from_partner", "allocation_roles", "lease_time_cap",
]

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


# ---------------------------------------------------------------------------
# RFC 3074 load balancing
# ---------------------------------------------------------------------------

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


def client_hash_key(client_id: bytes | None, chaddr: bytes) -> bytes:
    """The RFC 3074 service transaction id: the client identifier option's
    value when present and non-empty, else the hardware address (``hlen``
    bytes of chaddr, without htype)."""
    return bytes(client_id) if client_id else bytes(chaddr)


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
