"""Unable until synced: a (re)starting registrar does not own shards before its peers
gave it what it missed.

A node that was down (or restarted) holds bindings that may be old; the peers
that served meanwhile push it the AORs it missed (delta or paged full resync,
:mod:`services.sip.replication`) and then a ``synced`` marker.  Until every
replication peer sent that marker, this node reports the sip service as
failed with reason ``syncing`` (``cluster.service_failed("sip", "syncing")``):
the cluster keeps every resource that follows the sip service (the shard
resources, registered with ``kind = "sip"``, and a ``[[vip]]`` with
``service = "sip"``) away from it while an able peer can hold them -- so a
preempting node does not take a shard back with stale bindings -- and gives
them to it anyway when no peer is able (never no owner).  Then it reports
``service_failed("sip", None)``.

A peer that is not there cannot send the marker: once ``grace_s`` passed since
the start, a peer that is neither linked nor alive (heartbeats) is not waited
for.  After ``max_s`` the node stops waiting for anyone (e.g. an older peer
that sends no marker), with a warning.
"""

from __future__ import annotations

from typing import Callable

from twisted.logger import Logger

_log = Logger(namespace="services.sip.syncgate")

REASON = "syncing"


class SyncGate:
    def __init__(self, cluster, peers, *, now: Callable[[], float],
                 connected: Callable[[str], bool], alive: Callable[[str], bool],
                 grace_s: float = 5.0, max_s: float = 600.0, service: str = "sip"):
        self.cluster = cluster
        self.peers = tuple(peers)
        self.now = now
        self.connected = connected
        self.alive = alive
        self.grace_s = grace_s
        self.max_s = max_s
        self.service = service
        self.waiting: set[str] = set(self.peers)
        self.started: float | None = None
        self.syncing = False
        self.synced_at: float | None = None
        self.gave_up: list[str] = []

    def _report(self, reason: str | None) -> None:
        report = getattr(self.cluster, "service_failed", None)
        if report is None:
            return
        try:
            report(self.service, reason)
        except Exception:
            _log.failure("sip: could not report {reason!r} to the cluster", reason=reason)

    def begin(self) -> None:
        """Unable from now (call it before the cluster's first election)."""
        self.started = self.now()
        if not self.waiting:
            return
        self.syncing = True
        self._report(REASON)
        _log.info("sip: unable for its shards until {peers} sent what this node missed",
                  peers=", ".join(sorted(self.waiting)))

    def synced(self, peer: str) -> None:
        """``peer`` sent its synced marker."""
        if peer in self.waiting:
            self.waiting.discard(peer)
            self._check()

    def tick(self) -> None:
        """Once a second: stop waiting for peers that are not there."""
        if not self.syncing or self.started is None:
            return
        waited = self.now() - self.started
        if waited >= self.max_s:
            _log.warn("sip: no synced marker from {peers} after {s:.0f}s: serving anyway",
                      peers=", ".join(sorted(self.waiting)), s=waited)
            self.gave_up.extend(sorted(self.waiting))
            self.waiting.clear()
        elif waited >= self.grace_s:
            for peer in sorted(self.waiting):
                if not self.connected(peer) and not self.alive(peer):
                    _log.info("sip: {peer} is down: not waiting for its resync", peer=peer)
                    self.gave_up.append(peer)
                    self.waiting.discard(peer)
        self._check()

    def _check(self) -> None:
        if self.syncing and not self.waiting:
            self.syncing = False
            self.synced_at = self.now()
            took = self.synced_at - self.started if self.started is not None else 0.0
            self._report(None)
            _log.info("sip: synced with its peers after {s:.1f}s: able to serve", s=took)

    def status(self) -> dict:
        return {"syncing": self.syncing, "waiting_for": sorted(self.waiting),
                "not_waited_for": list(self.gave_up),
                "synced_after_s": None if self.synced_at is None or self.started is None
                else round(self.synced_at - self.started, 3)}
