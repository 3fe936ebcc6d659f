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
  ``auto_partner_down_s``) down: serve everything.
* ``RECOVER`` -- back after the peer ran in PARTNER-DOWN: serve nothing
  until the partner's state is synced.
* ``RECOVER-DONE`` -- synced; waiting for the peer to return to NORMAL.

Every state has a way out that needs no restart: RECOVER times out into a
fresh sync attempt and operator ``partner-down`` works from any state.
"""

from __future__ import annotations

from dataclasses import dataclass

STARTUP = "STARTUP"
NORMAL = "NORMAL"
COMM_INTERRUPTED = "COMMUNICATIONS-INTERRUPTED"
PARTNER_DOWN = "PARTNER-DOWN"
RECOVER = "RECOVER"
RECOVER_DONE = "RECOVER-DONE"
STATES = (STARTUP, NORMAL, COMM_INTERRUPTED, PARTNER_DOWN, RECOVER, RECOVER_DONE)


@dataclass(frozen=True)
class Transition:
    old: str
    new: str
    reason: str


class PartnerFSM:
    """One side of a partner relationship with ``peer``."""

    def __init__(self, peer: str, *, primary: bool, auto_partner_down_s: float,
                 startup_wait_s: float, now: float, persisted: str | None = None):
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

    # ------------------------------------------------------------------
    def _go(self, new: str, now: float, reason: str) -> Transition | None:
        if new == self.state:
            return None
        t = Transition(self.state, new, reason)
        self.state, self.since = new, now
        if new == COMM_INTERRUPTED:
            self.interrupted_at = now
        return t

    # ------------------------------------------------------------------
    def heard(self, peer_state: str | None, now: float, *, maintenance: bool = False) -> Transition | None:
        """A heartbeat from the peer reporting ``peer_state`` for us."""
        self.peer_seen = True
        self.peer_state = peer_state
        self.peer_maintenance = maintenance
        if maintenance:
            # The peer promised to stop serving: take everything now.
            return self._go(PARTNER_DOWN, now, f"peer {self.peer} in maintenance")
        s = self.state
        if s in (STARTUP, COMM_INTERRUPTED):
            if peer_state == PARTNER_DOWN:
                return self._go(RECOVER, now, f"peer {self.peer} ran in PARTNER-DOWN; resync")
            if s == STARTUP and self.persisted == PARTNER_DOWN and peer_state in (RECOVER, STARTUP):
                return self._go(PARTNER_DOWN, now, "was PARTNER-DOWN before restart; peer recovering")
            return self._go(NORMAL, now, f"peer {self.peer} heard ({peer_state})")
        if s == PARTNER_DOWN:
            if peer_state in (RECOVER_DONE, NORMAL):
                return self._go(NORMAL, now, f"peer {self.peer} recovered ({peer_state})")
            if peer_state == PARTNER_DOWN and not self.primary:
                return self._go(RECOVER, now, "both sides ran PARTNER-DOWN; secondary resyncs")
            return None
        if s == NORMAL:
            if peer_state == PARTNER_DOWN:
                return self._go(RECOVER, now, f"peer {self.peer} ran in PARTNER-DOWN; resync")
            return None
        if s == RECOVER_DONE:
            if peer_state in (NORMAL, RECOVER_DONE, COMM_INTERRUPTED, STARTUP):
                return self._go(NORMAL, now, f"peer {self.peer} is {peer_state}")
            return None
        return None

    def lost(self, now: float) -> Transition | None:
        """The failure detector stopped hearing the peer."""
        self.peer_state = None
        self.interrupted_at = now
        if self.state in (NORMAL, RECOVER_DONE):
            return self._go(COMM_INTERRUPTED, now, f"peer {self.peer} not heard")
        return None

    def tick(self, now: float) -> Transition | None:
        """Time-driven transitions."""
        if self.state == STARTUP and not self.peer_seen and now - self.since >= self.startup_wait_s:
            if self.persisted == PARTNER_DOWN:
                return self._go(PARTNER_DOWN, now, "was PARTNER-DOWN before restart; peer still silent")
            return self._go(COMM_INTERRUPTED, now,
                            f"peer {self.peer} not heard within {self.startup_wait_s:g}s of start")
        if (self.state in (COMM_INTERRUPTED, RECOVER) and self.peer_state is None
                and self.auto_partner_down_s > 0 and self.interrupted_at is not None
                and now - self.interrupted_at >= self.auto_partner_down_s):
            return self._go(PARTNER_DOWN, now,
                            f"peer {self.peer} silent for {self.auto_partner_down_s:g}s "
                            "(auto_partner_down_s)")
        return None

    def partner_down(self, now: float) -> Transition | None:
        """Operator says the peer is down (works from every state)."""
        return self._go(PARTNER_DOWN, now, "operator partner-down")

    def sync_done(self, now: float) -> Transition | None:
        if self.state == RECOVER:
            return self._go(RECOVER_DONE, now, "recovery sync finished")
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
