"""DHCPv6 on the failover core: the handler's allocation interface
(``leases.py``'s :class:`~services.dhcp.v6.leases.Allocator`) over the core's
lease stores, one per lease type, so a dhcp6 pair has the v4 pair's rules.

* IA_NA addresses: a :class:`~services.dhcp.failover.leases.LeaseStore` of
  family ``DHCP6_NA`` (keys ``dhcp6:na:*``); IA_PD prefixes: one of family
  ``DHCP6_PD`` (``dhcp6:pd:*``, prefix ints ``L << 128 | net >> (128-L)``).
* Pools (address and delegated-prefix) are split between the partners by
  range (RFC 8156 section 4.2: split pools; no hash load balancing): the
  primary allocates from the lowest ``split`` percent of each pool, the
  secondary from the rest; the partner's half only in a confirmed
  PARTNER-DOWN past the MCLT.  Every lifetime is capped by the MCLT beyond
  what the partner acknowledged (a new client's first valid lifetime is the
  MCLT, its renewal after the partner's ack the full time).
* A client's identity per IA is DUID + IAID (``family.v6_client``);
  reservations by DUID.  The lease's preferred lifetime is not stored: the
  handler derives it (``preferred_until = 0``) from the subnet's setting,
  within the valid lifetime.
* The partner relationship (states, lazy updates on channel ``dhcp6``,
  recovery sync, merge) is the core's ``FailoverPartner`` on the
  :class:`~services.dhcp.failover.stores.LeaseStores` of both stores
  (:attr:`CoreAllocator.stores`).

The per-request calls are synchronous, as the handler expects: the core's
stores answer at once on the embedded store (``immediate_writes``); a store
that cannot (Redis) makes them raise :class:`NotImmediate`.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from services.dhcp.failover import pools as P
from services.dhcp.failover.family import DHCP6_NA, DHCP6_PD, prefix_int, v6_client
from services.dhcp.failover.leases import (AddressUnavailable, DDNSState, Lease, LeaseError,
                                           LeaseStore)
from services.dhcp.failover.partner import FailoverPartner, FailoverView
from services.dhcp.failover.stores import (LeaseStores, Scope, ScopeConfig, ScopePool,
                                           ScopeReservation)
from services.dhcp.v6 import codec as C
from services.dhcp.v6.leases import KINDS, NA, PD, STATES, Lease6, Unavailable

_log = Logger(namespace="services.dhcp6")

__all__ = ["CoreAllocator", "Dhcp6Partner", "NotImmediate", "make_allocator", "scope_configs"]


class NotImmediate(RuntimeError):
    """The lease store answered later (not the embedded store)."""


def _now_value(result):
    """The value of an eager call (a Deferred that already fired, or a value)."""
    if isinstance(result, defer.Deferred):
        box: list = []
        result.addBoth(box.append)
        if not box:
            raise NotImmediate("dhcp6 on the failover core needs the embedded store")
        if isinstance(box[0], Failure):
            box[0].raiseException()
        return box[0]
    return result


def _duid_colon(duid_hex: str) -> str:
    return bytes.fromhex(duid_hex).hex(":")


def scope_configs(config) -> tuple[ScopeConfig, ScopeConfig]:
    """The core's view of a ``Dhcp6Config``: one ScopeConfig for IA_NA
    addresses, one for IA_PD prefixes (same subnet ids)."""
    na, pd = [], []
    for s in config.subnets:
        na.append(Scope(s.id, s.network,
                        tuple(ScopePool(int(p.first), int(p.last), p.size) for p in s.pools),
                        tuple(ScopeReservation(r.address, _duid_colon(r.duid))
                              for r in s.reservations if r.address is not None),
                        lease_time_s=s.valid_lifetime_s))
        pools = []
        for p in s.pd_pools:
            first = prefix_int(f"{p.prefix.network_address}/{p.delegated_length}")
            pools.append(ScopePool(first, first + p.size - 1, p.size))
        pd.append(Scope(s.id, s.network, tuple(pools),
                        tuple(ScopeReservation(prefix_int(r.prefix), _duid_colon(r.duid))
                              for r in s.reservations if r.prefix is not None),
                        delegated_len=s.pd_pools[0].delegated_length if s.pd_pools else 64,
                        lease_time_s=s.valid_lifetime_s))
    fo = getattr(config, "failover", None)
    common = dict(failover=fo, offer_timeout_s=config.offer_timeout_s,
                  decline_quarantine_s=config.decline_quarantine_s)
    return ScopeConfig(tuple(na), **common), ScopeConfig(tuple(pd), **common)


class CoreAllocator:
    """The v6 handler's allocator on the failover core (see the module)."""

    def __init__(self, store, config, node_id: str, *, now: Callable[[], float],
                 view: FailoverView | None = None):
        self.config = config
        self.now = now
        self.view = view or FailoverView()
        na_cfg, pd_cfg = scope_configs(config)
        kw = dict(immediate_writes=True, offer_timeout_s=config.offer_timeout_s,
                  decline_quarantine_s=config.decline_quarantine_s)
        self.na = LeaseStore(store, na_cfg, node_id, now, family=DHCP6_NA, **kw)
        self.pd = LeaseStore(store, pd_cfg, node_id, now, family=DHCP6_PD, **kw)
        #: both stores behind one face: what FailoverPartner drives
        self.stores = LeaseStores({NA: self.na, PD: self.pd})
        self._failover = getattr(config, "failover", None) is not None

    def _store(self, kind: str) -> LeaseStore:
        return self.na if kind == NA else self.pd

    # -- conversions ----------------------------------------------------
    @staticmethod
    def to6(kind: str, lease: Lease | None) -> Lease6 | None:
        if lease is None:
            return None
        cid = lease.client_id
        duid, iaid = (cid[:-8], int(cid[-8:], 16)) if len(cid) > 8 else ("", 0)
        ddns = json.dumps(lease.ddns.to_dict()) if lease.ddns is not None else ""
        return Lease6(kind, lease.address, lease.subnet_id, duid, iaid, lease.state,
                      lease.expires, 0.0, lease.cltt, lease.owner, lease.hostname, ddns)

    def _client(self, duid: str, iaid: int) -> tuple[str, str]:
        return v6_client(bytes.fromhex(duid), iaid)

    def _roles(self):
        v = self.view
        since = (self.now() - v.partner_down_since) if v.partner_down_since is not None else None
        return P.allocation_roles(v.role, v.state, since, v.mclt_s, failover=self._failover,
                                  confirmed=v.partner_down_confirmed)

    # -- what the handler calls -------------------------------------------
    @property
    def writes(self) -> int:
        return self.stores.writes

    def durable(self) -> defer.Deferred:
        return self.stores.durable()

    def load(self) -> defer.Deferred:
        return self.stores.load()

    def get(self, kind: str, address: str) -> Lease6 | None:
        try:
            return self.to6(kind, _now_value(self._store(kind).get(address)))
        except LeaseError:
            return None

    def find(self, kind: str, subnet_id: int, duid: str, iaid: int) -> list[Lease6]:
        hw, cid = self._client(duid, iaid)
        lease = _now_value(self._store(kind).find_client(subnet_id, hw, cid))
        return [self.to6(kind, lease)] if lease is not None else []

    def find_duid(self, duid: str) -> list[Lease6]:
        """Every lease of a DUID (admin: a walk over the stored records)."""
        out = []
        for kind in KINDS:
            st = self._store(kind)
            for a in list(st._meta):
                lease = _now_value(st._get(st._ntoa(a)))
                if lease is not None and lease.client_id[:-8] == duid:
                    out.append(self.to6(kind, lease))
        return out

    def offer(self, kind: str, subnet, duid: str, iaid: int, hints=()) -> Lease6 | None:
        hw, cid = self._client(duid, iaid)
        requested = hints[0] if hints else None
        lease = _now_value(self._store(kind).offer(subnet.id, hw, cid, requested=requested,
                                                   roles=self._roles()))
        return self.to6(kind, lease)

    def offered(self, kind: str, subnet, duid: str, iaid: int) -> Lease6 | None:
        """The IA's pending offer (the ADVERTISE's), or None."""
        hw, cid = self._client(duid, iaid)
        return self.to6(kind, self._store(kind).pending_offer(subnet.id, hw, cid))

    def bind(self, kind: str, subnet, duid: str, iaid: int, address: str,
             preferred_s: int, valid_s: int, hostname: str | None = None) -> Lease6:
        hw, cid = self._client(duid, iaid)
        try:
            lease = _now_value(self._store(kind).bind(subnet.id, address, hw, cid,
                                                      lease_time_s=valid_s,
                                                      hostname=hostname or "",
                                                      roles=self._roles()))
        except (AddressUnavailable, LeaseError, ValueError) as e:
            raise Unavailable(str(e)) from None
        return self.to6(kind, lease)

    def release(self, kind: str, address: str, duid: str | None = None,
                iaid: int | None = None) -> Lease6 | None:
        hw, cid = self._client(duid, iaid or 0) if duid is not None else (None, None)
        try:
            return self.to6(kind, _now_value(self._store(kind).release(address, hw, cid)))
        except (LeaseError, ValueError):
            return None

    def decline(self, kind: str, address: str, duid: str, iaid: int) -> Lease6 | None:
        hw, cid = self._client(duid, iaid)
        try:
            before = self.get(kind, address)
            declined = _now_value(self._store(kind).decline(address, hw, cid))
        except (LeaseError, ValueError):
            return None
        return before if declined is not None else None

    def set_ddns(self, lease: Lease6, ddns: str) -> None:
        st = self._store(lease.kind)
        rec = _now_value(st._get(lease.address))
        if rec is None or rec.client_id[:-8] != lease.duid:
            return
        state = DDNSState.of(ddns) if ddns else None
        if ddns and state is None:      # not the core's shape: keep the name and address
            try:
                d = json.loads(ddns)
                state = DDNSState(str(d.get("fqdn", "")), str(d.get("address", lease.address)))
            except (ValueError, TypeError, AttributeError):
                return
        _now_value(st.set_ddns(rec, state))

    def reclaim(self, limit: int = 500) -> list[Lease6]:
        """Expire what is due; the bound leases that expired (as Lease6).  On a
        store that answers later the expiries still happen; none are returned."""
        out: list[Lease6] = []
        for kind in KINDS:
            d = self._store(kind).reclaim(limit)
            try:
                changed = _now_value(d)
            except NotImmediate:
                d.addErrback(lambda f: _log.failure("dhcp6 reclaim failed", failure=f))
                continue
            out.extend(self.to6(kind, le) for le in changed or () if le.state == "expired")
        return out

    # -- admin ------------------------------------------------------------
    def leases(self, subnet: int | None = None, state: str | None = None,
               kind: str | None = None, limit: int = 100,
               cursor: str | None = None) -> dict[str, Any]:
        """One page: NA rows then PD rows; ``cursor`` is ``<kind>:<address>``."""
        kinds = (kind,) if kind else KINDS
        start_kind, after = kinds[0], None
        if cursor:
            k, _, a = cursor.partition(":")
            if k in kinds:
                start_kind, after = k, a or None
        rows: list[dict] = []
        nxt = None
        for k in kinds[kinds.index(start_kind):]:
            page = _now_value(self._store(k).leases(subnet, state, limit - len(rows), after))
            for row in page["leases"]:
                rows.append(self._row(k, row))
            after = None
            if page["cursor"] is not None:
                nxt = f"{k}:{page['cursor']}"
                break
            if len(rows) >= limit:
                rest = kinds[kinds.index(k) + 1:]
                nxt = f"{rest[0]}:" if rest else None
                break
        return {"leases": rows, "cursor": nxt}

    @staticmethod
    def _row(kind: str, row: dict) -> dict:
        cid = row.get("client_id") or ""
        out = {"prefix" if kind == PD else "address": row["address"], "type": kind,
               "duid": cid[:-8], "iaid": int(cid[-8:], 16) if len(cid) > 8 else 0,
               "state": row["state"], "expires": row["expires"], "cltt": row["cltt"],
               "owner": row["owner"], "subnet": row["subnet"]}
        if row.get("hostname"):
            out["hostname"] = row["hostname"]
        return out

    def free_count(self, kind: str, subnet_id: int) -> int:
        return self._store(kind).free_count(subnet_id)

    def stats(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for kind in KINDS:
            counts = {s: 0 for s in STATES}
            for sub in self._store(kind).stats()["subnets"].values():
                for st, n in sub["states"].items():
                    counts[st] = counts.get(st, 0) + n
            out[kind] = counts
        return out

    def failover_stats(self) -> dict[str, Any]:
        return {kind: {k: v for k, v in self._store(kind).stats().items() if k != "subnets"}
                for kind in KINDS}


#: messages of a client that has (or asks for) a binding: their elapsed time counts
_EVIDENCE_TYPES = (C.REQUEST, C.RENEW, C.REBIND)


class Dhcp6Partner(FailoverPartner):
    """The dhcp6 service's partner relationship: the core's FailoverPartner
    on both lease stores (:attr:`CoreAllocator.stores`), channel ``dhcp6``.
    Held by the service as ``service.failover`` (composition: the service
    class stays as it is)."""

    failover_channel = "dhcp6"

    def __init__(self, service, allocator: CoreAllocator):
        self.service = service
        self.name = service.name
        self.config = service.config
        self.context = service.context
        self.reactor = service.reactor
        self.allocator = allocator
        self.leases = allocator.stores
        self._init_failover()
        allocator.view = self.view          # the handler's allocation roles follow it

    @property
    def running(self) -> bool:
        return bool(getattr(self.service, "running", False))

    def start(self, records_at_start: int) -> None:
        """After the stores are loaded: register with the cluster, open the channel."""
        self._records_at_start = records_at_start
        if records_at_start:
            self._owed_marker_now()
        self._setup_failover()

    def stop(self) -> None:
        self._stop_failover()

    def may_serve(self) -> bool:
        """Answer clients only in a serving state and not on hold (after a
        start or a recovery, until in step with the partner); in hot-standby the
        standby answers nobody in NORMAL (as dhcp4: ``pools.answers``)."""
        v = self.view
        if v.hold or v.state not in P.SERVING_STATES:
            return False
        owner = P.PRIMARY if v.mode == "hot-standby" else v.role
        return P.answers(v.mode, v.role, v.state, owner)

    def answers_solicit(self, m) -> bool:
        """Whether this node answers the SOLICIT ``m`` now (``may_serve`` holds).

        ``split-scope`` and ``hot-standby``: yes (RFC 8156: both partners answer a new
        client from their own halves; the standby answers nobody through ``may_serve``).
        ``load-balancing``: the v4 design's client ownership on the split pools -- the
        owner of the client's RFC 3074 bucket (the hash of its DUID, as Kea HA's load
        balancing) answers at once, the other partner once the client's elapsed time
        reaches ``delay_s`` (the owner looks silent) or when not in NORMAL
        (COMMUNICATIONS-INTERRUPTED, PARTNER-DOWN: ``pools.answers``).  Each partner then
        does the SOLICIT work (offer, ADVERTISE) of half the new clients instead of all;
        answering fewer is never less safe: allocation and every lease rule stay as they
        are, and a client that SOLICITs again gets its binding from either partner."""
        v = self.view
        if v.mode != "load-balancing" or m.client_id is None:
            return True
        owner = P.hash_owner(m.client_id, v.split)
        return P.answers(v.mode, v.role, v.state, owner, (m.elapsed or 0) / 100.0, v.delay_s)

    def answers_overloaded(self, m) -> bool:
        """Whether this node still answers the SOLICIT ``m`` while overloaded (the
        service's ``MAX_INFLIGHT`` REPLYs wait for the disk).

        ``split-scope`` in NORMAL: the partner answers every new client too, and it gets the
        same traffic, so both are overloaded at the same moments; if each then dropped every
        SOLICIT, the same clients would go unanswered by both.  Instead each keeps answering
        the clients whose DUID hash bucket it owns (RFC 3074, as ``load-balancing`` does) and
        sheds the others: every client still gets one ADVERTISE, and each partner does half
        the SOLICIT work until it catches up.  Anything else -- another state (the partner
        may not answer at all), ``load-balancing`` (already only its own clients) -- sheds."""
        v = self.view
        if v.mode != "split-scope" or v.state != P.NORMAL or m.client_id is None:
            return False
        return P.hash_owner(m.client_id, v.split) == v.role

    def observe(self, message) -> None:
        """Client evidence (COMMUNICATIONS-INTERRUPTED): a client of the partner -- one whose
        address or prefix lies in the partner's half -- asking with an elapsed time of at
        least ``max_ack_delay_s`` has waited that long unanswered: evidence that the partner
        is down, not merely cut from us.  The count of such clients goes to the cluster
        (``report_client_evidence``), as dhcp4's; the cluster decides what it proves.  New
        clients are no evidence here: in v6 both partners answer them from their halves."""
        if self.view.state != P.COMM_INTERRUPTED or self._evidence_to is None \
                or self._catching_up:
            return
        m = message.innermost() if hasattr(message, "innermost") else message
        if m is None or m.msg_type not in _EVIDENCE_TYPES or m.client_id is None \
                or (m.elapsed or 0) < 100 * self._max_ack_delay_s:
            return
        partner = self.config.failover.partner_role
        stores = self.allocator.stores
        for ia in (*m.ia_na, *m.ia_pd):
            for x in (*ia.addresses, *ia.prefixes):
                if isinstance(x, C.IAPrefix):
                    text = f"{C.ntop(x.prefix)}/{x.prefix_len}"
                else:
                    text = C.ntop(x.address)
                try:
                    role = stores.segment_role(text)
                except ValueError:
                    continue
                if role == partner:
                    self._evidence[m.client_id] = self.reactor.seconds()
                    self._evidence_report()
                    return

    def _ddns(self, event: str, lease) -> None:
        kind = PD if "/" in lease.address else NA
        changed = getattr(self.service, "_lease_changed", None)
        if changed is not None:
            try:
                changed(event, CoreAllocator.to6(kind, lease))
            except Exception:
                _log.failure("dhcp6: DDNS for {address} failed", address=lease.address)

    def status(self) -> dict[str, Any]:
        f = self.config.failover
        return {"state": self.view.state, "role": f.role if f else None,
                "peer": f.peer if f else None, "hold": self.view.hold,
                "catching_up": self._catching_up,
                "partner_down_confirmed": self.view.partner_down_confirmed,
                "outbox_backlog": self.outbox.backlog if self.outbox is not None else 0,
                "replication": dict(self.stats), "skew_hold": self.skew_hold,
                "stores": self.allocator.failover_stats()}


def make_allocator(service) -> CoreAllocator:
    """The seam of ``Dhcp6Service._make_allocator`` with ``failover`` set: the
    core's stores for the handler, and ``service.failover`` (a
    :class:`Dhcp6Partner`) for the partner relationship."""
    allocator = CoreAllocator(service.context.store, service.config, service.context.node_id,
                              now=service.reactor.seconds)
    service.failover = Dhcp6Partner(service, allocator)
    return allocator
