"""Leases of one family (DHCPv4 addresses, DHCPv6 addresses or delegated
prefixes) in the shared state store, and fast free-address allocation: the
failover core's lease record lifecycle and guards.

The family (``family.py``) gives the key namespace and the address <-> int
conversion; everything else here is the same for every family.  The v4
service uses it through ``services/dhcp/v4/leases.py`` (family ``DHCP4``).

Reactor-free; time comes from the ``now`` callable given to the constructor
(``reactor.seconds`` or a ``task.Clock``'s).  The per-request methods
(``get``, ``find_client``, ``offer``, ``bind``, ``release``, ``decline``,
``apply_remote``) are ``appliance.eager``: on a store that answers reads at
once (``IImmediateStore``: the embedded store's ``hgetall_now``/``get_now``) they return
their result directly unless they wait for a write, otherwise a Deferred;
errors are always a failed Deferred.  Wrap with ``as_deferred`` when a
Deferred is needed.  The rest (load, reclaim, leases, export) return Deferreds.

Store layout (keys are ``str``, values ``str``; ``<ns>`` is the family's
name: ``dhcp4``, ``dhcp6:na``, ``dhcp6:pd``)::

    <ns>:lease:<addr>                hash: the lease (Lease.to_hash)
    <ns>:lease-ver:<addr>            plain: the lease's version (commit guard)
    <ns>:client:<subnet id>:<ckey>   plain: -> addr; ckey "id:<hex client-id>" or
                                     "hw:<aa:bb:..>" (client id wins, RFC 2131 4.2;
                                     v6: DUID + IAID, family.v6_client)
    <ns>:expiry                      sorted set: addr scored by the time its
                                     offer / binding / decline quarantine ends
    <ns>:held                        sorted set: addresses held after a recovery
                                     without data

Every change to a lease is ONE ``commit`` (hash + version + client index +
expiry score, and the release of the client's superseded lease if any),
guarded by the version key, so a concurrent writer (the partner sharing a
Redis store, an RPC release racing a renewal) makes the commit fail cleanly
and the operation re-reads and retries.  The Deferred fires after the
store acknowledged the write: the server sends its ACK only then.

``immediate_writes=True`` (the DHCP service, on an ``IImmediateStore``):
writes are applied at once and committed at the end of the reactor turn and the methods
return without waiting for the disk; ``writes`` counts them and the caller
waits on :meth:`LeaseStore.durable` before it tells anybody (the ACK, the
peer link's ack of a partner batch, an RPC answer).  One wait per reply
or batch instead of a Deferred chain through every method per write.

States: ``offered`` and ``bound`` hold the address for their client until
``expires``; ``declined`` holds it (for nobody) until the quarantine ends;
``released``, ``expired`` and ``free`` are free addresses.  Released and
expired leases keep their client fields and client index, so a returning
client gets its old address back while nobody else took it (lease
stability).  ``backup`` is accepted from a partner and treated as free.

Allocation never scans the store.  At :meth:`LeaseStore.load` one paged
``scan`` of ``<ns>:lease:`` builds, per pool segment (see ``pools.py``),
a :class:`FreeSet`: a byte per address plus a cursor over never-used
addresses (handed out lowest first) and a FIFO of addresses that became
free again (handed out oldest-freed first, so a just-expired client's
address is reused last).  Take and put are O(1) amortised.  Reserved
addresses are never in a free set.  Expiry walks the ``<ns>:expiry``
index in bounded batches (:meth:`LeaseStore.reclaim`), never all leases.

The free sets and a small per-address mirror (version, state, subnet) are
this process's view; writes by others reach it through :meth:`apply_remote`
(partner updates) or, when a guard fails, through a re-read of the record.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import json
import re
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

from twisted.internet import defer
from twisted.logger import Logger

from appliance.eager import eager
from appliance.store.interface import IImmediateStore, Op, StoreError

from services.dhcp.failover import pools as _pools
from services.dhcp.failover.family import DHCP4, Family

# the v4 family's keys (a LeaseStore of another family uses ``family.*_prefix``)
LEASE_PREFIX = DHCP4.lease_prefix
VERSION_PREFIX = DHCP4.version_prefix
CLIENT_PREFIX = DHCP4.client_prefix
EXPIRY_KEY = DHCP4.expiry_key
#: addresses held after a recovery without data (address -> until): kept in the
#: store, a restart before the hold runs out must not free them
HELD_KEY = DHCP4.held_key

FREE, OFFERED, BOUND, RELEASED, EXPIRED, DECLINED, BACKUP = (
    "free", "offered", "bound", "released", "expired", "declined", "backup")
STATES = (FREE, OFFERED, BOUND, RELEASED, EXPIRED, DECLINED, BACKUP)
ACTIVE_STATES = (OFFERED, BOUND)                 # held for a client
TIMED_STATES = (OFFERED, BOUND, DECLINED)         # in the expiry index
FREE_STATES = (FREE, RELEASED, EXPIRED, BACKUP)   # allocatable
INDEXED_STATES = (OFFERED, BOUND, RELEASED, EXPIRED)  # keep the client index

APPLIED = "applied"
STALE = "stale"
CONFLICT_REMOTE_WON = "conflict-remote-won"
CONFLICT_LOCAL_WON = "conflict-local-won"
LOCAL_WON = "local-won"            # not a conflict, but the partner must get our record
REJECTED = "rejected"

_RETRIES = 8
#: the largest clock difference between the partners the MCLT waits allow for
#: (times in a partner's records are its clock's): every wait that trusts a
#: partner's time adds it.  The service refuses merges beyond it.
MAX_SKEW_S = 2.0
_RANK = {OFFERED: 1, BOUND: 2, EXPIRED: 3, RELEASED: 4, DECLINED: 4}
_NORMAL_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2})*$")


class LeaseError(Exception):
    """Base of lease refusals."""


class AddressUnavailable(LeaseError):
    """The address is held by another client, quarantined, reserved for
    somebody else, or outside what this server may allocate: NAK."""


class UnknownSubnet(LeaseError):
    """No configured subnet has this id, or the address is not in it."""


#: the v4 family's conversions (dotted quad <-> int), kept under their old names
_aton, _ntoa, _canonical = DHCP4.aton, DHCP4.ntoa, DHCP4.canonical


def lease_key(address: str, family: Family = DHCP4) -> str:
    return family.lease_prefix + address


def version_key(address: str, family: Family = DHCP4) -> str:
    return family.version_prefix + address


def client_index_key(subnet_id: int, ckey: str, family: Family = DHCP4) -> str:
    return f"{family.client_prefix}{subnet_id}:{ckey}"


def normalize_hwaddr(value: bytes | str | None) -> str:
    """bytes (chaddr[:hlen]) or text to ``aa:bb:..``; ``""`` for none."""
    if not value:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex(":")
    if _NORMAL_MAC.match(value):
        return value
    return value.replace("-", ":").lower()


def normalize_client_id(value: bytes | str | None) -> str:
    """Client identifier (option 61) bytes, or hex text, to lowercase hex; ``""`` for none."""
    if not value:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    return value.replace(":", "").replace("-", "").lower()


def client_key(hwaddr: bytes | str | None, client_id: bytes | str | None = None) -> str:
    """The client's identity in the store: client id if any, else hardware address."""
    try:
        return _client_key_cached(hwaddr, client_id)
    except TypeError:                       # unhashable (bytearray): compute it
        return _client_key(hwaddr, client_id)


def _client_key(hwaddr: bytes | str | None, client_id: bytes | str | None = None) -> str:
    cid = normalize_client_id(client_id)
    if cid:
        return "id:" + cid
    hw = normalize_hwaddr(hwaddr)
    return "hw:" + hw if hw else ""


def _with_version(lease: "Lease", version: int) -> "Lease":
    """``replace(lease, version=version)`` without dataclasses.replace's
    per-field introspection (this is on every lease write)."""
    return Lease(lease.address, lease.subnet_id, lease.state, lease.hwaddr, lease.client_id,
                 lease.hostname, lease.expires, lease.cltt, lease.owner, lease.updated_by,
                 version, lease.pexp, lease.acked, lease.synced, lease.ddns, lease.dv)


def _synced(lease: "Lease", acked: float, address: str | None = None) -> "Lease":
    """``replace(lease, synced=True, acked=acked[, address=address])`` without
    dataclasses.replace (on every partner ack and every partner update)."""
    return Lease(address or lease.address, lease.subnet_id, lease.state, lease.hwaddr,
                 lease.client_id, lease.hostname, lease.expires, lease.cltt, lease.owner,
                 lease.updated_by, lease.version, lease.pexp, acked, True, lease.ddns, lease.dv)


# the same few clients' keys are asked for several times per packet
_client_key_cached = functools.lru_cache(maxsize=8192)(_client_key)


def _f(value: float) -> str:
    return repr(float(value))


