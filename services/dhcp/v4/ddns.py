"""DHCPv4 DDNS: what the dhcp4 service tells the DDNS provider, and what it answers.

The provider is the node's :class:`appliance.ddns.IDDNSUpdater` (the
``dns`` service with ``ddns = {..}``); without one nothing happens.  The
service calls :func:`lease_event` for every lease change *after* the
change is queued for the partner, and nothing here raises into it: DDNS
can never keep a lease from its client or from the partner.

Bound (a REQUEST answered with an ACK):

- the name: the client's option 81 name (RFC 4702), else its option 12
  host name, else what is already published for it; every one through
  :func:`appliance.ddns.sanitize_hostname` (lower case, letters, digits and
  ``-``, empty labels dropped, 63/253-octet limits).  A partial name gets
  the DDNS forward zone appended; a fully qualified one outside every DDNS
  domain keeps its first label under the forward zone (RFC 4702 section 4
  lets the server choose the name; the answer tells the client).  A name
  the provider still refuses (:class:`~appliance.ddns.DDNSNameError`) is a
  counted skip, never an error for the lease;
- option 81 flags go to the provider (``fqdn_flags``), and the ACK answers
  option 81 with the S/O/N flags the provider decides
  (``answer_flags``), E as the client sent it, RCODE1/2 = 255 and the name
  used;
- the record's ``ddns`` (:class:`~services.dhcp.v4.leases.DDNSState`)
  says what is published: written (``done`` False) in the same reactor
  turn as the bind, so it reaches the partner with the bound record, and
  ``done`` True once the DNS server confirmed it;
- a renewal with the same name, address and flags, already confirmed,
  sends nothing; a changed name or a moved client passes
  ``previous_fqdn``/``previous_address`` so the old records go.

TTL (RFC 4702 section 5 asks for TTLs that follow the volatility of the
lease; a third of the lease, the usual reading, as Kea does): one third of
the subnet's configured ``lease_time_s``, at least :data:`TTL_MIN_S`
(60 s) -- the configured time, not the (failover-capped) length of this
lease, so renewals do not change it.  The dns ``ddns`` table has no TTL
key; the rule lives here.

Released, declined (a client's RELEASE/DECLINE, or ``dhcp4.release``):
the recorded name is removed by the node that handled it (only that node
hears the event; the partner learns the released record through
replication).  Expired: only by the lease owner -- without failover this
node; in failover the node whose pool segment holds the address (the
bound record's ``owner`` for an address outside the pools), and in a
confirmed PARTNER-DOWN the survivor -- so a partner's stale copy never
removes the name of a client the owner renewed.  While the partner cannot
be heard (COMMUNICATIONS-INTERRUPTED, an unconfirmed PARTNER-DOWN, a
recovery) the owner holds the removal: the partner may have renewed the
lease unseen, and its renewals, unchanged, would not publish the name
again.  Once NORMAL (or a confirmed PARTNER-DOWN) the held removals run
for the records still as they expired; the others are dropped.  Held
removals live in the store too (``dhcp4:ddns:held``, address -> record
version): after a restart the service's start hook (:func:`service_started`)
brings them back and they run once the partner is heard.  Once per
start (10 s after the start, or the first lease event) a sweep puts expired/released
records that still name published records through the same rules (a crash
between an expiry and its removal, a DNS outage beyond the provider's
retries, a removal held when the node stopped).  Records written before the ``ddns``
field existed fall back to their host name (the DHCID guard keeps a
removal from touching another client's name).
"""

from __future__ import annotations

import re
import weakref
from collections import Counter
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from appliance.ddns import (DHCID_CLIENT_ID, DHCID_HWADDR, FQDN_E, FQDN_N, FQDN_O, FQDN_S,
                            DDNSConflict, DDNSNameError, ddns_provider, sanitize_hostname)
from services.dhcp.v4 import codec as C
from services.dhcp.v4 import pools as P
from services.dhcp.v4.leases import DDNSState

_log = Logger(namespace="services.dhcp4.ddns")

TTL_MIN_S = 60
TTL_FRACTION = 3
_ESCAPE = re.compile(r"\\(\d{3})")
_glue: "weakref.WeakKeyDictionary[Any, Dhcp4DDNS]" = weakref.WeakKeyDictionary()
#: removals held while the partner cannot be heard: address -> record version
#: (a store hash, so that a restart keeps them; see :meth:`Dhcp4DDNS.started`)
HELD_KEY = "dhcp4:ddns:held"


