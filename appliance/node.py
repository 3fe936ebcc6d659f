"""The node: one service tree per box.

``ApplianceNode`` is a ``MultiService`` whose children start in order --
store, cluster, admin, then every enabled service -- each waiting for the
one before (``MultiService`` itself would not wait).  A service whose start
fails is marked ``failed`` with the reason, is stopped again (so whatever
it bound is released) and the others go on, unless ``node.fail_fast`` is
set.  Each child gets ``node.start_timeout_s`` to start and
``node.stop_timeout_s`` to stop.  The store and the cluster manager must
start; so must the admin listener unless ``admin.required = false``.
Shutdown runs in reverse order and waits for each child (the store last); a
shutdown that arrives during the start cancels the start first.

``config.reload``, SIGHUP and ``service.restart`` run one at a time.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application.service import IService, MultiService
from twisted.internet import defer
from twisted.logger import Logger

from appliance import __version__
from appliance.admin.rpc import ApplicationError, InvalidParams, MethodRegistry, Param, Params
from appliance.admin.service import AdminService
from appliance.config import ConfigError, NodeConfig, ServiceEntry, load_config
from appliance.plugin import NodeContext, discover_plugins

_log = Logger(namespace="appliance.node")

STATES = ("starting", "running", "failed", "stopping", "stopped")


def make_store(reactor, config: NodeConfig):
    """Build (not start) the store the config asks for.

    ``memory`` (aliases ``embedded``, ``sqlite``; the config maps them to
    ``memory``) is the embedded store on SQLite under ``node.state_dir``.
    """
    s = config.store
    if s.backend == "redis":
        from appliance.store.redis import RedisStore
        return RedisStore(reactor, url=s.url, sentinels=tuple(s.sentinels),
                          master_name=s.master_name, namespace=s.namespace,
                          op_timeout_s=s.op_timeout_s, connect_timeout_s=s.connect_timeout_s,
                          min_replicas_acked=s.min_replicas_acked,
                          replicas_timeout_ms=s.replicas_timeout_ms)
    from appliance.store.embedded import EmbeddedStore
    return EmbeddedStore(reactor, state_dir=config.node.state_dir, fsync=s.fsync)


def make_cluster(reactor, config: NodeConfig, store):
    """The heartbeat + failover manager (alone, it owns everything it may)."""
    from appliance.cluster.manager import ClusterManager
    vip_manager = None
    if config.vips:
        from appliance.cluster.vip import VIPManager
        vip_manager = VIPManager(reactor, list(config.vips))
    clock = None
    if config.cluster is not None and config.cluster.peers:
        # Liveness and partner timers on CLOCK_MONOTONIC: a wall-clock step
        # neither silences this node nor fires its deadlines.
        from appliance.cluster.clock import monotonic_clock
        clock = monotonic_clock(reactor)
    return ClusterManager(reactor, node_id=config.node.id, cluster=config.cluster,
                          vips=config.vips, store=store, state_dir=config.node.state_dir,
                          vip_manager=vip_manager, clock=clock)


class _CollectorAdapter:
    """Lets an object with a ``collect()`` generator be a Prometheus collector."""

    def __init__(self, source):
        self.source = source

    def collect(self):
        return self.source.collect()


@dataclass
class ServiceSlot:
    """A hosted service and what the node knows about it."""

    entry: ServiceEntry
    service: Any = None
    state: str = "stopped"
    reason: str | None = None
    since: float = field(default_factory=time.time)

    def set(self, state: str, reason: str | None = None) -> None:
        self.state, self.reason, self.since = state, reason, time.time()

    def describe(self) -> dict[str, Any]:
        role = getattr(self.service, "role", None) if self.service is not None else None
        out = {"state": self.state, "role": role or "standalone"}
        if self.reason:
            out["reason"] = self.reason
        return out


class _NodeCollector:
    """Prometheus collector reading the node's live state at scrape time."""

    def __init__(self, node: "ApplianceNode"):
        self.node = node

    def collect(self):
        up = GaugeMetricFamily("appliance_up", "1 while the node runs", labels=["node", "version"])
        up.add_metric([self.node.config.node.id, __version__], 1)
        yield up
        store = GaugeMetricFamily("appliance_store_healthy", "1 if the state store answers",
                                  labels=["backend"])
        store.add_metric([self.node.store.backend], 1 if self.node.store.healthy else 0)
        yield store
        stats = getattr(self.node.store, "stats", None)
        if isinstance(stats, dict):
            events = CounterMetricFamily(
                "appliance_store_events", "store counters (embedded: writes, commits, rows "
                "committed, checkpoints, commits slower than 250 ms, failures, recoveries)",
                labels=["backend", "event"])
            for event, n in sorted(stats.items()):
                events.add_metric([self.node.store.backend, event], n)
            yield events
        svc = GaugeMetricFamily("appliance_service_state",
                                "1 for the state each service is in", labels=["service", "state"])
        for name, slot in self.node.slots.items():
            for state in STATES:
                svc.add_metric([name, state], 1 if slot.state == state else 0)
        yield svc


