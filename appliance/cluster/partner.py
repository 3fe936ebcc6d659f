"""The failover state of a partner relationship (DHCP, SIP, DN pairs).

Pure logic, no I/O: the manager feeds events (heard the peer in some state,
lost the peer, time passed, operator command, recovery sync finished) and
reads the resulting state.  States and transitions follow the DHCP
failover drafts:

* ``STARTUP`` -- just started; wait to hear the peer (or time out).
* ``NORMAL`` -- both up and talking; each serves its share.
* ``COMMUNICATIONS-INTERRUPTED`` -- the peer is not heard.  Not the same as
  down: each side keeps serving only its own share, so a partition never
  hands out the same resource twice.
* ``PARTNER-DOWN`` -- the peer is known (operator) or assumed (after
  ``auto_partner_down_s``, default 0 = never) down: serve everything.
  With ``evidence_required`` (the manager's setting) the automatic one also
  needs a confirmation (``tick(confirm=...)``: the witness's quorum, or the
  partner's clients retransmitting unanswered): silence alone is what a
  partition looks like too.
  Each entry records whether it is *confirmed* (:attr:`PartnerFSM.confirmed`,
  :attr:`Transition.confirmed`): the operator's command, or an automatic
  partner-down backed by evidence the partner cannot have (the witness's
  quorum, or the partner's clients unanswered).  A partner in maintenance or
  recovering is alive: that PARTNER-DOWN serves its clients but is not
  confirmed (its addresses are not ours to give).
* ``RECOVER`` -- back after the peer ran in PARTNER-DOWN, or started
  without valid stable storage (``data_lost``), or restarted while in
  RECOVER: serve nothing until the partner's state is synced.  RECOVER
  never times out into PARTNER-DOWN (a node that never finished its sync
  must not serve everything); the sync is retried, and the operator's
  ``partner-down`` is the way out when the peer is gone for good.
* ``RECOVER-WAIT`` -- synced, but this node's own knowledge was incomplete
  (no stable storage, or a restart in RECOVER): wait ``recover_wait_s``
  (the service's MCLT) before RECOVER-DONE, so leases the peer granted
  that the sync could not show have expired.
* ``RECOVER-DONE`` -- synced; waiting for the peer to return to NORMAL.
* ``POTENTIAL-CONFLICT`` -- both sides served everything (both were
  PARTNER-DOWN, e.g. after a partition with operator partner-down on each
  side): no new allocations.  The primary pulls all of the secondary's
  bindings (resolving by cltt) and goes CONFLICT-DONE; then the secondary
  pulls the primary's and goes NORMAL; the primary follows to NORMAL.
* ``CONFLICT-DONE`` -- the primary resolved its side; waiting for the
  secondary's pull.

A relationship that replicates over the peer link (``link`` is not
``LINK_NA``) is not NORMAL while that link is down: heartbeats up but the
link down for ``dead_after`` intervals (the manager then sets
``LINK_DOWN``) is COMMUNICATIONS-INTERRUPTED ("peer link down"); while the
link is reconnecting (``LINK_PENDING``) nothing enters NORMAL, and once it
is back the next heartbeat returns the relationship to NORMAL the usual
way (through RECOVER and its sync if the peer ran PARTNER-DOWN meanwhile).

RECOVER-DONE (draft-ietf-dhc-failover-12): the side that finished its
recovery sync goes NORMAL once the partner is NORMAL or RECOVER-DONE
itself (a partner in PARTNER-DOWN or COMMUNICATIONS-INTERRUPTED goes NORMAL
on hearing RECOVER-DONE first); losing the partner in RECOVER-DONE is
COMMUNICATIONS-INTERRUPTED.  A partner lost during RECOVER or RECOVER-WAIT
leaves the state alone: RECOVER waits for the peer (never PARTNER-DOWN by
timeout), RECOVER-WAIT still ends by time, into RECOVER-DONE and from there
into COMMUNICATIONS-INTERRUPTED since nobody is heard.

A peer that is heard but does not report a relationship with us (its
service stopped, failed or has not registered yet) is not a NORMAL
partner: COMMUNICATIONS-INTERRUPTED until it does.  A partner that is in
RECOVER while we are NORMAL or COMMUNICATIONS-INTERRUPTED lost its data:
we go PARTNER-DOWN so that its clients are served while it syncs.

The state of the previous run (``persisted``) is read by the manager
before the first event: PARTNER-DOWN comes back PARTNER-DOWN while the peer
is silent or recovering, RECOVER comes back RECOVER.

Every state has a way out that needs no restart: RECOVER retries its
sync and operator ``partner-down`` works from any state.
"""