@dataclass(frozen=True, slots=True)
class DDNSState:
    """What DDNS published for a lease (services/dhcp/v4/ddns.py): the name,
    the address, the S/O/N flags of the option 81 answer, and ``done`` once
    the DNS server confirmed it (False: sent, or to be sent again).  Kept on
    the record so the partner and a restart know what to remove."""

    fqdn: str
    address: str
    flags: int | None = None
    done: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"fqdn": self.fqdn, "address": self.address, "flags": self.flags,
                "done": self.done}

    @classmethod
    def of(cls, value: Any) -> "DDNSState | None":
        """From a dict (wire), its JSON text (store) or a DDNSState; None when
        absent or malformed (old records have none)."""
        if isinstance(value, DDNSState) or value is None:
            return value
        try:
            if isinstance(value, str):
                value = json.loads(value) if value else None
            if not isinstance(value, dict) or not isinstance(value.get("fqdn"), str) \
                    or not isinstance(value.get("address"), str):
                return None
            flags = value.get("flags")
            return cls(value["fqdn"], value["address"],
                       None if flags is None else int(flags), bool(value.get("done")))
        except (ValueError, TypeError):
            return None


@dataclass(frozen=True, slots=True)
class Lease:
    """One address's lease record."""

    address: str
    subnet_id: int
    state: str = FREE
    hwaddr: str = ""
    client_id: str = ""
    hostname: str = ""
    expires: float = 0.0
    cltt: float = 0.0
    owner: str = ""
    updated_by: str = ""
    version: int = 0
    #: failover (draft-ietf-dhc-failover-12): the potential expiration time this
    #: record tells the partner (the address may be held until then), the one
    #: the partner has acknowledged (``acked``: for a record learnt from the
    #: partner, the partner's own ``pexp``), and whether the partner has this
    #: version (``synced``; an unsynced record is an update still owed to it:
    #: the durable outbox).
    pexp: float = 0.0
    acked: float = 0.0
    synced: bool = False
    #: DDNS state (:class:`DDNSState`): what is published for this client;
    #: None when nothing is (or for records written before it existed)
    ddns: DDNSState | None = None
    #: changes of ``ddns`` alone on this binding (``LeaseStore.set_ddns``): the
    #: merge's last tie-break, so a DDNS-only update (same cltt, state and
    #: expiry) beats the partner's copy instead of being merged as stale
    #: (0 for records and partners that predate it)
    dv: int = 0

    @property
    def client_key(self) -> str:
        return client_key(self.hwaddr, self.client_id)

    def holds(self, now: float) -> bool:
        """True while the address may not be given to anybody else."""
        return self.state in TIMED_STATES and self.expires > now

    def active(self, now: float) -> bool:
        """True while a client holds the address (offered or bound, not run out)."""
        return self.state in ACTIVE_STATES and self.expires > now

    def to_hash(self) -> dict[str, str]:
        return {"address": self.address, "subnet": str(self.subnet_id), "state": self.state,
                "hwaddr": self.hwaddr, "client_id": self.client_id, "hostname": self.hostname,
                "expires": _f(self.expires), "cltt": _f(self.cltt), "owner": self.owner,
                "updated_by": self.updated_by, "version": str(self.version),
                "pexp": _f(self.pexp), "acked": _f(self.acked), "synced": "1" if self.synced else "0",
                "ddns": json.dumps(self.ddns.to_dict()) if self.ddns is not None else "",
                "dv": str(self.dv)}

    @classmethod
    def from_hash(cls, h: dict[str, str], family: Family = DHCP4) -> "Lease | None":
        """Parse a stored hash; None if it is not a well-formed lease."""
        try:
            state = h["state"]
            if state not in STATES:
                return None
            address = h["address"]
            if family.canonical(address) != address:
                return None
            return cls(address, int(h["subnet"]), state,
                       h.get("hwaddr", ""), h.get("client_id", ""), h.get("hostname", ""),
                       float(h.get("expires", 0)), float(h.get("cltt", 0)), h.get("owner", ""),
                       h.get("updated_by", ""), int(h.get("version", 0)),
                       float(h.get("pexp", h.get("expires", 0))), float(h.get("acked", 0)),
                       h.get("synced", "0") == "1", DDNSState.of(h.get("ddns")),
                       int(h.get("dv") or 0))
        except (KeyError, ValueError, TypeError, OSError):
            return None

    def to_json(self) -> dict[str, Any]:
        """The RPC shape (SPEC ``dhcp4.leases``) plus subnet and hostname."""
        return {"address": self.address, "hwaddr": self.hwaddr, "client_id": self.client_id,
                "state": self.state, "expires": self.expires, "cltt": self.cltt,
                "owner": self.owner, "subnet": self.subnet_id, "hostname": self.hostname,
                "ddns": self.ddns.to_dict() if self.ddns is not None else None}

    def to_wire(self) -> dict[str, Any]:
        """Everything, for lease updates to the partner (``from_wire`` reads it)."""
        return {"address": self.address, "subnet_id": self.subnet_id, "state": self.state,
                "hwaddr": self.hwaddr, "client_id": self.client_id, "hostname": self.hostname,
                "expires": self.expires, "cltt": self.cltt, "owner": self.owner,
                "updated_by": self.updated_by, "version": self.version,
                "pexp": self.pexp,
                "ddns": self.ddns.to_dict() if self.ddns is not None else None,
                "dv": self.dv}

    @classmethod
    def from_wire(cls, d: dict[str, Any], family: Family = DHCP4) -> "Lease":
        """Build from a partner's ``to_wire`` dict; raises ValueError if malformed."""
        try:
            lease = cls(family.checked(d["address"]), int(d["subnet_id"]), str(d["state"]),
                        normalize_hwaddr(d.get("hwaddr") or ""),
                        normalize_client_id(d.get("client_id") or ""), str(d.get("hostname") or ""),
                        float(d.get("expires", 0)), float(d.get("cltt", 0)),
                        str(d.get("owner") or ""), str(d.get("updated_by") or ""),
                        int(d.get("version", 0)), float(d.get("pexp", d.get("expires", 0))),
                        ddns=DDNSState.of(d.get("ddns")), dv=int(d.get("dv") or 0))
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed lease: {e!r}") from None
        if lease.state not in STATES:
            raise ValueError(f"unknown lease state {lease.state!r}")
        return lease


# ---------------------------------------------------------------------------
# free addresses
# ---------------------------------------------------------------------------

_USED, _FRESH, _REUSE = 0, 1, 2


class FreeSet:
    """The free addresses of one segment ``first..last`` (ints, inclusive).

    Never-used addresses go out lowest first (a cursor); addresses that
    became free again go out oldest-freed first (a FIFO with lazy
    deletion).  ``take``/``put``/``discard`` are O(1) amortised.
    """

    __slots__ = ("first", "last", "role", "subnet_id", "_flags", "_cursor", "_reuse", "free")

    def __init__(self, first: int, last: int, role: str | None = None, subnet_id: int = 0):
        if first > last:
            raise ValueError("first > last")
        self.first, self.last, self.role, self.subnet_id = first, last, role, subnet_id
        self._flags = bytearray([_FRESH]) * (last - first + 1)
        self._cursor = 0
        self._reuse: deque[int] = deque()
        self.free = last - first + 1

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def __len__(self) -> int:
        return self.free

    def __contains__(self, address: int) -> bool:
        return self.first <= address <= self.last and self._flags[address - self.first] != _USED

    def covers(self, address: int) -> bool:
        return self.first <= address <= self.last

    def take(self, reuse_first: bool = False) -> int | None:
        """Remove and return a free address, or None when there is none.

        Never-used addresses first (lowest first), then oldest-freed; with
        ``reuse_first`` the other way round (the partner's segment in
        PARTNER-DOWN: its never-used addresses are the ones it may have
        given without telling us)."""
        first, then = ((self._take_reuse, self._take_fresh) if reuse_first
                       else (self._take_fresh, self._take_reuse))
        a = first()
        return then() if a is None else a

    def _take_fresh(self) -> int | None:
        flags, n = self._flags, len(self._flags)
        i = self._cursor
        while i < n:
            if flags[i] == _FRESH:
                flags[i] = _USED
                self._cursor = i + 1
                self.free -= 1
                return self.first + i
            i += 1
        self._cursor = n
        return None

    def _take_reuse(self) -> int | None:
        flags, reuse = self._flags, self._reuse
        while reuse:
            i = reuse.popleft()
            if flags[i] == _REUSE:
                flags[i] = _USED
                self.free -= 1
                return self.first + i
        return None

    def discard(self, address: int) -> bool:
        """Mark ``address`` used; True if it was free."""
        i = address - self.first
        if self._flags[i] == _USED:
            return False
        self._flags[i] = _USED
        self.free -= 1
        return True

    def put(self, address: int) -> bool:
        """Mark ``address`` free again (reuse tier); True if it was used.

        A never-used address moves to the reuse tier (it has a history now).
        """
        i = address - self.first
        flag = self._flags[i]
        if flag == _REUSE:
            return False
        self._flags[i] = _REUSE
        self._reuse.append(i)
        if flag == _FRESH:
            return False
        self.free += 1
        if len(self._reuse) > 2 * self.free + 1024:     # drop stale FIFO entries
            flags = self._flags
            self._reuse = deque(j for j in dict.fromkeys(self._reuse) if flags[j] == _REUSE)
        return True


