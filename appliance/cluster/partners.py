"""Partner relationships: the pure ``partner.PartnerFSM`` per peer, fed by the
detector and heartbeats, its state persisted in the store and read back at
registration (before the first transition), listeners told, the RECOVER
sync run and retried.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger

from appliance.cluster import partner as P
from appliance.cluster.resources import call_listener

_log = Logger(namespace="appliance.cluster")


def _all_of(syncs: list) -> Callable:
    """A sync that runs every one of ``syncs`` and is done when all are."""
    def every(peer):
        return defer.gatherResults([defer.maybeDeferred(s, peer) for s in syncs],
                                   consumeErrors=True)
    return every


@dataclass
class Partnership:
    fsm: P.PartnerFSM
    listeners: list[Callable] = field(default_factory=list)
    sync: Callable | None = None
    syncing: bool = False
    syncs: dict = field(default_factory=dict)     # owner (service name) -> its sync
    loading: bool = False        # persisted state being read: no transitions yet
    reason: str = ""             # of the last transition
    confirmed_by: str | None = None
    uses_link: bool = False      # replicates over the peer link: NORMAL needs it up
    link_down_since: float | None = None
    alive_since: float | None = None   # the peer heard continuously since


class Partnerships:
    def __init__(self, m):
        self.m = m
        self.partners: dict[str, Partnership] = {}
        # peer -> (distinct clients of the partner unanswered, when reported)
        self.evidence: dict[str, tuple[int, float]] = {}

    def key(self, peer: str) -> str:
        return f"cluster:partner:{self.m.node_id}:{peer}"

    def confirmed_key(self, peer: str) -> str:
        """Whether the persisted PARTNER-DOWN was confirmed ("1"/"0"; written
        before the state on every entry into PARTNER-DOWN)."""
        return f"cluster:partner:{self.m.node_id}:{peer}:confirmed"

    def _read(self, store, peer: str, ps: "Partnership"):
        """Read the previous run's state (and its confirmation) into the FSM."""
        @defer.inlineCallbacks
        def read():
            value = yield store.get(self.key(peer))
            if value in P.STATES:
                ps.fsm.persisted = value
                if value == P.PARTNER_DOWN:
                    ps.fsm.persisted_confirmed = (yield store.get(self.confirmed_key(peer))) == "1"
                _log.info("partner {peer}: state before this start was {state}{confirmed}",
                          peer=peer, state=value,
                          confirmed=" (confirmed)" if ps.fsm.persisted_confirmed else "")
        return read()

    def register(self, peer: str, listener, *, primary: bool, sync, data_lost: bool,
                 recover_wait_s: float = 0.0, peer_link: bool | None = None) -> str:
        m = self.m
        ps = self.partners.get(peer)
        if ps is None:
            fsm = P.PartnerFSM(peer, primary=primary,
                               auto_partner_down_s=m.cfg.auto_partner_down_s,
                               startup_wait_s=max(2 * m.dead_after_s, 0.5),
                               now=m.clock.seconds(), data_lost=data_lost,
                               recover_wait_s=recover_wait_s, evidence_required=True)
            ps = self.partners[peer] = Partnership(fsm)
            if m.store is not None:
                ps.loading = True
                d = self._read(m.store, peer, ps)

                def unreadable(f):
                    _log.warn("partner {peer}: persisted state unreadable ({why}); "
                              "starting without it", peer=peer, why=f.getErrorMessage())

                def ready(_):
                    ps.loading = False

                d.addErrback(unreadable).addBoth(ready)
                d.addErrback(lambda f: _log.failure("partner load bookkeeping", failure=f))
        else:
            # a second service of the relationship (dhcp6 after dhcp4) that lost its data, or
            # with a longer MCLT: the relationship recovers (and waits) for it too -- while
            # still in STARTUP, as for the first
            ps.fsm.data_lost = ps.fsm.data_lost or data_lost
            ps.fsm.recover_wait_s = max(ps.fsm.recover_wait_s, recover_wait_s)
        if listener is not None:
            ps.listeners.append(listener)
        if sync is not None:
            # two services of one relationship (dhcp4 and dhcp6 with the same peer): RECOVER
            # runs the sync of each (the second registration used to replace the first's);
            # a service registering again (restarted) replaces its own
            owner = getattr(getattr(sync, "__self__", None), "name", None)
            ps.syncs[owner if isinstance(owner, str) else sync] = sync
            ps.sync = sync if len(ps.syncs) == 1 else _all_of(list(ps.syncs.values()))
        if peer_link or (peer_link is None and sync is not None):
            ps.uses_link = True
        return ps.fsm.state

    def load(self, store):
        @defer.inlineCallbacks
        def load():
            for peer, ps in self.partners.items():
                if ps.fsm.persisted is None and not ps.loading:
                    yield self._read(store, peer, ps)
        return load()

    def states(self) -> dict[str, str]:
        return {peer: ps.fsm.state for peer, ps in self.partners.items()}

    def confirmed(self, peer: str) -> bool:
        ps = self.partners.get(peer)
        return ps is not None and ps.fsm.state == P.PARTNER_DOWN and ps.fsm.confirmed

    def min_clients(self) -> int:
        return int(getattr(self.m.cfg, "partner_down_min_clients", 10) or 10)

    def confirmation(self, peer: str) -> str | None:
        """What confirms an automatic PARTNER-DOWN with ``peer`` now (None:
        nothing, silence alone).  With a witness (a witness node or Redis
        leases) only the witness does: client evidence seen by a node without
        quorum could be matched by the same evidence on the side that holds
        it.  Without one, the partner's clients retransmitting unanswered
        (Kea's max-unacked-clients)."""
        m = self.m
        lease = getattr(m, "lease", None)
        if lease is not None:
            return "the Redis quorum lease" if lease.holds_quorum() else None
        if m.witness_id is not None:
            return f"witness {m.witness_id} quorum" if m.has_quorum() else None
        n = self.evidence.get(peer, (0, 0.0))[0]
        if n >= self.min_clients():
            return (f"client evidence: {n} clients of {peer} unanswered "
                    f"(partner_down_min_clients = {self.min_clients()})")
        return None

    def report_client_evidence(self, peer: str, unanswered: int, now: float):
        """The latest count stands until the next report (a service reports 0
        when its window is empty); a peer heard reporting the relationship
        clears it."""
        unanswered = max(0, int(unanswered))
        before = self.evidence.get(peer, (0, 0.0))[0]
        self.evidence[peer] = (unanswered, now)
        threshold = self.min_clients()
        if (before >= threshold) != (unanswered >= threshold):
            _log.info("partner {peer}: {n} of its clients unanswered ({verdict} "
                      "partner_down_min_clients = {min})", peer=peer, n=unanswered,
                      verdict="reaches" if unanswered >= threshold else "below",
                      min=threshold,
                      partner_evidence={"peer": peer, "unanswered_clients": unanswered,
                                        "min_clients": threshold})

    # -- events -----------------------------------------------------------------
    def heard(self, peer: str, reported: str | None, now: float, maintenance: bool):
        ps = self.partners.get(peer)
        if ps is not None and ps.alive_since is None:
            ps.alive_since = now
        if reported is not None:
            self.evidence.pop(peer, None)        # its side of the relationship answers
        if ps is not None and not ps.loading:
            self.transition(ps, ps.fsm.heard(reported, now, maintenance=maintenance))
            self.maybe_sync(ps)        # the secondary's turn in POTENTIAL-CONFLICT

    def lost(self, peer: str, now: float):
        ps = self.partners.get(peer)
        if ps is not None:
            ps.alive_since = None
        if ps is not None and not ps.loading:
            self.transition(ps, ps.fsm.lost(now))

    def tick(self, now: float, allow_auto: bool | None = None):
        """Time-driven transitions.  Automatic partner-down: with a witness
        only while this node holds quorum (then confirmed)."""
        if allow_auto is None:
            allow_auto = self.m.witness_id is None or self.m.has_quorum()
        for peer, ps in self.partners.items():
            if not ps.loading:
                self._check_link(peer, ps, now)
                self.transition(ps, ps.fsm.tick(now, allow_auto=allow_auto,
                                                confirm=self.confirmation(peer)))

    def _check_link(self, peer: str, ps: Partnership, now: float):
        """The peer link of a relationship that replicates over it: down for
        dead_after intervals while the peer is heard is LINK_DOWN."""
        link = self.m.peerlink
        if not ps.uses_link or link is None:
            return
        try:
            up = link.connected(peer)
        except KeyError:
            return
        if up:
            ps.link_down_since = None
            state = P.LINK_UP
        else:
            if ps.link_down_since is None:
                ps.link_down_since = now
            since = max(ps.link_down_since, ps.alive_since if ps.alive_since is not None else now)
            down = ps.fsm.link == P.LINK_DOWN or (ps.alive_since is not None
                                                  and now - since >= self.m.dead_after_s)
            state = P.LINK_DOWN if down else P.LINK_PENDING
        if state != ps.fsm.link:
            _log.info("partner {peer}: peer link {state}", peer=peer, state=state,
                      partner_link={"peer": peer, "state": state})
            self.transition(ps, ps.fsm.link_changed(state, now))

    def leave_maintenance(self, now: float):
        for ps in self.partners.values():
            self.transition(ps, ps.fsm.leave_maintenance(now))

    def partner_down(self, peer: str, now: float) -> str:
        ps = self.partners.get(peer)
        if ps is None:
            return "no partnership"
        self.transition(ps, ps.fsm.partner_down(now))
        return ps.fsm.state

    def transition(self, ps: Partnership, t: P.Transition | None):
        if t is None:
            return
        m = self.m
        m.stats["partner_transitions"] += 1
        _log.info("partner {peer}: {old} -> {new}{confirmed}: {reason}", peer=ps.fsm.peer,
                  old=t.old, new=t.new, reason=t.reason,
                  confirmed=" (confirmed)" if t.confirmed else "",
                  partner_transition={"peer": ps.fsm.peer, "old": t.old, "new": t.new,
                                      "reason": t.reason, "confirmed": t.confirmed})
        ps.reason = t.reason
        ps.confirmed_by = (t.reason.split("confirmed by ", 1)[1]
                           if t.confirmed and "confirmed by " in t.reason
                           else "operator" if t.confirmed else None)
        if m.store is not None:
            warn = lambda f: _log.warn("partner state not persisted: {why}",  # noqa: E731
                                       why=f.getErrorMessage())
            if t.new == P.PARTNER_DOWN:
                m.store.set(self.confirmed_key(ps.fsm.peer),
                            "1" if t.confirmed else "0").addErrback(warn)
            m.store.set(self.key(ps.fsm.peer), t.new).addErrback(warn)
        for listener in list(ps.listeners):
            call_listener(listener, ps.fsm.peer, t.new, t.reason)
        self.maybe_sync(ps)

    def maybe_sync(self, ps: Partnership):
        if ps.fsm.wants_sync:
            self._start_sync(ps)

    # -- RECOVER sync ---------------------------------------------------------------
    def _start_sync(self, ps: Partnership):
        if ps.syncing:
            return
        m = self.m
        ps.syncing = True
        d = defer.maybeDeferred(ps.sync, ps.fsm.peer) if ps.sync else defer.succeed(None)

        def done(_):
            ps.syncing = False
            self.transition(ps, ps.fsm.sync_done(m.clock.seconds()))

        def failed(f):
            ps.syncing = False
            _log.error("recovery sync with {peer} failed: {why}; retrying", peer=ps.fsm.peer,
                       why=f.getErrorMessage())
            m.clock.callLater(max(1.0, m.dead_after_s), self._retry_sync, ps)

        d.addCallbacks(done, failed)
        d.addErrback(lambda f: _log.failure("sync bookkeeping failed", failure=f))

    def _retry_sync(self, ps: Partnership):
        if self.m.running:
            self.maybe_sync(ps)
