"""The partner relationship of a DHCP service: the failover core's state
machine, the same for ``dhcp4`` and ``dhcp6`` (draft-ietf-dhc-failover-12,
RFC 8156 for v6).

:class:`FailoverPartner` is a mixin of the service (an ``IService`` with
``name``, ``config``, ``context``, ``reactor``, ``running`` and a lease store
``self.leases``: one :class:`~services.dhcp.failover.leases.LeaseStore`, or a
:class:`~services.dhcp.failover.stores.LeaseStores` of several families on
one channel, as dhcp6's addresses and prefixes).  It holds what is not about
packets:

* partner state from the cluster (``register_partner``), the caught-up
  barrier (``update_request`` -> every unacked record -> ``update_done``),
  PARTNER-DOWN confirmation, without-data recovery (markers in state_dir,
  ``without_data``/``with_data``/``held`` notices);
* lazy updates (:class:`LeaseOutbox`, durable outbox = unsynced records),
  ``stored`` reports, hello/capabilities for mixed versions;
* merge of the partner's updates (skew guard, send-back of local winners),
  recovery sync both ways (``sync``/``sync_done``, flow-controlled), reclaim;
* client-evidence bookkeeping (the service decides which packets count).

The service sets ``failover_channel`` (the peer-link channel: ``"dhcp4"``,
``"dhcp6"``), calls :meth:`_init_failover` in its constructor,
:meth:`_setup_failover` once its lease store is loaded and its handler
built, starts ``task.LoopingCall(self._reclaim_due)``, and calls
:meth:`_stop_failover` in ``stopService``.  It provides ``_ddns(event,
lease)`` (may do nothing) and reads ``self.view`` (:class:`FailoverView`)
when it answers clients.  Capabilities are ``<channel>.stored`` and
``<channel>.update-done``; store markers ``<name>.held-leases`` and
``<name>.recovering-without-data``.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet import defer, task
from twisted.logger import Logger

from services.dhcp.failover import pools as P
from services.dhcp.failover.leases import (CONFLICT_LOCAL_WON, LOCAL_WON, MAX_SKEW_S,
                                           Lease)
from services.dhcp.failover.replication import LeaseOutbox

__all__ = ["FailoverPartner", "FailoverView", "SYNC_BATCH"]

_RECOVERING = (P.RECOVER, P.RECOVER_DONE, getattr(P, "RECOVER_WAIT", "RECOVER-WAIT"))
SYNC_BATCH = 256        # leases per peer-link message in a recovery sync


@dataclass
class FailoverView:
    """What the handler needs to know about the partner relationship."""

    mode: str | None = None         # None: no failover
    role: str | None = None
    split: int = 50
    delay_s: float = 0.0
    mclt_s: float = 3600
    state: str = P.NORMAL
    partner_down_since: float | None = None
    #: PARTNER-DOWN known to be real (operator, witness quorum, a partner in
    #: maintenance or recovering): only then the partner's addresses unlock
    partner_down_confirmed: bool = False
    #: not in step with the partner since this start or recovery: serve
    #: nobody until NORMAL (or PARTNER-DOWN).  A node that starts, or leaves
    #: RECOVER-DONE, without hearing its partner may find it in PARTNER-DOWN,
    #: using our addresses after the MCLT: COMMUNICATIONS-INTERRUPTED is not
    #: enough to serve then (review M3, issue 12 deliver 5)
    hold: bool = False
    #: PARTNER-DOWN entered while on hold (not in step since the start): the
    #: partner may have run PARTNER-DOWN on our addresses meanwhile, so our own
    #: free addresses are as unknown as its: nothing new before the MCLT
    stale_partner_down: bool = False


class _ServiceLog:
    """The service's logger; ``{svc}`` in a format is the service's name."""

    def __init__(self, name: str):
        self._log, self._svc = Logger(namespace=f"services.{name}"), name

    def info(self, fmt, **kw):
        self._log.info(fmt, svc=self._svc, **kw)

    def warn(self, fmt, **kw):
        self._log.warn(fmt, svc=self._svc, **kw)

    def error(self, fmt, **kw):
        self._log.error(fmt, svc=self._svc, **kw)

    def failure(self, fmt, failure=None, **kw):
        self._log.failure(fmt, failure=failure, svc=self._svc, **kw)


class FailoverPartner:
    """Mixin: the failover partner relationship of a DHCP service (see the module)."""

    #: the peer-link channel of this service's partner messages
    failover_channel: str = ""

    def _init_failover(self) -> None:
        """Failover attributes; call from the service's constructor (after
        ``self.config``, ``self.context``, ``self.reactor``, ``self.name``)."""
        self._flog = _ServiceLog(self.name)
        self._sync_wait = None
        self.outbox: LeaseOutbox | None = None    # lazy updates to the partner
        self._without_data = False
        self._marked = False
        self._records_at_start = 0
        self._sync_progress = 0.0
        self._partner_without_data = False
        self._reclaiming = False
        # the caught-up barrier: NORMAL from another state serves only after the
        # partner's update_done (it sent every record it owed us before it)
        self._cluster_state: str | None = None
        self._catching_up = False
        self._catch_from: str | None = None
        self._catch_token = 0
        self._catch_retry = None
        # the partner's capabilities: None unknown, else a frozenset
        self._partner_caps: frozenset | None = None
        self._caps_timer = None
        self._acked_unknown: list = []         # transport-acked while caps are unknown
        self.skew_hold: dict | None = None     # partner updates held: clocks too far apart
        # COMMUNICATIONS-INTERRUPTED: the partner's clients seen waiting
        # (client key -> last time), reported to the cluster (Kea's unacked clients)
        self._evidence: dict = {}
        self._evidence_to = None              # cluster.report_client_evidence, if any
        self._evidence_reported = 0
        self._evidence_prune = None
        f = self.config.failover
        self._max_ack_delay_s = f.max_ack_delay_s if f is not None else 0.0
        self.view = FailoverView()
        if f is not None:
            self.view = FailoverView(mode=f.mode, role=f.role, split=f.split, delay_s=f.delay_s,
                                     mclt_s=f.mclt_s, state=P.STARTUP, hold=True)
        self.stats = {"replication_sent": 0, "replication_failed": 0, "replication_applied": 0,
                      "replication_held": 0, "replication_rejected": 0}

    def _stop_failover(self) -> None:
        """Timers off; what the outbox holds goes to the peer link now."""
        if self._evidence_prune is not None and self._evidence_prune.active():
            self._evidence_prune.cancel()
        for call in (self._catch_retry, self._caps_timer):
            if call is not None and call.active():
                call.cancel()
        if self.outbox is not None:
            self.outbox.flush()            # hand what is queued to the peer link now

    @property
    def failover_caps(self) -> tuple[str, str]:
        """What this version does on the channel beyond the first release:
        ``stored`` reports (records are synced on those, not on the transport
        ack) and ``update_request`` / ``update_done`` (the caught-up barrier).
        Sent in a ``{"hello": {"caps": [...]}}`` message (and in the peer
        link's own hello when it carries capabilities); a partner that never
        says so is a previous version."""
        return (self._cap_stored, self._cap_update_done)

    @property
    def _cap_stored(self) -> str:
        return self.failover_channel + ".stored"

    @property
    def _cap_update_done(self) -> str:
        return self.failover_channel + ".update-done"

    @property
    def _fleases(self):
        """The lease store the partner relationship drives (a LeaseStore or a
        LeaseStores): the service's ``leases`` unless it says otherwise."""
        return self.leases

    def _fname(self, what: str) -> str:
        return f"{self.name}.{what}"

    def _sync_batch(self) -> int:
        """Leases per peer-link message in a sync (a service may override)."""
        return SYNC_BATCH

    def _ddns(self, event: str, lease) -> None:
        """DDNS for a lease change (the service overrides; never raises)."""

    RECLAIM_BATCH = 500
    SYNC_WINDOW = 8          # recovery sync batches in flight
    SYNC_IDLE_S = 60.0       # a recovery sync gives up after this long without a batch

    def _reclaim_due(self):
        """Expire what is due, batch after batch (yielding to the reactor
        between batches) while full batches come back (review M5)."""
        if self._reclaiming:
            return None
        self._reclaiming = True
        if self._fleases.partner_down_since is not None:
            self._fleases.unlock_pending()

        def batch():
            return self._fleases.reclaim(self.RECLAIM_BATCH).addCallback(expired)

        def expired(changed):
            for lease in changed or ():
                if lease.state == "expired":
                    self._ddns("expired", lease)
            if changed is not None and len(changed) >= self.RECLAIM_BATCH and self.running:
                return task.deferLater(self.reactor, 0, batch)
            return None

        def done(_):
            self._reclaiming = False

        d = batch()
        d.addErrback(lambda f: self._flog.warn("{svc} reclaim failed: {why}", why=f.getErrorMessage()))
        d.addBoth(done)
        return None

    # ------------------------------------------------------------------
    # failover: partner state and lazy updates over the peer link
    # ------------------------------------------------------------------
    def _setup_failover(self):
        f = self.config.failover
        cluster = self.context.cluster
        if f is None or cluster is None:
            return
        # A lease store that holds nothing although this node held leases before
        # (the marker in state_dir survived: the store was wiped or lost) knows
        # nothing of what it gave: RECOVER, serve only after the sync and the
        # MCLT, and hold every address the partner reports until its potential
        # expiry + MCLT (a lease we gave may run until then)
        marker = self._marker()
        again = self._marker(self._fname("recovering-without-data"))
        self._without_data = bool(marker is not None and (
            (self._records_at_start == 0 and marker.exists()) or again.exists()))
        if self._without_data:
            try:
                again.touch()       # a restart before NORMAL recovers without data again
            except OSError:
                pass
            self._flog.warn("{svc}: the lease store is empty but this node held leases before "
                      "({marker}): starting in RECOVER without data", marker=str(marker))
        link = getattr(cluster, "peerlink", None)
        if link is not None:
            advertise = getattr(link, "advertise", None)
            if callable(advertise):
                advertise(*self.failover_caps)
            link.on(self.failover_channel, self._remote_update)
            # a record is synced when the partner says it stored it ({"stored"}),
            # not on the peer link's ack: that ack is handled as it arrives and can
            # overtake the partner's winner of the merge still waiting in our inbox
            # (a previous-version partner never says so: then the ack, _transport_acked)
            self.outbox = LeaseOutbox(self.reactor, link, f.peer, self.failover_channel,
                                      f.max_unacked, stats=self.stats,
                                      durable=self._fleases.durable,
                                      on_acked=self._transport_acked, tag=self.name)
            on_connection = getattr(link, "on_connection", None)
            if callable(on_connection):
                on_connection(self._link_changed)
            self._send_hello(f.peer)
        state = cluster.register_partner(f.peer, self._partner_state, primary=f.role == "primary",
                                         sync=self._sync_from_partner,
                                         data_lost=self._without_data,
                                         recover_wait_s=float(f.mclt_s))
        self.view.hold = state not in (P.NORMAL, P.PARTNER_DOWN)
        self._cluster_state = state
        if state == P.NORMAL and self._barrier_applies():
            # registered while the cluster already says NORMAL: still catch up
            self._catch_from, self._catching_up = P.STARTUP, True
            self.view.hold = True
            self.view.state = P.COMM_INTERRUPTED
            self._request_updates(f.peer)
        else:
            self.view.state = state
        report = getattr(cluster, "report_client_evidence", None)
        self._evidence_to = report if callable(report) else None
        if link is not None:
            # the durable outbox: every record the partner has not acknowledged
            # (kept across a crash in the store) goes to it again
            owed = self._requeue_unsynced()
            if owed:
                self._flog.info("{svc}: {n} lease updates owed to {peer} from before this start",
                          n=owed, peer=f.peer)
            self._fleases.on_unsynced = self._owed

    def _owed_marker_now(self):
        marker = self._marker()
        if marker is not None and not marker.exists():
            try:
                marker.touch()
            except OSError:
                return
        self._marked = marker is not None

    def _marker(self, name: str | None = None):
        state_dir = getattr(self.context, "state_dir", None)
        if state_dir is None:
            return None
        name = self._fname("held-leases") if name is None else name
        from pathlib import Path
        return Path(state_dir) / name

    def _owed(self, lease):
        """A record the partner does not have yet: to the outbox (and remember
        that this node holds leases: a later empty store is a lost one)."""
        if not self._marked:
            self._owed_marker_now()
        self.outbox.add(lease)

    def _requeue_unsynced(self) -> int:
        """Queue every record the partner has not acknowledged (the durable outbox)."""
        if self.outbox is None:
            return 0
        n = 0
        for address in list(self._fleases.unsynced):
            lease = self._fleases._get(address)
            if isinstance(lease, Lease):
                self.outbox.add(lease)
                n += 1
        return n

    def _partner_stored(self, entries):
        """The partner stored these versions of our records (``[[address,
        version], ...]``, sent after its merge winners in the same ordered
        stream): each one still current here is synced (a pending-free
        address it frees becomes free).  A record the partner's own beat is
        not listed: it stays owed until the partner's winner replaces it."""
        now: list = []                   # read at once: marked in one store op
        for entry in entries if isinstance(entries, list) else ():
            try:
                address, version = str(entry[0]), int(entry[1])
            except (TypeError, ValueError, IndexError):
                continue
            rec = self._fleases._get(address)
            if isinstance(rec, defer.Deferred):
                rec.addCallback(self._mark_stored, version).addErrback(
                    lambda f: self._flog.failure("{svc}: marking a record synced failed", failure=f))
            elif isinstance(rec, Lease) and rec.version == version and not rec.synced:
                now.append(rec)
        if now:
            many = getattr(self._fleases, "mark_synced_many", None)
            if many is None:
                for rec in now:
                    self._fleases.mark_synced(rec)
                return
            done = many(now)
            if isinstance(done, defer.Deferred):
                done.addErrback(lambda f: self._flog.failure(
                    "{svc}: marking records synced failed", failure=f))

    def _mark_stored(self, rec, version):
        if isinstance(rec, Lease) and rec.version == version and not rec.synced:
            return self._fleases.mark_synced(rec)
        return None

    # ------------------------------------------------------------------
    # the partner's capabilities (mixed versions during a rolling upgrade)
    # ------------------------------------------------------------------
    #: after the partner handled our hello: how long its own hello (sent on the
    #: same connection before it handled ours, but queued in our serial inbox)
    #: may take to reach us before we take it for a previous version
    HELLO_GRACE_S = 5.0

    def _send_hello(self, peer):
        link = getattr(self.context.cluster, "peerlink", None)
        if link is None:
            return
        d = link.send(peer, self.failover_channel, {"hello": {"caps": list(self.failover_caps)}}, limit=1 << 30)
        d.addCallback(lambda _: self._hello_handled(peer))
        d.addErrback(lambda f: self._flog.info("{svc}: hello to {peer} not delivered ({why}); "
                                         "sent again on the next connection", peer=peer,
                                         why=f.getErrorMessage()))

    def _hello_handled(self, peer):
        """The partner handled our hello.  A current partner sent its own first
        (on its connection), so it is in our inbox or handled; wait a little for
        our inbox, then take silence for a previous version."""
        if self._partner_caps is not None:
            return
        if self._caps_timer is not None and self._caps_timer.active():
            return
        self._caps_timer = self.reactor.callLater(self.HELLO_GRACE_S, self._caps_unknown_over,
                                                  peer)

    def _caps_unknown_over(self, peer):
        self._caps_timer = None
        if self._partner_caps is None and self._cluster_state != P.NORMAL:
            # only a partner in a relationship with us answers on this channel (a
            # stopped service's messages are parked and acked by the peer link):
            # decide while the cluster says NORMAL
            self._caps_timer = self.reactor.callLater(self.HELLO_GRACE_S,
                                                      self._caps_unknown_over, peer)
            return
        if self._partner_caps is None:
            link = getattr(self.context.cluster, "peerlink", None)
            ask = getattr(link, "peer_capabilities", None)
            caps = ask(peer) if callable(ask) else None
            if caps and self._cap_stored in caps:
                self._learn_caps(peer, frozenset(caps))
                return
            self._flog.warn("{svc}: {peer} does not speak this version's failover additions "
                      "(a previous version): records are synced on the peer link's ack, "
                      "NORMAL without the caught-up exchange", peer=peer)
            self._learn_caps(peer, frozenset())

    def _learn_caps(self, peer, caps: frozenset):
        old, self._partner_caps = self._partner_caps, frozenset(caps)
        if self._caps_timer is not None and self._caps_timer.active():
            self._caps_timer.cancel()
        self._caps_timer = None
        stash, self._acked_unknown = self._acked_unknown, []
        if self._cap_stored not in self._partner_caps:
            self._mark_acked(stash)
        if old != self._partner_caps and self._catching_up \
                and self._cap_update_done not in self._partner_caps:
            self._caught_up(peer, "the partner is a previous version (no update_done)")

    def _partner_is_current(self) -> bool | None:
        """True: the partner sends ``stored`` and ``update_done``; False: a previous
        version; None: not known yet."""
        caps = self._partner_caps
        if caps is None:
            link = getattr(self.context.cluster, "peerlink", None)
            ask = getattr(link, "peer_capabilities", None)
            seen = ask(self.config.failover.peer) if callable(ask) else None
            if seen and self._cap_stored in seen:
                return True
            return None
        return self._cap_stored in caps

    def _link_changed(self, peer, connected):
        f = self.config.failover
        if f is None or peer != f.peer:
            return
        if connected:
            # a new connection may be a different version of the partner
            self._partner_caps = None
            self._send_hello(peer)
            if self._catching_up:
                self._request_updates(peer)

    def _transport_acked(self, leases):
        """The peer link's ack of a batch: a current partner's ``stored`` report
        marks the records (the ack can overtake its winners); a previous version
        sends none, so its ack does, as that version expects."""
        current = self._partner_is_current()
        if current:
            return
        if current is None:
            self._acked_unknown.extend(leases)
            return
        self._mark_acked(leases)

    def _mark_acked(self, leases):
        for lease in leases:
            d = self._fleases.mark_synced(lease)
            if isinstance(d, defer.Deferred):
                d.addErrback(lambda f: self._flog.failure("{svc}: marking a record synced failed",
                                                    failure=f))

    # ------------------------------------------------------------------
    # the caught-up barrier (draft-ietf-dhc-failover-12 update-request / update-done)
    # ------------------------------------------------------------------
    #: a catch-up without the partner's update_done asks again after this long
    CATCH_UP_RETRY_S = 10.0

    def _barrier_applies(self) -> bool:
        return self.outbox is not None and self._partner_is_current() is not False

    def _partner_state(self, peer, state, reason):
        """The cluster's partner state.  NORMAL entered from another state (or
        at registration) is served only once caught up: we ask the partner for
        every record it has not had acknowledged (``update_request``), it sends
        them and then ``update_done`` on the same ordered stream.  Until then we
        serve by the rules of COMMUNICATIONS-INTERRUPTED, or nobody if we did
        not serve before (RECOVER-DONE, STARTUP): heartbeats say NORMAL before
        the update stream delivered what the partner gave meanwhile -- e.g. in
        PARTNER-DOWN on our addresses while only the peer link was down."""
        prev, self._cluster_state = self._cluster_state, state
        if state == P.NORMAL and (prev != P.NORMAL or self._catching_up) \
                and self._barrier_applies():
            if not self._catching_up:
                self._catch_from = self.view.state
            self._catching_up = True
            self._apply_state(peer, P.COMM_INTERRUPTED,
                              f"{reason}; NORMAL once caught up with the partner")
            self._evidence_reset(peer)          # the partner is there: no evidence
            self._request_updates(peer)
            return
        if self._catching_up:
            self._catching_up = False
            self._cancel_catch_retry()
        self._apply_state(peer, state, reason)

    def _request_updates(self, peer):
        link = getattr(self.context.cluster, "peerlink", None)
        if link is None:
            return
        self._catch_token += 1
        token = self._catch_token
        link.send(peer, self.failover_channel, {"update_request": token}, limit=1 << 30).addErrback(
            lambda f: self._flog.info("{svc}: update request to {peer} not delivered ({why}); "
                                "asking again", peer=peer, why=f.getErrorMessage()))
        self._cancel_catch_retry()
        self._catch_retry = self.reactor.callLater(self.CATCH_UP_RETRY_S, self._catch_again,
                                                   peer)

    def _catch_again(self, peer):
        self._catch_retry = None
        if self._catching_up:
            self._flog.info("{svc}: no update_done from {peer} yet; asking again", peer=peer)
            self._request_updates(peer)

    def _cancel_catch_retry(self):
        if self._catch_retry is not None and self._catch_retry.active():
            self._catch_retry.cancel()
        self._catch_retry = None

    def _send_with_data(self, peer):
        """In step again after a recovery without data (the MCLT waited, every
        address the partner reported held): the partner's "without_data"
        distrust of our acks ends -- also when it never went through
        PARTNER-DOWN -> NORMAL, which used to be the only way (sim seed 12110 left
        it distrusting for ever: its pending-free addresses never freed)."""
        link = getattr(self.context.cluster, "peerlink", None)
        if link is None:
            return
        link.send(peer, self.failover_channel, {"with_data": True}, limit=1 << 30).addErrback(
            lambda f: self._flog.info("{svc}: 'with data' notice to {peer} not queued ({why})",
                                peer=peer, why=f.getErrorMessage()))

    def _caught_up(self, peer, why: str):
        if not self._catching_up:
            return
        self._catching_up = False
        self._cancel_catch_retry()
        if self._catch_from == P.PARTNER_DOWN:
            self._partner_without_data = False     # it recovered (and waited MCLT)
        self.view.state = P.COMM_INTERRUPTED
        self._apply_state(peer, P.NORMAL, why)

    @defer.inlineCallbacks
    def _send_owed(self, peer, token):
        """Answer an ``update_request``: every record the partner has not
        acknowledged (in batches, flow-controlled), then ``update_done`` --
        after them on the same ordered stream, so the partner has applied all
        of them when it reads it."""
        link = self.context.cluster.peerlink
        addresses = list(self._fleases.unsynced)
        window: list[defer.Deferred] = []
        sent = 0
        for i in range(0, len(addresses), self._sync_batch()):
            batch = []
            for address in addresses[i:i + self._sync_batch()]:
                lease = self._fleases._get(address)
                if isinstance(lease, defer.Deferred):
                    lease = yield lease
                if isinstance(lease, Lease) and not lease.synced:
                    batch.append(lease)
            if not batch:
                continue
            d = link.send(peer, self.failover_channel, {"leases": [le.to_wire() for le in batch]},
                          limit=1 << 30)
            d.addCallback(lambda _, b=batch: self._transport_acked(b))
            d.addErrback(self._sync_send_failed, peer)
            window.append(d)
            sent += len(batch)
            if len(window) >= self.SYNC_WINDOW:
                yield window.pop(0)
        link.send(peer, self.failover_channel, {"update_done": token}, limit=1 << 30).addErrback(
            self._sync_send_failed, peer)
        self.stats["update_requests"] = self.stats.get("update_requests", 0) + 1
        self._flog.info("{svc}: {n} owed lease updates sent to {peer} for its catch-up", n=sent,
                  peer=peer)

    def _apply_state(self, peer, state, reason):
        if state == P.PARTNER_DOWN and self.view.state != P.PARTNER_DOWN:
            self.view.stale_partner_down = self.view.hold
        elif state != P.PARTNER_DOWN:
            self.view.stale_partner_down = False
        self._fleases.own_is_foreign = self.view.stale_partner_down
        if state in (P.NORMAL, P.PARTNER_DOWN):
            self.view.hold = False
            if self._without_data:
                self._without_data = False
                again = self._marker(self._fname("recovering-without-data"))
                if again is not None:
                    again.unlink(missing_ok=True)
                self._send_with_data(peer)
        elif state in _RECOVERING:
            self.view.hold = True
        if state == P.PARTNER_DOWN and self.view.state != P.PARTNER_DOWN:
            self.view.partner_down_since = self.reactor.seconds()
            self.view.partner_down_confirmed = self._confirmed(peer, reason)
        elif state == P.PARTNER_DOWN:
            # PARTNER-DOWN -> PARTNER-DOWN: the cluster confirmed it afterwards
            # (the operator, evidence); the MCLT wait counts from the confirmation
            if not self.view.partner_down_confirmed and self._confirmed(peer, reason):
                self.view.partner_down_confirmed = True
                self.view.partner_down_since = self.reactor.seconds()
        elif state != P.PARTNER_DOWN:
            self.view.partner_down_since = None
            self.view.partner_down_confirmed = False
        self._fleases.partner_down_since = (self.view.partner_down_since
                                          if self.view.partner_down_confirmed else None)
        if state == P.NORMAL and self.view.state == P.PARTNER_DOWN:
            self._partner_without_data = False     # it recovered (and waited MCLT)
        was_down = not self._fleases.trust_acks
        self._fleases.trust_acks = state != P.PARTNER_DOWN and not self._partner_without_data
        if was_down and self._fleases.trust_acks:
            self._requeue_unsynced()      # acks refused in PARTNER-DOWN: ask again
        self._flog.info("{svc} partner {peer}: {state} ({reason}){note}", peer=peer, state=state,
                  reason=reason,
                  note="" if state != P.PARTNER_DOWN or self.view.partner_down_confirmed else
                  "; not confirmed (heartbeat silence only): the partner's addresses stay locked")
        self.view.state = state
        if state != P.COMM_INTERRUPTED:
            self._evidence_reset(peer)

    def _confirmed(self, peer: str, reason: str) -> bool:
        """Whether a PARTNER-DOWN means the partner is really down, so its
        addresses may be used after the MCLT.  The cluster says so when it can
        (``cluster.partner_confirmed(peer)``: the operator's command, the
        witness's quorum, the partner's clients unanswered).  Otherwise a guess
        from the reason: the operator's command is; heartbeat silence alone
        (``auto_partner_down_s``) is what a partition looks like too:
        confirmed only when the cluster has a witness (then automatic
        PARTNER-DOWN needs quorum).  A partner in maintenance or recovering is
        alive and will serve its addresses again: not confirmed (its clients
        are served, its free addresses are left alone)."""
        ask = getattr(self.context.cluster, "partner_confirmed", None)
        if callable(ask):
            try:
                return ask(peer) is True
            except (KeyError, ValueError) as e:
                self._flog.warn("{svc}: cluster.partner_confirmed({peer}) failed ({why}): "
                          "the PARTNER-DOWN is not confirmed", peer=peer, why=e)
                return False
        if "operator" in reason:
            return True
        if "auto_partner_down_s" in reason:
            return getattr(self.context.cluster, "witness_id", None) is not None
        return False

    # ------------------------------------------------------------------
    # client evidence (COMMUNICATIONS-INTERRUPTED): the partner's clients waiting
    # ------------------------------------------------------------------
    #: a client counts while it was last seen waiting within this many seconds
    EVIDENCE_WINDOW_S = 60.0

    def _evidence_report(self):
        now = self.reactor.seconds()
        cutoff = now - self.EVIDENCE_WINDOW_S
        for key in [k for k, t in self._evidence.items() if t <= cutoff]:
            del self._evidence[key]
        n = len(self._evidence)
        if n != self._evidence_reported:
            self._evidence_reported = n
            self._evidence_send(n)
        if self._evidence_prune is not None and self._evidence_prune.active():
            self._evidence_prune.cancel()
        self._evidence_prune = None
        if self._evidence:
            first = min(self._evidence.values())
            self._evidence_prune = self.reactor.callLater(
                max(0.0, first + self.EVIDENCE_WINDOW_S - now) + 0.001, self._evidence_report)

    def _evidence_send(self, n: int):
        report = self._evidence_to
        if report is None:
            return
        try:
            report(self.config.failover.peer, n)
        except Exception:
            self._flog.failure("{svc}: cluster.report_client_evidence failed")

    def _evidence_reset(self, peer):
        if self._evidence_prune is not None and self._evidence_prune.active():
            self._evidence_prune.cancel()
        self._evidence_prune = None
        self._evidence.clear()
        if self._evidence_reported:
            self._evidence_reported = 0
            self._evidence_send(0)

    def _remote_update(self, peer, body):
        if "without_data" in body:
            # the partner lost its lease store: its acks of our expiries and
            # releases say nothing about the leases it gave before (they are
            # lost with its data) -- only the MCLT rules free addresses now
            if not self._partner_without_data:
                self._flog.warn("{svc}: {peer} recovers without its data: its acks free no "
                          "addresses until it is NORMAL again", peer=peer)
            self._partner_without_data = True
            self._fleases.trust_acks = False
            return None
        if "with_data" in body:
            # the partner is in step again after recovering without its data
            if self._partner_without_data:
                self._flog.info("{svc}: {peer} is in step again after its recovery without "
                          "data: its acks free addresses again", peer=peer)
            self._partner_without_data = False
            was_down = not self._fleases.trust_acks
            self._fleases.trust_acks = self.view.state != P.PARTNER_DOWN
            if was_down and self._fleases.trust_acks:
                self._requeue_unsynced()      # acks refused meanwhile: ask again
            return None
        if "held" in body:
            # the partner lost its data and may have given these addresses until
            # then: nobody gets them here before that either
            writes = self._fleases.writes
            for address, until in (body.get("held") or {}).items():
                try:
                    self._fleases.hold(self._fleases.address_int(address),
                                     float(until) + self._fleases.skew_margin_s)
                except (ValueError, TypeError, OSError):
                    continue
            # acked once the holds are on disk (a restart keeps them)
            return self._fleases.durable() if self._fleases.writes != writes else None
        if "hello" in body:
            caps = (body.get("hello") or {}).get("caps") if isinstance(body.get("hello"),
                                                                       dict) else None
            self._learn_caps(peer, frozenset(c for c in caps or () if isinstance(c, str)))
            return None
        if "update_request" in body:
            if self._partner_caps is None:
                self._learn_caps(peer, frozenset(self.failover_caps))    # only a current version asks
            # not the handler's Deferred: both sides may ask at once, and an inbox
            # held while waiting for the partner's acks (its inbox held the same
            # way) would wait for ever; the stream keeps update_done after them
            self._send_owed(peer, body["update_request"]).addErrback(
                lambda f: self._flog.failure("{svc}: answering {peer}'s update request failed",
                                       failure=f, peer=peer))
            return None
        if "update_done" in body:
            if body["update_done"] == self._catch_token:
                self._caught_up(peer, "caught up with the partner (update_done)")
            return None
        if "stored" in body:
            if self._partner_caps is None:
                self._learn_caps(peer, frozenset(self.failover_caps))    # only a current version reports
            self._partner_stored(body["stored"])
            return None
        if "leases" in body or "lease" in body:
            return self._apply_updates(peer, body.get("leases") or [body["lease"]])
        if "sync" in body:
            return self._send_all(peer)
        if "sync_done" in body:
            # Everything the partner had was sent before this marker on the same
            # ordered channel, so it has all been applied by now.
            self._flog.info("{svc} recovery sync from {peer} done: {n} leases", peer=peer,
                      n=body["sync_done"])
            waiting, self._sync_wait = self._sync_wait, None
            if waiting is not None and not waiting.called:
                waiting.callback(body["sync_done"])
        return None

    def _skew_too_large(self, peer) -> float | None:
        """The partner's measured clock offset if it exceeds MAX_SKEW_S, else None."""
        skew_of = getattr(self.context.cluster, "skew", None)
        if skew_of is None:
            return None
        try:
            skew = skew_of(peer)
        except (KeyError, AttributeError):
            return None
        if skew is not None and abs(skew) > MAX_SKEW_S:
            return skew
        return None

    def _apply_updates(self, peer, wires):
        """Merge a partner batch -- but not while its clock is off by more than
        MAX_SKEW_S: the merge compares times of two clocks, and every MCLT wait
        allows only that much.  The batch then waits (unacked: the partner's
        leases stay capped at MCLT past what we acked) until the skew is back
        within the limit; ``dhcp4.stats`` shows it."""
        skew = self._skew_too_large(peer)
        if skew is None:
            self.skew_hold = None
            return self._apply_now(peer, wires)
        if self.skew_hold is None:
            self._flog.error("{svc}: {peer}'s clock is {skew:+.1f}s off ours (limit {limit}s): its "
                       "lease updates wait until the clocks agree", peer=peer, skew=skew,
                       limit=MAX_SKEW_S)
        self.skew_hold = {"peer": peer, "skew_s": round(skew, 3), "limit_s": MAX_SKEW_S}
        return task.deferLater(self.reactor, 1.0, self._apply_updates, peer, wires)

    def _apply_now(self, peer, wires):
        """Store a batch of the partner's leases (merged by cltt); the peer link
        acks the batch when all are stored.  A malformed entry is counted and
        skipped (resending it would not make it better)."""
        results = []
        writes = self._fleases.writes
        self._sync_progress = self.reactor.seconds()
        link = getattr(self.context.cluster, "peerlink", None)
        if self._without_data and link is not None:
            # before this batch's ack: the partner must not read it as "the
            # partner gave nobody these addresses" (we lost what we gave)
            link.send(peer, self.failover_channel, {"without_data": True}, limit=1 << 30).addErrback(
                lambda f: None)
        stored: list[list] = []          # [address, version] the partner may mark synced
        for wire in wires if isinstance(wires, list) else ():
            try:
                lease = self._fleases.lease_from_wire(wire)
            except (ValueError, TypeError, AttributeError) as e:
                self.stats["replication_rejected"] += 1
                self._flog.warn("{svc}: malformed lease update from {peer} skipped: {why}",
                          peer=peer, why=e)
                continue
            result = self._fleases.apply_remote(lease, without_data=self._without_data)
            if isinstance(result, defer.Deferred):
                result.addCallback(self._stored_unless_beaten, stored, lease)
            else:
                self._stored_unless_beaten(result, stored, lease)
            until = self._fleases.held_until(lease.address)
            if until is not None and link is not None:
                # before the ack: our lost leases may hold it until then
                link.send(peer, self.failover_channel, {"held": {lease.address: until}},
                          limit=1 << 30).addErrback(lambda f: None)
            if isinstance(result, str) and result in (LOCAL_WON, CONFLICT_LOCAL_WON):
                self._send_back(peer, lease.address)
            elif isinstance(result, defer.Deferred):
                result.addCallback(self._maybe_send_back, peer, lease.address)
            results.append(result)
        waits = [r for r in results if isinstance(r, defer.Deferred)]
        self.stats["replication_applied"] += len(results) - len(waits)
        if not waits and self._fleases.writes == writes:
            self._report_stored(peer, link, stored)
            return None

        def settle(_):
            self.stats["replication_applied"] += len(waits)
            # the batch is acked to the partner only once what it wrote here
            # (at once, or after a wait) is on disk
            return self._fleases.durable() if self._fleases.writes != writes else None

        d = defer.gatherResults(waits, consumeErrors=True).addCallback(settle)
        return d.addCallback(lambda _: self._report_stored(peer, link, stored))

    @staticmethod
    def _stored_unless_beaten(result, stored, lease):
        if result not in (LOCAL_WON, CONFLICT_LOCAL_WON):
            stored.append([lease.address, lease.version])
        return result

    def _report_stored(self, peer, link, stored):
        """Tell the partner which of its records are stored here (on disk), after
        our winners went back: it marks exactly those synced."""
        if stored and link is not None:
            link.send(peer, self.failover_channel, {"stored": stored}, limit=1 << 30).addErrback(
                lambda f: None)      # not queued: the records stay owed and come again

    def _maybe_send_back(self, result, peer, address):
        if result in (LOCAL_WON, CONFLICT_LOCAL_WON):
            self._send_back(peer, address)
        return result

    def _send_back(self, peer, address):
        """Our record beat the partner's: send it now, before the peer link
        acks the partner's batch, so the partner applies it before it treats
        its own (losing) record as acknowledged -- e.g. never frees an address
        we renewed (the winners of a merge go back: review H4)."""
        lease = self._fleases._get(address)
        link = getattr(self.context.cluster, "peerlink", None)
        if not isinstance(lease, Lease) or link is None:
            return
        self.stats["replication_sent_back"] = self.stats.get("replication_sent_back", 0) + 1
        d = link.send(peer, self.failover_channel, {"leases": [lease.to_wire()]}, limit=1 << 30)
        # a previous-version partner sends no "stored": its ack marks it then
        d.addCallback(lambda _: self._transport_acked([lease]))
        d.addErrback(lambda f: self.outbox.add(lease) if self.outbox is not None else None)

    def _sync_from_partner(self, peer):
        """RECOVER: ask the partner for all its leases; done at its end marker."""
        link = getattr(self.context.cluster, "peerlink", None)
        if link is None:
            return defer.succeed(None)
        self._sync_wait = wait = defer.Deferred()
        self._sync_progress = self.reactor.seconds()
        self._flog.info("{svc} recovering: asking {peer} for its leases", peer=peer)
        link.send(peer, self.failover_channel, {"sync": True}).addErrback(
            lambda f: wait.errback(f) if not wait.called else None)

        def watchdog():
            # gives up only when nothing arrived for SYNC_IDLE_S (a big table
            # takes as long as it takes while batches keep coming)
            if wait.called:
                return
            idle = self.reactor.seconds() - self._sync_progress
            if idle >= self.SYNC_IDLE_S:
                self._sync_wait = None
                wait.errback(defer.TimeoutError(f"recovery sync from {peer}: nothing for "
                                                f"{idle:.0f}s"))
            else:
                self.reactor.callLater(self.SYNC_IDLE_S - idle, watchdog)

        self.reactor.callLater(self.SYNC_IDLE_S, watchdog)
        return wait

    @defer.inlineCallbacks
    def _send_all(self, peer):
        """Answer a partner's sync request: every lease, then an end marker.
        Flow-controlled: at most SYNC_WINDOW batches unacknowledged, pages read
        as the window opens (memory bounded by the window, not the table)."""
        link = self.context.cluster.peerlink
        cursor, sent = None, 0
        window: list[defer.Deferred] = []
        while True:
            batch_size = self._sync_batch()
            page, cursor = yield self._fleases.export(cursor, batch_size * 4)
            for i in range(0, len(page), batch_size):
                batch = page[i:i + batch_size]
                d = link.send(peer, self.failover_channel, {"leases": batch}, limit=1 << 30)
                d.addCallback(self._page_acked, batch)
                d.addErrback(self._sync_send_failed, peer)
                window.append(d)
                sent += len(batch)
                if len(window) >= self.SYNC_WINDOW:
                    yield window.pop(0)
            if cursor is None:
                break
        link.send(peer, self.failover_channel, {"sync_done": sent}).addErrback(self._sync_send_failed, peer)
        self._flog.info("{svc} sent {n} leases to {peer} for its recovery", n=sent, peer=peer)

    def _page_acked(self, _, batch):
        """A recovery-sync page handled by the partner: synced by its "stored"
        report, or by this ack for a previous version (which sends none)."""
        if self._partner_is_current():
            return
        leases = []
        for wire in batch:
            try:
                leases.append(self._fleases.lease_from_wire(wire))
            except ValueError:
                continue
        self._transport_acked(leases)

    def _sync_send_failed(self, failure, peer):
        self.stats["replication_failed"] += 1
        self._flog.warn("{svc} recovery data for {peer} not queued: {why} (it will ask again)",
                  peer=peer, why=failure.getErrorMessage())
