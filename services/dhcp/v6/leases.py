"""DHCPv6 leases (IA_NA addresses and IA_PD prefixes) for a single server.

This is the allocation interface the v6 handler is written against
(:class:`Allocator`): ``find`` / ``offer`` / ``bind`` / ``release`` /
``decline`` per IA, ``reclaim`` for what is due, ``durable`` for the
ACK-after-durable rule.  :class:`LeaseStore6` implements it on the shared
state store for one node; the failover core (services/dhcp/failover/, by
dhcp-core) is meant to take its place for a pair without changing the
handler.

The per-request methods are synchronous: the lease table lives in memory
(loaded once from the store at start) and every change is written to the
store at once (``commit_now`` on an embedded store, else ``commit``); the
caller waits on :meth:`LeaseStore6.durable` before it answers anybody.

Store layout (keys and values ``str``)::

    dhcp6:na:lease:<address>         hash: an IA_NA lease (Lease6.to_hash)
    dhcp6:pd:lease:<prefix>/<len>    hash: an IA_PD lease
    dhcp6:server-duid:<node id>      plain: this node's server DUID (hex)

States: ``offered`` (in memory only: an ADVERTISE holds the address for
``offer_timeout_s`` so a burst of SOLICITs does not get one address
twice), ``bound`` (until ``expires``, the valid lifetime's end),
``declined`` (held for nobody until the quarantine ends), ``released`` and
``expired`` (free; the record keeps its client so a returning client gets
the same address or prefix back while nobody took it: lease stability).

Allocation never scans: each pool is a range of integer slots (an address,
or a prefix index for IA_PD) with a cursor over never-used slots and a FIFO
of slots freed again, so a just-freed slot is reused last.
"""

from __future__ import annotations

import heapq
import socket
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol

from twisted.internet import defer
from twisted.logger import Logger

from appliance.store.interface import IImmediateStore, Op

from services.dhcp.v6.config import Dhcp6Config, Subnet

_log = Logger(namespace="services.dhcp6")
NA, PD = "na", "pd"
KINDS = (NA, PD)
STATES = ("offered", "bound", "declined", "released", "expired")
HOLDING = ("offered", "bound", "declined")
PREFIX = "dhcp6:"


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

    def holds(self, now: float) -> bool:
        return self.state in HOLDING and self.expires > now

    def to_hash(self) -> dict[str, str]:
        return {"kind": self.kind, "address": self.address, "subnet": str(self.subnet_id),
                "duid": self.duid, "iaid": str(self.iaid), "state": self.state,
                "expires": repr(self.expires), "preferred_until": repr(self.preferred_until),
                "cltt": repr(self.cltt), "owner": self.owner, "hostname": self.hostname,
                "ddns": self.ddns}

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> "Lease6 | None":
        try:
            return cls(h["kind"], h["address"], int(h["subnet"]), h.get("duid", ""),
                       int(h.get("iaid", 0)), h.get("state", "expired"),
                       float(h.get("expires", 0)), float(h.get("preferred_until", 0)),
                       float(h.get("cltt", 0)), h.get("owner", ""), h.get("hostname", ""),
                       h.get("ddns", ""))
        except (KeyError, ValueError):
            return None

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


@dataclass
class _Range:
    """Slots ``start + i * step`` for ``i`` in ``range(count)`` (``plen``: prefix length, PD)."""

    start: int
    count: int
    step: int = 1
    plen: int | None = None

    def text(self, i: int) -> str:
        return key_text(self.start + i * self.step, self.plen)


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


def _sort_key(kind: str, address: str) -> tuple:
    a, plen = parse_key(kind, address)
    return (0 if kind == NA else 1, a, plen or 0)