def lease_event(service, event: str, lease) -> None:
    """The dhcp4 service's DDNS hook: never raises."""
    try:
        glue = _glue.get(service)
        if glue is None:
            glue = _glue[service] = Dhcp4DDNS(service)
        glue.lease_event(event, lease)
    except Exception:
        _log.failure("dhcp4 DDNS for {address} ({event}) failed",
                     address=getattr(lease, "address", "?"), event=event)


def service_started(service) -> None:
    """The dhcp4 service's start hook: removals held when the node stopped come
    back from the store, and the sweep is scheduled.  Never raises."""
    try:
        glue = _glue.get(service)
        if glue is None:
            glue = _glue[service] = Dhcp4DDNS(service)
        glue.started()
    except Exception:
        _log.failure("dhcp4 DDNS start failed")


def glue_for(service) -> "Dhcp4DDNS | None":
    """The service's DDNS glue once it was used (its ``stats``)."""
    return _glue.get(service)


def ttl_for(lease_time_s: float) -> int:
    """The DDNS TTL for a subnet lease time (see the module docstring)."""
    return max(TTL_MIN_S, int(lease_time_s // TTL_FRACTION))


def _unescape(text: str) -> str:
    """Option 81 name text (``\\DDD`` escapes from the wire format) as plain
    text; an escaped dot inside a label becomes ``-``."""
    def one(m):
        value = int(m.group(1))
        return "-" if value == 0x2E else chr(value) if value < 256 else "-"
    return _ESCAPE.sub(one, text)


def _inside(name: str, domain: str) -> bool:
    name, domain = name.lower(), domain.lower()
    return domain == "." or (name != domain and name.endswith("." + domain))


def client_fqdn(raw: str | None, fully_qualified: bool, provider) -> str | None:
    """A client's name (option 81 text or option 12) as the absolute name to
    publish, or None when nothing usable is left after sanitizing."""
    if not raw:
        return None
    host = sanitize_hostname(_unescape(raw).rstrip("."))
    if host is None:
        return None
    zone = provider.forward_zone.rstrip(".") + "."
    domains = [str(d) if not hasattr(d, "to_text") else d.to_text()
               for d in (getattr(provider, "domains", None) or (zone,))]
    name = host + "."
    if any(_inside(name, d) for d in domains):
        return name
    if fully_qualified:
        host = host.split(".", 1)[0]      # outside our domains: its host label under ours
    return f"{host}.{zone}" if zone != "." else name


class Dhcp4DDNS:
    """DDNS for one dhcp4 service (see the module docstring)."""

    #: how often expiries held while out of touch with the partner are looked at again
    HELD_RECHECK_S = 5.0

    def __init__(self, service):
        self.service = service
        self.stats: Counter[str] = Counter()
        #: address -> version of the expired record whose removal is held; also in
        #: the store (:data:`HELD_KEY`), so a restart keeps it
        self._held: dict[str, int] = {}
        self._held_call = None
        self._swept = False
        self._removing: set[tuple[str, int]] = set()    # (address, version) being removed

    def started(self) -> defer.Deferred:
        """At the service's start (:func:`service_started`): the removals held when
        the node stopped come back from the store and run once the partner is
        heard; the sweep is scheduled without waiting for a lease event."""
        svc = self.service
        if not self._swept:
            self._swept = True
            svc.reactor.callLater(self.SWEEP_AFTER_S, self.sweep)
        store = getattr(svc.context, "store", None)
        if store is None:
            return defer.succeed(0)
        d = defer.maybeDeferred(store.hgetall, HELD_KEY)

        def loaded(held):
            n = 0
            for address, version in (held or {}).items():
                address = address.decode() if isinstance(address, bytes) else str(address)
                try:
                    self._held.setdefault(address, int(version))
                    n += 1
                except (TypeError, ValueError):
                    self._forget_held(address)
            if n:
                _log.info("ddns: {n} removal(s) held when the node stopped (the partner could "
                          "not be heard): run once it is", n=n)
                self._schedule_held()
            return n
        d.addCallback(loaded)
        d.addErrback(lambda f: _log.warn("ddns: reading the held removals failed: {why}",
                                         why=f.getErrorMessage()))
        return d

    def _schedule_held(self) -> None:
        if self._held_call is None or not self._held_call.active():
            self._held_call = self.service.reactor.callLater(self.HELD_RECHECK_S,
                                                             self._flush_held)

    def _persist_held(self, address: str, version: int) -> None:
        store = getattr(self.service.context, "store", None)
        if store is None:
            return
        d = defer.maybeDeferred(store.hset, HELD_KEY, {address: str(version)})
        d.addErrback(lambda f: _log.warn("ddns: the held removal of {address} was not stored "
                                         "(lost if the node stops before the partner is "
                                         "heard; the start sweep still finds it): {why}",
                                         address=address, why=f.getErrorMessage()))

    def _forget_held(self, *addresses: str) -> None:
        store = getattr(self.service.context, "store", None)
        if store is None or not addresses:
            return
        d = defer.maybeDeferred(store.hdel, HELD_KEY, *addresses)
        d.addErrback(lambda f: _log.warn("ddns: clearing held removals failed: {why}",
                                         why=f.getErrorMessage()))

    #: the sweep of removals left undone starts this long after the first lease event
    SWEEP_AFTER_S = 10.0
    SWEEP_PAGE = 500

    def sweep(self) -> defer.Deferred:
        """Once per start: expired/released records that still name what DDNS
        published (a crash between the expiry and its removal, a DNS outage
        beyond the provider's retries, a removal held when the node stopped) go
        through the expiry rules again (the owner removes; held while the
        partner cannot be heard).  Paged through the store's address order."""
        svc = self.service

        async def go():
            if ddns_provider(svc.context) is None:
                return 0            # no DDNS on this node: nothing to page through
            cursor, found = None, 0
            while getattr(svc, "running", True):
                page, cursor = await defer.maybeDeferred(svc.leases.export, cursor,
                                                         self.SWEEP_PAGE)
                for wire in page:
                    if wire.get("state") in ("expired", "released") and wire.get("ddns"):
                        rec = await defer.maybeDeferred(svc.leases.get, wire["address"])
                        provider = ddns_provider(svc.context)
                        if rec is not None and rec.ddns is not None and provider is not None \
                                and rec.state in ("expired", "released"):
                            found += 1
                            self._removed(provider, "expired", rec)
                if cursor is None:
                    break
                await task.deferLater(svc.reactor, 0, lambda: None)
            if found:
                _log.info("ddns: {n} expired or released leases still had published names; "
                          "removing them (lease owner rules)", n=found)
            return found
        d = defer.ensureDeferred(go())
        d.addErrback(lambda f: _log.failure("dhcp4 DDNS sweep failed", failure=f))
        return d

    # ------------------------------------------------------------------
    def lease_event(self, event: str, lease) -> None:
        provider = ddns_provider(self.service.context)
        if provider is None:
            return
        if not self._swept:
            self._swept = True
            self.service.reactor.callLater(self.SWEEP_AFTER_S, self.sweep)
        if event == "bound":
            self._bound(provider, lease)
        elif event in ("released", "declined", "expired"):
            self._removed(provider, event, lease)

    # ------------------------------------------------------------------
    def _identity(self, lease) -> tuple[bytes, int]:
        """The DHCID identity (RFC 4701): option 61 when the client sent one,
        else htype + chaddr (the provider hashes RFC 4361 DUIDs as type 2).
        The record keeps no htype: Ethernet (1) for binding and removal alike,
        so a removal's DHCID matches what was published (other media send
        option 61, RFC 4390)."""
        if lease.client_id:
            return bytes.fromhex(lease.client_id), DHCID_CLIENT_ID
        return b"\x01" + bytes.fromhex(lease.hwaddr.replace(":", "")), DHCID_HWADDR

    def _ttl(self, lease) -> int:
        for subnet in self.service.config.subnets:
            if subnet.id == lease.subnet_id:
                return ttl_for(subnet.lease_time_s)
        return TTL_MIN_S

    @staticmethod
    def _answer_flags(provider, fqdn_flags):
        decide = getattr(provider, "answer_flags", None)
        if decide is not None:
            return decide(fqdn_flags)
        if fqdn_flags is None:
            return None          # RFC 4702 defaults: S=1 or N=1 as asked, S=0 -> PTR only
        return FQDN_N if fqdn_flags & FQDN_N else (FQDN_S if fqdn_flags & FQDN_S else 0)

    def _record(self, lease, state: DDNSState | None):
        """``state`` on the lease's record if it is still that version: a
        Lease (the written version), None, or a Deferred of either."""
        return self.service.leases.set_ddns(lease, state)

    def _bound(self, provider, lease) -> None:
        handler = getattr(self.service, "handler", None)
        binding = getattr(handler, "binding", None)
        if binding is not None and binding.address != lease.address:
            binding = None
        option = binding.fqdn if binding is not None else None
        previous = binding.previous if binding is not None else None
        recorded = lease.ddns
        if recorded is None and previous is not None and previous.address != lease.address \
                and previous.state == "bound" and previous.ddns is not None:
            recorded = previous.ddns            # the client moved: its old name goes
        flags = option.flags if option is not None else None
        if option is not None and option.name:
            raw, qualified, source = option.name, option.name.endswith("."), "option 81"
        elif lease.hostname:
            raw = lease.hostname
            qualified, source = "." in raw.strip("."), "host name"
        else:
            raw, qualified, source = None, False, None
        fqdn = client_fqdn(raw, qualified, provider)
        if fqdn is None and raw is None and recorded is not None:
            fqdn = recorded.fqdn                # no name this time: keep the published one
        answer = self._answer_flags(provider, flags)
        if fqdn is None:
            if raw is not None:
                self._skip(provider, "bind", "bad_name")
                _log.info("ddns: {address}: no usable name in the client's {source} {raw!r}; "
                          "not published", address=lease.address, source=source,
                          raw=raw[:80])
            if option is not None and binding is not None:
                binding.answer = C.ClientFQDN("", FQDN_N | (option.flags & FQDN_E), 255, 255)
            return
        if answer is not None and answer & FQDN_N and not answer & FQDN_S:
            self._skip(provider, "bind", "client_no_update")   # N=1: nobody updates
            self._answer(binding, option, fqdn, answer)
            return
        if recorded is not None and recorded.done and recorded.fqdn == fqdn \
                and recorded.address == lease.address and recorded.flags == answer:
            self._skip(provider, "bind", "unchanged")          # a renewal: nothing to send
            self._answer(binding, option, fqdn, answer)
            return
        identity, kind = self._identity(lease)
        prev_fqdn = recorded.fqdn if recorded is not None and recorded.fqdn != fqdn else None
        prev_addr = (recorded.address if recorded is not None
                     and recorded.address != lease.address else None)
        d = provider.lease_bound(fqdn, lease.address, identity, self._ttl(lease), kind,
                                 fqdn_flags=flags, previous_fqdn=prev_fqdn,
                                 previous_address=prev_addr)
        refused = []
        d.addErrback(lambda f: refused.append(f) if f.check(DDNSNameError) else f)
        if refused:
            self.stats["bad_name"] += 1
            _log.info("ddns: {address}: {name} not published: {why}", address=lease.address,
                      name=fqdn, why=refused[0].getErrorMessage())
            if option is not None and binding is not None:
                binding.answer = C.ClientFQDN(fqdn, FQDN_N | (option.flags & FQDN_E), 255, 255)
            return
        self.stats["sent"] += 1
        self._answer(binding, option, fqdn, answer)
        # what is being published, on the record now: it goes to the partner
        # with the bound record (the outbox keeps an address's newest state)
        intent = defer.maybeDeferred(self._record, lease,
                                     DDNSState(fqdn, lease.address, answer, False))

        def done(result, written):
            if not isinstance(result, dict):
                return None
            state = DDNSState(fqdn, lease.address, result.get("flags", answer), True)
            self.stats["published"] += 1
            # on the version the intent was written to (None: the record already
            # held it, the bound version is current); a record changed since keeps
            # done = False and is sent again at its next renewal
            return self._record(written if written is not None else lease, state)

        def failed(f, written):
            if f.check(DDNSConflict):
                self.stats["conflict"] += 1
                _log.warn("ddns: {name} ({address}) not published: {why}", name=fqdn,
                          address=lease.address, why=f.getErrorMessage())
                # nothing of this client is published under it (the old name went)
                return self._record(written, None) if written is not None else None
            self.stats["error"] += 1
            _log.warn("ddns: {name} ({address}) not published yet: {why} (sent again at the "
                      "next renewal)", name=fqdn, address=lease.address,
                      why=f.getErrorMessage())
            return None

        def after_intent(written):
            return d.addCallbacks(done, failed, callbackArgs=(written,),
                                  errbackArgs=(written,))
        intent.addErrback(lambda f: (_log.warn("ddns: recording {address}'s DDNS state "
                                               "failed: {why}", address=lease.address,
                                               why=f.getErrorMessage()), None)[1])
        intent.addCallback(after_intent)
        intent.addErrback(lambda f: _log.failure("dhcp4 DDNS bookkeeping failed", failure=f))

    def _skip(self, provider, op: str, reason: str) -> None:
        """Count a decision that sent nothing, here and in the provider's DDNS
        metrics (``appliance_dns_ddns_total{op, result}``) when it has them."""
        self.stats[reason] += 1
        count = getattr(provider, "skipped", None)
        if count is not None:
            count(op, reason)

    def _answer(self, binding, option, fqdn: str, flags) -> None:
        """The ACK's option 81: the provider's S/O/N, E as the client sent it."""
        if binding is None or option is None or flags is None:
            return
        binding.answer = C.ClientFQDN(fqdn, (flags & (FQDN_S | FQDN_O | FQDN_N))
                                      | (option.flags & FQDN_E), 255, 255)

    # ------------------------------------------------------------------
    def removes(self, lease, event: str) -> bool | None:
        """Whether this node removes the names of ``lease`` for ``event``; None:
        not now (an expiry while out of touch with the partner: held)."""
        if event != "expired":
            return True          # only the node that handled the release hears it
        svc = self.service
        if getattr(svc.config, "failover", None) is None:
            return True
        view = svc.view
        if view.state == P.PARTNER_DOWN and view.partner_down_confirmed:
            return True          # the survivor
        role = svc.leases.segment_role(lease.address)
        mine = (lease.owner in ("", svc.context.node_id)) if role is None else role == view.role
        if not mine:
            return False
        if view.state != P.NORMAL:
            # the partner may have renewed it where we cannot see: removing now could
            # take a live client's name (and its renewals, unchanged, would not put it
            # back); decided again once the partner is heard
            return None
        return True

    def _flush_held(self) -> None:
        """Expiries held while out of touch: once NORMAL (or a confirmed PARTNER-DOWN)
        again, remove those whose record is still the expired one."""
        self._held_call = None
        svc = self.service
        if not self._held or not getattr(svc, "running", True):
            return
        view = svc.view
        if not (view.state == P.NORMAL or (view.state == P.PARTNER_DOWN
                                           and view.partner_down_confirmed)):
            self._schedule_held()
            return
        provider = ddns_provider(svc.context)
        if provider is None:
            # no provider (yet, or DDNS switched off): the store keeps them for the
            # next start
            self._held = {}
            return
        held, self._held = self._held, {}
        # Out of the store now: each one is removed or dropped below (a crash before
        # its removal completes leaves the record naming it: the start sweep finds it).
        self._forget_held(*held)
        for address, version in held.items():
            d = defer.maybeDeferred(svc.leases.get, address)

            def check(rec, version=version):
                if rec is None or rec.version != version or rec.ddns is None \
                        or rec.state not in ("expired", "released"):
                    self.stats["held_dropped"] += 1     # renewed or changed meanwhile
                    return None
                self._removed(provider, "expired", rec)
            d.addCallback(check)
            d.addErrback(lambda f: _log.failure("dhcp4 DDNS held removal failed", failure=f))

    def _removed(self, provider, event: str, lease) -> None:
        state = lease.ddns
        if state is None and lease.hostname:
            # a record from before the ddns field: its host name, as published then
            fqdn = client_fqdn(lease.hostname, "." in lease.hostname.strip("."), provider)
            state = DDNSState(fqdn, lease.address) if fqdn else None
        if state is None:
            return
        decision = self.removes(lease, event)
        if decision is None:
            self._skip(provider, "release", "held")
            if self._held.get(lease.address) != lease.version:
                self._held[lease.address] = lease.version
                self._persist_held(lease.address, lease.version)
            self._schedule_held()
            return
        if not decision:
            self._skip(provider, "release", "not_owner")
            _log.debug("ddns: {name} ({address}) expired here, removed by the lease owner",
                       name=state.fqdn, address=lease.address)
            return
        job = (lease.address, lease.version)
        if job in self._removing:
            return          # already on its way (a held removal and the start sweep)
        identity, kind = self._identity(lease)
        d = provider.lease_released(state.fqdn, state.address, identity, kind)
        if not d.called:
            self._removing.add(job)
            d.addBoth(lambda r: (self._removing.discard(job), r)[1])

        def removed(result):
            self.stats["removed"] += 1
            return self._record(lease, None)

        def failed(f):
            self.stats["remove_" + ("bad_name" if f.check(DDNSNameError) else "error")] += 1
            _log.warn("ddns: removing {name} ({address}, {event}) failed: {why}",
                      name=state.fqdn, address=lease.address, event=event,
                      why=f.getErrorMessage())
        d.addCallbacks(removed, failed)
        d.addErrback(lambda f: _log.failure("dhcp4 DDNS bookkeeping failed", failure=f))
