"""The failure detector: per-peer liveness on the monotonic clock, loss and
jitter from sequence gaps, the skew estimate, config diffs.

A peer is suspected ``deadline_s`` (``dead_after`` intervals plus half a beat
period) after its last authentic beat; the timer is reset by every beat, so
takeover time does not depend on tick alignment.  ``on_down(peer)`` hears
each suspicion, ``on_restart(peer)`` each new incarnation of a peer.

A silence that overlaps a stall of this node is judged only once this node
has run ``stall_grace_s`` (one interval: ``beats_per_interval`` beats of a
live peer) since the stall ended (``stall_end(now)``: the heartbeat channel
sees its own ticks run late; the process or the whole host was not
scheduled).  A stall of this node alone leaves the peer's beats queued in
the socket (read before deciding); a stall of the whole host (a VM pause, a
starved box) also silenced the peer when both run there, and that silence
is no evidence of a death.  A death is then detected at most one interval
later than it would be without the stall (never more than ``deadline_s`` +
the stall + one interval after the last beat: a node late on every tick
still suspects).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.logger import Logger

from appliance.cluster.heartbeat import Heartbeat

_log = Logger(namespace="appliance.cluster")

SKEW_WARN_S = 30.0


@dataclass
class PeerInfo:
    id: str
    address: str
    last_seen: float | None = None
    alive: bool = False
    heartbeat: Heartbeat | None = None
    skew_s: float | None = None
    timer: Any = None            # fires deadline_s after the last heartbeat
    stall_deferred: bool = False  # its suspicion is put off (we were stalled)
    config_mismatch: dict[str, list[str]] = field(default_factory=dict)
    # loss and jitter from sequence gaps (per incarnation)
    incarnation: int | None = None
    last_seq: int = 0
    got: int = 0
    lost: int = 0
    loss_ewma: float = 0.0       # share of beats lost, smoothed over ~100 beats
    jitter_s: float = 0.0        # RFC 3550-style smoothed |arrival - expected| deviation
    early: bool = False          # the last beat came well before its schedule (an extra one)
    restarts: int = 0
    suspected: int = 0           # times the detector declared it dead

    @property
    def able(self) -> bool:
        return self.alive and self.heartbeat is not None and self.heartbeat.able


class PeerTable:
    """Liveness of every peer; emits ``on_down``, ``on_restart``, ``on_skew``."""

    def __init__(self, clock, peers: dict[str, str], *, deadline_s: float, beat_period: float,
                 wall: Callable[[], float], on_deadline: Callable[[], None],
                 on_down: Callable[[PeerInfo, float], None],
                 on_restart: Callable[[PeerInfo], None],
                 on_skew: Callable[[PeerInfo], None]):
        self.clock = clock
        self.peers = {pid: PeerInfo(pid, addr) for pid, addr in peers.items()}
        self.deadline_s, self.beat_period = deadline_s, beat_period
        self.wall = wall
        self.on_deadline, self.on_down = on_deadline, on_down
        self.on_restart, self.on_skew = on_restart, on_skew
        #: now -> (when, how long) of this node's latest stall (None: never stalled)
        self.stall_end: Callable[[float], tuple[float, float] | None] = lambda now: None
        self.stall_grace_s = 0.0
        self.stall_deferred = 0      # suspicions put off because we were stalled

    def heard(self, hb: Heartbeat, now: float) -> tuple[PeerInfo, bool]:
        """Record an authentic beat; ``(peer, it was alive before)``."""
        peer = self.peers[hb.node]
        was_alive = peer.alive
        self._account(peer, hb, now)
        peer.last_seen, peer.heartbeat, peer.alive = now, hb, True
        peer.stall_deferred = False
        if peer.timer is not None and peer.timer.active():
            peer.timer.reset(self.deadline_s)
        else:
            peer.timer = self.clock.callLater(self.deadline_s, self.on_deadline)
        self._skew(peer, hb)
        if not was_alive:
            _log.info("peer {peer} alive (incarnation {inc}, health {health})", peer=peer.id,
                      inc=hb.incarnation, health=",".join(hb.health) or "ok")
        return peer, was_alive

    def _account(self, peer: PeerInfo, hb: Heartbeat, now: float):
        """Loss and jitter from sequence gaps; a new incarnation resets them."""
        if peer.incarnation != hb.incarnation:
            if peer.incarnation is not None:
                peer.restarts += 1
                _log.info("peer {peer} restarted (incarnation {old} -> {new})", peer=peer.id,
                          old=peer.incarnation, new=hb.incarnation)
                self.on_restart(peer)
            peer.incarnation, peer.last_seq = hb.incarnation, hb.seq
            peer.got += 1
            return
        gap = hb.seq - peer.last_seq
        lost = max(0, gap - 1)
        peer.got += 1
        peer.lost += lost
        alpha = 0.01
        for _ in range(min(lost, 200)):
            peer.loss_ewma += alpha * (1 - peer.loss_ewma)
        peer.loss_ewma += alpha * (0 - peer.loss_ewma)
        if peer.last_seen is not None and gap > 0:
            # An extra beat (sent at once on a state change, off the schedule)
            # says nothing about jitter, nor does the interval after it.
            early = (now - peer.last_seen) < 0.5 * gap * self.beat_period
            if not early and not peer.early:
                deviation = abs((now - peer.last_seen) - gap * self.beat_period)
                peer.jitter_s += (deviation - peer.jitter_s) / 16
            peer.early = early
        peer.last_seq = hb.seq

    def _skew(self, peer: PeerInfo, hb: Heartbeat):
        skew = hb.sent_at - self.wall()
        was_skewed = peer.skew_s is not None and abs(peer.skew_s) > SKEW_WARN_S
        peer.skew_s = skew if peer.skew_s is None else 0.8 * peer.skew_s + 0.2 * skew
        skewed = abs(peer.skew_s) > SKEW_WARN_S
        if skewed != was_skewed:
            if skewed:
                _log.warn("clock skew with peer {peer} is {skew:.1f}s (warn above {limit:.0f}s); "
                          "services exchanging absolute times are told",
                          peer=peer.id, skew=peer.skew_s, limit=SKEW_WARN_S)
            else:
                _log.info("clock skew with peer {peer} back to {skew:.3f}s", peer=peer.id,
                          skew=peer.skew_s)
            self.on_skew(peer)

    def check_config(self, peer: PeerInfo, hb: Heartbeat, digest_of: Callable[[str], Any]):
        """Name the settings of shared resources that differ from the peer's."""
        for name, digest in hb.config.items():
            mine_digest = digest_of(name)
            if mine_digest is None:
                continue
            overall, mine = mine_digest
            if overall == digest:
                peer.config_mismatch.pop(name, None)
                continue
            if hb.config_detail is not None and name in hb.config_detail:
                theirs = hb.config_detail[name]
                differing = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                if peer.config_mismatch.get(name) != differing:
                    _log.warn("resource {res}: settings differ from peer {peer}: {settings}",
                              res=name, peer=peer.id, settings=", ".join(differing))
                peer.config_mismatch[name] = differing
            else:
                peer.config_mismatch.setdefault(name, ["(details follow)"])

    def detect(self, now: float, logs: list | None = None) -> list[PeerInfo]:
        """Suspect every peer silent for ``deadline_s``; the newly suspected.
        ``logs``: the "suspected dead" lines are appended there (for
        :meth:`log_suspected` once the takeover is under way), not logged."""
        down = []
        stall = None
        for peer in self.peers.values():
            if peer.alive and (peer.last_seen is None
                               or now - peer.last_seen >= self.deadline_s - 1e-6):
                if peer.last_seen is not None and self.stall_grace_s > 0:
                    if stall is None:
                        stall = self.stall_end(now) or (0.0, 0.0)
                    end, length = stall
                    if (end > peer.last_seen and now - end < self.stall_grace_s - 1e-6
                            and now - peer.last_seen
                            < self.deadline_s + length + self.stall_grace_s):
                        # we were not running for part of that silence: wait
                        # (every tick detects again)
                        if not peer.stall_deferred:
                            peer.stall_deferred = True
                            self.stall_deferred += 1
                            _log.info("peer {peer} silent for {ms} ms, but this node was "
                                      "stalled during it: judged {grace} ms after the stall",
                                      peer=peer.id, ms=round((now - peer.last_seen) * 1000),
                                      grace=round(self.stall_grace_s * 1000))
                        continue
                peer.alive = False
                peer.suspected += 1
                entry = (peer.id, round((now - (peer.last_seen or now)) * 1000))
                if logs is None:
                    self.log_suspected([entry])
                else:
                    logs.append(entry)
                down.append(peer)
                self.on_down(peer, now)
        return down

    @staticmethod
    def log_suspected(entries) -> None:
        for peer_id, ms in entries:
            _log.warn("peer {peer} suspected dead: no heartbeat for {ms} ms", peer=peer_id, ms=ms)

    def stop(self):
        for peer in self.peers.values():
            if peer.timer is not None and peer.timer.active():
                peer.timer.cancel()

    def status(self, now: float) -> dict[str, dict]:
        out = {}
        for p in self.peers.values():
            entry = {"alive": p.alive, "address": p.address,
                     "last_seen_ms": None if p.last_seen is None else round((now - p.last_seen) * 1000),
                     "health": list(p.heartbeat.health) if p.heartbeat else [],
                     "skew_s": None if p.skew_s is None else round(p.skew_s, 3),
                     "incarnation": p.incarnation, "restarts": p.restarts,
                     "suspected": p.suspected,
                     "received": p.got, "lost": p.lost, "loss": round(p.loss_ewma, 4),
                     "jitter_ms": round(p.jitter_s * 1000, 2)}
            if p.skew_s is not None and abs(p.skew_s) > SKEW_WARN_S:
                entry["warning"] = f"clock skew {p.skew_s:.1f}s"
            if p.config_mismatch:
                entry["config_mismatch"] = dict(p.config_mismatch)
            out[p.id] = entry
        return out


