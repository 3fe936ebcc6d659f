"""The ``cluster`` service: heartbeats, liveness, ownership, partner states.

A thin façade over the pieces, each in its own module:

* :mod:`~appliance.cluster.transport` -- the heartbeat socket, key,
  incarnation, sequence, the drift-free send schedule;
* :mod:`~appliance.cluster.detector` -- per-peer liveness, loss and jitter,
  skew, config diffs;
* :mod:`~appliance.cluster.health` -- the flags this node advertises;
* :mod:`~appliance.cluster.resources` -- elections, epochs, claims, VIPs;
* :mod:`~appliance.cluster.partners` -- partner state machines and syncs;
* :mod:`~appliance.cluster.admin` -- RPC methods, status, metrics.

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
period.  A peer is suspected ``dead_after * interval + slack`` after its
last beat; the slack is ``[cluster] deadline_slack_ms``, by default half a
beat period (``(interval / k) / 2``, room for jitter).  keepalived's
counterpart of the slack is its skew time, ``(256 - priority) / 256 x
advert`` (1.2 ms at priority 253 and 100 ms): ``deadline_slack_ms``
reproduces its threshold exactly (bench/failover.py's
``appliance-as-keepalived-254`` row).  A slack below the delay jitter of
the heartbeat path lets a late beat (not a lost one) end the deadline.

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

import time
from pathlib import Path
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from appliance.cluster import admin
from appliance.cluster.detector import SKEW_WARN_S, PeerInfo, PeerTable  # noqa: F401 (API)
from appliance.cluster.detector import apply_election_fallback
from appliance.cluster.keys import cert_expiry, previous_keys
from appliance.cluster.errors import ClusterError
from appliance.cluster.health import LocalHealth
from appliance.cluster.heartbeat import Heartbeat
from appliance.cluster.ownership import ResourceSpec
from appliance.cluster.partners import Partnership, Partnerships  # noqa: F401 (API)
from appliance.cluster.quorum import Quorum
from appliance.cluster.resources import Resource, ResourceTable, call_listener  # noqa: F401
from appliance.cluster.transport import (URGENT_BURST, HeartbeatChannel,  # noqa: F401 (API)
                                         MaintenanceMark, load_key, new_cluster_key,
                                         next_incarnation)

_log = Logger(namespace="appliance.cluster")

DETAIL_EVERY = 10          # heartbeats between config-detail broadcasts


def deadline_slack_s(cluster, beat_period: float) -> float:
    """The liveness deadline's slack after ``dead_after`` intervals, in seconds:
    ``[cluster] deadline_slack_ms`` when set, else half a beat period (the
    default, unchanged since the drift-free schedule)."""
    slack_ms = getattr(cluster, "deadline_slack_ms", None)
    if slack_ms is None:
        return 0.5 * beat_period
    if slack_ms < 0:
        raise ValueError(f"cluster.deadline_slack_ms: {slack_ms} is below the minimum 0")
    return slack_ms / 1000.0


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
        self.deadline_s = self.dead_after_s + deadline_slack_s(cluster, self.beat_period)
        # keepalived's preempt_delay (resources.py ResourceTable._settle)
        self.preempt_delay_s = float(getattr(cluster, "preempt_delay_s", 0.0) or 0.0)
        self.stats = {"sent": 0, "received": 0, "send_errors": 0, "role_changes": 0,
                      "partner_transitions": 0, "reannounced": 0, "late_beats": 0,
                      "oversize_sent": 0}
        self.skew_listeners: list[Callable] = []
        self.is_witness = getattr(cluster, "role", "node") == "witness"
        witness = getattr(cluster, "witness", None)
        self.witness_id: str | None = witness.id if witness is not None else None
        members = {p.id: str(p.address) for p in (cluster.peers if cluster else ())}
        if witness is not None:
            members[witness.id] = str(witness.address)
        self.node_ids = [self.node_id] + [p.id for p in (cluster.peers if cluster else ())]
        # every heartbeat address of each peer (``addresses``: further paths)
        self._paths = {p.id: [str(a) for a in p.paths] for p in (cluster.peers if cluster else ())}
        self.detector = PeerTable(
            self.clock, members,
            deadline_s=self.deadline_s, beat_period=self.beat_period, wall=self._wall_now,
            on_deadline=self._deadline, on_down=self._peer_down, on_restart=self._peer_restart,
            on_skew=self._peer_skew)
        self.peers: dict[str, PeerInfo] = self.detector.peers
        self.health = LocalHealth(self.clock, store=lambda: self.store,
                                  vip_manager=lambda: self.vip_manager, changed=self.changed)
        self.table = ResourceTable(self)
        self.gateway = None                 # [cluster] track_gateway (gateway.py)
        gw = getattr(cluster, "track_gateway", None)
        if gw is not None and not self.is_witness:
            from appliance.cluster.gateway import GatewayCheck
            self.gateway = GatewayCheck(self.clock, self.health, str(gw.address),
                                        interval_s=gw.interval_s, timeout_s=gw.timeout_s,
                                        fall=gw.fall, rise=gw.rise, reactor=reactor)
        self.fencer = None                  # [cluster] pre_takeover (fencing.py)
        pre = getattr(cluster, "pre_takeover", None)
        if pre is not None and not self.is_witness:
            from appliance.cluster.fencing import Fencer
            self.fencer = Fencer(self.clock, node_id, pre.command, pre.timeout_s,
                                 reactor=reactor, on_change=lambda: self.changed()
                                 if self.running else None)
        self.resources: dict[str, Resource] = self.table.resources
        self.excluded = self.table.excluded
        self.partnerships = Partnerships(self)
        self.quorum = Quorum(self)
        from appliance.cluster.lease_witness import from_manager as _lease_witness
        self.lease = _lease_witness(self, store)   # [cluster.witness] redis_lease, or None
        self.partners: dict[str, Partnership] = self.partnerships.partners
        self.incarnation = 0
        self.channel: HeartbeatChannel | None = None
        self.port = None
        self.peerlink = None                    # PeerLink when [cluster] has peer_link
        self.certs: dict[str, dict] = {}        # peer-link cert/CA expiry (keys.cert_expiry)
        self.started_at = 0.0
        self.hold_until = 0.0
        # The operator's maintenance survives a restart (state_dir/cluster.maintenance)
        self.maintenance_mark = MaintenanceMark(self.state_dir)
        self._mark_lock = defer.DeferredLock()      # saves run one after another
        for vip in vips:
            self.add_resource(
                ResourceSpec(vip.name, dict(vip.priority), vip.preempt, kind="vip"),
                settings={"address": str(vip.address), "priority": dict(vip.priority),
                          "preempt": vip.preempt})
            if getattr(vip, "service", None):
                self.health.colocated[vip.name] = vip.service   # M6: the VIP follows it
        self.health.kinds = lambda: {n: r.spec.kind for n, r in self.resources.items()}

    def _wall_now(self) -> float:
        return self.wall()

    # ------------------------------------------------------------------
    # registration API for services
    # ------------------------------------------------------------------
    @property
    def single(self) -> bool:
        return not self.peers

    @property
    def maintenance(self) -> bool:
        return self.health.maintenance

    @maintenance.setter
    def maintenance(self, on: bool):
        self.health.maintenance = bool(on)

    @property
    def verifier(self):
        return self.channel.verifier if self.channel is not None else None

    @property
    def seq(self) -> int:
        return self.channel.seq if self.channel is not None else 0

    def add_resource(self, spec: ResourceSpec, settings: dict | None = None,
                     listener: Callable | None = None) -> None:
        """Register a resource; ``listener(resource, role, epoch)`` hears role changes."""
        self.table.add(spec, settings, listener)
        if self.running:
            self.evaluate()

    def register_resource(self, name: str, listener: Callable, *, priority: dict | None = None,
                          preempt: bool = True, kind: str = "service", settings: dict | None = None):
        """Convenience for services: default priority 100 for every node."""
        prio = priority or {n: 100 for n in self.node_ids}
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
                         data_lost: bool = False, recover_wait_s: float = 0.0,
                         peer_link: bool | None = None) -> str:
        """Join a partner relationship with ``peer``; returns the current state.

        ``listener(peer, state, reason)`` hears every transition; ``sync(peer)``
        (returning a Deferred) runs in RECOVER to resynchronise.  The state
        persisted by the previous run is read from the store before the first
        transition (a node that was PARTNER-DOWN comes back PARTNER-DOWN).
        ``data_lost``: the service has no valid stable storage (a fresh or
        lost lease store): the relationship starts in RECOVER and serves
        nothing until it synced from the peer, then waits ``recover_wait_s``
        (the service's MCLT) in RECOVER-WAIT.  ``sync`` also runs in
        POTENTIAL-CONFLICT (the primary first, then the secondary).
        ``peer_link``: the relationship replicates over the peer link (default:
        when it has a ``sync``), so it is not NORMAL while that link is down
        (COMMUNICATIONS-INTERRUPTED after dead_after intervals, "peer link down").
        """
        if peer not in self.peers or peer == self.witness_id:
            raise ValueError(f"{peer!r} is not a cluster peer")
        return self.partnerships.register(peer, listener, primary=primary, sync=sync,
                                          data_lost=data_lost, recover_wait_s=recover_wait_s,
                                          peer_link=peer_link)

    def partner_confirmed(self, peer: str) -> bool:
        """True iff the relationship with ``peer`` is PARTNER-DOWN and that is
        *confirmed*: the operator's ``partner-down``, or an automatic one
        backed by the witness's quorum or by the partner's clients going
        unanswered.  Heartbeat silence alone, a partner in maintenance or one
        recovering is not (its addresses are not ours to give).  Already
        correct when the listener hears the transition."""
        return self.partnerships.confirmed(peer)

    def service_failed(self, name: str, reason: str | None, *,
                       source: str | None = "service") -> None:
        """The node's service ``name`` cannot serve (``reason``) or can again
        (None): while it cannot, this node advertises ``service_failed:<name>``
        and is unable for the resources that follow it (VIPs with
        ``service = name``; resources registered with ``kind = name``, as
        ``register_resource(..., kind="sip")`` does), so they move to a peer
        whose service runs (or stay here when no peer can: one degraded owner,
        never none); other resources stay.

        A service calls it itself at any time, e.g. ``service_failed("sip",
        "syncing")`` until it has its data, then ``service_failed("sip", None)``.
        node.py reports start failures as ``source="start"``; each source is
        cleared on its own (a successful start does not clear the service's
        own report).  ``source=None`` with ``reason=None`` clears them all."""
        self.health.service_failed(name, reason, source)

    def reload_keys(self):
        """Re-read ``auth_key_file`` (beats are signed with it from now on)
        and ``previous_auth_key_file`` (also accepted), and the peer-link
        certificates' expiry: the key rotation of etc/README, without a
        restart and without a moment where the peers reject each other."""
        if self.channel is None:
            raise ClusterError("no heartbeats on this node (single node)", code=-32026)
        try:
            key = load_key(self.cfg.auth_key_file) if self.cfg.auth_key_file else self._key
            previous = previous_keys(self.cfg)
        except ValueError as e:
            raise ClusterError(f"keys not reloaded: {e}", code=-32026) from None
        changed = key != self._key
        self._key = self.channel.key = self.channel.verifier.key = key
        self.channel.verifier.previous_keys = previous
        self.certs = self._read_certs()
        _log.info("cluster keys reloaded: signing key {what}, {n} previous key(s) accepted",
                  what="changed" if changed else "unchanged", n=len(previous))
        return {"signing_key_changed": changed, "previous_keys": len(previous),
                "accepted_by_key": dict(self.channel.verifier.accepted_by_key)}

    def _read_certs(self) -> dict:
        tls = getattr(self.cfg, "tls", None)
        if tls is None:
            return {}
        return {"cert": cert_expiry(tls.cert), "ca": cert_expiry(tls.ca)}

    def report_client_evidence(self, peer: str, unanswered_clients: int) -> None:
        """A service (dhcp4) reports how many distinct clients of ``peer``
        retransmitted past their threshold without an answer from ``peer`` in
        its recent window (0 when none).  With ``auto_partner_down_s`` > 0,
        no witness, the partner silent (COMMUNICATIONS-INTERRUPTED) at least
        that long and the latest report at ``partner_down_min_clients`` or
        more, the relationship enters a confirmed PARTNER-DOWN."""
        if peer not in self.partners:
            return
        self.partnerships.report_client_evidence(peer, unanswered_clients, self.clock.seconds())

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
        self._load_maintenance()
        if self.gateway is not None:
            self.gateway.start()
        if self.single:
            self.hold_until = self.started_at
            self.evaluate()
            return defer.succeed(None)
        if self._key is None:
            self._key = load_key(self.cfg.auth_key_file)
        self.incarnation = next_incarnation(self.state_dir)
        self.channel = HeartbeatChannel(
            self.reactor, self.clock, node_id=self.node_id, key=self._key,
            incarnation=self.incarnation, peers={p.id: self._paths.get(p.id, p.address)
                                                       for p in self.peers.values()},
            port=self.cfg.heartbeat_port, beat_period=self.beat_period,
            # (in sequence numbers: extra beats (send_soon) at most double the
            # scheduled rate, plus a burst, so the window still spans the time)
            window=2 * self.beats * (self.cfg.dead_after + 2) + URGENT_BURST,
            build=lambda: self.build_heartbeat(), on_beat=self._beat,
            on_tick=self._tick, stats=self.stats)
        self.channel.verifier.previous_keys = previous_keys(self.cfg)   # M7: key rotation
        self.detector.stall_end = self.channel.stall_end   # our own stalls are no silence
        self.detector.stall_grace_s = self.interval
        self.certs = self._read_certs()
        if self.cfg.peer_link and self.cfg.tls is not None:
            from appliance.cluster.peerlink import from_config
            self.peerlink = from_config(self.reactor, self.node_id, self.incarnation, self.cfg,
                                        clock=self.clock)
            self.peerlink.startService().addErrback(
                lambda f: _log.error("peer link failed to start: {why}", why=f.getErrorMessage()))
        # Listen for the peers before claiming anything; hold claims until a
        # live owner elsewhere would have been heard.
        self.hold_until = self.started_at + self.dead_after_s + self.interval
        self.table.start_settling()              # preempt_delay_s: in the first beat
        interface = str(self.cfg.bind_address) if self.cfg.bind_address else ""
        self.port = self.channel.listen(interface)
        d = self._load_persisted()
        d.addErrback(lambda f: _log.warn("could not load persisted cluster state: {why}",
                                         why=f.getErrorMessage()))
        d.addCallback(lambda _: self.channel.start() if self.running else None)
        d.addErrback(lambda f: _log.failure("cluster start", failure=f))
        _log.info("cluster: node {node} incarnation {inc}, peers {peers}, {k} heartbeats every "
                  "{ms} ms, suspect after {dead} ms", node=self.node_id, inc=self.incarnation,
                  peers=", ".join(self.peers), k=self.beats, ms=round(self.interval * 1000),
                  dead=round(self.deadline_s * 1000, 1))
        return d

    def _load_maintenance(self):
        """Maintenance set by the operator before a restart is still on:
        this node claims nothing until ``cluster.maintenance {on:false}``."""
        try:
            kept = self.maintenance_mark.load()
        except Exception as e:
            _log.error("cluster: could not read the maintenance mark: {why}", why=e)
            return
        if kept:
            self.maintenance = True
            _log.warn("cluster: node {node} starts in MAINTENANCE, kept from the previous run "
                      "({path}): it claims nothing until 'cluster.maintenance {{on: false}}' "
                      "('appliancectl maintenance off')", node=self.node_id,
                      path=str(getattr(self.maintenance_mark, "path", "")))

    def _load_persisted(self):
        if self.store is None:
            return defer.succeed(None)
        d = self.table.load_epochs(self.store)
        d.addCallback(lambda _: self.partnerships.load(self.store))
        return d

    def stopService(self):
        super().stopService()
        if self.gateway is not None:
            self.gateway.stop()
        if self.channel is not None:
            self.channel.stop()
        self.detector.stop()
        # Give everything up, tell the peers once, then stop listening.
        self.table.release_all("node shutdown")
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
        """Every beat: send, detect, partner timers, carrier, VIP retries, elect."""
        if not self.running:
            return
        self._send_heartbeats()
        now = self.clock.seconds()
        self.detector.detect(now)
        if self.is_witness:
            self.quorum.update_vote(now)
        if self.lease is not None:
            self.lease.tick(now)
        self.partnerships.tick(now, allow_auto=self.quorum.allow_auto_partner_down())
        self.health.check_links()
        self.table.retry_vips(self.health.expired_unable())
        self.evaluate()

    def health_flags(self) -> tuple[str, ...]:
        return self.health.flags()

    def build_heartbeat(self) -> Heartbeat:
        seq = self.channel.next_seq() if self.channel is not None else 0
        claims = {name: (res.mine.owner, res.mine.epoch, res.mine.manual)
                  for name, res in self.resources.items() if res.mine is not None}
        config = {}
        detail = {} if seq % DETAIL_EVERY == 1 else None
        for name, res in self.resources.items():
            overall, per = self.table.digest(res)
            config[name] = overall
            if detail is not None:
                detail[name] = per
        verifier = self.verifier
        health = self.health_flags() + (("witness",) if self.is_witness else ())
        hb = Heartbeat(self.node_id, self.incarnation, seq, self.wall(),
                       health, claims, self.partnerships.states(),
                       config, detail, verifier.echo() if verifier is not None else None,
                       {name: res.max_epoch for name, res in self.resources.items()
                        if res.max_epoch > 0}, self.vote if self.is_witness else None)
        return self._fitter().fit(hb)       # M8: within the size budget, optional parts shed

    def _fitter(self):
        from appliance.cluster.heartbeat import BeatFitter
        if getattr(self, "_beat_fitter", None) is None:
            self._beat_fitter = BeatFitter(self._key or b"", self.stats, log=_log.warn)
        return self._beat_fitter

    # ------------------------------------------------------------------
    # quorum and the witness (quorum.py)
    # ------------------------------------------------------------------
    def node_peers(self):
        return self.quorum.node_peers()

    def has_quorum(self) -> bool:
        return self.quorum.has_quorum()

    def connected(self, peer: PeerInfo) -> bool:
        return self.quorum.connected(peer)

    @property
    def vote(self) -> str | None:
        return self.quorum.vote

    def _send_heartbeats(self):
        if self.channel is not None and self.port is not None:
            self.channel.send(self.port)

    def send_soon(self):
        """A state a peer waits for changed here (want, claim, release,
        releasing, demoted, an intent, health): an extra beat now, not at the
        next tick (rate-limited, see HeartbeatChannel.send_soon).  A promote
        then takes a few network delays, not a few beat periods."""
        if self.channel is not None and self.port is not None and self.running:
            self.channel.send_soon(self._send_heartbeats)

    def changed(self):
        """Local health changed: re-elect and tell the peers now."""
        self.evaluate()
        self.send_soon()

    def datagram(self, data: bytes, addr) -> None:
        """A datagram from the heartbeat socket (also the tests' entry point)."""
        if self.channel is not None:
            self.channel.received(data, addr)

    def _beat(self, hb: Heartbeat) -> None:
        now = self.clock.seconds()
        before = self.peers[hb.node].heartbeat if hb.node in self.peers else None
        peer, _ = self.detector.heard(hb, now)
        if before is not None and before.health != hb.health:
            # The peer's flags moved (want:, claiming:, releasing:, ...): it may
            # wait for our answer or our echo of this beat; answer now.
            self.send_soon()
        self.detector.check_config(peer, hb, self.table.digest_of)
        apply_election_fallback(self)             # M1: peers disagree on priorities
        self.table.learn(hb)
        if not self.maintenance:
            # In maintenance this node serves nothing and its peer is
            # PARTNER-DOWN by design: that is no conflict; leaving maintenance
            # goes through RECOVER.
            self.partnerships.heard(peer.id, hb.partners.get(self.node_id), now,
                                    "maintenance" in hb.health)
        self.evaluate()

    def _deadline(self):
        try:
            # After a stall of this process the deadline and queued beats become
            # ready together, in no set order: read what the kernel holds first,
            # so a beat that did arrive is never declared lost.
            read = getattr(self.port, "doRead", None)
            if read is not None:
                try:
                    read()
                except Exception:
                    _log.failure("draining the heartbeat socket")
            # The claim (and the VIP's netlink job) starts before the
            # "suspected dead" line is formatted and written: the log is not
            # on the takeover's path.
            logs: list = []
            try:
                self.detector.detect(self.clock.seconds(), logs)
                self.evaluate()
            finally:
                self.detector.log_suspected(logs)
        except Exception:
            _log.failure("liveness deadline handling failed")

    def _peer_down(self, peer: PeerInfo, now: float):
        self.partnerships.lost(peer.id, now)

    def _peer_restart(self, peer: PeerInfo):
        if self.peerlink is not None:
            self.peerlink.reset(peer.id, "peer restarted")

    def _peer_skew(self, peer: PeerInfo):
        for listener in list(self.skew_listeners):
            call_listener(listener, peer.id, peer.skew_s)

    # ------------------------------------------------------------------
    # ownership
    # ------------------------------------------------------------------
    def evaluate(self) -> None:
        """Run every resource's election and act on the result."""
        if self.running:
            self.table.evaluate()

    # ------------------------------------------------------------------
    # operator actions (JSON-RPC through cluster/admin.py)
    # ------------------------------------------------------------------
    def _resource(self, name: str) -> Resource:
        res = self.resources.get(name)
        if res is None:
            known = ", ".join(sorted(self.resources)) or "none"
            raise ClusterError(f"unknown resource {name!r} (known: {known})", code=-32020)
        return res

    def promote(self, resource: str):
        """Take ``resource`` now as a manual claim (kept until demote)."""
        res = self._resource(resource)
        if not self.has_quorum():
            raise ClusterError(f"no quorum: this node cannot own {resource} now (it does not "
                               "see a majority of the nodes and the witness)", code=-32025)
        self.excluded.discard(resource)
        if res.mine is not None and res.mine.manual:
            return {"resource": resource, "owner": self.node_id, "epoch": res.mine.epoch}
        if not self.health.able():
            raise ClusterError(f"this node cannot serve {resource} now (health: "
                               f"{','.join(self.health_flags())})", code=-32026)
        # Break before make (resources.py ResourceTable.promote): the owner
        # lets go first, then this node claims.
        return self.table.promote(res)

    def demote(self, resource: str):
        res = self._resource(resource)
        others = [p.id for p in self.peers.values()
                  if p.able and res.spec.priority.get(p.id, 0) > 0]
        if res.mine is not None and not others:
            raise ClusterError(f"no other node can take {resource} now", code=-32021)
        self.excluded.add(resource)
        self.evaluate()
        return {"resource": resource, "role": self.role(resource), "handed_to": others}

    def set_maintenance(self, on: bool):
        """Maintenance on: hand everything over and claim nothing, also after
        a restart (kept in the state dir until maintenance off).  The answer
        comes once the mark is on disk (``persisted``: False when it could
        not be written; the maintenance itself holds in this run anyway)."""
        on = bool(on)
        was, self.maintenance = self.maintenance, on
        if was and not on:
            self.partnerships.leave_maintenance(self.clock.seconds())
        _log.info("maintenance {state} on node {node}", state="on" if on else "off",
                  node=self.node_id)
        self.changed()
        saved = self._save_maintenance(on)
        if isinstance(saved, defer.Deferred):
            return saved.addCallback(lambda ok: {"maintenance": on, "persisted": ok})
        return {"maintenance": on, "persisted": saved}

    def _save_maintenance(self, on: bool):
        """Write (on) or remove (off) the mark: in a thread when the reactor
        has one (fsync), in order; at once otherwise (tests, simulator)."""
        from twisted.internet.interfaces import IReactorThreads

        def failed(e):
            _log.error("cluster: maintenance {state} not persisted ({why}): a restart "
                       "would not keep it", state="on" if on else "off", why=e)
            return False

        if not IReactorThreads.providedBy(self.reactor):
            try:
                self.maintenance_mark.save(on)
            except Exception as e:
                return failed(e)
            return True
        from twisted.internet import threads
        d = self._mark_lock.run(threads.deferToThreadPool, self.reactor,
                                self.reactor.getThreadPool(), self.maintenance_mark.save, on)
        return d.addCallbacks(lambda _: True, lambda f: failed(f.getErrorMessage()))

    def partner_down(self, peer: str):
        """Declare ``peer`` down.  Refused while its heartbeats show its side
        of the relationship alive (a peer heard without one -- its service
        failed or stopped -- may be declared down)."""
        if peer not in self.peers:
            raise ClusterError(f"{peer!r} is not a cluster peer", code=-32022)
        info = self.peers[peer]
        related = info.heartbeat is not None and self.node_id in info.heartbeat.partners
        if info.alive and (related or peer not in self.partners):
            raise ClusterError(f"peer {peer} is alive (heard {self._ago(info)} ago); "
                               "refusing partner-down", code=-32023)
        return {"peer": peer, "state": self.partnerships.partner_down(peer, self.clock.seconds())}

    def _ago(self, peer: PeerInfo) -> str:
        if peer.last_seen is None:
            return "never"
        return f"{(self.clock.seconds() - peer.last_seen) * 1000:.0f} ms"

    def status(self) -> dict[str, Any]:
        return admin.status(self)

    def register_methods(self, rpc) -> None:
        admin.register_methods(self, rpc)

    def collect(self):
        return admin.collect(self)

    @property
    def cluster_id(self) -> str:
        """This cluster's stable identity (the dns service writes it into its
        guards): a digest of the sorted member node ids and of the heartbeat
        HMAC key (a fingerprint, never the key), 12 hex digits -- the same on
        every member, another one for a cluster rebuilt with other members or
        a new key.  (Added for the dns service, issue 13.)"""
        import hashlib
        key = self._key
        if key is None and self.cfg is not None and getattr(self.cfg, "auth_key_file", None):
            try:
                key = load_key(self.cfg.auth_key_file)
            except ValueError:
                key = None
        h = hashlib.sha256(",".join(sorted(set(self.node_ids))).encode())
        if key:
            h.update(key)
        return h.hexdigest()[:12]

    def previous_claim(self, resource: str, epoch: int) -> tuple[str, int] | None:
        """``(node, epoch)`` of the last claim on ``resource`` below ``epoch`` this
        node heard from a peer (its heartbeats), or None: a listener hearing
        "owner" at ``epoch`` learns whose guard/state to expect (the dns
        service's compare-and-set).  (Added for the dns service, issue 13.)"""
        res = self.resources.get(resource)
        claim = getattr(res, "last_claim", None)
        return claim if claim is not None and claim[1] < epoch else None
