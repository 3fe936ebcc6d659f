"""Several lease families of one service behind one lease-store face, and the
small scope shapes a :class:`~services.dhcp.failover.leases.LeaseStore` reads.

DHCPv6 keeps IA_NA addresses and IA_PD prefixes in two stores (families
``DHCP6_NA`` and ``DHCP6_PD``) but has one partner and one peer-link channel
(``dhcp6``).  :class:`LeaseStores` gives
:class:`~services.dhcp.failover.partner.FailoverPartner` what it uses of a
lease store, dispatching each address to its family: a prefix's text has a
``/`` and its int is ``>= 2**128``; an address's has neither.  Wire dicts
carry the address text, so the partner messages need no family field.

The scope shapes (:class:`ScopeConfig`, :class:`Scope`, :class:`ScopePool`,
:class:`ScopeReservation`) are the duck type a LeaseStore's ``config`` must
have (``services/dhcp/v4/config.py``'s Dhcp4Config is one); a v6 service
builds one per family from its own config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from twisted.internet import defer

from services.dhcp.failover.config import Failover
from services.dhcp.failover.leases import Lease, LeaseStore

__all__ = ["LeaseStores", "ScopeConfig", "Scope", "ScopePool", "ScopeReservation"]


@dataclass(frozen=True)
class ScopePool:
    """Addresses (or prefixes) ``first..last``: ints of the family, or text
    it accepts (``"2001:db8::10"``, ``"2001:db8:0:100::/56"``)."""

    first: Any
    last: Any
    size: int = 0


@dataclass(frozen=True)
class ScopeReservation:
    """``address`` for the client whose lease ``hwaddr`` is ``hwaddr``
    (v6: the DUID in colon hex, ``family.v6_client``)."""

    address: Any
    hwaddr: str


@dataclass(frozen=True)
class Scope:
    """One subnet (v6 NA: the link's prefix; PD: the parent prefix the pool's
    prefixes of ``delegated_len`` are cut from).  ``id`` must be the same on
    both partners."""

    id: int
    network: Any                                   # ipaddress network
    pools: tuple[ScopePool, ...] = ()
    reservations: tuple[ScopeReservation, ...] = ()
    delegated_len: int = 0                         # PD only
    lease_time_s: float = 3600.0


@dataclass(frozen=True)
class ScopeConfig:
    """What a LeaseStore reads of its config."""

    subnets: tuple[Scope, ...]
    failover: Failover | None = None
    offer_timeout_s: float = 60.0
    decline_quarantine_s: float = 86400.0
    extra: dict = field(default_factory=dict)

    def subnet_for(self, address) -> Scope | None:
        for s in self.subnets:
            try:
                if address in s.network:
                    return s
            except TypeError:
                continue
        return None


class LeaseStores:
    """Lease stores of several families (e.g. ``{"na": ..., "pd": ...}``) as
    the one lease store FailoverPartner drives: the setters apply to all,
    the per-address calls go to the address's family, the rest add up."""

    def __init__(self, stores: dict[str, LeaseStore]):
        if not stores:
            raise ValueError("no lease stores")
        self.stores = dict(stores)
        self._list = list(self.stores.values())
        #: a prefix text (with a ``/``) goes to the prefix family's store first, any
        #: other text to the others (one conversion, not one exception per family)
        self._by_slash = {True: [s for s in self._list if s.family.name.endswith(":pd")],
                          False: [s for s in self._list if not s.family.name.endswith(":pd")]}
        for want_pd in (True, False):
            self._by_slash[want_pd] += [s for s in self._list if s not in self._by_slash[want_pd]]
        #: every store journals into the same state store the same way: one durable()
        #: wait covers them all (no DeferredList per REPLY)
        first = self._list[0]
        self._one_durable = first if all(
            s.store is first.store and (s._commit_now is None) == (first._commit_now is None)
            for s in self._list[1:]) else None

    def __getitem__(self, key: str) -> LeaseStore:
        return self.stores[key]

    # -- dispatch -------------------------------------------------------
    def store_for(self, address: str) -> LeaseStore:
        """The store of an address (or prefix) text; ValueError if none takes it."""
        order = self._by_slash[isinstance(address, str) and "/" in address]
        for s in order:
            try:
                s.family.canonical(address)
            except (ValueError, TypeError, OSError):
                continue
            return s
        raise ValueError(f"{address!r}: no lease family here takes it")

    def _store_for_int(self, a: int) -> LeaseStore:
        # prefix ints carry their length above bit 128 (family.prefix_int)
        want_pd = a >= (1 << 128)
        for s in self._list:
            if (s.family.name.endswith(":pd")) == want_pd:
                return s
        return self._list[0]

    # -- what FailoverPartner reads and sets ------------------------------
    def _all(self, name: str, value) -> None:
        for s in self._list:
            setattr(s, name, value)

    trust_acks = property(lambda self: self._list[0].trust_acks,
                          lambda self, v: self._all("trust_acks", v))
    own_is_foreign = property(lambda self: self._list[0].own_is_foreign,
                              lambda self, v: self._all("own_is_foreign", v))
    partner_down_since = property(lambda self: self._list[0].partner_down_since,
                                  lambda self, v: self._all("partner_down_since", v))
    on_unsynced = property(lambda self: self._list[0].on_unsynced,
                           lambda self, v: self._all("on_unsynced", v))

    @property
    def skew_margin_s(self) -> float:
        return self._list[0].skew_margin_s

    @property
    def writes(self) -> int:
        return sum(s.writes for s in self._list)

    @property
    def unsynced(self) -> dict[str, None]:
        out: dict[str, None] = {}
        for s in self._list:
            out.update(s.unsynced)
        return out

    @property
    def loaded(self) -> bool:
        return all(s.loaded for s in self._list)

    def durable(self) -> defer.Deferred:
        if self._one_durable is not None:
            return self._one_durable.durable()
        return defer.gatherResults([s.durable() for s in self._list], consumeErrors=True)

    def load(self) -> defer.Deferred:
        return defer.gatherResults([s.load() for s in self._list],
                                   consumeErrors=True).addCallback(sum)

    def _get(self, address: str):
        return self.store_for(address)._get(address)

    def get(self, address: str):
        return self.store_for(address).get(address)

    def mark_synced(self, sent: Lease):
        return self.store_for(sent.address).mark_synced(sent)

    def mark_synced_many(self, recs: list[Lease]):
        """LeaseStore.mark_synced_many per family (one commit each); how many were
        marked (a Deferred of it when one had to wait)."""
        groups: dict[int, tuple[LeaseStore, list]] = {}
        for rec in recs:
            st = self.store_for(rec.address)
            groups.setdefault(id(st), (st, []))[1].append(rec)
        results = [st.mark_synced_many(group) for st, group in groups.values()]
        waits = [r for r in results if isinstance(r, defer.Deferred)]
        n = sum(r for r in results if not isinstance(r, defer.Deferred))
        if not waits:
            return n
        return defer.gatherResults(waits, consumeErrors=True).addCallback(lambda rs: n + sum(rs))

    def apply_remote(self, remote: Lease, *, without_data: bool = False):
        return self.store_for(remote.address).apply_remote(remote, without_data=without_data)

    def lease_from_wire(self, d) -> Lease:
        try:
            address = d["address"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed lease: {e!r}") from None
        return self.store_for(address).lease_from_wire(d)

    def address_int(self, address: str) -> int:
        return self.store_for(address).address_int(address)

    def hold(self, address: int, until: float, *, persist: bool = True) -> None:
        self._store_for_int(address).hold(address, until, persist=persist)

    def held_until(self, address: str) -> float | None:
        try:
            return self.store_for(address).held_until(address)
        except ValueError:
            return None

    def unlock_pending(self, now: float | None = None) -> int:
        return sum(s.unlock_pending(now) for s in self._list)

    def release_held(self, now: float | None = None) -> int:
        return sum(s.release_held(now) for s in self._list)

    def segment_role(self, address) -> str | None:
        try:
            return self.store_for(address).segment_role(address)
        except ValueError:
            return None

    @property
    def pending_free(self) -> int:
        return sum(s.pending_free for s in self._list)

    def reclaim(self, limit: int = 500) -> defer.Deferred:
        """Each store reclaims up to ``limit``; fires with every changed lease."""
        d = defer.gatherResults([s.reclaim(limit) for s in self._list], consumeErrors=True)
        return d.addCallback(lambda lists: [lease for one in lists for lease in one])

    @defer.inlineCallbacks
    def export(self, cursor: str | None = None, limit: int = 1000):
        """A page of every store in turn; the cursor is ``<key>|<store cursor>``."""
        keys = list(self.stores)
        start, inner = 0, None
        if cursor:
            key, _, inner = cursor.partition("|")
            start = keys.index(key) if key in keys else 0
            inner = inner or None
        for i in range(start, len(keys)):
            page, nxt = yield self.stores[keys[i]].export(inner, limit)
            if nxt is not None:
                return page, f"{keys[i]}|{nxt}"
            if page or i == len(keys) - 1:
                more = i < len(keys) - 1
                return page, (f"{keys[i + 1]}|" if more else None)
            inner = None
        return [], None

    def stats(self) -> dict[str, Any]:
        return {key: s.stats() for key, s in self.stores.items()}

    def expire_offers(self, now: float | None = None) -> int:
        return sum(s.expire_offers(now) for s in self._list)

    def each(self) -> Iterable[tuple[str, LeaseStore]]:
        return self.stores.items()