class StartTimeout(Exception):
    """A child did not finish starting within ``node.start_timeout_s``."""


class ApplianceNode(MultiService):
    """Store, cluster, admin and the enabled services of one box.

    ``on_running`` (optional) is called once every child was started (or
    failed); ``appliance.tap.makeService`` uses it for the process-wide GC
    tuning, which library code and in-process tests should not inherit.
    """

    _log = _log

    def __init__(self, config: NodeConfig, reactor=None, plugins: dict | None = None, *,
                 store=None, on_running: Callable[["ApplianceNode"], Any] | None = None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config = config
        self.plugins = plugins if plugins is not None else discover_plugins()
        self.on_running = on_running
        self.started_at: float | None = None
        self.exit_code = 0
        self.state_dir = Path(config.node.state_dir)
        self.rpc = MethodRegistry()
        self.metrics = CollectorRegistry()
        self.metrics.register(_NodeCollector(self))
        self.store = store if store is not None else make_store(reactor, config)
        if not getattr(self.store, "name", None):
            self.store.setName("store")
        self.cluster = make_cluster(reactor, config, self.store)
        self.metrics.register(_CollectorAdapter(self.cluster))
        self.admin = AdminService(reactor, config.admin, self.rpc, self.metrics)
        self.context = NodeContext(reactor=reactor, config=config, store=self.store, rpc=self.rpc,
                                   metrics=self.metrics, cluster=self.cluster,
                                   state_dir=self.state_dir)
        self.slots: dict[str, ServiceSlot] = {}
        for entry in config.enabled_services():
            self.slots[entry.name] = ServiceSlot(entry)
        #: One config.reload / SIGHUP / service.restart at a time.
        self._reload_lock = defer.DeferredLock()
        #: The running start sequence (cancelled by a stop that arrives during it).
        self._start_d: defer.Deferred | None = None
        self._stopping = False
        self._register_methods()
        # sd_notify (READY, STATUS with the roles, WATCHDOG, STOPPING): a no-op
        # unless systemd gave $NOTIFY_SOCKET (etc/systemd/appliance.service)
        from appliance.systemd import SystemdNotifier, node_status_line
        self.notifier = SystemdNotifier(reactor, status=lambda: node_status_line(self))

    # ------------------------------------------------------------------
    # start / stop
    # ------------------------------------------------------------------
    def privilegedStartService(self):
        # Children are started in order by startService; nothing here binds
        # before the store is loaded.  The node runs as root (DHCP's port 67
        # is bound in startService): twistd --uid/--gid is not supported.
        pass

    def startService(self):
        from twisted.application.service import Service
        Service.startService(self)
        self._stopping = False
        self.started_at = self.reactor.seconds()
        self.notifier.start()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        _log.info("node {node} starting (appliance {version}, store {backend}, "
                  "services: {services})", node=self.config.node.id, version=__version__,
                  backend=self.config.store.backend, services=", ".join(self.slots) or "none")
        self._install_sighup()
        d = self._start_d = defer.ensureDeferred(self._start_all())
        d.addErrback(self._start_failed)
        d.addBoth(self._start_done)
        return d

    def _start_done(self, result):
        self._start_d = None
        return result

    def _start_failed(self, failure):
        if failure.check(defer.CancelledError) or self._stopping:
            _log.info("node {node}: start cancelled by shutdown", node=self.config.node.id)
            return None
        self._fatal(failure, "node start failed")
        return None

    def _install_sighup(self):
        """SIGHUP re-reads the config, like ``config.reload`` (main thread only)."""
        import signal

        def handler(signum, frame):
            self.reactor.callFromThread(self._sighup)

        try:
            signal.signal(signal.SIGHUP, handler)
        except (ValueError, AttributeError):   # not the main thread (tests), or no SIGHUP
            pass

    def _sighup(self):
        d = self.reload()
        d.addCallback(lambda result: _log.info("SIGHUP: {result}", result=result))
        d.addErrback(lambda f: _log.error("SIGHUP reload refused: {why}",
                                          why=f.value.data.get("reason") if hasattr(f.value, "data")
                                          and isinstance(f.value.data, dict) else f.getErrorMessage()))
        return d

    async def _start_all(self):
        try:
            await self._start_child(self.store)
        except defer.CancelledError:
            raise
        except Exception as e:
            self._fatal_error(f"state store ({self.config.store.backend}) failed to start: {e}")
            return
        try:
            await self._start_child(self.cluster)
        except defer.CancelledError:
            raise
        except Exception as e:
            self._fatal_error(f"cluster manager failed to start: {e}")
            return
        try:
            await self._start_child(self.admin)
        except defer.CancelledError:
            raise
        except Exception as e:
            await self._stop_child(self.admin, "admin")
            if self.config.admin.required:
                self._fatal_error(f"admin listener {self.config.admin.listen} failed: {e} "
                                  "(set admin.required = false to run without it)")
                return
            _log.critical("admin listener {listen} failed: {why}; running without /rpc and "
                          "/metrics (admin.required = false)", listen=self.config.admin.listen,
                          why=e)
        for name in list(self.slots):
            if self._stopping:
                raise defer.CancelledError()
            slot = self.slots.get(name)
            if slot is None:
                continue
            ok = await self._start_slot(slot)
            if not ok and self.config.node.fail_fast:
                self._fatal_error(f"service {name} failed (node.fail_fast = true)")
                return
        _log.info("node {node} running: {summary}", node=self.config.node.id,
                  summary=", ".join(f"{n}={s.state}" for n, s in self.slots.items()) or "no services")
        self.notifier.ready()
        if self.on_running is not None:
            try:
                self.on_running(self)
            except Exception:
                _log.failure("node {node}: on_running hook failed", node=self.config.node.id)

    async def _start_child(self, service):
        """Start one child, giving up after ``node.start_timeout_s``."""
        if service.parent is None:
            service.setServiceParent(self)
        timeout = self.config.node.start_timeout_s
        d = defer.maybeDeferred(service.startService)
        timed_out = []

        def on_timeout(result, t):
            timed_out.append(t)
            raise StartTimeout(f"did not start within {t:g} s (node.start_timeout_s)")

        d.addTimeout(timeout, self.reactor, onTimeoutCancel=on_timeout)
        await d

    async def _stop_child(self, service, what: str) -> None:
        """Stop one child (also one whose start failed: it may hold ports), giving up
        after ``node.stop_timeout_s``; never raises."""
        timeout = self.config.node.stop_timeout_s
        try:
            d = defer.maybeDeferred(service.stopService)
            d.addTimeout(timeout, self.reactor)
            await d
        except defer.TimeoutError:
            _log.error("{what} did not stop within {timeout} s (node.stop_timeout_s); "
                       "going on without it", what=what, timeout=timeout)
        except Exception as e:
            _log.error("{what} did not stop cleanly: {why}", what=what, why=e)

    def addService(self, service):
        # Children are started by _start_all in order, never by MultiService
        # as a side effect of being added while running.
        if service.name and service.name in self.namedServices:
            raise RuntimeError(f"cannot have two services named {service.name!r}")
        if service.name:
            self.namedServices[service.name] = service
        self.services.append(service)

    async def _start_slot(self, slot: ServiceSlot) -> bool:
        entry = slot.entry
        plugin = self.plugins[entry.name]
        slot.set("starting")
        try:
            service = plugin.make_service(entry.config, self.context)
            if not IService.providedBy(service):
                raise TypeError(f"plugin {entry.name} returned {service!r}, not an IService")
            if not service.name:
                service.setName(entry.name)
            slot.service = service
            await self._start_child(service)
        except defer.CancelledError:
            slot.set("stopped", "node shutdown during start")
            await self._release(slot)
            raise
        except Exception as e:
            reason = f"{type(e).__name__}: {e}" if not isinstance(e, StartTimeout) else str(e)
            slot.set("failed", reason)
            _log.error("service {service} failed to start: {reason}", service=entry.name,
                       reason=reason)
            self._tell_cluster(entry.name, reason)
            await self._release(slot)
            return False
        slot.set("running")
        self._tell_cluster(entry.name, None)
        _log.info("service {service} running (role {role})", service=entry.name,
                  role=slot.describe()["role"])
        return True

    def _tell_cluster(self, name: str, reason: str | None, source: str | None = "start") -> None:
        """A service failed to start (or started): the cluster moves the
        resources that follow it (review M6).  A service that fails later
        tells the cluster itself (``cluster.service_failed(name, reason)``,
        source "service"); a start clears only the node's own report, a
        service disabled by a reload clears both (``source=None``)."""
        tell = getattr(self.cluster, "service_failed", None)
        if tell is not None:
            try:
                tell(name, reason, source=source)
            except Exception:
                _log.failure("telling the cluster about service {service}", service=name)

    async def _release(self, slot: ServiceSlot) -> None:
        """After a failed start: stop what the service may have bound or registered."""
        service = slot.service
        if service is None:
            return
        if service.running:
            await self._stop_child(service, f"service {slot.entry.name} (after its failed start)")
        if service.parent is self:
            self.removeService(service)

    async def _stop_slot(self, slot: ServiceSlot, why: str) -> None:
        if slot.service is None or slot.state == "stopped":
            slot.set("stopped", why)
            return
        if slot.state == "failed":
            await self._release(slot)     # released at the failure; again costs nothing
            if why.startswith("disabled"):
                self._tell_cluster(slot.entry.name, None, None)   # no longer a service here
            return
        slot.set("stopping", why)
        await self._stop_child(slot.service, f"service {slot.entry.name}")
        if slot.service.parent is self:
            self.removeService(slot.service)
        slot.set("stopped", why)
        if why.startswith("disabled"):
            # What the instance said about itself (e.g. "syncing") cannot be cleared
            # by it any more.  A restart keeps it: the new instance clears it (or
            # repeats it) itself, so there is no moment where this node looks able.
            self._tell_cluster(slot.entry.name, None, None)

    def removeService(self, service):
        if service.name:
            self.namedServices.pop(service.name, None)
        if service in self.services:
            self.services.remove(service)
        service.parent = None

    def stopService(self):
        from twisted.application.service import Service
        Service.stopService(self)
        self._stopping = True
        self.notifier.stopping()
        return defer.ensureDeferred(self._stop_all())

    async def _stop_all(self):
        _log.info("node {node} stopping", node=self.config.node.id)
        start = self._start_d
        if start is not None and not start.called:
            # SIGTERM while starting: cancel the child being started and wait for
            # the start sequence to unwind, so nothing starts after this point.
            start.cancel()
            await start
        # A reload in progress finishes first (it may be starting a service).
        await self._reload_lock.acquire()
        try:
            for slot in reversed(list(self.slots.values())):
                await self._stop_slot(slot, "node shutdown")
            for child, what in ((self.admin, "admin"), (self.cluster, "cluster manager"),
                                (self.store, "state store")):
                if child.running:
                    await self._stop_child(child, what)
        finally:
            self._reload_lock.release()
        _log.info("node {node} stopped", node=self.config.node.id)
        self.notifier.close()

    def _fatal(self, failure, what):
        self._fatal_error(f"{what}: {failure.getErrorMessage()}")

    def _fatal_error(self, message: str):
        """Log, stop the reactor, and make twistd exit non-zero."""
        _log.critical("fatal: {message}; stopping", message=message)
        self.exit_code = 1
        if getattr(self.reactor, "running", False):
            self.reactor.addSystemEventTrigger("after", "shutdown", _exit_now, 1)
            self.reactor.stop()

    # ------------------------------------------------------------------
    # admin methods of the node itself
    # ------------------------------------------------------------------
    def _register_methods(self):
        self.cluster.register_methods(self.rpc)
        self.rpc.register("system.status", self.status, params=Params(),
                          doc="Node id, version, uptime, store health, service states.")
        self.rpc.register("system.version", lambda: {"version": __version__}, params=Params(),
                          doc="The appliance version.")
        self.rpc.register("config.reload", self.reload, params=Params(),
                          doc="Re-read the config file; apply what can change at run time, "
                              "restart failed services.")
        self.rpc.register("service.restart", self.restart_service,
                          params=Params(service=Param("str", required=True, min=1, max=64)),
                          doc="Stop and start one service {service} (also a failed one).")
        self.rpc.register("store.recheck", self.recheck_store, params=Params(),
                          doc="Check the state store now; a failed store that answers "
                              "becomes healthy. Returns its status.")

    def status(self) -> dict[str, Any]:
        uptime = 0.0 if self.started_at is None else self.reactor.seconds() - self.started_at
        return {
            "node": self.config.node.id,
            "version": __version__,
            "uptime_s": round(uptime, 3),
            "store": self._store_status(),
            "services": {name: slot.describe() for name, slot in self.slots.items()},
        }

    def _store_status(self) -> dict[str, Any]:
        """The store's describe(), always with ``backend`` and ``healthy`` (SPEC)."""
        try:
            info = dict(self.store.describe())
        except Exception as e:
            _log.failure("store describe() failed")
            info = {"error": f"describe failed: {type(e).__name__}: {e}"}
        info.setdefault("backend", getattr(self.store, "backend", self.config.store.backend))
        info["healthy"] = bool(info.get("healthy", getattr(self.store, "healthy", False)))
        return info

    def recheck_store(self) -> defer.Deferred:
        recheck = getattr(self.store, "recheck", None)
        if recheck is None:
            return defer.succeed(self._store_status())
        d = defer.maybeDeferred(recheck)
        d.addCallback(lambda _: self._store_status())
        return d

    def restart_service(self, service: str) -> defer.Deferred:
        return self._reload_lock.run(
            lambda: defer.ensureDeferred(self._restart_service(service)))

    async def _restart_service(self, name: str) -> dict[str, Any]:
        slot = self.slots.get(name)
        if slot is None:
            known = ", ".join(sorted(self.slots)) or "none"
            raise InvalidParams.because(f"params.service: {name!r} is not an enabled service "
                                        f"(enabled: {known})")
        if self._stopping:
            raise ApplicationError("the node is stopping", code=-32011)
        await self._stop_slot(slot, "service.restart")
        fresh = self.slots[name] = ServiceSlot(slot.entry)
        await self._start_slot(fresh)
        return {"service": name, **fresh.describe()}

    def reload(self) -> defer.Deferred:
        """``config.reload`` and SIGHUP: one at a time (a second waits for the first)."""
        return self._reload_lock.run(lambda: defer.ensureDeferred(self._reload()))

    async def _load_new_config(self) -> NodeConfig:
        """Read and parse the config off the reactor thread when there is a thread pool."""
        from twisted.internet.interfaces import IReactorThreads
        try:
            if IReactorThreads.providedBy(self.reactor):
                from twisted.internet import threads
                return await threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                                       load_config, self.config.file, self.plugins)
            return load_config(self.config.file, self.plugins)
        except ConfigError as e:
            raise ApplicationError(f"config not reloaded: {e}", code=-32010)

    async def _reload(self) -> dict[str, Any]:
        if self._stopping:
            raise ApplicationError("config not reloaded: the node is stopping", code=-32011)
        new = await self._load_new_config()
        old = self.config
        restart_required = [section for section in ("node", "store", "admin", "cluster", "vips")
                            if getattr(old, section) != getattr(new, section)]
        # 1. The plan, from the slots as they are (not from the old config text:
        #    a service that failed is retried even if its table did not change).
        new_enabled = {e.name: e for e in new.enabled_services()}
        plan: list[tuple[str, str, ServiceEntry | None]] = []
        for name in self.slots:
            if name not in new_enabled:
                plan.append(("stop", name, None))
        for name, entry in new_enabled.items():
            slot = self.slots.get(name)
            if slot is None:
                plan.append(("start", name, entry))
            elif slot.state == "failed":
                plan.append(("restart", name, entry))
            elif entry.config != slot.entry.config:
                reconfigure = getattr(slot.service, "reconfigure", None)
                plan.append(("reconfigure" if reconfigure is not None and slot.state == "running"
                             else "restart", name, entry))
        # Services started below see the new service tables; node-level sections
        # that need a restart keep their old values.
        target = new if not restart_required else _merge_services(old, new)
        self.context.config = target
        applied: list[str] = []
        failed: list[str] = []
        kept_old: dict[str, ServiceEntry] = {}
        # 2. Apply each step on its own: one failing step does not stop the others.
        for action, name, entry in plan:
            try:
                line, ok = await self._apply(action, name, entry)
            except defer.CancelledError:
                raise
            except Exception as e:
                _log.failure("config.reload: {action} {service} failed", action=action,
                             service=name)
                line, ok = f"services.{name}: {action} failed ({type(e).__name__}: {e})", False
            applied.append(line)
            if not ok:
                failed.append(name)
                if action == "reconfigure" and name in old.services:
                    kept_old[name] = old.services[name]
        # 3. Switch the config last; a service whose reconfigure failed keeps its old
        #    table, so the next reload sees the difference and tries again.
        if kept_old:
            services = dict(target.services)
            services.update(kept_old)
            from dataclasses import replace
            target = replace(target, services=MappingProxyType(services))
        self.config = target
        self.context.config = target
        _log.info("config reloaded from {file}: applied {applied}; failed {failed}; restart "
                  "required for {restart}", file=new.file, applied=applied or "nothing",
                  failed=failed or "nothing", restart=restart_required or "nothing")
        return {"file": new.file, "applied": applied, "failed": failed,
                "restart_required": restart_required}

    async def _apply(self, action: str, name: str, entry: ServiceEntry | None) -> tuple[str, bool]:
        if action == "stop":
            await self._stop_slot(self.slots[name], "disabled by config.reload")
            del self.slots[name]
            return f"services.{name}: stopped", True
        if action == "start":
            slot = self.slots[name] = ServiceSlot(entry)
            ok = await self._start_slot(slot)
            return (f"services.{name}: started" if ok else
                    f"services.{name}: failed to start ({slot.reason})"), ok
        if action == "reconfigure":
            slot = self.slots[name]
            await defer.maybeDeferred(slot.service.reconfigure, entry.config)
            slot.entry = entry
            return f"services.{name}: reconfigured", True
        # restart (also of a failed slot)
        await self._stop_slot(self.slots[name], "restarting for config.reload")
        slot = self.slots[name] = ServiceSlot(entry)
        ok = await self._start_slot(slot)
        return (f"services.{name}: restarted" if ok else
                f"services.{name}: failed to restart ({slot.reason})"), ok


def _merge_services(old: NodeConfig, new: NodeConfig) -> NodeConfig:
    """Old node-level sections (they need a restart) with the new services."""
    from dataclasses import replace
    return replace(old, services=new.services)


def _exit_now(code: int):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