class LeaseStore6:
    """IA_NA and IA_PD leases of one node, on the shared state store."""

    def __init__(self, store, config: Dhcp6Config, owner: str, *, now: Callable[[], float]):
        self.store = store
        self.config = config
        self.owner = owner
        self.now = now
        self.writes = 0
        self._immediate = IImmediateStore.providedBy(store)
        self._pending: list[defer.Deferred] = []
        self.write_errors = 0
        self._by_addr: dict[str, dict[str, Lease6]] = {NA: {}, PD: {}}
        self._by_client: dict[tuple, list[str]] = {}
        self._heap: list[tuple[float, str, str]] = []
        # per (kind, subnet id): [(range, cursor, freed deque)]
        self._pools: dict[tuple[str, int], list[list]] = {}
        self._reserved: dict[str, set[str]] = {NA: set(), PD: set()}
        self._size: dict[tuple[str, int], int] = {}
        self._build_pools()

    # -- setup ---------------------------------------------------------
    def _build_pools(self) -> None:
        for s in self.config.subnets:
            na = [[_Range(int(p.first), p.size), 0, deque()] for p in s.pools]
            pd = [[_Range(int(p.prefix.network_address), p.size,
                          1 << (128 - p.delegated_length), p.delegated_length), 0, deque()]
                  for p in s.pd_pools]
            self._pools[(NA, s.id)] = na
            self._pools[(PD, s.id)] = pd
            self._size[(NA, s.id)] = sum(p.size for p in s.pools)
            self._size[(PD, s.id)] = sum(p.size for p in s.pd_pools)
            for r in s.reservations:
                if r.address is not None:
                    self._reserved[NA].add(str(r.address))
                if r.prefix is not None:
                    self._reserved[PD].add(str(r.prefix))

    @defer.inlineCallbacks
    def load(self):
        """Read every lease record once (paged scan); returns how many."""
        n = 0
        for kind in KINDS:
            prefix = f"{PREFIX}{kind}:lease:"
            cursor = None
            while True:
                cursor, keys = yield self.store.scan(prefix, cursor, 500)
                for key in keys:
                    h = yield self.store.hgetall(key)
                    lease = Lease6.from_hash(h or {})
                    if lease is None or lease.kind != kind:
                        continue
                    self._index(lease)
                    n += 1
                if cursor is None:
                    break
        return n

    # -- index ---------------------------------------------------------
    def _client_key(self, lease: Lease6) -> tuple:
        return (lease.kind, lease.subnet_id, lease.duid, lease.iaid)

    def _index(self, lease: Lease6) -> None:
        old = self._by_addr[lease.kind].get(lease.address)
        if old is not None and old.duid and (old.duid, old.iaid) != (lease.duid, lease.iaid):
            self._unclient(old)
        self._by_addr[lease.kind][lease.address] = lease
        if lease.duid:
            addrs = self._by_client.setdefault(self._client_key(lease), [])
            if lease.address in addrs:
                addrs.remove(lease.address)
            addrs.append(lease.address)
        if lease.state in HOLDING:
            heapq.heappush(self._heap, (lease.expires, lease.kind, lease.address))

    def _unclient(self, lease: Lease6) -> None:
        addrs = self._by_client.get(self._client_key(lease))
        if addrs and lease.address in addrs:
            addrs.remove(lease.address)
            if not addrs:
                del self._by_client[self._client_key(lease)]

    def _persist(self, lease: Lease6) -> None:
        ops = [Op.hset(f"{PREFIX}{lease.kind}:lease:{lease.address}", lease.to_hash())]
        self.writes += 1
        if self._immediate:
            self.store.commit_now(ops)
            return
        d = self.store.commit(ops)
        self._pending.append(d)

        def done(result):
            if d in self._pending:
                self._pending.remove(d)
            return result
        d.addBoth(done)

    def durable(self) -> defer.Deferred:
        """Fires once every write made so far is durable (fails if one could not be)."""
        if self._immediate:
            return self.store.durable()
        if not self._pending:
            return defer.succeed(None)
        return defer.gatherResults(list(self._pending), consumeErrors=True)

    def _free(self, kind: str, address: str, now: float) -> bool:
        lease = self._by_addr[kind].get(address)
        return address not in self._reserved[kind] and (lease is None or not lease.holds(now))

    def _in_pool(self, kind: str, subnet_id: int, address: str) -> bool:
        try:
            a, plen = parse_key(kind, address)
        except ValueError:
            return False
        for rng, _c, _f in self._pools.get((kind, subnet_id), ()):
            if plen is not None and plen != rng.plen:
                continue
            off = a - rng.start
            if 0 <= off < rng.count * rng.step and off % rng.step == 0:
                return True
        return False

    def _take(self, kind: str, subnet_id: int, now: float) -> str | None:
        for entry in self._pools.get((kind, subnet_id), ()):
            rng, _cursor, freed = entry
            while entry[1] < rng.count:
                text = rng.text(entry[1])
                entry[1] += 1
                if self._free(kind, text, now):
                    return text
            for _ in range(len(freed)):
                text = freed.popleft()
                if self._free(kind, text, now):
                    return text
        return None

    def _freed(self, lease: Lease6) -> None:
        for rng, _c, freed in self._pools.get((lease.kind, lease.subnet_id), ()):
            freed.append(lease.address)
            return

    # -- the allocation interface --------------------------------------
    def get(self, kind: str, address: str) -> Lease6 | None:
        try:
            return self._by_addr[kind].get(address_key(kind, address))
        except ValueError:
            return None

    def find(self, kind: str, subnet_id: int, duid: str, iaid: int) -> list[Lease6]:
        addrs = self._by_client.get((kind, subnet_id, duid, iaid), ())
        return [self._by_addr[kind][a] for a in addrs]

    def find_duid(self, duid: str) -> list[Lease6]:
        return [le for kind in KINDS for le in self._by_addr[kind].values() if le.duid == duid]

    def offer(self, kind: str, subnet: Subnet, duid: str, iaid: int,
              hints: list[str] = ()) -> Lease6 | None:
        """An address/prefix this client may have (held ``offer_timeout_s``
        in memory), or None when the pool has nothing for it."""
        now = self.now()
        mine = self.find(kind, subnet.id, duid, iaid)
        for lease in reversed(mine):               # its current or last one (stability)
            if lease.holds(now) and lease.state != "declined":
                return lease
        res = subnet.reservation_for(duid)
        if res is not None:
            want = res.address if kind == NA else res.prefix
            if want is not None:
                return self._hold(kind, subnet, duid, iaid, str(want), now)
        for lease in reversed(mine):
            if lease.state in ("released", "expired") and self._free(kind, lease.address, now) \
                    and self._in_pool(kind, subnet.id, lease.address):
                return self._hold(kind, subnet, duid, iaid, lease.address, now)
        for hint in hints:
            try:
                key = address_key(kind, hint)
            except ValueError:
                continue
            if self._in_pool(kind, subnet.id, key) and self._free(kind, key, now):
                return self._hold(kind, subnet, duid, iaid, key, now)
        text = self._take(kind, subnet.id, now)
        if text is None:
            return None
        return self._hold(kind, subnet, duid, iaid, text, now)

    def _hold(self, kind, subnet, duid, iaid, address, now) -> Lease6:
        old = self._by_addr[kind].get(address)
        lease = Lease6(kind, address, subnet.id, duid, iaid, "offered",
                       now + self.config.offer_timeout_s, 0.0, now, self.owner,
                       old.hostname if old is not None and old.duid == duid else "",
                       old.ddns if old is not None and old.duid == duid else "")
        self._index(lease)
        return lease

    def bind(self, kind: str, subnet: Subnet, duid: str, iaid: int, address: str,
             preferred_s: int, valid_s: int, hostname: str | None = None) -> Lease6:
        """Bind ``address`` to the client for ``valid_s``; :class:`Unavailable`
        when another client holds it or it is neither in a pool nor reserved for it."""
        now = self.now()
        key = address_key(kind, address)
        old = self._by_addr[kind].get(key)
        res = subnet.reservation_for(duid)
        reserved_here = res is not None and str(res.address if kind == NA else res.prefix) == key
        if old is not None and old.holds(now) and (old.duid, old.iaid) != (duid, iaid):
            raise Unavailable(key)
        if not reserved_here and (key in self._reserved[kind]
                                  or not self._in_pool(kind, subnet.id, key)):
            raise Unavailable(key)
        same = old is not None and old.duid == duid
        lease = Lease6(kind, key, subnet.id, duid, iaid, "bound", now + valid_s,
                       now + preferred_s, now, self.owner,
                       hostname if hostname is not None else (old.hostname if same else ""),
                       old.ddns if same else "")
        self._index(lease)
        self._persist(lease)
        return lease

    def release(self, kind: str, address: str, duid: str | None = None,
                iaid: int | None = None) -> Lease6 | None:
        """Free a bound lease (of this client when ``duid`` is given); None if none."""
        now = self.now()
        lease = self.get(kind, address)
        if lease is None or lease.state != "bound" or lease.expires <= now:
            return None
        if duid is not None and (lease.duid, lease.iaid) != (duid, iaid):
            return None
        lease = replace(lease, state="released", expires=now, preferred_until=now, cltt=now)
        self._index(lease)
        self._persist(lease)
        self._freed(lease)
        return lease

    def decline(self, kind: str, address: str, duid: str, iaid: int) -> Lease6 | None:
        now = self.now()
        lease = self.get(kind, address)
        if lease is None or not lease.holds(now) or (lease.duid, lease.iaid) != (duid, iaid):
            return None
        self._unclient(lease)
        declined = replace(lease, state="declined", duid="", iaid=0, hostname="",
                           expires=now + self.config.decline_quarantine_s, cltt=now)
        self._index(declined)
        self._persist(declined)
        return lease

    def set_ddns(self, lease: Lease6, ddns: str) -> None:
        current = self._by_addr[lease.kind].get(lease.address)
        if current is None or current.duid != lease.duid:
            return
        current.ddns = ddns
        self._persist(current)

    def reclaim(self, limit: int = 500) -> list[Lease6]:
        """Expire what is due (bound -> expired, offered -> dropped, declined ->
        free); at most ``limit``; returns the bound leases that expired."""
        now = self.now()
        out: list[Lease6] = []
        done = 0
        while self._heap and self._heap[0][0] <= now and done < limit:
            _, kind, address = heapq.heappop(self._heap)
            lease = self._by_addr[kind].get(address)
            if lease is None or lease.state not in HOLDING or lease.expires > now:
                continue
            done += 1
            if lease.state == "offered":
                # an ADVERTISE's hold: forget it (an older record, if any, stays free)
                free = replace(lease, state="expired")
                self._by_addr[kind][address] = free
                self._freed(free)
                continue
            free = replace(lease, state="expired")
            self._index(free)
            self._persist(free)
            self._freed(free)
            if lease.state == "bound":
                out.append(free)
        return out

    # -- admin ---------------------------------------------------------
    def leases(self, subnet: int | None = None, state: str | None = None, kind: str | None = None,
               limit: int = 100, cursor: str | None = None) -> dict[str, Any]:
        rows = [le for k in ((kind,) if kind else KINDS) for le in self._by_addr[k].values()
                if (subnet is None or le.subnet_id == subnet)
                and (state is None or le.state == state) and le.state != "offered"]
        rows.sort(key=lambda le: _sort_key(le.kind, le.address))
        if cursor:
            kind_c, _, addr_c = cursor.partition(":")
            try:
                after = _sort_key(kind_c, addr_c)
            except ValueError:
                after = None
            if after is not None:
                rows = [le for le in rows if _sort_key(le.kind, le.address) > after]
        page = rows[:limit]
        nxt = f"{page[-1].kind}:{page[-1].address}" if len(rows) > limit else None
        return {"leases": [le.to_json() for le in page], "cursor": nxt}

    def free_count(self, kind: str, subnet_id: int) -> int:
        now = self.now()
        used = sum(1 for le in self._by_addr[kind].values()
                   if le.subnet_id == subnet_id and le.holds(now))
        return max(0, self._size.get((kind, subnet_id), 0) - used)

    def stats(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for kind in KINDS:
            counts = {s: 0 for s in STATES}
            for le in self._by_addr[kind].values():
                counts[le.state] = counts.get(le.state, 0) + 1
            out[kind] = counts
        return out
