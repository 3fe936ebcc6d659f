"""The node: one service tree per box.

``ApplianceNode`` is a ``MultiService`` whose children start in order --
store, cluster, admin, then every enabled service -- each waiting for the
one before (``MultiService`` itself would not wait).  A service whose start
fails is marked ``failed`` with the reason and the others go on, unless
``node.fail_fast`` is set.  Shutdown runs in reverse order and waits for
each child (the memory store flushes its journal last).
"""

from __future__ import annotations

import gc

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application.service import IService, MultiService
from twisted.internet import defer
from twisted.logger import Logger

from appliance import __version__
from appliance.admin.rpc import ApplicationError, MethodRegistry
from appliance.admin.service import AdminService
from appliance.config import ConfigError, NodeConfig, ServiceEntry, load_config
from appliance.plugin import NodeContext, discover_plugins

_log = Logger(namespace="appliance.node")

STATES = ("starting", "running", "failed", "stopping", "stopped")


def make_store(reactor, config: NodeConfig):
    """Build (not start) the store the config asks for."""
    s = config.store
    if s.backend == "redis":
        from appliance.store.redis import RedisStore
        return RedisStore(reactor, url=s.url, sentinels=tuple(s.sentinels),
                          master_name=s.master_name, namespace=s.namespace,
                          op_timeout_s=s.op_timeout_s, connect_timeout_s=s.connect_timeout_s)
    from appliance.store.memory import MemoryStore
    return MemoryStore(reactor, state_dir=config.node.state_dir, fsync=s.fsync,
                       compact_after_bytes=s.compact_after_bytes)


def make_cluster(reactor, config: NodeConfig, store):
    """The heartbeat + failover manager (alone, it owns everything it may)."""
    from appliance.cluster.manager import ClusterManager
    vip_manager = None
    if config.vips:
        from appliance.cluster.vip import VIPManager
        vip_manager = VIPManager(reactor, list(config.vips))
    return ClusterManager(reactor, node_id=config.node.id, cluster=config.cluster,
                          vips=config.vips, store=store, state_dir=config.node.state_dir,
                          vip_manager=vip_manager)


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
                "appliance_store_events", "memory store: journal writes, flushes, fsyncs, "
                "compactions, torn records dropped at load, journal writes slower than 250 ms",
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


