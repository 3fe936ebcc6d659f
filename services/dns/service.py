"""The ``dns`` service: records follow resource ownership; reconcile; RPC; metrics.

Every node runs it; only the node that owns a resource publishes that
resource's records.  Flow:

- ``cluster`` listener ``(resource, role, epoch)``: on "owner" the records of
  the resource are marked dirty and flushed at once -- one UPDATE per zone,
  so the new answer is at the server one round trip after the decision;
- per zone at most one UPDATE is in flight; changes marked meanwhile are
  sent together right after it;
- a failed UPDATE is retried with exponential backoff and jitter until it
  succeeds or the node stops owning the resource (never blocks, never raises);
- reconcile (on start, every ``reconcile_interval_s``, on ``dns.sync``) reads
  what the primary publishes and repairs drift of the records this node owns.
"""

from __future__ import annotations

import random
import time
from typing import Any

import dns.name
import dns.rdatatype
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from appliance.admin.rpc import ApplicationError, Param, Params
from appliance.plugin import withdraw
from services.dns.backoff import Backoff
from services.dns.client import DNSClient, PrimaryDiscoveryClient, show_server
from services.dns.ddns import DDNSUpdater
from services.dns.message import DNSError, Rdatas
from services.dns.metrics import DNSMetrics, gauge
from services.dns.guard import cluster_identity, guard_owner, parse_guard
from services.dns.records import desired_rdatas, plan, rdatas_text
from services.dns.updater import PublishResult, Updater

_log = Logger(namespace="appliance.dns")

#: After losing a resource, re-read its guards this much later (the new owner
#: has written by then), keeping the compare-and-set cache fresh.
GUARD_REFRESH_S = 0.05


def _manager_cluster_id(cluster) -> str | None:
    """The cluster manager's ``cluster_id`` if it has one (a text), else None."""
    try:
        value = getattr(cluster, "cluster_id", None)
    except Exception:
        return None
    return value if isinstance(value, str) and value else None


def in_sync(spec, desired, published) -> bool:
    """Published equals desired, and the TTL read from the server (if any) is the spec's."""
    return (desired is not None and published == desired
            and getattr(published, "ttl", None) in (None, spec.ttl))