# ---------------------------------------------------------------------------
# the lease store
# ---------------------------------------------------------------------------

class LeaseStore:
    """Leases of the configured subnets on top of an ``IStateStore``.

    ``config`` gives the subnets, pools and reservations, and (through
    ``config.failover.split``) how pools are cut into primary/secondary
    segments.  Call :meth:`load` once before anything else.
    """


    def __init__(self, store, config, node_id: str, now: Callable[[], float], *,
                 offer_timeout_s: float | None = None, decline_quarantine_s: float | None = None,
                 page_size: int = 5000, immediate_writes: bool = False,
                 family: Family = DHCP4):
        self.store = store
        #: the lease family (key namespace, address <-> int): family.py
        self.family = self._fam = family
        self._aton, self._ntoa = family.aton, family.ntoa
        self._expiry_key, self._held_key = family.expiry_key, family.held_key
        self._lease_prefix, self._version_prefix = family.lease_prefix, family.version_prefix
        self._client_prefix = family.client_prefix
        self._tag = family.name
        self._log = Logger(namespace=f"services.{family.name.replace(':', '.')}.leases")
        immediate = IImmediateStore.providedBy(store)
        self._commit_now = store.commit_now if immediate and immediate_writes else None
        self._lazy_ok = self._commit_now is not None and "lazy" in getattr(
            getattr(store.commit_now, "__code__", None), "co_varnames", ())
        self.writes = 0          # journaled writes (immediate_writes): wait on durable()
        self.config = config
        self.node_id = node_id
        self._now = now
        self.offer_timeout_s = offer_timeout_s or config.offer_timeout_s
        self.decline_quarantine_s = decline_quarantine_s or config.decline_quarantine_s
        self.page_size = page_size
        self.loaded = False
        # the embedded store answers reads at once: no Deferred on the hot path
        self._hgetall_now = store.hgetall_now if immediate else None
        self._get_now = store.get_now if immediate else None
        #: (stores that answer at once) the Lease last read or written per address: a
        #: read returns it while the stored version key still names its version (every
        #: change of a record moves its version, but mark_synced's, which tracks it), so
        #: the hot path does not copy and parse the same 16-field hash again and again
        self._parsed: dict[str, Lease] = {}
        self._subnets = {s.id: s for s in config.subnets}
        split = config.failover.split if config.failover else None
        fo = config.failover
        #: failover: this server's segment role and the MCLT (None: no failover)
        self.role: str | None = fo.role if fo else None
        self.mclt_s: float | None = float(fo.mclt_s) if fo else None
        self.skew_margin_s = MAX_SKEW_S
        #: addresses whose record the partner has not acknowledged yet (in
        #: store order: the durable outbox; the service sends them)
        self.unsynced: dict[str, None] = {}
        #: pending-free: expired/released addresses the partner has not
        #: acknowledged (address -> the time after which, plus the MCLT, a
        #: confirmed PARTNER-DOWN may reuse them), and a heap over them
        self._pending: dict[int, float] = {}
        self._pending_heap: list[tuple[float, int]] = []
        #: after a recovery without our own data: addresses nobody may get
        #: before the time (the partner-known potential expiry + MCLT: a lease
        #: we gave before losing our data may run until then)
        self._held: dict[int, float] = {}
        self._held_heap: list[tuple[float, int]] = []
        #: set by the service while PARTNER-DOWN is confirmed (operator, witness,
        #: maintenance, a recovering partner): when it started
        self.partner_down_since: float | None = None
        #: called with each record written that the partner does not have yet
        #: (the service queues it for the partner)
        self.on_unsynced: Callable[[Lease], None] | None = None
        #: False in PARTNER-DOWN: the partner is recovering (maybe without its
        #: data), so its ack of an expiry or release says nothing about leases
        #: it gave before it went down -- only the MCLT rule frees them then
        self.trust_acks = True
        #: a PARTNER-DOWN entered without having been in step with the partner
        #: since this start: our own addresses get the partner's waits too
        self.own_is_foreign = False
        self._sets: list[FreeSet] = []
        for s in config.subnets:
            for pool in s.pools:
                first, last = family.as_int(pool.first), family.as_int(pool.last)
                if family.max_pool is not None and last - first + 1 > family.max_pool:
                    raise ValueError(f"{family.name} pool {pool.first}-{pool.last} has "
                                     f"{last - first + 1} entries, more than {family.max_pool}")
                for seg in _pools.segments(first, last, split):
                    self._sets.append(FreeSet(seg.first, seg.last, seg.role, s.id))
        self._sets.sort(key=lambda fs: fs.first)
        self._starts = [fs.first for fs in self._sets]
        self._reserved_addr: dict[int, tuple[int, str]] = {}
        self._reserved_mac: dict[tuple[int, str], int] = {}
        for s in config.subnets:
            for r in s.reservations:
                self._reserved_addr[family.as_int(r.address)] = (s.id, r.hwaddr)
                self._reserved_mac[(s.id, r.hwaddr)] = family.as_int(r.address)
        for a in self._reserved_addr:
            fs = self._set_for(a)
            if fs is not None:
                fs.discard(a)
        self._config_reserved = (dict(self._reserved_addr), dict(self._reserved_mac))
        # mirror: ip int -> (version, state, subnet id) of every stored record
        self._meta: dict[int, tuple[int, str, int]] = {}
        self._sorted: list[int] | None = None
        # offers live in memory only (RFC 2131 4.3.1: the server need not
        # reserve an offered address durably): address -> offered Lease,
        # (subnet id, client key) -> address, and a FIFO of (expires, address)
        self._offers: dict[int, Lease] = {}
        self._offer_of: dict[tuple[int, str], int] = {}
        self._offer_fifo: deque[tuple[float, int]] = deque()
        self.counters = {"conflicts": 0, "remote_applied": 0, "remote_stale": 0,
                         "remote_rejected": 0, "guard_retries": 0, "reclaimed": 0,
                         "malformed_records": 0}

    # ------------------------------------------------------------------
    # keys of this family
    # ------------------------------------------------------------------
    def _lease_key(self, address: str) -> str:
        return self._lease_prefix + address

    def _version_key(self, address: str) -> str:
        return self._version_prefix + address

    def _client_index_key(self, subnet_id: int, ckey: str) -> str:
        return f"{self._client_prefix}{subnet_id}:{ckey}"

    def _parse_hash(self, h):
        return Lease.from_hash(h, self._fam) if h else None

    def lease_from_wire(self, d) -> Lease:
        """A partner's wire dict as a Lease of this family (ValueError if malformed)."""
        return Lease.from_wire(d, self._fam)

    # ------------------------------------------------------------------
    # lookup helpers
    # ------------------------------------------------------------------
    def _set_for(self, address: int) -> FreeSet | None:
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and self._sets[i].covers(address):
            return self._sets[i]
        return None

    def segment_role(self, address: str | int) -> str | None:
        """The pool-segment role (``primary``/``secondary``/None) of an address."""
        a = self._aton(address) if isinstance(address, str) else self._fam.as_int(address)
        fs = self._set_for(a)
        return fs.role if fs is not None else None   # (a full FreeSet is falsy)

    def in_pool(self, address: str | int) -> bool:
        return self._set_for(self._fam.as_int(address)) is not None

    def free_count(self, subnet_id: int | None = None, roles: Iterable[str] | None = None) -> int:
        roles = tuple(roles) if roles is not None else None
        return sum(len(fs) for fs in self._sets
                   if (subnet_id is None or fs.subnet_id == subnet_id)
                   and (roles is None or fs.role in roles))

    def reserved_address(self, subnet_id: int, hwaddr: str) -> str | None:
        a = self._reserved_mac.get((subnet_id, normalize_hwaddr(hwaddr)))
        return self._ntoa(a) if a is not None else None

    def set_external_reservations(self, pairs: Iterable[tuple[str, Any]]) -> list[str]:
        """Replace the reservations that come from outside the config (LDAP)
        with ``pairs`` of ``(mac, address)``; the config's own win on a
        conflict.  Returns a text for each pair not used (no subnet holds
        the address, or the address or client is reserved already)."""
        addr, mac_of = dict(self._config_reserved[0]), dict(self._config_reserved[1])
        unplaced = []
        for mac, ip in pairs:
            a = self._fam.as_int(ip)
            sub = self.config.subnet_for(ip)
            if sub is None:
                unplaced.append(f"{ip} for {mac}: in no configured subnet")
                continue
            if addr.get(a, (sub.id, mac)) != (sub.id, mac):
                unplaced.append(f"{ip} for {mac}: reserved for {addr[a][1]} already")
                continue
            if mac_of.get((sub.id, mac), a) != a:
                unplaced.append(f"{ip} for {mac}: {mac} has {self._ntoa(mac_of[(sub.id, mac)])} "
                                "reserved already")
                continue
            addr[a] = (sub.id, mac)
            mac_of[(sub.id, mac)] = a
        before = self._reserved_addr
        self._reserved_addr, self._reserved_mac = addr, mac_of
        for a in addr.keys() - before.keys():          # newly reserved: not for the pool
            fs = self._set_for(a)
            if fs is not None:
                fs.discard(a)
        for a in before.keys() - addr.keys():          # no longer reserved: free if unused
            meta = self._meta.get(a)
            fs = self._set_for(a)
            if fs is not None and a not in self._offers and a not in self._pending \
                    and (meta is None or meta[1] in FREE_STATES):
                fs.put(a)
        return unplaced

    @property
    def reservation_count(self) -> int:
        return len(self._reserved_addr)

    def _subnet(self, subnet_id: int):
        s = self._subnets.get(subnet_id)
        if s is None:
            raise UnknownSubnet(f"no subnet with id {subnet_id}")
        return s

    def _track(self, lease: Lease) -> None:
        """Bring the mirror and the free sets in line with a stored record."""
        if self._hgetall_now is not None:
            self._parsed[lease.address] = lease
        a = self._aton(lease.address)
        if a not in self._meta:
            self._sorted = None
        # the 4th field: until when any lease on the address may run that the
        # partner may have given or extended (its potential expiry)
        self._meta[a] = (lease.version, lease.state, lease.subnet_id,
                         max(lease.expires, lease.pexp, lease.acked))
        pending = False
        if self.role is not None:
            if lease.synced:
                self.unsynced.pop(lease.address, None)
            else:
                self.unsynced[lease.address] = None
                if self.on_unsynced is not None:
                    self.on_unsynced(lease)
            pending = not lease.synced and lease.state in (RELEASED, EXPIRED)
        if pending:
            basis = max(lease.expires, lease.pexp, lease.acked)
            if self._pending.get(a) != basis:
                self._pending[a] = basis
                heapq.heappush(self._pending_heap, (basis, a))
        else:
            self._pending.pop(a, None)
        fs = self._set_for(a)
        if fs is None or a in self._reserved_addr:
            return
        if lease.state in FREE_STATES and not pending and a not in self._held:
            if a not in self._offers:
                fs.put(a)
        else:
            fs.discard(a)

    def unlock_pending(self, now: float | None = None) -> int:
        """In a confirmed PARTNER-DOWN, pending-free addresses become free
        MCLT after ``max(their potential expiry, the start of PARTNER-DOWN)``
        (the partner may have extended them until then without telling us).
        Returns how many were freed."""
        since = self.partner_down_since
        if since is None or self.mclt_s is None:
            return 0
        now = self._now() if now is None else now
        wait = self.mclt_s + self.skew_margin_s
        if now < since + wait:
            return 0
        heap, n = self._pending_heap, 0
        while heap and heap[0][0] + wait <= now:
            basis, a = heapq.heappop(heap)
            if self._pending.get(a) != basis:
                continue
            del self._pending[a]
            fs = self._set_for(a)
            if fs is not None and a not in self._reserved_addr and a not in self._offers:
                fs.put(a)
                n += 1
        return n

    def hold(self, address: int, until: float, *, persist: bool = True) -> None:
        """Nobody but the address's current client gets it before ``until``.
        Written to the store (self._held_key) so that a restart keeps it: the
        leases it stands for were lost with our data, nothing else knows them."""
        if until <= self._held.get(address, 0.0):
            return
        self._held[address] = until
        heapq.heappush(self._held_heap, (until, address))
        fs = self._set_for(address)
        if fs is not None:
            fs.discard(address)
        if persist:
            self._write_held([Op.zadd(self._held_key, {self._ntoa(address): until})])

    def _write_held(self, ops) -> None:
        if self._commit_now is not None:
            self.writes += 1
            try:
                self._commit_now(ops, None)
            except Exception as e:          # the store is down: it says so itself
                self._log.warn("{tag}: an address hold was not stored: {why}", tag=self._tag, why=e)
            return
        self.store.commit(ops).addErrback(
            lambda f: self._log.warn("{tag}: an address hold was not stored: {why}", tag=self._tag,
                                     why=f.getErrorMessage()))

    def held_until(self, address: str) -> float | None:
        """Until when ``address`` is held (after a recovery without data), or None."""
        try:
            until = self._held.get(self._aton(address))
        except OSError:
            return None
        return until if until is not None and until > self._now() else None

    def address_int(self, address: str) -> int:
        return self._aton(self._fam.canonical(address))

    def release_held(self, now: float | None = None) -> int:
        """Return addresses whose hold ran out to the free sets (if free)."""
        if not self._held_heap:
            return 0
        now = self._now() if now is None else now
        heap, n, done = self._held_heap, 0, []
        while heap and heap[0][0] <= now:
            until, a = heapq.heappop(heap)
            if self._held.get(a) != until:
                continue
            del self._held[a]
            done.append(self._ntoa(a))
            meta = self._meta.get(a)
            fs = self._set_for(a)
            if fs is not None and a not in self._pending and a not in self._offers \
                    and a not in self._reserved_addr and (meta is None or meta[1] in FREE_STATES):
                fs.put(a)
                n += 1
        if done:
            self._write_held([Op.zrem(self._held_key, done)])
        return n

    def _foreign_wait_over(self, a: int, now: float) -> bool:
        """For a new binding on ``a``: True unless it is the partner's address
        (or, after a stale PARTNER-DOWN, any address) whose last potential
        expiry + MCLT (+ skew) has not passed -- the partner may have given
        or extended a lease on it until then without telling us."""
        if self.mclt_s is None:
            return True
        fs = self._set_for(a)
        if fs is None or (fs.role == self.role and not self.own_is_foreign):
            return True
        meta = self._meta.get(a)
        return (meta[3] if meta else 0.0) + self.mclt_s + self.skew_margin_s <= now

    def _blocked(self, a: int, ck: str, rec: "Lease | None", now: float) -> bool:
        """Pending-free: not for a client other than the record's.  Held (after a
        recovery without our data): only the renewal of the record's binding --
        we may have given the address to anybody since that record."""
        if self._held.get(a, 0.0) > now:
            return not (rec is not None and rec.client_key == ck and rec.state == BOUND)
        if a not in self._pending:
            return False
        return rec is None or rec.client_key != ck

    @property
    def pending_free(self) -> int:
        """Expired/released addresses waiting for the partner's acknowledgement."""
        return len(self._pending)

    def _forget(self, address: int) -> None:
        if self._meta.pop(address, None) is not None:
            self._sorted = None
        self._pending.pop(address, None)
        self.unsynced.pop(self._ntoa(address), None)
        fs = self._set_for(address)
        if fs is not None and address not in self._reserved_addr and address not in self._offers:
            fs.put(address)

    # ------------------------------------------------------------------
    # offers (memory only)
    # ------------------------------------------------------------------
    def _pending_offer(self, subnet_id: int, ck: str, now: float) -> Lease | None:
        a = self._offer_of.get((subnet_id, ck))
        if a is None:
            return None
        lease = self._offers.get(a)
        if lease is None or lease.expires <= now or lease.client_key != ck:
            return None
        return lease

    def pending_offer(self, subnet_id: int, hwaddr: bytes | str | None,
                      client_id: bytes | str | None = None) -> Lease | None:
        """The client's unexpired offer (memory only), or None: what a v6 REQUEST after
        the ADVERTISE binds without a second :meth:`offer` (``bind`` checks it again)."""
        ck = client_key(normalize_hwaddr(hwaddr), normalize_client_id(client_id))
        return self._pending_offer(subnet_id, ck, self._now()) if ck else None

    def _offered_to_other(self, address: int, ck: str, now: float) -> bool:
        lease = self._offers.get(address)
        return lease is not None and lease.expires > now and lease.client_key != ck

    def _hold_offer(self, lease: Lease) -> None:
        a = self._aton(lease.address)
        key = (lease.subnet_id, lease.client_key)
        prev = self._offer_of.get(key)
        if prev is not None and prev != a:
            self._drop_offer(prev)
        self._offers[a] = lease
        self._offer_of[key] = a
        self._offer_fifo.append((lease.expires, a))

    def _drop_offer(self, address: int) -> None:
        """Forget the offer on ``address``; the address is free again unless
        the store holds it (our mirror says so) or it is reserved."""
        lease = self._offers.pop(address, None)
        if lease is None:
            return
        key = (lease.subnet_id, lease.client_key)
        if self._offer_of.get(key) == address:
            del self._offer_of[key]
        meta = self._meta.get(address)
        if (meta is None or meta[1] in FREE_STATES) and address not in self._reserved_addr \
                and address not in self._pending and address not in self._held:
            fs = self._set_for(address)
            if fs is not None:
                fs.put(address)

    def expire_offers(self, now: float | None = None) -> int:
        """Drop offers whose time ran out (their addresses are free again)."""
        now = self._now() if now is None else now
        fifo, n = self._offer_fifo, 0
        while fifo and fifo[0][0] <= now:
            _, a = fifo.popleft()
            lease = self._offers.get(a)
            if lease is not None and lease.expires <= now:
                self._drop_offer(a)
                n += 1
        return n

    @property
    def offers_pending(self) -> int:
        return len(self._offers)

    # ------------------------------------------------------------------
    # start
    # ------------------------------------------------------------------
    @defer.inlineCallbacks
    def load(self):
        """Build the free sets from one paged scan of the stored leases.

        Fires with the number of lease records read.
        """
        cursor, n = None, 0
        while True:
            cursor, keys = yield self.store.scan(self._fam.lease_prefix, cursor, self.page_size)
            hashes = yield defer.gatherResults([self.store.hgetall(k) for k in keys],
                                               consumeErrors=True)
            for key, h in zip(keys, hashes):
                lease = self._parse_hash(h)
                if lease is None or key != self._lease_key(lease.address):
                    self.counters["malformed_records"] += 1
                    self._log.warn("ignoring malformed lease record {key}", key=key)
                    continue
                self._track(lease)
                n += 1
            if cursor is None:
                break
        now = self._now()
        for address, until in (yield self.store.zrangebyscore(self._held_key, now, float("inf"))):
            try:
                self.hold(self._aton(address), float(until), persist=False)
            except (OSError, ValueError, TypeError):
                continue
        self.loaded = True
        self._log.info("{tag} leases loaded: {n} records, {free} free addresses",
                       tag=self._tag, n=n, free=self.free_count())
        return n

    # ------------------------------------------------------------------
    # reads
    # ------------------------------------------------------------------
    def get(self, address: str):
        """Fire with the :class:`Lease` stored for ``address``, or None."""
        try:
            address = self._fam.canonical(address)
        except ValueError:
            return defer.fail(UnknownSubnet(f"{address!r} is not an {self._fam.what}"))
        return self._get(address)

    def _get(self, address: str):
        """The stored Lease (or None): at once from a store that holds its
        data in this process (``hgetall_now``), else a Deferred."""
        if self._hgetall_now is not None:
            try:
                cached = self._parsed.get(address)
                if cached is not None and \
                        self._get_now(self._version_prefix + address) == str(cached.version):
                    return cached
                lease = self._parse_hash(self._hgetall_now(self._lease_key(address)))
            except StoreError:
                return defer.fail()
            if lease is not None:
                self._parsed[address] = lease
            return lease
        return self.store.hgetall(self._lease_key(address)).addCallback(self._parse_hash)

    def _index_get(self, key: str):
        """A client index entry (address or None), at once when the store allows."""
        if self._get_now is not None:
            try:
                return self._get_now(key)
            except StoreError:
                return defer.fail()
        return self.store.get(key)

    @eager
    def find_client(self, subnet_id: int, hwaddr: bytes | str | None,
                    client_id: bytes | str | None = None):
        """Fire with the client's lease in the subnet (any state but declined), or None."""
        ck = client_key(hwaddr, client_id)
        if not ck:
            return None
        ip = yield self._index_get(self._client_index_key(subnet_id, ck))
        if ip is None:
            return None
        lease = yield self._get(ip)
        if lease is None or lease.client_key != ck or lease.subnet_id != subnet_id \
                or lease.state == DECLINED:
            return None     # stale index entry: the address moved on
        return lease

    @defer.inlineCallbacks
    def leases(self, subnet: int | None = None, state: str | None = None,
               limit: int = 100, cursor: str | None = None):
        """One page for ``dhcp4.leases``: ``{leases: [...], cursor}``.

        Ordered by address; ``cursor`` is the last address of the previous
        page (None: from the start); the returned cursor is None at the end.
        """
        limit = max(1, min(int(limit), 1000))
        if self._sorted is None:
            self._sorted = sorted(self._meta)
        order = self._sorted
        start = 0 if cursor is None else bisect.bisect_right(order, self._fam.as_int(cursor))
        out: list[dict] = []
        last = None
        i = start
        while i < len(order) and len(out) < limit:
            a = order[i]
            i += 1
            meta = self._meta.get(a)
            if meta is None or (subnet is not None and meta[2] != subnet) \
                    or (state is not None and meta[1] != state):
                continue
            lease = yield self._get(self._ntoa(a))
            last = a
            if lease is None:
                continue
            if (subnet is None or lease.subnet_id == subnet) and (state is None or lease.state == state):
                out.append(lease.to_json())
        more = any(self._match(order[j], subnet, state) for j in range(i, len(order)))
        next_cursor = self._ntoa(last) if (more and last is not None) else None
        return {"leases": out, "cursor": next_cursor}

    def _match(self, a: int, subnet, state) -> bool:
        meta = self._meta.get(a)
        return meta is not None and (subnet is None or meta[2] == subnet) \
            and (state is None or meta[1] == state)

    def stats(self) -> dict[str, Any]:
        """Counts per subnet and state (from the mirror), free addresses, counters."""
        per: dict[int, dict[str, Any]] = {}
        for s in self.config.subnets:
            per[s.id] = {"subnet": str(s.network), "pool_size": sum(p.size for p in s.pools),
                         "free": self.free_count(s.id), "states": {}}
        for _, st, sid, _ in self._meta.values():
            if sid in per:
                states = per[sid]["states"]
                states[st] = states.get(st, 0) + 1
        for lease in self._offers.values():
            if lease.subnet_id in per:
                states = per[lease.subnet_id]["states"]
                states["offered"] = states.get("offered", 0) + 1
        return {"subnets": per, "counters": dict(self.counters), "offers_pending": len(self._offers),
                "pending_free": len(self._pending), "unsynced": len(self.unsynced),
                "held": len(self._held)}

    # ------------------------------------------------------------------
    # the one write path
    # ------------------------------------------------------------------
    @eager
    def _commit(self, new: Lease, old: Lease | None, *, supersede: Lease | None = None,
                drop_index: Iterable[str] = (), set_index: bool = True):
        """Write ``new`` over ``old`` (the record read, None if absent) in one
        guarded commit.  Fires with the written Lease, or None if a guard
        failed (somebody else wrote first; ``old`` was re-read into the mirror).
        """
        now = self._now()
        new = _with_version(new, (old.version if old else 0) + 1)
        a = new.address
        ops = [Op.hset(self._lease_key(a), new.to_hash()), Op.set(self._version_key(a), str(new.version))]
        if new.state in TIMED_STATES:
            ops.append(Op.zadd(self._expiry_key, {a: new.expires}))
        else:
            ops.append(Op.zrem(self._expiry_key, [a]))
        expect: dict[str, str | None] = {self._version_key(a): str(old.version) if old else None}
        ck = new.client_key
        cleanup = set(drop_index)
        if ck and new.state in INDEXED_STATES:
            if set_index:
                ops.append(Op.set(self._client_index_key(new.subnet_id, ck), a))
        elif ck:
            cleanup.add(self._client_index_key(new.subnet_id, ck))
        if old is not None and old.client_key and (
                old.client_key != ck or old.subnet_id != new.subnet_id):
            cleanup.add(self._client_index_key(old.subnet_id, old.client_key))
        cleanup.discard(self._client_index_key(new.subnet_id, ck) if new.state in INDEXED_STATES else "")
        for key in sorted(cleanup):
            value = yield self._index_get(key)
            if value == a:
                ops.append(Op.delete(key))
                expect[key] = value
        sup_new = None
        if supersede is not None and supersede.address != a:
            sup_new = replace(supersede, state=EXPIRED, expires=min(supersede.expires, now),
                              version=supersede.version + 1, updated_by=self.node_id,
                              synced=False)
            sa = sup_new.address
            ops += [Op.hset(self._lease_key(sa), sup_new.to_hash()),
                    Op.set(self._version_key(sa), str(sup_new.version)), Op.zrem(self._expiry_key, [sa])]
            expect[self._version_key(sa)] = str(supersede.version)
        if self._commit_now is not None:
            self.writes += 1
            ok = self._commit_now(ops, expect)
        else:
            ok = yield self.store.commit(ops, expect)
        if not ok:
            self.counters["guard_retries"] += 1
            fresh = yield self._get(a)
            if fresh is None:
                self._forget(self._aton(a))
            else:
                self._track(fresh)
            return None
        self._track(new)
        if sup_new is not None:
            self._track(sup_new)
        return new

    # ------------------------------------------------------------------
    # DHCP operations
    # ------------------------------------------------------------------
    def _allowed(self, address: int, subnet_id: int, roles) -> bool:
        fs = self._set_for(address)
        return fs is not None and fs.subnet_id == subnet_id and (roles is None or fs.role in roles)

    def _take(self, subnet_id: int, roles) -> int | None:
        """A free address: this server's own segments first; the partner's
        (only when ``roles`` allows them: a confirmed PARTNER-DOWN past the
        MCLT) after them, oldest-freed first."""
        if self.partner_down_since is not None:
            self.unlock_pending()
        if self._held_heap:
            self.release_held()
        own = self.role
        for pass_own in (True, False):
            for fs in self._sets:
                if (fs.role == own or own is None) != pass_own:
                    continue
                if fs.subnet_id == subnet_id and (roles is None or fs.role in roles) and fs.free:
                    foreign = not pass_own or self.own_is_foreign
                    while True:
                        a = fs.take(reuse_first=not pass_own)
                        if a is None or not foreign:
                            break
                        # the partner's address (confirmed PARTNER-DOWN): its lease on
                        # it may run MCLT past its potential expiry
                        meta = self._meta.get(a)
                        until = (meta[3] if meta else 0.0) + (self.mclt_s or 0.0) \
                            + self.skew_margin_s
                        if until <= self._now():
                            break
                        fs.put(a)
                        self.hold(a, until)
                    if a is not None:
                        return a
        return None

    def _still_held_for(self, rec: Lease) -> bool:
        """Failover: a binding past its time that nobody can have given to
        another client -- still ``bound`` here (no expiry processed: the
        partner frees an address only after we acknowledged its expiry or
        release), so its client may renew it here (a lost update of the
        partner's renewal must not cost the client its address).  Not once we
        expired it ourselves: the partner may have applied that expiry and
        freed the address before our own record learns of its ack."""
        return self.role is not None and rec.state == BOUND

    def expiry_for(self, lease: "Lease | None", lease_time_s: float, now: float) -> float:
        """The expiry to give a client now on the address of ``lease`` (its
        current record, or None): ``now + lease_time_s``, and in failover at
        most ``max(partner-acked potential expiry, now) + mclt_s``
        (draft-ietf-dhc-failover-12: a lease never runs more than the MCLT
        beyond what the partner knows).  A new client gets the MCLT; its
        renewal after the partner's ack gets the full time."""
        end = now + float(lease_time_s)
        if self.mclt_s is None:
            return end
        acked = lease.acked if lease is not None else 0.0
        return min(end, max(acked, now) + self.mclt_s)

    @eager
    def offer(self, subnet_id: int, hwaddr: bytes | str | None, client_id: bytes | str | None = None,
              *, requested: str | None = None, roles: Iterable[str] | None = None,
              hostname: str = "", current: Lease | None | bool = False):
        """Pick an address for a DISCOVER and hold it for ``offer_timeout_s``.

        Preference: the client's pending offer; its reservation; its current
        or previous lease (same address back); the requested address (option
        50) if free and allocatable; else a free address from the segments of
        ``roles`` (``pools.allocation_roles``; None = any).  A bound,
        unexpired lease is returned unchanged.  The offer is held in memory
        only (no store write: RFC 2131 4.3.1 lets a server not reserve an
        offered address; the REQUEST's bind is the durable write), so no
        other DISCOVER gets the address until the offer times out.
        ``current``: the client's lease if the caller already looked it up.
        Fires with the Lease (state ``offered``), or None when no address is
        available.
        """
        sub = self._subnet(subnet_id)
        hw, cid = normalize_hwaddr(hwaddr), normalize_client_id(client_id)
        ck = client_key(hw, cid)
        roles = tuple(roles) if roles is not None else None
        for _ in range(_RETRIES):
            now = self._now()
            self.expire_offers(now)
            if current is False:
                current = yield self.find_client(subnet_id, hw, cid)
            if current is not None and current.state == BOUND and current.expires > now \
                    and not self._reserved_elsewhere(current, subnet_id, hw):
                return current
            pending = self._pending_offer(subnet_id, ck, now) if ck else None
            candidates: list[int] = []
            reserved = self._reserved_mac.get((subnet_id, hw))
            if reserved is not None:
                candidates.append(reserved)
            else:
                if pending is not None:
                    pa = self._aton(pending.address)
                    if self._allowed(pa, subnet_id, roles):
                        candidates.append(pa)
                    else:                  # made in PARTNER-DOWN on the partner's address
                        self._drop_offer(pa)
                if current is not None and not self._reserved_elsewhere(current, subnet_id, hw):
                    ca = self._aton(current.address)
                    if current.active(now) or self._allowed(ca, subnet_id, roles):
                        candidates.append(ca)
            if requested and reserved is None:
                try:
                    ra = self._fam.as_int(requested)
                except (ValueError, TypeError, OSError):
                    ra = None
                if ra is not None and self._fam.in_subnet(sub, ra) \
                        and ra not in self._reserved_addr and self._allowed(ra, subnet_id, roles):
                    candidates.append(ra)
            chosen, old = None, None
            for ca in candidates:
                if self._offered_to_other(ca, ck, now):
                    continue
                rec = yield self._get(self._ntoa(ca))
                if rec is not None and rec.holds(now) and rec.client_key != ck:
                    continue
                if self._blocked(ca, ck, rec, now):
                    continue               # pending-free: the partner may still renew it
                if not (rec is not None and rec.client_key == ck and rec.active(now)) \
                        and not self._foreign_wait_over(ca, now):
                    continue               # the partner's: its leases may still run
                if rec is not None and rec.state == DECLINED and rec.expires > now:
                    continue
                chosen, old = ca, rec
                break
            if chosen is None and reserved is not None:
                # the client's reserved address is held by someone else: a pool
                # address would only be NAKed at the REQUEST (bind refuses it), so
                # OFFER and REQUEST agree by staying silent (review M6)
                self.counters["reservation_busy"] = self.counters.get("reservation_busy", 0) + 1
                return None
            if chosen is None:
                chosen = self._take(subnet_id, roles)
                if chosen is None:
                    return None
                # the mirror may be behind a writer sharing the store: read it
                old = yield self._get(self._ntoa(chosen))
                if old is not None and (old.holds(now) and old.client_key != ck):
                    self._track(old)       # our mirror was behind: skip it
                    current = False
                    continue
            else:
                fs = self._set_for(chosen)
                if fs is not None:
                    fs.discard(chosen)
            lease = Lease(self._ntoa(chosen), subnet_id, OFFERED, hw, cid,
                          hostname or (old.hostname if old and old.client_key == ck else ""),
                          now + self.offer_timeout_s, now, self.node_id, self.node_id,
                          old.version if old is not None else 0, 0.0,
                          old.acked if old is not None else 0.0)
            self._hold_offer(lease)
            return lease
        return None

    def _reserved_elsewhere(self, lease: Lease, subnet_id: int, hw: str) -> bool:
        """True if the client has a reservation for another address, or the
        lease's address is reserved for another client."""
        a = self._aton(lease.address)
        mine = self._reserved_mac.get((subnet_id, hw))
        if mine is not None and mine != a:
            return True
        holder = self._reserved_addr.get(a)
        return holder is not None and holder != (subnet_id, hw)

    @eager
    def bind(self, subnet_id: int, address, hwaddr: bytes | str | None,
             client_id: bytes | str | None = None, *, lease_time_s: float,
             hostname: str = "", roles: Iterable[str] | None = None):
        """Bind (REQUEST: selecting, init-reboot, renewing, rebinding).

        Renews the client's own offered/bound lease on ``address`` whatever
        segment it is in; takes a free address only if it is allocatable
        (in a pool segment of ``roles``, or reserved for this client).
        Fires with the bound Lease, durable in the store; errbacks with
        :class:`AddressUnavailable` (NAK) or :class:`UnknownSubnet`.
        """
        sub = self._subnet(subnet_id)
        try:
            a = self._fam.as_int(address)
            address = self._ntoa(a)
        except (ValueError, TypeError, OSError):
            raise UnknownSubnet(f"{address!r} is not an {self._fam.what}") from None
        if not self._fam.in_subnet(sub, a):
            raise UnknownSubnet(f"{address} is not in subnet {sub.id} ({sub.network})")
        hw, cid = normalize_hwaddr(hwaddr), normalize_client_id(client_id)
        ck = client_key(hw, cid)
        roles = tuple(roles) if roles is not None else None
        holder = self._reserved_addr.get(a)
        if holder is not None and holder != (subnet_id, hw):
            raise AddressUnavailable(f"{address} is reserved for another client")
        mine = self._reserved_mac.get((subnet_id, hw))
        if mine is not None and mine != a:
            raise AddressUnavailable(f"client {hw} has a reservation for {self._ntoa(mine)}")
        for _ in range(_RETRIES):
            now = self._now()
            rec = yield self._get(address)
            if rec is not None and rec.state == DECLINED and rec.expires > now:
                raise AddressUnavailable(f"{address} is quarantined (declined)")
            if rec is not None and rec.holds(now) and rec.client_key != ck:
                raise AddressUnavailable(f"{address} is held by another client")
            if self._offered_to_other(a, ck, now):
                raise AddressUnavailable(f"{address} is offered to another client")
            if self._blocked(a, ck, rec, now):
                raise AddressUnavailable(f"{address} is pending-free (the partner has not "
                                         "acknowledged its expiry or release)")
            offered = self._offers.get(a)
            # our offer to this client counts only while we may still allocate the
            # address: an offer made in PARTNER-DOWN on the partner's address is
            # no licence once the partner is back (it may give the address now)
            renewal = (rec is not None and rec.client_key == ck and (
                rec.active(now) or self._still_held_for(rec))) or (
                offered is not None and offered.expires > now
                and (holder is not None or self._allowed(a, subnet_id, roles)))
            if not renewal and holder is None and not self._allowed(a, subnet_id, roles):
                raise AddressUnavailable(f"{address} is not an address this server may allocate")
            if not renewal and not self._foreign_wait_over(a, now):
                raise AddressUnavailable(f"{address}: the partner's lease on it may still run")
            current = yield self.find_client(subnet_id, hw, cid)
            supersede = current if (current is not None and current.address != address
                                    and current.active(now)) else None
            expires = self.expiry_for(rec, lease_time_s, now)
            # what we tell the partner the address may be held until: a renewal at
            # T1 (half the lease) after its ack is then within the MCLT of it
            pexp = now + 1.5 * float(lease_time_s) if self.mclt_s is not None else expires
            lease = Lease(address, subnet_id, BOUND, hw, cid,
                          hostname or (rec.hostname if rec and rec.client_key == ck else ""),
                          expires, now, self.node_id, self.node_id, 0, max(pexp, expires),
                          rec.acked if rec is not None else 0.0, False,
                          # a renewal keeps what DDNS published for the client
                          rec.ddns if rec is not None and rec.client_key == ck
                          and rec.state == BOUND else None)
            fs = self._set_for(a)
            was_free = fs is not None and fs.discard(a)
            try:
                written = yield self._commit(lease, rec, supersede=supersede)
            except Exception:
                if was_free:
                    fs.put(a)
                raise
            if written is not None:
                self._offers.pop(a, None)
                pending = self._offer_of.pop((subnet_id, ck), None)
                if pending is not None and pending != a:
                    self._drop_offer(pending)      # the client took another address
                return written
        raise AddressUnavailable(f"{address}: too many concurrent changes")

    @eager
    def release(self, address: str, hwaddr: bytes | str | None = None,
                client_id: bytes | str | None = None):
        """RELEASE (or RPC ``dhcp4.release`` without a client): the address is
        free again; the client keeps its index entry so it gets it back.
        Fires with the released Lease, or None if nothing (of that client) was held."""
        address = self._fam.canonical(address)
        ck = client_key(hwaddr, client_id) if (hwaddr or client_id) else None
        for _ in range(_RETRIES):
            now = self._now()
            rec = yield self.get(address)
            if rec is None or rec.state not in ACTIVE_STATES or (ck is not None and rec.client_key != ck):
                return None
            lease = replace(rec, state=RELEASED, expires=now, cltt=now, updated_by=self.node_id,
                            synced=False)
            written = yield self._commit(lease, rec)
            if written is not None:
                return written
        return None

    @eager
    def decline(self, address: str, hwaddr: bytes | str | None = None,
                client_id: bytes | str | None = None):
        """DECLINE: the address is in use on the wire; quarantine it for
        ``decline_quarantine_s`` and drop the client's index entry so it is
        offered a different address.  Fires with the declined Lease or None."""
        address = self._fam.canonical(address)
        ck = client_key(hwaddr, client_id) if (hwaddr or client_id) else None
        for _ in range(_RETRIES):
            now = self._now()
            rec = yield self.get(address)
            if rec is None or (ck is not None and rec.client_key != ck):
                return None
            lease = replace(rec, state=DECLINED, expires=now + self.decline_quarantine_s,
                            cltt=now, updated_by=self.node_id, synced=False)
            written = yield self._commit(lease, rec)
            if written is not None:
                return written
        return None

    @defer.inlineCallbacks
    def reclaim(self, limit: int = 500):
        """Expire what is due, from the expiry index, at most ``limit`` leases.

        offered/bound -> expired (client fields kept), declined -> free.
        Fires with the list of changed Leases (call again while it returns
        ``limit`` entries).  Never scans all leases.
        """
        now = self._now()
        self.expire_offers(now)
        if self.mclt_s is not None:
            # a partner's expiry is by its clock: expire only once it passed on
            # both clocks (our expiry may free the address here)
            now -= self.skew_margin_s
        due = yield self.store.zrangebyscore(self._expiry_key, 0, now, limit)
        changed = []
        for ip, _score in due:
            rec = yield self.get(ip)
            if rec is None or rec.state not in TIMED_STATES:
                yield self.store.zrem(self._expiry_key, ip)     # stale index entry
                continue
            if rec.expires > now:
                yield self.store.zadd(self._expiry_key, {ip: rec.expires})
                continue
            if rec.state == DECLINED:
                new = replace(rec, state=FREE, hwaddr="", client_id="", hostname="",
                              updated_by=self.node_id, synced=False)
            else:
                new = replace(rec, state=EXPIRED, updated_by=self.node_id, synced=False)
            written = yield self._commit(new, rec)
            if written is not None:
                changed.append(written)
        if changed:
            self.counters["reclaimed"] += len(changed)
            self._log.info("{tag}: {n} leases expired", tag=self._tag, n=len(changed))
        return changed

    # ------------------------------------------------------------------
    # failover merge
    # ------------------------------------------------------------------
    @staticmethod
    def _newer(a: Lease, b: Lease) -> bool:
        """True if ``a`` beats ``b``: later cltt; on a tie the later state of a
        client's life (released/declined after expired after bound after
        offered: a release or an expiry keeps or takes the binding's cltt),
        then the later expiry, then the higher (updated_by, state), then the
        later DDNS-only change of the same binding (``dv``) -- the same answer
        on both nodes."""
        return (a.cltt, _RANK.get(a.state, 0), a.expires, a.updated_by, a.state, a.dv) > \
            (b.cltt, _RANK.get(b.state, 0), b.expires, b.updated_by, b.state, b.dv)

    @eager
    def apply_remote(self, remote: Lease, *, without_data: bool = False):
        """Merge a partner's lease (update or sync page entry).

        The lease with the newer client-last-transaction time wins.  When
        both sides hold the address for different clients (a partition) it
        is a conflict: counted and logged, the newer cltt wins, and the
        loser's client index entry is removed so no address ends with two
        active clients.  A client keeps one active lease per subnet: if the
        winning remote lease moves a client, its older local lease expires.

        Fires with APPLIED, STALE, CONFLICT_REMOTE_WON, CONFLICT_LOCAL_WON
        (the caller should send the local lease back) or REJECTED (unknown
        subnet / address outside it).
        """
        sub = self._subnets.get(remote.subnet_id)
        try:
            a = self._aton(self._fam.canonical(remote.address))
        except (ValueError, OSError, TypeError):
            a = None
        if sub is None or a is None or remote.state not in STATES \
                or not self._fam.in_subnet(sub, a):
            self.counters["remote_rejected"] += 1
            self._log.warn("rejected partner lease {address} (subnet {subnet}): not configured here",
                           address=remote.address, subnet=remote.subnet_id)
            return REJECTED
        address = self._ntoa(a)
        if without_data and self.mclt_s is not None:
            # a recovery sync after we lost our data: we may have extended this
            # binding, or given the address (released, expired) to a new client, up
            # to MCLT beyond the potential expiry the partner knew, without telling it
            until = max(remote.expires, remote.pexp, remote.acked) + self.mclt_s \
                + self.skew_margin_s
            if until > self._now():
                self.hold(a, until)
        for _ in range(_RETRIES):
            now = self._now()
            local = yield self._get(address)
            rck = remote.client_key
            conflict = (local is not None and local.active(now) and remote.active(now)
                        and local.client_key != rck)
            # a record that frees the address (released, expired, ...) of client X
            # never ends a binding of another client Y here (review M2): Y's
            # lease stands and goes back to the partner
            frees_other = (local is not None and local.active(now) and not remote.active(now)
                           and local.client_key != rck)
            # the mirror: a partner's active binding of client Y never loses, on cltt
            # alone, to a local record that freed the address for another client X --
            # the two cltts come from two clocks (sim seed 14233: a release at a node
            # 0.67 s ahead looked newer than the partner's later binding, the address
            # stayed free here and went to a second client); Y may use the address
            binds_freed = (local is not None and remote.active(now) and not local.active(now)
                           and local.state in (FREE, RELEASED, EXPIRED)
                           and local.client_key != rck)
            if local is not None and (frees_other or (not binds_freed
                                                      and not self._newer(remote, local))):
                if conflict:
                    self._conflict(local, remote, winner="local")
                    yield self._drop_index_if(remote.subnet_id, rck, address)
                    return CONFLICT_LOCAL_WON
                if local.active(now) and not remote.active(now):
                    # the partner expires/releases what we renewed (or gave to
                    # another client): our record must reach it before it frees
                    # the address
                    self.counters["remote_stale"] += 1
                    return LOCAL_WON
                self.counters["remote_stale"] += 1
                return STALE
            supersede, set_index = None, True
            # the partner has this record and its potential expiry
            new = _synced(remote, max(remote.pexp, remote.expires), address)
            if rck and remote.state in ACTIVE_STATES:
                other = yield self.find_client(remote.subnet_id, remote.hwaddr, remote.client_id)
                if other is not None and other.address != address and other.active(now):
                    if not self._fam.one_lease_per_client:
                        # DHCPv6: the client may be using either binding (both partners
                        # answered its rapid-commit SOLICIT): neither ends early; the
                        # client index follows the newer, the other runs to its expiry
                        set_index = self._newer(remote, other)
                    elif self._newer(remote, other):
                        supersede = other          # the client moved: its old lease ends
                    else:
                        # the client has a newer lease here: keep the partner's record
                        # for history, but not as a second active lease of that client
                        new = replace(new, state=EXPIRED, expires=min(new.expires, now))
                        set_index = False
            written = yield self._commit(new, local, supersede=supersede, set_index=set_index)
            if written is None:
                continue
            offered = self._offers.get(a)
            if offered is not None and new.active(now) and offered.client_key != rck:
                # the partner bound the address to another client: our offer (a
                # promise to nobody) goes, or that client's renewals here would
                # be NAKed as "offered to another client" (sim seed 7609)
                self._drop_offer(a)
            if conflict:
                self._conflict(local, remote, winner="remote")
                return CONFLICT_REMOTE_WON
            self.counters["remote_applied"] += 1
            return APPLIED
        return STALE

    @eager
    def mark_synced(self, sent: Lease):
        """The partner acknowledged ``sent`` (a record we sent it): if it is
        still our version of the address, remember that the partner has it
        and the potential expiry it acknowledged.  A pending-free address
        becomes free.  Fires with True if the record was marked."""
        a = self._aton(sent.address)
        meta = self._meta.get(a)
        if meta is None or meta[0] != sent.version:
            return False               # changed since: the newer version is owed
        rec = yield self._get(sent.address)
        if rec is None or rec.version != sent.version or rec.synced:
            return False
        if not self.trust_acks and rec.state in (RELEASED, EXPIRED):
            return False               # stays pending-free (and owed: sent again later)
        acked = max(rec.acked, sent.pexp, sent.expires)
        ops = [Op.hset(self._lease_key(sent.address), {"synced": "1", "acked": _f(acked)})]
        expect = {self._version_key(sent.address): str(sent.version)}
        if self._commit_now is not None:
            self.writes += 1
            done = self._commit_now(ops, expect)
        else:
            done = yield self.store.commit(ops, expect)
        if not done:
            return False
        self._track(_synced(rec, acked))
        return True

    def mark_synced_many(self, recs: list[Lease]):
        """:meth:`mark_synced` for the records of one partner ack (``recs``: our stored
        records the partner reported, read just before), in ONE guarded store commit
        when writes are immediate (the embedded store) instead of a commit per record;
        one by one otherwise, or when the one commit's guard fails (a record changed
        behind the mirror).  The same rules as :meth:`mark_synced`.  Returns how many
        were marked (a Deferred of it when it had to wait)."""
        if self._commit_now is None or len(recs) < 2:
            return self._mark_each(recs)
        ops, expect, marked = [], {}, []
        meta_of = self._meta.get
        for rec in recs:
            meta = meta_of(self._aton(rec.address))
            if meta is None or meta[0] != rec.version or rec.synced:
                continue
            if not self.trust_acks and rec.state in (RELEASED, EXPIRED):
                continue
            vkey = self._version_key(rec.address)
            if vkey in expect:
                continue
            acked = max(rec.acked, rec.pexp, rec.expires)
            ops.append(Op.hset(self._lease_key(rec.address),
                               {"synced": "1", "acked": _f(acked)}))
            expect[vkey] = str(rec.version)
            marked.append(_synced(rec, acked))
        if not ops:
            return 0
        try:
            # lazy: no transaction of its own (nothing waits for a synced marker; its
            # loss in a crash only resends the records and keeps their lifetimes at
            # the MCLT cap): it goes with the next commit, so whatever is acknowledged
            # after it (a pending-free address given again) is durable after it
            if self._lazy_ok:
                done = self._commit_now(ops, expect, lazy=True)
            else:
                self.writes += 1
                done = self._commit_now(ops, expect)
        except StoreError:
            return defer.fail()
        if not done:
            return self._mark_each(recs)
        for rec in marked:
            self._track(rec)
        return len(marked)

    def _mark_each(self, recs: list[Lease]):
        results = [self.mark_synced(rec) for rec in recs]
        waits = [r for r in results if isinstance(r, defer.Deferred)]
        n = sum(1 for r in results if r is True)
        if not waits:
            return n
        return defer.gatherResults(waits, consumeErrors=True).addCallback(
            lambda rs: n + sum(1 for r in rs if r is True))

    @eager
    def set_ddns(self, lease: Lease, ddns: DDNSState | None):
        """Record ``ddns`` on ``lease``'s address if the stored record is still
        ``lease`` (same version), in one commit.  ``dv`` counts the change: the
        partner's merge takes it although cltt, state and expiry are the same
        (it would call it stale otherwise).  A bound record becomes owed to the
        partner (it must know what was published, to remove it on expiry when
        it is the one left); an expired or released record keeps its
        ``synced`` (were it owed again, the address would be pending-free
        again until the partner acks) and the change travels with its next
        update.  Fires with the written Lease, or None when the record changed
        meanwhile."""
        rec = yield self._get(lease.address)
        if rec is None or rec.version != lease.version or rec.ddns == ddns:
            return None
        synced = rec.synced and (rec.state != BOUND or self.role is None)
        # set_index=False: a released/expired record must not take the client's index
        # back from the lease it holds now
        written = yield self._commit(replace(rec, ddns=ddns, dv=rec.dv + 1, synced=synced), rec,
                                     set_index=False)
        return written

    def _conflict(self, local: Lease, remote: Lease, winner: str) -> None:
        self.counters["conflicts"] += 1
        self._log.warn(
            "{tag} lease conflict on {address}: local {lck} (cltt {lcltt}) vs partner {rck} "
            "(cltt {rcltt}); {winner} kept (newer client transaction)",
            tag=self._tag, address=local.address, lck=local.client_key, lcltt=local.cltt,
            rck=remote.client_key, rcltt=remote.cltt, winner=winner)

    @eager
    def _drop_index_if(self, subnet_id: int, ck: str, address: str):
        if not ck:
            return False
        key = self._client_index_key(subnet_id, ck)
        value = yield self._index_get(key)
        if value != address:
            return False
        if self._commit_now is not None:
            self.writes += 1
            return self._commit_now([Op.delete(key)], {key: value})
        ok = yield self.store.commit([Op.delete(key)], {key: value})
        return ok

    def durable(self) -> defer.Deferred:
        """Fires when every write made so far is on disk (``immediate_writes``;
        otherwise each method already waited: fires at once)."""
        if self._commit_now is not None:
            return self.store.durable()
        return defer.succeed(None)

    @defer.inlineCallbacks
    def export(self, cursor: str | None = None, limit: int = 1000):
        """A page of full leases for the partner's sync (RECOVER):
        ``([wire dicts], next_cursor)``, ordered by address."""
        if self._sorted is None:
            self._sorted = sorted(self._meta)
        order = self._sorted
        start = 0 if cursor is None else bisect.bisect_right(order, self._fam.as_int(cursor))
        page = order[start:start + limit]
        out = []
        for a in page:
            lease = yield self._get(self._ntoa(a))
            if lease is not None:
                out.append(lease.to_wire())
        nxt = self._ntoa(page[-1]) if page and start + limit < len(order) else None
        return out, nxt
