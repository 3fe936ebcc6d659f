"""The ``cluster`` service: heartbeats, liveness, ownership, partner states.

Events flow one way: heartbeat in -> liveness -> elections and partner
state machines -> ``roleChanged`` / ``partnerStateChanged`` callbacks on the
services that registered -> side effects (VIP add/remove, ...).  Nobody
polls.  Decisions are re-evaluated on every received heartbeat and every
beat, so a dead owner is replaced ``dead_after`` intervals after its last
beat, and a claim conflict left by a healed partition is resolved within
one heartbeat (the winner re-claims above every epoch seen).

Timing.  Every timer runs on ``clock``, a monotonic ``IReactorTime``
(:class:`appliance.cluster.clock.MonotonicClock` in production, a
``task.Clock`` in tests and the simulator): a wall-clock step changes no
deadline.  Wall time (``wall()``) is used only for what goes on the wire
(``sent_at``, for the skew estimate).  Beats leave on a drift-free
schedule: ``beats_per_interval`` (k) beats per interval at absolute times
``start + n * interval / k``, so the tick's own cost never stretches the
period.  A peer is suspected ``dead_after * interval + (interval / k) / 2``
after its last beat (half a beat period of slack for jitter).

Loss tolerance.  A false suspicion needs every beat of that window lost:
``dead_after * k`` consecutive beats.  With independent loss p and
``R = k / interval`` beats per second, false suspicions come at a rate of
about ``R * (1 - p) * p ** (dead_after * k)`` per second.  At 100 ms,
dead_after 3, k = 3 (30 beats/s): p = 10 % gives 2.7e-8/s, one in about
430 days (k = 1 would give 36 an hour); p = 20 % gives 1.2e-5/s, about
one a day; k = 4 at 20 %: one in about 70 days.  The detection time stays
``dead_after`` intervals.

Without a ``[cluster]`` table the node is alone: it owns every resource it
has a priority for and sends no heartbeats.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application.service import Service
from twisted.internet import defer, protocol
from twisted.logger import Logger

from appliance.admin.rpc import ApplicationError
from appliance.cluster import partner as P
from appliance.cluster.heartbeat import (DROP_REASONS, Heartbeat, HeartbeatVerifier,
                                         config_digest, encode)
from appliance.cluster.ownership import Claim, ResourceSpec, View, decide
from appliance.net.sockets import set_receive_buffer

_log = Logger(namespace="appliance.cluster")

SKEW_WARN_S = 30.0
LINK_CHECK_S = 0.5         # how often VIP interfaces are checked for carrier
DETAIL_EVERY = 10          # heartbeats between config-detail broadcasts
HEARTBEAT_RCVBUF = 1 << 20  # bytes of kernel receive buffer for the heartbeat socket


def load_key(path: str) -> bytes:
    """Read the heartbeat HMAC key (text, stripped; at least 16 bytes)."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as e:
        raise ValueError(f"cluster.auth_key_file {path}: {e.strerror or e}") from None
    if len(key) < 16:
        raise ValueError(f"cluster.auth_key_file {path}: key is shorter than 16 bytes")
    return key


def next_incarnation(state_dir: Path) -> int:
    """A number larger than any previous start's (wall-clock ns, persisted)."""
    path = state_dir / "cluster.incarnation"
    try:
        last = int(path.read_text().strip())
    except (OSError, ValueError):
        last = 0
    inc = max(time.time_ns(), last + 1)
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(inc))
    os.replace(tmp, path)
    return inc


@dataclass
class PeerInfo:
    id: str
    address: str
    last_seen: float | None = None
    alive: bool = False
    heartbeat: Heartbeat | None = None
    skew_s: float | None = None
    timer: Any = None            # fires dead_after after the last heartbeat
    config_mismatch: dict[str, list[str]] = field(default_factory=dict)
    # loss and jitter from sequence gaps (per incarnation)
    incarnation: int | None = None
    last_seq: int = 0
    got: int = 0
    lost: int = 0
    loss_ewma: float = 0.0       # share of beats lost, smoothed over ~100 beats
    jitter_s: float = 0.0        # RFC 3550-style smoothed |arrival - expected| deviation
    restarts: int = 0
    suspected: int = 0           # times the detector declared it dead

    @property
    def able(self) -> bool:
        return self.alive and self.heartbeat is not None and self.heartbeat.able


@dataclass
class Resource:
    spec: ResourceSpec
    settings: dict[str, Any]
    listeners: list[Callable] = field(default_factory=list)
    mine: Claim | None = None
    owner: str | None = None
    epoch: int = 0
    max_epoch: int = 0
    claiming: bool = False
    contested: bool = False      # another live node claims it while we own it
    vip_failures: int = 0        # consecutive failed VIP adds
    vip_error: str | None = None
    digest: Any = None           # (settings, config_digest(settings)) cache
    changed_at: float = 0.0
    reason: str = ""


@dataclass
class Partnership:
    fsm: P.PartnerFSM
    listeners: list[Callable] = field(default_factory=list)
    sync: Callable | None = None
    syncing: bool = False
    loading: bool = False        # persisted state being read: no transitions yet