class DNSService(Service):
    """Publishes the configured records for the resources this node owns."""

    name = "dns"

    #: a service resource ("name:role") no service defined when dns started: how long
    #: dns waits for its service to define it before defining it itself (review M9)
    DEFINE_GRACE_S = 5.0
    DEFINE_POLL_S = 0.1
    #: verify_secondaries: how often the primary is asked whether it serves the write yet
    VERIFY_PROBE_S = 0.02

    def __init__(self, config, context, *, rng=random.random, client=None):
        self.config = config
        self.context = context
        self.reactor = context.reactor
        self.node = context.node_id
        self.cluster = context.cluster
        self.metrics = DNSMetrics(getattr(context, "metrics", None))
        self.client = client or DNSClient(self.reactor, list(config.servers), config.timeout_s)
        # Zones with servers of their own get a client per distinct server list.
        self.clients = {tuple(config.servers): self.client}
        self.zone_routes = {}
        for zone, zs in (getattr(config, "zone_settings", None) or {}).items():
            servers = tuple(zs.servers)
            if getattr(zs, "discover_primary", False) and client is None:
                # its own client: the primary its SOA names, the servers as fallback
                discovering = PrimaryDiscoveryClient(self.reactor, zone.to_text(),
                                                     list(servers), config.timeout_s,
                                                     zs.primary_port)
                self.clients[("discover", zone)] = discovering
                self.zone_routes[zone] = (discovering, zs.key)
                continue
            if servers not in self.clients:
                self.clients[servers] = (client if client is not None else
                                         DNSClient(self.reactor, list(servers), config.timeout_s))
            self.zone_routes[zone] = (self.clients[servers], zs.key)
        section = getattr(getattr(context, "config", None), "cluster", None)
        self.node_ids = sorted({self.node, *(p.id for p in getattr(section, "peers", ()) or ())})
        # [services.dns] cluster_id, else the cluster manager's identity (member ids +
        # key fingerprint), else the same digest computed here (a manager without one)
        self.cluster_id = cluster_identity(
            getattr(config, "cluster_id", None) or _manager_cluster_id(self.cluster),
            self.node_ids, getattr(section, "auth_key_file", None))
        self.updater = Updater(self.client, config.key, self.node, self.reactor, self.metrics,
                               cluster=self.cluster_id, priority=self._priority,
                               zones=self.zone_routes,
                               guard_scope=getattr(config, "guard_scope", "name"))
        # zones in BIND views chosen by TSIG key: an Updater (guard cache) per view
        self.view_updaters: dict[dns.name.Name, list[Updater]] = {}
        for zone, zs in (getattr(config, "zone_settings", None) or {}).items():
            if getattr(zs, "views", ()):
                self.view_updaters[zone] = [
                    Updater(self.zone_routes[zone][0], vkey, self.node, self.reactor,
                            self.metrics, cluster=self.cluster_id, priority=self._priority,
                            guard_scope=getattr(config, "guard_scope", "name"))
                    for vkey in zs.views]
        self.ddns = None
        if config.ddns is not None:
            dd = config.ddns
            self.ddns = DDNSUpdater(
                self.client, config.key, dd.forward_zone, dd.reverse_zone, self.metrics,
                config.zones, forward_zones=dd.forward_zones, reverse_zones=dd.reverse_zones,
                managed=[s.name for s in config.records], clock=self.reactor,
                attempts=dd.attempts, retry_initial_s=dd.retry_initial_s,
                retry_max_s=dd.retry_max_s, override_client_update=dd.override_client_update,
                override_no_update=dd.override_no_update, rng=rng,
                client_for=self.updater.client_for, key_for=self.updater.key_for)
        self._rng = rng
        self._force: set[tuple[str, str]] = set()       # keys dns.reset_guard asked to force
        self._flush_call = None                          # end-of-turn flush of marked zones
        self.config_secondaries = tuple(getattr(config, "verify_secondaries", ()) or ())
        self.secondaries: dict[str, dict[str, dict]] = {}  # zone -> server -> state
        self._verifying: dict[dns.name.Name, Any] = {}
        self._verify_again: set = set()
        #: zone -> (name, rdtype, rdatas) last written: the primary's serial counts once
        #: it serves that (an inline-signed zone answers NOERROR before it does)
        self._verify_probe: dict = {}
        self._secondary_clients = {}
        self.owned: dict[str, int] = {}                  # resource -> epoch this node holds
        self.published: dict[tuple[str, str], frozenset | None] = {}   # last read or written
        self.dirty: dict[dns.name.Name, dict[tuple[str, str], str]] = {}
        self.inflight: set[dns.name.Name] = set()
        self.backoff: dict[dns.name.Name, Backoff] = {}
        self.retry_calls: dict[dns.name.Name, Any] = {}
        self.errors: dict[str, str] = {}                 # zone -> last error
        self.waiters: dict[dns.name.Name, list[defer.Deferred]] = {}
        self.last_reconcile: float | None = None
        self.stats = {"stale_refused": 0, "drift_repairs": 0, "updates": 0, "failures": 0,
                      "takeovers": 0}
        self._reconcile_call = None
        self._define_call = None
        self._undefined: list[str] = []
        self._define_deadline = 0.0
        self._reconciling: defer.Deferred | None = None
        self._writes: dict[tuple[str, str], int] = {}    # key -> successful writes so far
        self._refresh_calls: list = []
        self.resources = sorted({r.resource for r in config.records})
        self.last_success: dict[str, float] = {}         # zone -> wall time of the last success
        self.blocked: dict[tuple[str, str], Any] = {}    # record key -> the guard that blocks it
        self._wall = getattr(context, "wall", None) or time.time

    # ------------------------------------------------------------------
    @property
    def role(self) -> str:
        if self.cluster is None or getattr(self.cluster, "single", False):
            return "standalone"
        return "owner" if self.owned else "standby"

    def startService(self):
        super().startService()
        self.metrics.gauges = self._gauges
        self.metrics.attach()
        rpc = self.context.rpc
        if rpc is not None:
            rpc.register("dns.records", self.records, doc="DNS records: desired vs published.",
                         params=Params())
            rpc.register("dns.sync", self.sync, params=Params(),
                         doc="Read the server now, repair drift; returns what changed.")
            rpc.register("dns.reset_guard", self.reset_guard,
                         params=Params(name=Param("str", nullable=True)),
                         doc="{name?}: overwrite the server's _appliance-owner guard of the "
                             "records this node owns (all blocked ones without a name) and "
                             "publish them; for a guard left ahead by a cluster that lost its "
                             "epochs.")
        if self.ddns is not None:
            self.context.providers["ddns"] = self.ddns
        self._undefined = []
        for resource in self.resources:
            if not self._listen(resource):
                if ":" in resource:
                    # a service resource ("sip:registrar"): its service may start after
                    # dns; let it define it (its priorities) -- dns only listens (M9)
                    self._undefined.append(resource)
                else:
                    self._define(resource)
        if self._undefined:
            self._define_deadline = self.reactor.seconds() + self.DEFINE_GRACE_S
            self._define_call = self.reactor.callLater(0, self._await_definitions)
        _log.info("dns: updating {zones} at {servers} (key {key}) for {n} records of {res}",
                  zones=", ".join(z.to_text() for z in self.config.zones),
                  servers=", ".join(show_server(s) for s in self.config.servers),
                  key=self.config.key.name if self.config.key else "none",
                  n=len(self.config.records), res=", ".join(self.resources) or "no resources")
        self._reconcile_call = self.reactor.callLater(0, self._periodic)
        if self.config.key is None and not any(
                zs.key for zs in (getattr(self.config, "zone_settings", None) or {}).values()):
            _log.warn("dns: no TSIG key: updates are unsigned and answers spoofable "
                      "(set tsig_key_file)")
        if self.ddns is not None:
            clash = sorted(s.name.to_text() for s in self.config.records
                           if any(s.name.is_subdomain(d) for d in self.ddns.domains))
            if clash:
                _log.warn("dns: managed records inside the DDNS domains ({names}): DDNS refuses "
                          "these names to DHCP clients", names=", ".join(clash))

    def stopService(self):
        super().stopService()
        for call in [self._reconcile_call, self._flush_call, self._define_call,
                     *self.retry_calls.values()]:
            if call is not None and call.active():
                call.cancel()
        self._reconcile_call = self._flush_call = self._define_call = None
        self.retry_calls.clear()
        for call in self._refresh_calls:
            if call.active():
                call.cancel()
        self._refresh_calls = []
        withdraw(self.context, ("dns.records", "dns.sync", "dns.reset_guard"))
        if self.ddns is not None and self.context.providers.get("ddns") is self.ddns:
            del self.context.providers["ddns"]
        self._fire_waiters(list(self.waiters), "service stopped")
        self.metrics.detach()
        self.metrics.gauges = None
        if self.ddns is not None:
            self.ddns.stopped = True
        # Do not leave our listener behind: a restart (config.reload) adds a new one.
        for resource in self.resources:
            res = getattr(self.cluster, "resources", {}).get(resource)
            listeners = getattr(res, "listeners", None)
            if isinstance(listeners, list) and self._role_changed in listeners:
                listeners.remove(self._role_changed)
        clients = [*self.clients.values(), *self._secondary_clients.values()]
        return defer.gatherResults([defer.maybeDeferred(c.close) for c in
                                    {id(c): c for c in clients}.values()],
                                   consumeErrors=True)

    def _listen(self, resource: str) -> bool:
        """Listen to ``resource`` as defined by its [[vip]] or service; False: undefined."""
        known = getattr(self.cluster, "resources", {}).get(resource)
        if known is None:
            return False
        self.cluster.add_resource(known.spec, listener=self._role_changed)
        return True

    def _define(self, resource: str) -> None:
        # nobody defined it (no [[vip]], no service registered it): dns defines it,
        # priority 100 on every node -- say so (review M9)
        _log.warn("dns: no vip or service defines resource {res}; the dns service "
                  "defines it (priority 100 on every node, preempt); define it in "
                  "its service or as a [[vip]] for other priorities", res=resource)
        self.cluster.register_resource(resource, self._role_changed, kind="dns")

    def _await_definitions(self) -> None:
        """Service resources nobody defined at dns's start: listen as soon as their
        service defines them; after ``DEFINE_GRACE_S`` define the rest (warned)."""
        self._define_call = None
        if not self.running:
            return
        self._undefined = [r for r in self._undefined if not self._listen(r)]
        if not self._undefined:
            return
        if self.reactor.seconds() >= self._define_deadline:
            for resource in self._undefined:
                self._define(resource)
            self._undefined = []
            return
        self._define_call = self.reactor.callLater(self.DEFINE_POLL_S, self._await_definitions)

    # ------------------------------------------------------------------
    # ownership -> publish
    # ------------------------------------------------------------------
    def _role_changed(self, resource: str, role: str, epoch: int) -> None:
        if not self.running:
            return
        if role == "owner":
            self.owned[resource] = epoch
            previous = None
            try:
                previous = self.cluster.previous_claim(resource, epoch)
            except (AttributeError, KeyError, TypeError):
                previous = None       # a cluster manager without previous_claim
            for key in sorted({self.updater.guard_key(s) for s in self.config.records
                               if s.resource == resource}):
                self.updater.expect(key, resource, epoch, self.node_ids, previous)
                for ups in self.view_updaters.values():
                    for up in ups:
                        up.expect(key, resource, epoch, self.node_ids, previous)
            _log.info("dns: {node} gained {res} (epoch {epoch}): publishing its records",
                      node=self.node, res=resource, epoch=epoch)
            self.mark([s for s in self.config.records if s.resource == resource],
                      f"{self.node} owns {resource} (epoch {epoch})")
        else:
            if self.owned.pop(resource, None) is not None:
                _log.info("dns: {node} lost {res}: no longer publishing its records",
                          node=self.node, res=resource)
            for pending in self.dirty.values():
                for spec in self.config.records:
                    if spec.resource == resource:
                        pending.pop(spec.key, None)
            for spec in self.config.records:
                if spec.resource == resource:
                    self.blocked.pop(spec.key, None)
            # The new owner writes its guard in a moment: read it then, so that
            # if this node gets the resource back its compare-and-set expects
            # the right value and lands in one round trip.
            call = self.reactor.callLater(GUARD_REFRESH_S, self._refresh_guards, resource)
            self._refresh_calls = [c for c in self._refresh_calls if c.active()] + [call]

    def _refresh_guards(self, resource: str) -> None:
        if not self.running or resource in self.owned:
            return
        by_zone: dict[dns.name.Name, set] = {}
        for spec in self.config.records:
            if spec.resource == resource:
                by_zone.setdefault(spec.zone, set()).add(self.updater.guard_key(spec))
        for zone, names in by_zone.items():
            ups = self.view_updaters.get(zone) or [self.updater]
            d = defer.gatherResults([up.read_guards(zone, sorted(names)) for up in ups],
                                    consumeErrors=True)
            d.addErrback(lambda f: f.value.subFailure if isinstance(
                f.value, defer.FirstError) else f)
            d.addErrback(lambda f, zone=zone: _log.warn(
                "dns: reading the guards of {res} in {zone} after losing it failed: {why} "
                "(regaining it may cost a failed UPDATE and a read)", res=resource,
                zone=zone.to_text(), why=f.getErrorMessage()))

    def mark(self, specs, reason: str) -> list[dns.name.Name]:
        """Queue ``specs`` for publishing; their zones are flushed at the end of this
        reactor turn, so every change of one decision (the cluster calls the listener
        once per resource) goes out in one UPDATE per zone (review M3)."""
        zones = []
        for spec in specs:
            if spec.resource not in self.owned:
                continue
            self.dirty.setdefault(spec.zone, {})[spec.key] = reason
            if spec.zone not in zones:
                zones.append(spec.zone)
        if zones and self._flush_call is None and self.running:
            self._flush_call = self.reactor.callLater(0, self._flush_marked)
        return zones

    def _flush_marked(self) -> None:
        self._flush_call = None
        for zone in list(self.dirty):
            self._flush(zone)

    def _flush(self, zone: dns.name.Name) -> None:
        if not self.running or zone in self.inflight:
            return
        call = self.retry_calls.get(zone)
        if call is not None and call.active():
            return
        take = self.dirty.pop(zone, {})
        force = bool(self._force & set(take))
        if force:       # forced records alone; the rest follows in the next UPDATE
            rest = {k: v for k, v in take.items() if k not in self._force}
            take = {k: v for k, v in take.items() if k in self._force}
            if rest:
                self.dirty.setdefault(zone, {}).update(rest)
            self._force -= set(take)
        # only what was marked: a decision's flush must not recompute every owned
        # record of every zone on the move's critical path
        changes = plan([s for s in self.config.records if s.zone == zone and s.key in take],
                       self.owned, self.node).get(zone, [])
        if not changes:
            self._fire_waiters([zone], None)
            return
        self.inflight.add(zone)
        epochs = dict(self.owned)
        d = self._publish(zone, changes, epochs, force)
        d.addCallbacks(self._published, self._failed, callbackArgs=(zone, take, epochs),
                       errbackArgs=(zone, take))
        d.addErrback(lambda f: _log.failure("dns: publish bookkeeping failed", failure=f))

    # ------------------------------------------------------------------
    # BIND views (split horizon): the same records in every view of a zone
    # ------------------------------------------------------------------
    def _publish(self, zone, changes, epochs, force=False) -> defer.Deferred:
        """One UPDATE per view (each signed with its view's key, each with its own
        compare-and-set); applied = what every view took, stale/takeovers of any."""
        ups = self.view_updaters.get(zone)
        if not ups:
            return self.updater.publish(zone, changes, epochs, force=force)
        d = defer.gatherResults([up.publish(zone, changes, epochs, force=force) for up in ups],
                                consumeErrors=True)
        d.addErrback(lambda f: f.value.subFailure if isinstance(f.value, defer.FirstError)
                     else f)

        def merge(results):
            first = results[0]
            taken = set.intersection(*[{c.spec.key for c in r.applied} for r in results])
            return PublishResult(
                first.zone, first.server, [c for c in first.applied if c.spec.key in taken],
                [x for r in results for x in r.stale], [x for r in results for x in r.takeovers],
                max(r.latency_s for r in results), max(r.rounds for r in results))
        return d.addCallback(merge)

    def _read(self, zone, name, rdtype) -> defer.Deferred:
        """What the zone publishes (with views: each view read; views that disagree
        read as TTL -1, i.e. drift, so the records are written to every view again)."""
        ups = self.view_updaters.get(zone)
        if not ups:
            return self.updater.read(zone, name, rdtype)
        d = defer.gatherResults([up.read(zone, name, rdtype) for up in ups], consumeErrors=True)
        d.addErrback(lambda f: f.value.subFailure if isinstance(f.value, defer.FirstError)
                     else f)

        def merge(values):
            first = values[0]
            if all(v == first and getattr(v, "ttl", None) == getattr(first, "ttl", None)
                   for v in values[1:]):
                return first
            out = Rdatas(first)
            out.ttl = -1
            return out
        return d.addCallback(merge)

    def _guards_of(self, zone) -> "Updater":
        ups = self.view_updaters.get(zone)
        return ups[0] if ups else self.updater

    def _published(self, result, zone, take, epochs) -> None:
        self.inflight.discard(zone)
        self.backoff.pop(zone, None)
        if self.errors.pop(zone.to_text(), None) is not None:
            _log.info("dns: zone {zone} updates succeed again at {server}", zone=zone.to_text(),
                      server=result.server)
        self.stats["updates"] += 1
        self.last_success[zone.to_text()] = self._wall()
        if result.rounds > 1:
            self.metrics.cas_misses.inc(result.rounds - 1)
        if result.applied and self.config_secondaries:
            last = result.applied[-1]
            self._verify_probe[zone] = (last.spec.name, last.spec.rdtype, last.rdatas)
            self._verify(zone)
        for change in result.applied:
            spec = change.spec
            self.blocked.pop(spec.key, None)
            self.published[spec.key] = change.rdatas
            self._writes[spec.key] = self._writes.get(spec.key, 0) + 1
            reason = take.get(spec.key, "")
            if reason.startswith("drift"):
                self.metrics.drift.inc()
                self.stats["drift_repairs"] += 1
            _log.info("dns: {name} {type} -> {rdatas} (ttl {ttl}, epoch {epoch}) in {ms} ms: "
                      "{reason}", name=spec.name.to_text(), type=spec.type_text,
                      rdatas=", ".join(rdatas_text(change.rdatas)), ttl=spec.ttl,
                      epoch=epochs.get(spec.resource), ms=round(result.latency_s * 1000, 1),
                      reason=reason)
        for change, guard, why in result.takeovers:
            self.metrics.takeovers.labels("operator" if why.startswith("reset") else
                                          "identity").inc()
            self.stats["takeovers"] += 1
            _log.critical("dns: TOOK OVER the guard of {name} {type} from {old}: {why}; now "
                          "{node} at epoch {epoch} in cluster {cluster}",
                          name=change.spec.name.to_text(), type=change.spec.type_text,
                          old=guard.show() if guard else "?", why=why, node=self.node,
                          epoch=epochs.get(change.spec.resource), cluster=self.cluster_id)
        for change, guard in result.stale:
            self.blocked[change.spec.key] = guard
            self.metrics.stale.inc()
            self.stats["stale_refused"] += 1
            _log.error("dns: not writing {name} {type}: the server's guard names {holder}, ahead "
                       "of our epoch {ours} in cluster {cluster}; if that guard is stale (the "
                       "cluster lost its epochs), clear it with dns.reset_guard",
                       name=change.spec.name.to_text(), type=change.spec.type_text,
                       holder=guard.show() if guard else "?", ours=epochs.get(change.spec.resource),
                       cluster=self.cluster_id)
        if self.dirty.get(zone):
            self._flush(zone)
        else:
            self._fire_waiters([zone], None)

    def _failed(self, failure, zone, take) -> None:
        self.inflight.discard(zone)
        if not self.running:        # stopping: in-flight exchanges end as "refused"; not news
            self._fire_waiters([zone], "service stopped")
            return
        self.stats["failures"] += 1
        message = failure.getErrorMessage() if failure.check(DNSError) else (
            f"{failure.type.__name__}: {failure.getErrorMessage()}")
        if not failure.check(DNSError):
            _log.failure("dns: unexpected error updating zone {zone}", failure=failure,
                         zone=zone.to_text())
        pending = self.dirty.setdefault(zone, {})
        for key, reason in take.items():
            pending.setdefault(key, reason)
        backoff = self.backoff.setdefault(zone, Backoff(self.config.retry_initial_s,
                                                        self.config.retry_max_s, rng=self._rng))
        delay = backoff.next_delay()
        if self.errors.get(zone.to_text()) != message:
            _log.error("dns: {message}; retrying in {delay:.2f}s (with backoff)", message=message,
                       delay=delay)
        self.errors[zone.to_text()] = message
        if self.running:
            self.retry_calls[zone] = self.reactor.callLater(delay, self._retry, zone)
        self._fire_waiters([zone], message)

    # ------------------------------------------------------------------
    # verify_secondaries: did they pick up the new serial?
    # ------------------------------------------------------------------
    def _secondary_client(self, server):
        client = self._secondary_clients.get(server)
        if client is None:
            client = self._secondary_clients[server] = DNSClient(
                self.reactor, [server], self.config.timeout_s)
        return client

    async def _serial(self, client, zone, key=None) -> int | None:
        from services.dns.message import answer_rdatas, make_query
        response, _ = await client.exchange(make_query(zone, dns.rdatatype.SOA, key),
                                            zone.to_text(), key.name if key else None, "query")
        soa = answer_rdatas(response, zone, dns.rdatatype.SOA)
        return next(iter(soa)).serial if soa else None

    def _verify(self, zone) -> None:
        """After an UPDATE: read the primary's SOA serial, then poll each secondary until
        it serves that serial or later (``verify_timeout_s``); shown in dns.records."""
        running = self._verifying.get(zone)
        if running is not None and not running.called:
            self._verify_again.add(zone)
            return
        d = defer.ensureDeferred(self._verify_zone(zone))
        d.addErrback(lambda f: _log.warn("dns: secondary check of {zone} failed: {why}",
                                         zone=zone.to_text(), why=f.getErrorMessage()))

        def done(_):
            if zone in self._verify_again and self.running:
                self._verify_again.discard(zone)
                self._verify(zone)
        d.addBoth(done)
        self._verifying[zone] = d

    async def _verify_zone(self, zone) -> None:
        started = self.reactor.seconds()
        probe = self._verify_probe.get(zone)
        while probe is not None and self.running:
            # the serial to wait for is one that holds our write: with inline signing
            # (dnssec-policy) named answers the UPDATE before the zone it serves has
            # it, and the serial read at once would be the one before (review M11)
            name, rdtype, rdatas = probe
            try:
                if await self.updater.read(zone, name, rdtype) == rdatas:
                    break
            except DNSError:
                pass
            if self.reactor.seconds() - started > self.config.verify_timeout_s:
                break
            await task.deferLater(self.reactor, self.VERIFY_PROBE_S, lambda: None)
        want = await self._serial(self.updater.client_for(zone), zone, self.updater.key_for(zone))
        states = self.secondaries.setdefault(zone.to_text(), {})
        pending = list(self.config_secondaries)
        while pending and self.running:
            for server in list(pending):
                name = show_server(server)
                state = states.setdefault(name, {})
                try:
                    serial = await self._serial(self._secondary_client(server), zone)
                    state.update(serial=serial, error=None)
                except DNSError as e:
                    serial = None
                    state.update(error=str(e))
                state["want"] = want
                ok = serial is not None and want is not None and \
                    (serial - want) % 2**32 < 2**31
                state["in_sync"] = ok
                if ok:
                    state["lag_ms"] = round((self.reactor.seconds() - started) * 1000, 1)
                    pending.remove(server)
            if not pending or self.reactor.seconds() - started > self.config.verify_timeout_s:
                break
            await task.deferLater(self.reactor, 0.1, lambda: None)
        for server in pending:
            states[show_server(server)]["lag_ms"] = None
            _log.warn("dns: secondary {server} still serves serial {serial} of {zone}, the "
                      "primary {want} ({s:g} s after the update)", server=show_server(server),
                      serial=states[show_server(server)].get("serial"), zone=zone.to_text(),
                      want=want, s=self.config.verify_timeout_s)

    def _retry(self, zone) -> None:
        self.retry_calls.pop(zone, None)
        self._flush(zone)

    def _wait_zone(self, zone) -> defer.Deferred:
        if zone not in self.inflight and not self.dirty.get(zone):
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self.waiters.setdefault(zone, []).append(d)
        return d

    def _fire_waiters(self, zones, error) -> None:
        for zone in zones:
            for d in self.waiters.pop(zone, []):
                d.callback(error)

    # ------------------------------------------------------------------
    # reconcile
    # ------------------------------------------------------------------
    def _periodic(self) -> None:
        self._reconcile_call = None
        if not self.running:
            return
        if self._reconciling is None:
            d = self.reconcile("periodic")
            d.addErrback(lambda f: _log.failure("dns: reconcile failed", failure=f))
        self._reconcile_call = self.reactor.callLater(self.config.reconcile_interval_s,
                                                      self._periodic)

    def reconcile(self, reason: str = "periodic") -> defer.Deferred:
        """Read the server, repair drift; fire with ``{changed, errors}``."""
        d = defer.ensureDeferred(self._reconcile(reason))
        self._reconciling = d

        def done(result):
            if self._reconciling is d:
                self._reconciling = None
            return result
        return d.addBoth(done)

    async def _reconcile(self, reason: str) -> dict[str, Any]:
        specs = list(self.config.records)
        writes_before = dict(self._writes)
        guard_gen = dict(self.updater.generation)
        reads = [self._read(s.zone, s.name, s.rdtype) for s in specs]
        names = {}
        for s in specs:
            names.setdefault(self.updater.guard_key(s), s.zone)
        guard_reads = [self.updater.read(zone, guard_owner(n), dns.rdatatype.TXT)
                       if zone not in self.view_updaters else
                       defer.gatherResults([up.read_guards(zone, [n])     # each view's cache
                                            for up in self.view_updaters[zone]],
                                           consumeErrors=True).addCallback(
                                               lambda found, n=n: found[0][n])
                       for n, zone in names.items()]
        results = await defer.DeferredList(reads + guard_reads, consumeErrors=True)
        errors: dict[str, str] = {}
        for (ok, value), (name, zone) in zip(results[len(specs):], names.items()):
            if ok and zone not in self.view_updaters:
                self.updater.remember(name, value, guard_gen.get(name, 0))
            elif not ok:
                why = value.value.subFailure if isinstance(value.value, defer.FirstError) \
                    else value
                errors[zone.to_text()] = why.getErrorMessage()
        drift = []
        for spec, (ok, value) in zip(specs, results[:len(specs)]):
            if not ok:
                errors[spec.zone.to_text()] = value.getErrorMessage()
                continue
            if self._writes.get(spec.key) != writes_before.get(spec.key) or (
                    spec.zone in self.inflight or spec.key in self.dirty.get(spec.zone, {})):
                continue     # written (or being written) while we read: our read is older
            self.published[spec.key] = value
            if spec.resource in self.owned:
                desired = desired_rdatas(spec, self.node)
                ttl = getattr(value, "ttl", None)
                if desired is not None and (desired != value or (
                        value and ttl is not None and ttl != spec.ttl)):
                    drift.append((spec, value, desired))   # a changed ttl too (review M7)
        self.last_reconcile = self.reactor.seconds()
        changed = []
        for spec, before, desired in drift:
            _log.warn("dns: drift at {name} {type}: server has {before} (ttl {ttl}), want {want} "
                      "(ttl {want_ttl}) ({reason})",
                      name=spec.name.to_text(), type=spec.type_text,
                      before=", ".join(rdatas_text(before)) or "nothing",
                      ttl=getattr(before, "ttl", None), want_ttl=spec.ttl,
                      want=", ".join(rdatas_text(desired)), reason=reason)
            changed.append({"name": spec.name.to_text(), "type": spec.type_text,
                            "zone": spec.zone.to_text(), "before": rdatas_text(before),
                            "after": rdatas_text(desired), "reason": f"drift ({reason})"})
        zones = self.mark([s for s, _, _ in drift], f"drift repair ({reason})")
        for zone in zones:
            error = await self._wait_zone(zone)
            if error:
                errors[zone.to_text()] = error
        for row in changed:
            key = (row["name"], row["type"])
            row["applied"] = rdatas_text(self.published.get(key)) == row["after"]
        return {"changed": changed, "errors": errors}

    def _priority(self, resource: str, node: str) -> int:
        res = getattr(self.cluster, "resources", {}).get(resource)
        spec = getattr(res, "spec", None)
        return int(getattr(spec, "priority", {}).get(node, 0)) if spec is not None else 0

    async def _reset_guard(self, name: str | None) -> dict[str, Any]:
        specs = [s for s in self.config.records
                 if (name is None and s.key in self.blocked) or
                 (name is not None and s.name.to_text().rstrip(".") == name.rstrip("."))]
        if name is not None and not specs:
            raise ApplicationError(f"{name} is not a configured record name")
        not_owned = sorted({s.name.to_text() for s in specs if s.resource not in self.owned})
        specs = [s for s in specs if s.resource in self.owned]
        if not_owned and name is not None:
            raise ApplicationError(f"{name}: this node does not own its resource; reset the "
                                   "guard on the owner")
        _log.warn("dns: operator resets the guards of {names}", names=", ".join(
            sorted({s.name.to_text() for s in specs})) or "nothing")
        self._force |= {s.key for s in specs}
        errors = {}
        for zone in self.mark(specs, "dns.reset_guard"):
            error = await self._wait_zone(zone)
            if error:
                errors[zone.to_text()] = error
        return {"reset": sorted({s.name.to_text() for s in specs if s.key not in self.blocked}),
                "still_blocked": sorted({s.name.to_text() for s in specs if s.key in self.blocked}),
                "not_owned": not_owned, "errors": errors}

    def reset_guard(self, name: str | None = None) -> defer.Deferred:
        """Overwrite stale guards (review H3); returns ``{reset, still_blocked, not_owned, errors}``."""
        return defer.ensureDeferred(self._reset_guard(name))

    # ------------------------------------------------------------------
    # gauges (computed at scrape time)
    # ------------------------------------------------------------------
    def _gauges(self):
        out_of_sync = 0
        for spec in self.config.records:
            if spec.resource in self.owned:
                desired = desired_rdatas(spec, self.node)
                if desired is not None and not in_sync(spec, desired, self.published.get(spec.key)):
                    out_of_sync += 1
        yield gauge("appliance_dns_records_out_of_sync",
                    "Records this node owns whose published rrset is not (known to be) the desired one",
                    [], [((), out_of_sync)])
        zones = sorted({z.to_text() for z in self.config.zones})
        yield gauge("appliance_dns_zone_last_success_timestamp_seconds",
                    "Wall-clock time of the last successful UPDATE per zone (0: none yet)",
                    ["zone"], [((z,), self.last_success.get(z, 0.0)) for z in zones])
        yield gauge("appliance_dns_zone_error", "1 while the last UPDATE of the zone failed",
                    ["zone"], [((z,), 1.0 if z in self.errors else 0.0) for z in zones])
        yield gauge("appliance_dns_secondary_in_sync",
                    "1 when the secondary served the primary's serial after the last update",
                    ["zone", "server"], [((z, srv), 1.0 if st.get("in_sync") else 0.0)
                                         for z, v in self.secondaries.items()
                                         for srv, st in v.items()])
        yield gauge("appliance_dns_guard_blocked_records",
                    "Records not written because the server's guard names a newer owner "
                    "(dns.reset_guard clears a stale one)", [], [((), len(self.blocked))])

    # ------------------------------------------------------------------
    # RPC
    # ------------------------------------------------------------------
    def records(self) -> dict[str, Any]:
        """Desired vs published per record (``published`` is what was last read or written)."""
        owners = {}
        try:
            resources = self.cluster.status()["resources"]
            owners = {name: r.get("owner") for name, r in resources.items()}
        except Exception as e:       # the rows still show what this node knows (review L8)
            _log.warn("dns.records: the cluster's status is unavailable ({why}); owners of "
                      "resources this node does not hold are shown as unknown",
                      why=f"{type(e).__name__}: {e}")
        rows = []
        for spec in self.config.records:
            owner = self.node if spec.resource in self.owned else owners.get(spec.resource)
            desired = desired_rdatas(spec, owner)
            published = self.published.get(spec.key)
            guard = parse_guard(self._guards_of(spec.zone).guards.get(
                self.updater.guard_key(spec), ()))
            blocked = self.blocked.get(spec.key)
            rows.append({
                "name": spec.name.to_text(), "type": spec.type_text, "ttl": spec.ttl,
                "resource": spec.resource, "owner": owner,
                "role": "owner" if spec.resource in self.owned else "standby",
                "desired": rdatas_text(desired), "published": rdatas_text(published),
                "in_sync": in_sync(spec, desired, published),
                "guard": guard.show() if guard else None,
                "blocked_by": blocked.show() if blocked else None,
            })
        now = self._wall()
        return {"node": self.node, "role": self.role, "cluster_id": self.cluster_id,
                "servers": [show_server(s) for s in self.config.servers],
                "key": self.config.key.name if self.config.key else None,
                # the operator's summary (issue 13 deliver 5): what /metrics also shows
                "out_of_sync": sum(1 for r in rows if r["role"] == "owner" and r["desired"]
                                   and not r["in_sync"]),     # as the gauge counts them
                "guard_blocked": sum(1 for r in rows if r["blocked_by"]),
                "zones": {z.to_text(): {
                    "servers": [show_server(x) for x in
                                getattr(self.updater.client_for(z), "servers", ())],
                    "key": self.updater.key_name_for(z),
                    **({"views": [up.key_name for up in self.view_updaters[z]]}
                       if z in self.view_updaters else {}),
                    **({"primary": getattr(self.updater.client_for(z), "mname", None)}
                       if isinstance(self.updater.client_for(z), PrimaryDiscoveryClient)
                       else {}),
                    "last_success_s_ago": (
                        round(now - self.last_success[z.to_text()], 1)
                        if z.to_text() in self.last_success else None),
                    "error": self.errors.get(z.to_text())} for z in self.config.zones},
                "ddns": self._ddns_summary(),
                "last_reconcile_s_ago": (None if self.last_reconcile is None else
                                         round(self.reactor.seconds() - self.last_reconcile, 3)),
                "secondaries": {z: {srv: dict(st) for srv, st in v.items()}
                                for z, v in self.secondaries.items()},
                "errors": dict(self.errors), "stats": dict(self.stats), "records": rows}

    def _ddns_summary(self) -> dict[str, Any] | None:
        """DDNS results by operation and result, and the mean time of an operation
        (from the service's own counters; ``appliance_dns_ddns_*`` in /metrics)."""
        if self.ddns is None:
            return None
        results: dict[str, int] = {}
        latency: dict[str, dict[str, float]] = {}
        for family in self.metrics.own.collect():
            for sample in family.samples:
                labels = sample.labels
                if sample.name == "appliance_dns_ddns_total":
                    results[f"{labels['op']} {labels['result']}"] = int(sample.value)
                elif sample.name == "appliance_dns_ddns_latency_seconds_sum":
                    latency.setdefault(labels["op"], {})["sum"] = sample.value
                elif sample.name == "appliance_dns_ddns_latency_seconds_count":
                    latency.setdefault(labels["op"], {})["count"] = sample.value
        return {"domains": [d.to_text() for d in self.ddns.domains],
                "reverse_zones": [z.to_text() for z in self.ddns.reverse_domains],
                "results": dict(sorted(results.items())),
                "latency_ms_mean": {op: round(v["sum"] / v["count"] * 1000, 2)
                                    for op, v in sorted(latency.items()) if v.get("count")}}

    async def _sync(self) -> dict[str, Any]:
        running = self._reconciling
        if running is not None:       # one reconcile at a time (review L11)
            await defer.DeferredList([running], consumeErrors=True)
        result = await self.reconcile("dns.sync")
        for zone in list(self.dirty):      # anything still queued (e.g. after an outage): now
            call = self.retry_calls.pop(zone, None)
            if call is not None and call.active():
                call.cancel()
            self._flush(zone)
            error = await self._wait_zone(zone)
            if error:
                result["errors"][zone.to_text()] = error
        return result

    def sync(self) -> defer.Deferred:
        """Force a reconcile now; returns ``{changed: [...], errors: {zone: reason}}``."""
        return defer.ensureDeferred(self._sync())