from __future__ import annotations

from dataclasses import dataclass

STARTUP = "STARTUP"
NORMAL = "NORMAL"
COMM_INTERRUPTED = "COMMUNICATIONS-INTERRUPTED"
PARTNER_DOWN = "PARTNER-DOWN"
RECOVER = "RECOVER"
RECOVER_DONE = "RECOVER-DONE"
RECOVER_WAIT = "RECOVER-WAIT"
POTENTIAL_CONFLICT = "POTENTIAL-CONFLICT"
CONFLICT_DONE = "CONFLICT-DONE"
STATES = (STARTUP, NORMAL, COMM_INTERRUPTED, PARTNER_DOWN, RECOVER, RECOVER_DONE, RECOVER_WAIT,
          POTENTIAL_CONFLICT, CONFLICT_DONE)

# The peer link of a relationship that replicates over it.
LINK_NA = "n/a"              # does not use the link (or the node has none)
LINK_UP = "up"
LINK_PENDING = "pending"     # not connected, for less than dead_after intervals
LINK_DOWN = "down"           # not connected for dead_after intervals while the peer is heard


@dataclass(frozen=True)
class Transition:
    old: str
    new: str
    reason: str
    confirmed: bool = False      # a PARTNER-DOWN the partner cannot contradict


class PartnerFSM:
    """One side of a partner relationship with ``peer``."""

    def __init__(self, peer: str, *, primary: bool, auto_partner_down_s: float,
                 startup_wait_s: float, now: float, persisted: str | None = None,
                 data_lost: bool = False, recover_wait_s: float = 0.0,
                 evidence_required: bool = False):
        self.peer = peer
        self.primary = primary
        self.auto_partner_down_s = auto_partner_down_s
        self.startup_wait_s = startup_wait_s
        self.state = STARTUP
        self.since = now
        self.persisted = persisted           # the state before this start, if known
        self.peer_state: str | None = None
        self.peer_seen = False
        self.peer_maintenance = False
        self.interrupted_at: float | None = None
        self.data_lost = data_lost           # no valid stable storage: start in RECOVER
        self.recover_wait_s = recover_wait_s
        self.incomplete = False              # own knowledge incomplete: RECOVER-WAIT after sync
        self.confirmed = False               # PARTNER-DOWN confirmed (operator, evidence)
        self.persisted_confirmed = False     # the previous run's PARTNER-DOWN was confirmed
        self.peer_alive = False              # heard since it was last lost
        self.evidence_required = evidence_required   # automatic partner-down needs `confirm`
        self.link = LINK_NA                  # the peer link, for relationships that use it
        self._link_gate = False              # inside heard(): NORMAL needs the link

    # ------------------------------------------------------------------
    def _go(self, new: str, now: float, reason: str, confirmed: bool = False) -> Transition | None:
        if new == self.state:
            if new == PARTNER_DOWN and confirmed and not self.confirmed:
                # An unconfirmed PARTNER-DOWN (maintenance, a recovering
                # partner) becomes confirmed: told as a transition to itself.
                self.confirmed = True
                return Transition(new, new, reason, True)
            return None
        if new == NORMAL and self._link_gate and self.link in (LINK_PENDING, LINK_DOWN):
            # Heartbeats say NORMAL, the replication link does not.
            if self.link == LINK_PENDING or self.state not in (STARTUP, RECOVER_DONE):
                return None              # (PARTNER-DOWN keeps serving until the link is back)
            new, reason = COMM_INTERRUPTED, f"peer {self.peer}: peer link down"
        confirmed = confirmed and new == PARTNER_DOWN
        t = Transition(self.state, new, reason, confirmed)
        self.state, self.since, self.confirmed = new, now, confirmed
        if new == COMM_INTERRUPTED:
            self.interrupted_at = now
        return t

    # ------------------------------------------------------------------
    def heard(self, peer_state: str | None, now: float, *, maintenance: bool = False) -> Transition | None:
        """A heartbeat from the peer reporting ``peer_state`` for us."""
        self._link_gate = True
        try:
            return self._heard(peer_state, now, maintenance)
        finally:
            self._link_gate = False

    def _heard(self, peer_state: str | None, now: float, maintenance: bool) -> Transition | None:
        self.peer_alive = True
        self.peer_seen = True
        self.peer_state = peer_state
        self.peer_maintenance = maintenance
        if maintenance:
            # The peer promised to stop serving: take everything now.
            return self._go(PARTNER_DOWN, now, f"peer {self.peer} in maintenance")
        s = self.state
        if s == STARTUP and (self.data_lost or self.persisted in (RECOVER, RECOVER_WAIT)):
            self.incomplete = True
            return self._go(RECOVER, now, "no valid stable storage; resync from peer"
                            if self.data_lost else "was RECOVER before restart; resync")
        if s == STARTUP and self.persisted in (POTENTIAL_CONFLICT, CONFLICT_DONE):
            return self._go(POTENTIAL_CONFLICT, now, f"was {self.persisted} before restart")
        if (peer_state == POTENTIAL_CONFLICT or (peer_state == CONFLICT_DONE and not self.primary)) \
                and s in (STARTUP, PARTNER_DOWN, COMM_INTERRUPTED, NORMAL, RECOVER_DONE):
            return self._go(POTENTIAL_CONFLICT, now, f"peer {self.peer} in {peer_state}")
        if s == POTENTIAL_CONFLICT:
            return None                      # left by the syncs (sync_done)
        if s == CONFLICT_DONE:
            if peer_state == NORMAL:
                return self._go(NORMAL, now, f"peer {self.peer} resolved its side")
            return None
        if peer_state is None:
            # Its cluster manager is alive, its side of the relationship is not.
            if s in (STARTUP, NORMAL, RECOVER_DONE):
                return self._go(COMM_INTERRUPTED, now,
                                f"peer {self.peer} alive but not in a relationship with us")
            return None
        if s in (NORMAL, COMM_INTERRUPTED) and peer_state == RECOVER:
            return self._go(PARTNER_DOWN, now, f"peer {self.peer} recovering; serve its clients")
        if s in (STARTUP, COMM_INTERRUPTED):
            if peer_state == PARTNER_DOWN:
                return self._go(RECOVER, now, f"peer {self.peer} ran in PARTNER-DOWN; resync")
            if s == STARTUP and self.persisted == PARTNER_DOWN and peer_state in (RECOVER, STARTUP):
                return self._go(PARTNER_DOWN, now, "was PARTNER-DOWN before restart; peer recovering",
                                self.persisted_confirmed)
            return self._go(NORMAL, now, f"peer {self.peer} heard ({peer_state})")
        if s == PARTNER_DOWN:
            if peer_state in (RECOVER_DONE, NORMAL):
                return self._go(NORMAL, now, f"peer {self.peer} recovered ({peer_state})")
            if peer_state == PARTNER_DOWN:
                return self._go(POTENTIAL_CONFLICT, now,
                                "both sides ran PARTNER-DOWN; exchange bindings")
            return None
        if s == NORMAL:
            if peer_state == PARTNER_DOWN:
                return self._go(RECOVER, now, f"peer {self.peer} ran in PARTNER-DOWN; resync")
            return None
        if s == RECOVER_WAIT:
            return None                      # left by time (tick)
        if s == RECOVER_DONE:
            # draft-ietf-dhc-failover-12: NORMAL once the partner is NORMAL or
            # RECOVER-DONE (one in PARTNER-DOWN, COMMUNICATIONS-INTERRUPTED or
            # STARTUP goes NORMAL on hearing our RECOVER-DONE first).
            if peer_state in (NORMAL, RECOVER_DONE):
                return self._go(NORMAL, now, f"peer {self.peer} is {peer_state}")
            return None
        return None

    def lost(self, now: float) -> Transition | None:
        """The failure detector stopped hearing the peer (in RECOVER and
        RECOVER-WAIT nothing changes: RECOVER waits for the peer)."""
        self.peer_state = None
        self.peer_alive = False
        self.interrupted_at = now
        if self.state in (NORMAL, RECOVER_DONE):
            return self._go(COMM_INTERRUPTED, now, f"peer {self.peer} not heard")
        return None

    def tick(self, now: float, allow_auto: bool = True,
             confirm: str | None = None) -> Transition | None:
        """Time-driven transitions (``allow_auto``: automatic partner-down is
        allowed now -- with a witness, only while this node holds quorum;
        ``confirm``: what confirms the partner is down, if anything -- the
        automatic PARTNER-DOWN is then confirmed and says so)."""
        if self.state == STARTUP and not self.peer_seen and now - self.since >= self.startup_wait_s:
            if self.data_lost or self.persisted in (RECOVER, RECOVER_WAIT):
                self.incomplete = True
                return self._go(RECOVER, now, "no valid stable storage; waiting for the peer"
                                if self.data_lost else "was RECOVER before restart")
            if self.persisted in (POTENTIAL_CONFLICT, CONFLICT_DONE):
                return self._go(POTENTIAL_CONFLICT, now, f"was {self.persisted} before restart")
            if self.persisted == PARTNER_DOWN:
                return self._go(PARTNER_DOWN, now, "was PARTNER-DOWN before restart; peer still silent",
                                self.persisted_confirmed)
            return self._go(COMM_INTERRUPTED, now,
                            f"peer {self.peer} not heard within {self.startup_wait_s:g}s of start")
        if self.state == RECOVER_DONE and not self.peer_alive and self.peer_seen:
            # Finished (sync or wait) while the partner was lost.
            return self._go(COMM_INTERRUPTED, now, f"peer {self.peer} not heard")
        if self.state == RECOVER_WAIT and now - self.since >= self.recover_wait_s:
            return self._go(RECOVER_DONE, now, f"waited {self.recover_wait_s:g}s (MCLT) after "
                                               "an incomplete recovery")
        if (self.state == COMM_INTERRUPTED and self.peer_state is None
                and self.auto_partner_down_s > 0 and allow_auto and self.interrupted_at is not None
                and now - self.interrupted_at >= self.auto_partner_down_s
                and (confirm is not None or not self.evidence_required)):
            return self._go(PARTNER_DOWN, now,
                            f"peer {self.peer} silent for {self.auto_partner_down_s:g}s "
                            "(auto_partner_down_s)" + (f"; confirmed by {confirm}" if confirm
                                                       else ""),
                            confirm is not None)
        return None

    def link_changed(self, link: str, now: float) -> Transition | None:
        """The peer link's state (``LINK_UP``, ``LINK_PENDING``, ``LINK_DOWN``;
        the manager says ``LINK_DOWN`` only after dead_after intervals of a
        down link while the peer is heard)."""
        was, self.link = self.link, link
        if link != LINK_DOWN or was == LINK_DOWN:
            return None
        if self.state in (NORMAL, RECOVER_DONE) or (self.state == STARTUP and self.peer_seen):
            return self._go(COMM_INTERRUPTED, now, f"peer {self.peer}: peer link down")
        return None

    def partner_down(self, now: float) -> Transition | None:
        """Operator says the peer is down (works from every state; confirms an
        unconfirmed PARTNER-DOWN)."""
        return self._go(PARTNER_DOWN, now, "operator partner-down", True)

    @property
    def wants_sync(self) -> bool:
        """Whether the manager should pull the peer's bindings now."""
        if self.state == RECOVER:
            return True
        if self.state == POTENTIAL_CONFLICT:
            return self.primary or self.peer_state == CONFLICT_DONE
        return False

    def sync_done(self, now: float) -> Transition | None:
        if self.state == RECOVER:
            if self.incomplete and self.recover_wait_s > 0:
                return self._go(RECOVER_WAIT, now, "recovery sync finished; own knowledge "
                                                   "was incomplete: wait MCLT")
            return self._go(RECOVER_DONE, now, "recovery sync finished")
        if self.state == POTENTIAL_CONFLICT:
            if self.primary:
                return self._go(CONFLICT_DONE, now, "pulled the secondary's bindings")
            return self._go(NORMAL, now, "pulled the primary's bindings; conflict resolved")
        return None

    def leave_maintenance(self, now: float) -> Transition | None:
        """This node comes back from maintenance: the peer served alone."""
        return self._go(RECOVER, now, "leaving maintenance; resync from peer")

    # ------------------------------------------------------------------
    @property
    def serves_own_share(self) -> bool:
        return self.state in (NORMAL, COMM_INTERRUPTED, PARTNER_DOWN)

    @property
    def serves_everything(self) -> bool:
        return self.state == PARTNER_DOWN