class _HeartbeatProtocol(protocol.DatagramProtocol):
    def __init__(self, manager: "ClusterManager"):
        self.manager = manager

    def datagramReceived(self, data, addr):
        try:
            self.manager.datagram(data, addr)
        except Exception:
            _log.failure("heartbeat handling failed for a datagram from {addr}", addr=addr)


class ClusterManager(Service):
    """Peer liveness, resource ownership and partner states for one node."""

    name = "cluster"

    def __init__(self, reactor, *, node_id: str, cluster, vips=(), store=None,
                 state_dir: str | Path = ".", vip_manager=None, key: bytes | None = None,
                 clock=None, wall: Callable[[], float] | None = None):
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor    # monotonic timers
        self.wall = wall or time.time                            # wire timestamps only
        self.node_id = node_id
        self.cfg = cluster                      # ClusterSection or None (single node)
        self.store = store
        self.state_dir = Path(state_dir)
        self.vip_manager = vip_manager
        self._key = key
        self.interval = (cluster.heartbeat_interval_ms / 1000.0) if cluster else 0.1
        self.dead_after_s = self.interval * (cluster.dead_after if cluster else 3)
        self.beats = max(1, int(getattr(cluster, "beats_per_interval", 1) or 1))
        self.beat_period = self.interval / self.beats
        self.deadline_s = self.dead_after_s + 0.5 * self.beat_period
        self._next_beat_at: float | None = None
        self._beat_no = 0
        self.peers: dict[str, PeerInfo] = {
            p.id: PeerInfo(p.id, str(p.address)) for p in (cluster.peers if cluster else ())}
        self.resources: dict[str, Resource] = {}
        self.partners: dict[str, Partnership] = {}
        self.health: set[str] = set()
        self.maintenance = False
        self.excluded: set[str] = set()         # resources this node was demoted from
        self.res_unable: dict[str, float] = {}  # resource -> retry time (failed VIP add)
        self.incarnation = 0
        self.seq = 0
        self.verifier: HeartbeatVerifier | None = None
        self.port = None
        self.peerlink = None                    # PeerLink when [cluster] has peer_link
        self._tick_call = None
        self._link_check_at = 0.0
        self._link_checking = False
        self.interfaces_down: list[str] = []
        self.skew_listeners: list[Callable] = []
        self.started_at = 0.0
        self.hold_until = 0.0
        self.stats = {"sent": 0, "received": 0, "send_errors": 0, "role_changes": 0,
                      "partner_transitions": 0, "reannounced": 0, "late_beats": 0}
        for vip in vips:
            self.add_resource(
                ResourceSpec(vip.name, dict(vip.priority), vip.preempt, kind="vip"),
                settings={"address": str(vip.address), "priority": dict(vip.priority),
                          "preempt": vip.preempt})

    # ------------------------------------------------------------------
    # registration API for services
    # ------------------------------------------------------------------
    @property
    def single(self) -> bool:
        return not self.peers

    def add_resource(self, spec: ResourceSpec, settings: dict | None = None,
                     listener: Callable | None = None) -> None:
        """Register a resource; ``listener(resource, role, epoch)`` hears role changes."""
        res = self.resources.get(spec.name)
        if res is None:
            res = self.resources[spec.name] = Resource(spec, settings or {})
        if listener is not None:
            res.listeners.append(listener)
            if res.mine is not None:
                self.clock.callLater(0, self._call, listener, spec.name, "owner", res.mine.epoch)
        if self.running:
            self.evaluate()

    def register_resource(self, name: str, listener: Callable, *, priority: dict | None = None,
                          preempt: bool = True, kind: str = "service", settings: dict | None = None):
        """Convenience for services: default priority 100 for every node."""
        prio = priority or {n: 100 for n in [self.node_id, *self.peers]}
        self.add_resource(ResourceSpec(name, prio, preempt, kind), settings or {"priority": prio,
                                                                               "preempt": preempt},
                          listener)

    def on_skew(self, listener: Callable) -> None:
        """``listener(peer, skew_s)`` hears when a peer's clock skew crosses
        the warning threshold (30 s) in either direction.  Services that
        exchange absolute times (lease expiry, registration expiry) use it."""
        self.skew_listeners.append(listener)

    def skew(self, peer: str) -> float | None:
        """The smoothed clock offset of ``peer`` (its clock minus ours), seconds."""
        return self.peers[peer].skew_s

    def role(self, name: str) -> str:
        res = self.resources.get(name)
        return "owner" if res is not None and res.mine is not None else "standby"

    def register_partner(self, peer: str, listener: Callable | None = None, *,
                         primary: bool, sync: Callable | None = None,
                         data_lost: bool = False) -> str:
        """Join a partner relationship with ``peer``; returns the current state.

        ``listener(peer, state, reason)`` hears every transition; ``sync(peer)``
        (returning a Deferred) runs in RECOVER to resynchronise.  The state
        persisted by the previous run is read from the store before the first
        transition (a node that was PARTNER-DOWN comes back PARTNER-DOWN).
        ``data_lost``: the service has no valid stable storage (a fresh or
        lost lease store): the relationship starts in RECOVER and serves
        nothing until it synced from the peer.
        """
        if peer not in self.peers:
            raise ValueError(f"{peer!r} is not a cluster peer")
        ps = self.partners.get(peer)
        if ps is None:
            fsm = P.PartnerFSM(peer, primary=primary,
                               auto_partner_down_s=self.cfg.auto_partner_down_s,
                               startup_wait_s=max(2 * self.dead_after_s, 0.5),
                               now=self.clock.seconds(), data_lost=data_lost)
            ps = self.partners[peer] = Partnership(fsm)
            if self.store is not None:
                ps.loading = True
                d = self.store.get(self._partner_key(peer))

                def loaded(value):
                    if value in P.STATES:
                        ps.fsm.persisted = value
                        _log.info("partner {peer}: state before this start was {state}",
                                  peer=peer, state=value)

                def unreadable(f):
                    _log.warn("partner {peer}: persisted state unreadable ({why}); "
                              "starting without it", peer=peer, why=f.getErrorMessage())

                def ready(_):
                    ps.loading = False

                d.addCallbacks(loaded, unreadable).addBoth(ready)
                d.addErrback(lambda f: _log.failure("partner load bookkeeping", failure=f))
        if listener is not None:
            ps.listeners.append(listener)
        if sync is not None:
            ps.sync = sync
        return ps.fsm.state

    def _partner_key(self, peer: str) -> str:
        return f"cluster:partner:{self.node_id}:{peer}"

    # ------------------------------------------------------------------
    # life cycle
    # ------------------------------------------------------------------
    def startService(self):
        super().startService()
        d = defer.succeed(None)
        if self.vip_manager is not None:
            # Removes stale VIPs a previous run left behind before any claim.
            d = defer.maybeDeferred(self.vip_manager.startService)
        return d.addCallback(lambda _: self._start())

    def _start(self):
        self.started_at = self.clock.seconds()
        if self.single:
            self.hold_until = self.started_at
            self.evaluate()
            return defer.succeed(None)
        if self._key is None:
            self._key = load_key(self.cfg.auth_key_file)
        self.incarnation = next_incarnation(self.state_dir)
        self.verifier = HeartbeatVerifier(self._key, self.node_id, self.peers,
                                          incarnation=self.incarnation,
                                          window=self.beats * (self.cfg.dead_after + 2))
        if self.cfg.peer_link and self.cfg.tls is not None:
            from appliance.cluster.peerlink import from_config
            self.peerlink = from_config(self.reactor, self.node_id, self.incarnation, self.cfg,
                                        clock=self.clock)
            self.peerlink.startService().addErrback(
                lambda f: _log.error("peer link failed to start: {why}", why=f.getErrorMessage()))
        # Listen for the peers before claiming anything; hold claims until a
        # live owner elsewhere would have been heard.
        self.hold_until = self.started_at + self.dead_after_s + self.interval
        interface = str(self.cfg.bind_address) if self.cfg.bind_address else ""
        self.port = self.reactor.listenUDP(self.cfg.heartbeat_port, _HeartbeatProtocol(self),
                                           interface=interface)
        # A burst of junk (a forger, a misconfigured box) queues instead of
        # crowding the partner's real heartbeats out of a ~200 KiB default buffer.
        sock = getattr(self.port, "socket", None)       # (a test reactor's port has none)
        if sock is not None:
            set_receive_buffer(sock, HEARTBEAT_RCVBUF)
        d = self._load_persisted()
        d.addErrback(lambda f: _log.warn("could not load persisted cluster state: {why}",
                                         why=f.getErrorMessage()))
        d.addCallback(lambda _: self._tick())
        _log.info("cluster: node {node} incarnation {inc}, peers {peers}, heartbeat every "
                  "{ms} ms, dead after {dead} ms", node=self.node_id, inc=self.incarnation,
                  peers=", ".join(self.peers), ms=round(self.interval * 1000),
                  dead=round(self.dead_after_s * 1000))
        return d

    def _load_persisted(self):
        if self.store is None:
            return defer.succeed(None)

        @defer.inlineCallbacks
        def load():
            for name, res in self.resources.items():
                value = yield self.store.get(f"cluster:epoch:{name}")
                if value is not None:
                    res.max_epoch = max(res.max_epoch, int(value))
            for peer, ps in self.partners.items():
                if ps.fsm.persisted is None and not ps.loading:
                    value = yield self.store.get(self._partner_key(peer))
                    if value in P.STATES:
                        ps.fsm.persisted = value
        return load()

    def stopService(self):
        super().stopService()
        if self._tick_call is not None and self._tick_call.active():
            self._tick_call.cancel()
        self._tick_call = None
        for peer in self.peers.values():
            if peer.timer is not None and peer.timer.active():
                peer.timer.cancel()
        # Give everything up, tell the peers once, then stop listening.
        for res in self.resources.values():
            if res.mine is not None:
                self._set_mine(res, None, "node shutdown")
        steps = []
        if self.peerlink is not None and self.peerlink.running:
            steps.append(defer.maybeDeferred(self.peerlink.stopService))
        if self.port is not None:
            self.maintenance = True
            self._send_heartbeats()          # peers see "maintenance" and take over at once
            steps.append(defer.maybeDeferred(self.port.stopListening))
            self.port = None
        if self.vip_manager is not None:
            steps.append(defer.maybeDeferred(self.vip_manager.stopService))  # removes held VIPs
        d = defer.gatherResults(steps, consumeErrors=True)
        d.addErrback(lambda f: _log.error("cluster stop: {why}", why=f.getErrorMessage()))
        return d

    # ------------------------------------------------------------------
    # heartbeats
    # ------------------------------------------------------------------
    def _tick(self):
        self._tick_call = None
        try:
            self._send_heartbeats()
            self._detect()
            for peer, ps in self.partners.items():
                if not ps.loading:
                    self._transition(ps, ps.fsm.tick(self.clock.seconds()))
            self._check_links()
            self._expire_unable()
            self.evaluate()
        except Exception:
            _log.failure("cluster tick failed")
        if self.running:
            self._schedule_tick()

    def _schedule_tick(self):
        """The next beat at an absolute time on the monotonic clock: the tick's
        own cost never stretches the period (a stall skips, counted)."""
        now = self.clock.seconds()
        if self._next_beat_at is None:
            self._next_beat_at = now
        self._next_beat_at += self.beat_period
        if self._next_beat_at <= now:
            missed = int((now - self._next_beat_at) / self.beat_period) + 1
            self.stats["late_beats"] += missed
            self._next_beat_at += missed * self.beat_period
        self._tick_call = self.clock.callLater(self._next_beat_at - now, self._tick)

    def _check_links(self):
        """Flag ``interface_down`` while a VIP's interface has no carrier."""
        now = self.clock.seconds()
        checker = getattr(self.vip_manager, "interfaces_down", None)
        if checker is None or self._link_checking or now < self._link_check_at:
            return
        self._link_check_at = now + LINK_CHECK_S
        self._link_checking = True

        def got(down):
            self._link_checking = False
            if down != self.interfaces_down:
                _log.warn("client-facing interfaces down: {down}; this node {verdict}",
                          down=", ".join(down) or "none",
                          verdict="cannot serve" if down else "can serve again")
                self.interfaces_down = down
                if down:
                    self.health.add("interface_down")
                else:
                    self.health.discard("interface_down")
                self._send_heartbeats()
                self.evaluate()

        def failed(f):
            self._link_checking = False
            _log.warn("interface check failed: {why}", why=f.getErrorMessage())

        defer.maybeDeferred(checker).addCallbacks(got, failed)

    def health_flags(self) -> tuple[str, ...]:
        flags = set(self.health)
        flags.update(f"unable:{name}" for name in self.res_unable)
        if self.maintenance:
            flags.add("maintenance")
        if self.store is not None and not getattr(self.store, "healthy", True):
            flags.add("store_down")
        return tuple(sorted(flags))

    def build_heartbeat(self) -> Heartbeat:
        self.seq += 1
        claims = {name: (res.mine.owner, res.mine.epoch, res.mine.manual)
                  for name, res in self.resources.items() if res.mine is not None}
        config = {}
        detail = {} if self.seq % DETAIL_EVERY == 1 else None
        for name, res in self.resources.items():
            overall, per = self._digest(res)
            config[name] = overall
            if detail is not None:
                detail[name] = per
        if self.verifier is not None:
            self.verifier.sent_seq = self.seq
        return Heartbeat(self.node_id, self.incarnation, self.seq, self.wall(),
                         self.health_flags(), claims,
                         {peer: ps.fsm.state for peer, ps in self.partners.items()},
                         config, detail,
                         self.verifier.echo() if self.verifier is not None else None,
                         {name: res.max_epoch for name, res in self.resources.items()
                          if res.max_epoch > 0})

    def _send_heartbeats(self):
        if self.port is None:
            return
        datagram = encode(self.build_heartbeat(), self._key)
        for peer in self.peers.values():
            try:
                self.port.write(datagram, (peer.address, self.cfg.heartbeat_port))
                self.stats["sent"] += 1
            except Exception as e:   # unreachable network, no route: counted, not fatal
                self.stats["send_errors"] += 1
                _log.debug("heartbeat to {peer} failed: {why}", peer=peer.id, why=e)

    def datagram(self, data: bytes, addr) -> None:
        hb = self.verifier.accept(data) if self.verifier else None
        if hb is None:
            return
        self.stats["received"] += 1
        now = self.clock.seconds()
        peer = self.peers[hb.node]
        was_alive = peer.alive
        self._account(peer, hb, now)
        peer.last_seen, peer.heartbeat, peer.alive = now, hb, True
        # Suspect the peer dead_after intervals (+ half a beat) after its last
        # beat, not at the next tick: takeover time does not depend on ticks.
        if peer.timer is not None and peer.timer.active():
            peer.timer.reset(self.deadline_s)
        else:
            peer.timer = self.clock.callLater(self.deadline_s, self._deadline)
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
            for listener in list(self.skew_listeners):
                self._call(listener, peer.id, peer.skew_s)
        self._check_config(peer, hb)
        if not was_alive:
            _log.info("peer {peer} alive (incarnation {inc}, health {health})", peer=peer.id,
                      inc=hb.incarnation, health=",".join(hb.health) or "ok")
        for name, (owner, epoch, _) in hb.resources.items():
            res = self.resources.get(name)
            if res is not None and epoch > res.max_epoch:
                res.max_epoch = epoch
        for name, epoch in hb.max_epochs.items():
            res = self.resources.get(name)
            if res is not None and epoch > res.max_epoch:
                res.max_epoch = epoch
        ps = self.partners.get(peer.id)
        if ps is not None and not ps.loading:
            reported = hb.partners.get(self.node_id)
            self._transition(ps, ps.fsm.heard(reported, now,
                                              maintenance="maintenance" in hb.health))
        self.evaluate()

    def _account(self, peer: PeerInfo, hb: Heartbeat, now: float):
        """Loss and jitter from sequence gaps; a new incarnation resets them
        (and the peer link, which may be half-open to the old process)."""
        if peer.incarnation != hb.incarnation:
            if peer.incarnation is not None:
                peer.restarts += 1
                _log.info("peer {peer} restarted (incarnation {old} -> {new})", peer=peer.id,
                          old=peer.incarnation, new=hb.incarnation)
                if self.peerlink is not None:
                    self.peerlink.reset(peer.id, "peer restarted")
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
            deviation = abs((now - peer.last_seen) - gap * self.beat_period)
            peer.jitter_s += (deviation - peer.jitter_s) / 16
        peer.last_seq = hb.seq

    def _check_config(self, peer: PeerInfo, hb: Heartbeat):
        for name, digest in hb.config.items():
            res = self.resources.get(name)
            if res is None:
                continue
            overall, mine = self._digest(res)
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

    def _deadline(self):
        try:
            self._detect()
            self.evaluate()
        except Exception:
            _log.failure("liveness deadline handling failed")

    def _detect(self):
        now = self.clock.seconds()
        for peer in self.peers.values():
            if peer.alive and (peer.last_seen is None
                               or now - peer.last_seen >= self.deadline_s - 1e-6):
                peer.alive = False
                peer.suspected += 1
                _log.warn("peer {peer} suspected dead: no heartbeat for {ms} ms", peer=peer.id,
                          ms=round((now - (peer.last_seen or now)) * 1000))
                ps = self.partners.get(peer.id)
                if ps is not None and not ps.loading:
                    self._transition(ps, ps.fsm.lost(now))

    # ------------------------------------------------------------------
    # ownership
    # ------------------------------------------------------------------
    def _able_nodes(self) -> set[str]:
        able = {p.id for p in self.peers.values() if p.able}
        if not any(f in ("maintenance", "interface_down", "service_failed", "store_down")
                   for f in self.health_flags()):
            able.add(self.node_id)
        return able

    def evaluate(self) -> None:
        """Run every resource's election and act on the result."""
        if not self.running:
            return
        able = self._able_nodes()
        alive = {p.id for p in self.peers.values() if p.alive} | {self.node_id}
        holding = self.clock.seconds() < self.hold_until
        for name, res in self.resources.items():
            claims = {}
            for peer in self.peers.values():
                hb = peer.heartbeat
                if peer.alive and hb is not None and name in hb.resources:
                    owner, epoch, manual = hb.resources[name]
                    if owner == peer.id:
                        claims[peer.id] = Claim(owner, epoch, manual)
            excluded = self._excluded(name, res, able)
            usable = able
            if not any(res.spec.priority.get(n, 0) > 0 for n in able):
                # Nobody healthy can serve it: better a degraded owner than none.
                usable = alive
            view = View(usable, claims, res.max_epoch, excluded)
            d = decide(res.spec, view, self.node_id, res.mine)
            owner = self.node_id if res.mine else max(
                claims.values(), key=lambda c: c.epoch, default=Claim("", 0)).owner or None
            res.owner = owner
            if d.action == "claim" and not holding and not res.claiming:
                self._claim(res, d.epoch, why=self._why(res, claims, able))
            elif d.action == "reassert" and not res.claiming:
                # Won a contest against a newer claim (a healed partition under
                # preempt): claim again above it, so listeners hear the new
                # epoch and the VIP is announced again.
                self._claim(res, d.epoch, manual=res.mine.manual,
                            why="re-asserted after a contest (" + self._why(res, claims, able) + ")")
            elif d.action == "keep" and res.mine is not None:
                contested = any(c.owner != self.node_id for c in claims.values())
                if contested and not res.contested:
                    # Someone else announces it too: announce again
                    # (keepalived garp_lower_prio_repeat).
                    self._reannounce(res, "contest: " + self._why(res, claims, able))
                res.contested = contested
            elif d.action == "release":
                self._set_mine(res, None, f"{d.winner or 'nobody'} should own it "
                                          f"({self._why(res, claims, able)})")
                res.owner = d.winner if d.winner in claims else None
            if name in self.excluded and res.owner not in (None, self.node_id):
                self.excluded.discard(name)    # demote done: someone else took it

    def _digest(self, res: Resource):
        """``config_digest`` of the resource's settings, cached (settings are
        fixed once the node runs; a change before start is picked up)."""
        if res.digest is None or res.digest[0] is not res.settings or not self.running:
            res.digest = (res.settings, config_digest(res.settings))
        return res.digest[1]

    def _excluded(self, name: str, res: Resource, able: set[str]) -> set[str]:
        """Nodes that must not own ``name`` now: this node after a demote or
        while its VIP cannot be added (if someone else can take it); a peer
        that flags ``unable:<name>`` or does not have the resource at all."""
        excluded = {self.node_id} if name in self.excluded else set()
        for peer in self.peers.values():
            hb = peer.heartbeat
            if peer.alive and hb is not None and (f"unable:{name}" in hb.health
                                                  or name not in hb.config):
                excluded.add(peer.id)
        if name in self.res_unable:
            others = [n for n in able if n != self.node_id and n not in excluded
                      and res.spec.priority.get(n, 0) > 0]
            if others:
                excluded.add(self.node_id)
        return excluded

    def _vip_result(self, ok, res: Resource):
        name = res.spec.name
        if ok is False and res.mine is not None:
            res.vip_failures += 1
            backoff = min(2.0 ** (res.vip_failures - 1), 60.0)
            self.res_unable[name] = self.clock.seconds() + backoff
            res.vip_error = f"add failed {res.vip_failures}x; retry in {backoff:g}s"
            _log.error("vip {res}: address could not be added ({n} failures); flagged "
                       "unable:{res} so a peer can take it; retry in {backoff:g}s",
                       res=name, n=res.vip_failures, backoff=backoff)
            self._send_heartbeats()
            self.evaluate()
        elif ok:
            res.vip_failures = 0
            res.vip_error = None
            self.res_unable.pop(name, None)

    def _expire_unable(self):
        now = self.clock.seconds()
        for name, until in list(self.res_unable.items()):
            if now < until:
                continue
            del self.res_unable[name]
            res = self.resources.get(name)
            if res is not None and res.mine is not None and self.vip_manager is not None:
                # Still the owner (nobody else could take it): try again.
                d = defer.maybeDeferred(self.vip_manager.acquire, name, "retry after failure")
                d.addCallback(self._vip_result, res)
                d.addErrback(lambda f: _log.failure("vip retry", failure=f))

    def _why(self, res: Resource, claims: dict, able: set[str]) -> str:
        dead = [p.id for p in self.peers.values() if not p.alive]
        unable = [p.id for p in self.peers.values() if p.alive and not p.able]
        parts = []
        if dead:
            parts.append("dead: " + ",".join(dead))
        if unable:
            parts.append("unable: " + ",".join(unable))
        if claims:
            parts.append("claims: " + ",".join(f"{c.owner}@{c.epoch}" for c in claims.values()))
        return "; ".join(parts) or "election"

    def _claim(self, res: Resource, epoch: int, why: str, manual: bool = False):
        res.claiming = True
        d = self._persist_epoch(res.spec.name, epoch)

        def claimed(ok):
            res.claiming = False
            if not ok:
                _log.info("claim of {res} at epoch {epoch} lost a race in the shared store",
                          res=res.spec.name, epoch=epoch)
                return
            res.max_epoch = max(res.max_epoch, epoch)
            self._set_mine(res, Claim(self.node_id, epoch, manual), why)

        def failed(f):
            res.claiming = False
            _log.error("claim of {res} not persisted ({why}); not taking it",
                       res=res.spec.name, why=f.getErrorMessage())

        d.addCallbacks(claimed, failed)
        d.addErrback(lambda f: _log.failure("claim bookkeeping failed", failure=f))
        return d

    def _persist_epoch(self, name: str, epoch: int):
        """Store the epoch; with a shared store, only if nobody wrote a higher one."""
        if self.store is None:
            return defer.succeed(True)
        key = f"cluster:epoch:{name}"

        @defer.inlineCallbacks
        def go():
            for _ in range(5):
                current = yield self.store.get(key)
                if current is not None and int(current) >= epoch:
                    self.resources[name].max_epoch = max(self.resources[name].max_epoch,
                                                         int(current))
                    return False
                ok = yield self.store.cas(key, current, str(epoch))
                if ok:
                    return True
            return False
        return go()

    def _set_mine(self, res: Resource, claim: Claim | None, why: str):
        before = res.mine
        res.mine = claim
        if (before is None) == (claim is None) and before == claim:
            return
        now = self.clock.seconds()
        res.changed_at, res.reason = now, why
        if (before is None) != (claim is None):
            self.stats["role_changes"] += 1
        role = "owner" if claim is not None else "standby"
        epoch = claim.epoch if claim is not None else before.epoch
        res.epoch = epoch
        _log.info("resource {res}: {node} is now {role} (epoch {epoch}): {why}", res=res.spec.name,
                  node=self.node_id, role=role, epoch=epoch, why=why)
        if res.spec.kind == "vip" and self.vip_manager is not None:
            action = self.vip_manager.acquire if claim is not None else self.vip_manager.release
            d = defer.maybeDeferred(action, res.spec.name, why)
            if claim is not None:
                d.addCallback(self._vip_result, res)
            d.addErrback(lambda f: _log.error("vip {res}: {why}", res=res.spec.name,
                                              why=f.getErrorMessage()))
        for listener in list(res.listeners):
            self._call(listener, res.spec.name, role, epoch)

    def _reannounce(self, res: Resource, why: str):
        if res.spec.kind != "vip" or self.vip_manager is None:
            return
        self.stats["reannounced"] += 1
        d = defer.maybeDeferred(self.vip_manager.acquire, res.spec.name, why)
        d.addErrback(lambda f: _log.error("vip {res}: {why}", res=res.spec.name,
                                          why=f.getErrorMessage()))

    @staticmethod
    def _call(listener, *args):
        try:
            result = listener(*args)
            if isinstance(result, defer.Deferred):
                result.addErrback(lambda f: _log.failure("role listener failed", failure=f))
        except Exception:
            _log.failure("role listener {listener!r} failed", listener=listener)

    # ------------------------------------------------------------------
    # partner states
    # ------------------------------------------------------------------
    def _transition(self, ps: Partnership, t: P.Transition | None):
        if t is None:
            return
        self.stats["partner_transitions"] += 1
        _log.info("partner {peer}: {old} -> {new}: {reason}", peer=ps.fsm.peer, old=t.old,
                  new=t.new, reason=t.reason)
        if self.store is not None:
            self.store.set(self._partner_key(ps.fsm.peer), t.new).addErrback(
                lambda f: _log.warn("partner state not persisted: {why}", why=f.getErrorMessage()))
        for listener in list(ps.listeners):
            self._call(listener, ps.fsm.peer, t.new, t.reason)
        if t.new == P.RECOVER:
            self._start_sync(ps)

    def _start_sync(self, ps: Partnership):
        if ps.syncing:
            return
        ps.syncing = True
        d = defer.maybeDeferred(ps.sync, ps.fsm.peer) if ps.sync else defer.succeed(None)

        def done(_):
            ps.syncing = False
            self._transition(ps, ps.fsm.sync_done(self.clock.seconds()))

        def failed(f):
            ps.syncing = False
            _log.error("recovery sync with {peer} failed: {why}; retrying", peer=ps.fsm.peer,
                       why=f.getErrorMessage())
            self.clock.callLater(max(1.0, self.dead_after_s), self._retry_sync, ps)

        d.addCallbacks(done, failed)
        d.addErrback(lambda f: _log.failure("sync bookkeeping failed", failure=f))

    def _retry_sync(self, ps: Partnership):
        if self.running and ps.fsm.state == P.RECOVER:
            self._start_sync(ps)

    # ------------------------------------------------------------------
    # operator actions (JSON-RPC)
    # ------------------------------------------------------------------
    def _resource(self, name: str) -> Resource:
        res = self.resources.get(name)
        if res is None:
            known = ", ".join(sorted(self.resources)) or "none"
            raise ApplicationError(f"unknown resource {name!r} (known: {known})", code=-32020)
        return res

    def promote(self, resource: str):
        res = self._resource(resource)
        self.excluded.discard(resource)
        if res.mine is not None and res.mine.manual:
            return {"resource": resource, "owner": self.node_id, "epoch": res.mine.epoch}
        epoch = max(res.max_epoch, res.mine.epoch if res.mine else 0) + 1
        if res.mine is not None:
            self._set_mine(res, None, "operator promote (re-claim as manual)")
        d = self._claim(res, epoch, why="operator promote", manual=True)
        return d.addCallback(lambda _: {"resource": resource, "owner": res.owner if res.mine is None
                                        else self.node_id, "epoch": res.max_epoch})

    def demote(self, resource: str):
        res = self._resource(resource)
        others = [p.id for p in self.peers.values()
                  if p.able and res.spec.priority.get(p.id, 0) > 0]
        if res.mine is not None and not others:
            raise ApplicationError(f"no other node can take {resource} now", code=-32021)
        self.excluded.add(resource)
        self.evaluate()
        return {"resource": resource, "role": self.role(resource), "handed_to": others}

    def set_maintenance(self, on: bool):
        was, self.maintenance = self.maintenance, bool(on)
        if was and not on:
            for ps in self.partners.values():
                self._transition(ps, ps.fsm.leave_maintenance(self.clock.seconds()))
        _log.info("maintenance {state} on node {node}", state="on" if on else "off",
                  node=self.node_id)
        self._send_heartbeats()
        self.evaluate()
        return {"maintenance": self.maintenance}

    def partner_down(self, peer: str):
        ps = self.partners.get(peer)
        if peer not in self.peers:
            raise ApplicationError(f"{peer!r} is not a cluster peer", code=-32022)
        if self.peers[peer].alive:
            raise ApplicationError(f"peer {peer} is alive (heard {self._ago(self.peers[peer])} "
                                   "ago); refusing partner-down", code=-32023)
        if ps is not None:
            self._transition(ps, ps.fsm.partner_down(self.clock.seconds()))
        return {"peer": peer, "state": ps.fsm.state if ps else "no partnership"}

    def _ago(self, peer: PeerInfo) -> str:
        if peer.last_seen is None:
            return "never"
        return f"{(self.clock.seconds() - peer.last_seen) * 1000:.0f} ms"

    def status(self) -> dict[str, Any]:
        now = self.clock.seconds()
        peers = {}
        for p in self.peers.values():
            entry = {"alive": p.alive, "address": p.address,
                     "last_seen_ms": None if p.last_seen is None else round((now - p.last_seen) * 1000),
                     "state": (self.partners[p.id].fsm.state if p.id in self.partners
                               else ("alive" if p.alive else "dead")),
                     "health": list(p.heartbeat.health) if p.heartbeat else [],
                     "skew_s": None if p.skew_s is None else round(p.skew_s, 3),
                     "incarnation": p.incarnation, "restarts": p.restarts,
                     "suspected": p.suspected,
                     "unechoed": self.verifier.unechoed.get(p.id, 0) if self.verifier else 0,
                     "received": p.got, "lost": p.lost, "loss": round(p.loss_ewma, 4),
                     "jitter_ms": round(p.jitter_s * 1000, 2)}
            if p.skew_s is not None and abs(p.skew_s) > SKEW_WARN_S:
                entry["warning"] = f"clock skew {p.skew_s:.1f}s"
            if p.config_mismatch:
                entry["config_mismatch"] = dict(p.config_mismatch)
            peers[p.id] = entry
        resources = {}
        for name, res in self.resources.items():
            resources[name] = {"owner": res.owner, "epoch": res.mine.epoch if res.mine else res.max_epoch,
                               "role": "owner" if res.mine else "standby", "kind": res.spec.kind,
                               "manual": bool(res.mine and res.mine.manual),
                               "vip_error": res.vip_error,
                               "since_s": round(now - res.changed_at, 3) if res.changed_at else None,
                               "reason": res.reason}
        warnings = []
        if self.cfg is not None and self.cfg.auto_partner_down_s > 0 and self.partners:
            warnings.append(
                f"auto_partner_down_s = {self.cfg.auto_partner_down_s:g} without a witness or "
                "client evidence: in a partition both sides could be PARTNER-DOWN and serve "
                "the same addresses")
        return {"node": self.node_id, "incarnation": self.incarnation, "warnings": warnings,
                "heartbeat": {"interval_ms": round(self.interval * 1000),
                              "beats_per_interval": self.beats,
                              "deadline_ms": round(self.deadline_s * 1000, 1),
                              "late_beats": self.stats["late_beats"]},
                "maintenance": self.maintenance, "health": list(self.health_flags()),
                "heartbeat_interval_ms": round(self.interval * 1000),
                "peers": peers, "resources": resources,
                "partners": {peer: ps.fsm.state for peer, ps in self.partners.items()},
                "drops": dict(self.verifier.drops) if self.verifier else {},
                "peer_link": self.peerlink.status() if self.peerlink is not None else None,
                "stats": dict(self.stats)}

    def register_methods(self, rpc) -> None:
        rpc.register("cluster.status", self.status, doc="Peers, resources, partner states.")
        rpc.register("cluster.promote", self.promote, doc="Take a resource now {resource}.")
        rpc.register("cluster.demote", self.demote, doc="Hand a resource to a peer {resource}.")
        rpc.register("cluster.maintenance", self.set_maintenance,
                     doc="{on}: hand everything to the partner and stop claiming.")
        rpc.register("cluster.partner_down", self.partner_down,
                     doc="{peer}: declare a silent peer down (serve everything).")

    # ------------------------------------------------------------------
    # metrics
    # ------------------------------------------------------------------
    def collect(self):
        sent = CounterMetricFamily("appliance_heartbeats_sent", "Heartbeats sent")
        sent.add_metric([], self.stats["sent"])
        yield sent
        recv = CounterMetricFamily("appliance_heartbeats_received", "Heartbeats accepted")
        recv.add_metric([], self.stats["received"])
        yield recv
        drops = CounterMetricFamily("appliance_heartbeats_dropped",
                                    "Heartbeats dropped, by reason", labels=["reason"])
        counts = self.verifier.drops if self.verifier else {}
        for reason in DROP_REASONS:
            drops.add_metric([reason], counts.get(reason, 0))
        yield drops
        alive = GaugeMetricFamily("appliance_peer_alive", "1 if the peer is heard", labels=["peer"])
        for p in self.peers.values():
            alive.add_metric([p.id], 1 if p.alive else 0)
        yield alive
        lost = CounterMetricFamily("appliance_heartbeats_lost",
                                   "Heartbeats missing from the peer's sequence", labels=["peer"])
        loss = GaugeMetricFamily("appliance_heartbeat_loss_ratio",
                                 "Smoothed share of the peer's heartbeats lost", labels=["peer"])
        jitter = GaugeMetricFamily("appliance_heartbeat_jitter_seconds",
                                   "Smoothed heartbeat arrival jitter", labels=["peer"])
        for p in self.peers.values():
            lost.add_metric([p.id], p.lost)
            loss.add_metric([p.id], p.loss_ewma)
            jitter.add_metric([p.id], p.jitter_s)
        yield lost
        yield loss
        yield jitter
        changes = CounterMetricFamily("appliance_failovers", "Ownership changes on this node")
        changes.add_metric([], self.stats["role_changes"])
        yield changes
        owner = GaugeMetricFamily("appliance_resource_owner", "1 if this node owns the resource",
                                  labels=["resource"])
        for name, res in self.resources.items():
            owner.add_metric([name], 1 if res.mine else 0)
        yield owner


def new_cluster_key() -> str:
    return secrets.token_hex(32)