class ApplianceNode(MultiService):
    """Store, cluster, admin and the enabled services of one box."""

    _log = _log

    def __init__(self, config: NodeConfig, reactor=None, plugins: dict | None = None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config = config
        self.plugins = plugins if plugins is not None else discover_plugins()
        self.started_at: float | None = None
        self.exit_code = 0
        self.state_dir = Path(config.node.state_dir)
        self.rpc = MethodRegistry()
        self.metrics = CollectorRegistry()
        self.metrics.register(_NodeCollector(self))
        self.store = make_store(reactor, config)
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
        self._register_methods()

    # ------------------------------------------------------------------
    # start / stop
    # ------------------------------------------------------------------
    def privilegedStartService(self):
        # Children are started in order by startService; nothing here binds
        # before the store is loaded.
        pass

    def startService(self):
        from twisted.application.service import Service
        Service.startService(self)
        self.started_at = self.reactor.seconds()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        _log.info("node {node} starting (appliance {version}, store {backend}, "
                  "services: {services})", node=self.config.node.id, version=__version__,
                  backend=self.config.store.backend, services=", ".join(self.slots) or "none")
        self._install_sighup()
        d = defer.ensureDeferred(self._start_all())
        d.addErrback(self._fatal, "node start failed")
        return d

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

    async def _start_all(self):
        try:
            await self._start_child(self.store)
        except Exception as e:
            self._fatal_error(f"state store ({self.config.store.backend}) failed to start: {e}")
            return
        try:
            await self._start_child(self.cluster)
        except Exception as e:
            self._fatal_error(f"cluster manager failed to start: {e}")
            return
        try:
            await self._start_child(self.admin)
        except Exception as e:
            _log.critical("admin listener {listen} failed: {why}", listen=self.config.admin.listen,
                          why=e)
            if self.config.node.fail_fast:
                self._fatal_error(f"admin failed: {e}")
                return
        for name in list(self.slots):
            ok = await self._start_slot(self.slots[name])
            if not ok and self.config.node.fail_fast:
                self._fatal_error(f"service {name} failed (node.fail_fast = true)")
                return
        _log.info("node {node} running: {summary}", node=self.config.node.id,
                  summary=", ".join(f"{n}={s.state}" for n, s in self.slots.items()) or "no services")
        # What exists now (modules, classes, loaded state) lives as long as the
        # process: keep it out of the cyclic GC's full passes, which otherwise
        # pause the reactor in proportion to it (measured: 50-145 ms under load).
        gc.collect()
        gc.freeze()
        # A packet allocates a few hundred short-lived objects: with the
        # default 700-allocation young generation, many are collected (and
        # promoted) while still in use.  A larger one lets them die first.
        gc.set_threshold(max(gc.get_threshold()[0], 20000), *gc.get_threshold()[1:])

    async def _start_child(self, service):
        if service.parent is None:
            service.setServiceParent(self)
        await defer.maybeDeferred(service.startService)

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
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            slot.set("failed", reason)
            _log.error("service {service} failed to start: {reason}", service=entry.name,
                       reason=reason)
            if slot.service is not None and slot.service.parent is self:
                self.removeService(slot.service)
            return False
        slot.set("running")
        _log.info("service {service} running (role {role})", service=entry.name,
                  role=slot.describe()["role"])
        return True

    async def _stop_slot(self, slot: ServiceSlot, why: str) -> None:
        if slot.service is None or slot.state in ("failed", "stopped"):
            if slot.state != "failed":
                slot.set("stopped", why)
            return
        slot.set("stopping", why)
        try:
            await defer.maybeDeferred(slot.service.stopService)
        except Exception as e:
            _log.error("service {service} did not stop cleanly: {why}",
                       service=slot.entry.name, why=e)
        if slot.service.parent is self:
            self.removeService(slot.service)
        slot.set("stopped", why)

    def removeService(self, service):
        if service.name:
            self.namedServices.pop(service.name, None)
        self.services.remove(service)
        service.parent = None

    def stopService(self):
        from twisted.application.service import Service
        Service.stopService(self)
        return defer.ensureDeferred(self._stop_all())

    async def _stop_all(self):
        _log.info("node {node} stopping", node=self.config.node.id)
        for slot in reversed(list(self.slots.values())):
            await self._stop_slot(slot, "node shutdown")
        for child in (self.admin, self.cluster, self.store):
            if child.running:
                try:
                    await defer.maybeDeferred(child.stopService)
                except Exception as e:
                    _log.error("{name} did not stop cleanly: {why}", name=child.name, why=e)
        _log.info("node {node} stopped", node=self.config.node.id)

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
        self.rpc.register("system.status", self.status,
                          doc="Node id, version, uptime, store health, service states.")
        self.rpc.register("system.version", lambda: {"version": __version__},
                          doc="The appliance version.")
        self.rpc.register("config.reload", self.reload,
                          doc="Re-read the config file; apply what can change at run time.")

    def status(self) -> dict[str, Any]:
        uptime = 0.0 if self.started_at is None else self.reactor.seconds() - self.started_at
        return {
            "node": self.config.node.id,
            "version": __version__,
            "uptime_s": round(uptime, 3),
            "store": self.store.describe(),
            "services": {name: slot.describe() for name, slot in self.slots.items()},
        }

    def reload(self):
        return defer.ensureDeferred(self._reload())

    async def _reload(self) -> dict[str, Any]:
        try:
            new = load_config(self.config.file, self.plugins)
        except ConfigError as e:
            raise ApplicationError(f"config not reloaded: {e}", code=-32010)
        old = self.config
        restart_required = [section for section in ("node", "store", "admin", "cluster", "vips")
                            if getattr(old, section) != getattr(new, section)]
        applied: list[str] = []
        old_enabled = {e.name: e for e in old.enabled_services()}
        new_enabled = {e.name: e for e in new.enabled_services()}
        for name in old_enabled.keys() - new_enabled.keys():
            await self._stop_slot(self.slots.pop(name), "disabled by config.reload")
            applied.append(f"services.{name}: stopped")
        # The node keeps its identity, store and listeners; services see the new config.
        self.config = new if not restart_required else _merge_services(old, new)
        self.context.config = self.config
        for name, entry in new_enabled.items():
            if name not in old_enabled:
                slot = self.slots[name] = ServiceSlot(entry)
                ok = await self._start_slot(slot)
                applied.append(f"services.{name}: started" if ok else
                               f"services.{name}: failed to start ({slot.reason})")
            elif entry.config != old_enabled[name].config:
                slot = self.slots[name]
                reconfigure = getattr(slot.service, "reconfigure", None)
                if reconfigure is not None and slot.state == "running":
                    await defer.maybeDeferred(reconfigure, entry.config)
                    slot.entry = entry
                    applied.append(f"services.{name}: reconfigured")
                else:
                    await self._stop_slot(slot, "restarting for config.reload")
                    slot = self.slots[name] = ServiceSlot(entry)
                    ok = await self._start_slot(slot)
                    applied.append(f"services.{name}: restarted" if ok else
                                   f"services.{name}: failed to restart ({slot.reason})")
        _log.info("config reloaded from {file}: applied {applied}; restart required for "
                  "{restart}", file=new.file, applied=applied or "nothing",
                  restart=restart_required or "nothing")
        return {"file": new.file, "applied": applied, "restart_required": restart_required}


def _merge_services(old: NodeConfig, new: NodeConfig) -> NodeConfig:
    """Old node-level sections (they need a restart) with the new services."""
    from dataclasses import replace
    return replace(old, services=new.services)


def _exit_now(code: int):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