#: Settings every node must agree on for an election to agree (review M1).
ELECTION_SETTINGS = ("priority", "preempt")


def apply_election_fallback(m) -> None:
    """Peers that disagree on a resource's priority map (or preempt) each
    elect by their own config: each may pick itself (two owners) or the
    other (none).  While a live peer reports such a difference for a
    resource, every node elects it by a config-independent rule instead --
    equal priority for every node that has the resource and no preemption:
    the current claimant with the highest epoch keeps it, else the largest
    node id -- and it is reported (log, ``cluster.status`` warning).  The
    configured spec comes back once the configs agree."""
    from appliance.cluster.ownership import ResourceSpec
    saved = m.__dict__.setdefault("_configured_specs", {})
    for name, res in m.resources.items():
        peers = sorted(p.id for p in m.node_peers() if p.alive and any(
            k in ELECTION_SETTINGS for k in p.config_mismatch.get(name, ())))
        if peers and name not in saved:
            members = {m.node_id} | {p.id for p in m.node_peers()
                                     if p.heartbeat is not None and name in p.heartbeat.config}
            saved[name] = res.spec
            res.spec = ResourceSpec(name, {n: 1 for n in sorted(members)}, False, res.spec.kind)
            _log.warn("resource {res}: priority/preempt differ from {peers}: elected by the "
                      "config-independent rule (the current owner keeps it, else the largest "
                      "node id) until the configs agree", res=name, peers=", ".join(peers),
                      election_fallback={"resource": name, "peers": peers})
        elif not peers and name in saved:
            res.spec = saved.pop(name)
            _log.info("resource {res}: configs agree again; elected by priority", res=name)


def election_fallbacks(m) -> list[str]:
    return sorted(getattr(m, "_configured_specs", {}))

