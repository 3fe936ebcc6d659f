"""The ESR route agent: one kernel route per mapped EN address or slice,
pointing at the DN that holds it, changed the moment the table changes.

Event-driven, no scan interval: the service watches the
:class:`~services.encap.mapping.MappingTable` (the store's change feed, or
the peer link with the embedded store) and for each change of a target
computes the route it wants -- ``next_hops[entry["dn"]]`` -- and installs it
with ``ip route replace`` (one netlink message: a slice moved from dn1 to
dn2 never has a gap) or withdraws it when the target was released.  Every
route carries the service's protocol number (``proto``, default 0xe5) in
its table (``table``), so the agent lists and removes only its own routes.

Per prefix, one netlink operation is in flight at a time; a change that
arrives meanwhile is applied right after it (the latest wins, nothing is
queued twice).  A failed operation is retried with backoff
(``retry_initial_s`` doubling to ``retry_max_s``), and counted.

Start = full reconcile: the service reads the routes with its protocol
number already in the kernel (left by a previous run: stopping does NOT
remove routes, so a restart of the agent never interrupts forwarding), loads
the table, installs what is missing or different, and withdraws its stale
routes (targets no longer in the table, or held by a DN without a next hop).
The table is loaded in the background: ``startService`` returns once the
kernel was read, and a store that is down at start only delays the reconcile
(``esr.routes`` shows ``"reconciled": false`` until then); the routes already
in the kernel keep forwarding meanwhile.

Without ``CAP_NET_ADMIN`` (a non-root demo) the service still follows the
table and shows the routes it would install; ``esr.routes`` says
``"net_admin": false`` and nothing is written.

Metrics: route changes (inject/withdraw), failures, installed routes, and
two latencies per change: ``notify`` (the table change reached this node ->
the kernel acknowledged the route) and ``claim`` (the DN's claim time
``entry["since"]`` -> route acknowledged; wall clocks of two machines, so
only meaningful with synchronized clocks or on one host).
"""

from __future__ import annotations

import errno
from collections import deque
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from appliance.admin.rpc import Params
from appliance.plugin import withdraw
from services.encap.mapping import MappingTable
from services.encap.routes import RouteInjector, as_prefix

_log = Logger(namespace="services.esr")

CAP_NET_ADMIN = 12
SAMPLES = 1000


def has_net_admin(status_path: str = "/proc/self/status") -> bool:
    """True if this process may change routes (``CAP_NET_ADMIN`` effective)."""
    try:
        with open(status_path) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def quantile(samples, q: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Collector:
    def __init__(self, service: "ESRService"):
        self.service = service

    def describe(self):
        return []

    def collect(self):
        s = self.service
        c = CounterMetricFamily("appliance_esr_route_changes", "Routes installed or withdrawn "
                                "by the ESR agent", labels=["op"])
        c.add_metric(["inject"], s.stats["injected"])
        c.add_metric(["withdraw"], s.stats["withdrawn"])
        yield c
        f = CounterMetricFamily("appliance_esr_route_failures",
                                "Netlink operations of the ESR agent that failed (retried)")
        f.add_metric([], s.stats["failures"])
        yield f
        g = GaugeMetricFamily("appliance_esr_routes", "Routes the ESR agent has installed")
        g.add_metric([], len(s.installed))
        yield g
        p = GaugeMetricFamily("appliance_esr_pending", "Targets whose route is not (yet) as "
                              "the mapping table says")
        p.add_metric([], len(s.pending()))
        yield p
        n = GaugeMetricFamily("appliance_esr_net_admin", "1 if the agent may change routes")
        n.add_metric([], 1 if s.net_admin else 0)
        yield n
        lat = GaugeMetricFamily(
            "appliance_esr_route_latency_seconds",
            "Recent mapping-change -> route-installed latencies (path notify: from the table "
            "change at this node; claim: from the DN's claim time)", labels=["path", "quantile"])
        for path, samples in (("notify", s.samples), ("claim", s.claim_samples)):
            for q in (0.5, 0.95, 1.0):
                v = quantile(samples, q)
                if v is not None:
                    lat.add_metric([path, f"{q:g}"], v)
        yield lat


class ESRService(Service):
    """Follows the mapping table; keeps the routes to the DNs (module docstring)."""

    name = "esr"

    def __init__(self, config, context, *, netlink=None, store=None, net_admin: bool | None = None):
        self.config = config
        self.context = context
        self.reactor = context.reactor
        self._netlink = netlink
        self._store = store
        self._own_store = None
        self.net_admin = has_net_admin() if net_admin is None else net_admin
        self.table: MappingTable | None = None
        self.routes: RouteInjector | None = None
        self.desired: dict[str, dict | None] = {}
        self.installed: dict[str, dict] = {}
        self.errors: dict[str, str] = {}
        self.unroutable: dict[str, str] = {}     # held by a DN without a next hop
        self._busy: set[str] = set()
        self._dirty: set[str] = set()
        self._retry: dict[str, Any] = {}
        self._delay: dict[str, float] = {}
        self.samples: deque = deque(maxlen=SAMPLES)
        self.claim_samples: deque = deque(maxlen=SAMPLES)
        self.reconciled = False
        self.following: defer.Deferred | None = None
        self._collector = None
        self.stats = {"injected": 0, "withdrawn": 0, "failures": 0, "changes": 0,
                      "unknown_dn": 0, "stale_removed": 0, "retries": 0}
        #: called (prefix, route_or_None, latency_s) after each kernel change (tests, bench)
        self.listeners: list = []

    @property
    def role(self) -> str:
        """What ``system.status`` shows for the service: ``no-net-admin`` while
        the agent cannot change routes (it only follows the table)."""
        return "standalone" if self.net_admin else "no-net-admin"

    # ------------------------------------------------------------------
    # life cycle
    # ------------------------------------------------------------------
    def startService(self):
        super().startService()
        rpc = getattr(self.context, "rpc", None)
        if rpc is not None:
            rpc.register("esr.routes", self.describe, params=Params(),
                         doc="ESR agent: the routes it keeps towards the DNs (per EN address "
                             "or slice), pending changes, errors, latencies.")
            rpc.register("esr.reconcile", self.reconcile, params=Params(),
                         doc="ESR agent: re-read its routes from the kernel and repair every "
                             "difference with the mapping table (after manual changes).")
        registry = getattr(self.context, "metrics", None)
        if registry is not None:
            self._collector = _Collector(self)
            registry.register(self._collector)
        d = defer.ensureDeferred(self._start())
        d.addErrback(self._start_failed)
        return d

    def _start_failed(self, failure):
        _log.failure("esr: start failed", failure=failure)
        return failure

    def _make_store(self):
        if self._store is not None:
            return self._store
        if self.config.source == "store":
            return self.context.store
        from appliance.store.redis import RedisStore
        self._own_store = RedisStore(self.reactor, url=self.config.source,
                                     namespace=self.config.namespace)
        return self._own_store

    async def _start(self):
        store = self._make_store()
        if self._own_store is not None:
            await defer.maybeDeferred(self._own_store.startService)
        link = getattr(getattr(self.context, "cluster", None), "peerlink", None)
        self.table = MappingTable(self.reactor, store, self.context.node_id, link=link)
        if self._netlink is None:
            from appliance.net.netlink import Netlink
            self._netlink = Netlink(self.reactor, None, name="esr-netlink")
            self._own_netlink = True
        self.routes = RouteInjector(self.reactor, self._netlink, table=self.config.table,
                                    proto=self.config.proto)
        self.routes.start()
        if not self.net_admin:
            _log.error("esr: no CAP_NET_ADMIN: following the mapping table but installing no "
                       "routes (run as root, or grant CAP_NET_ADMIN)")
        for prefix, hop in (await self._read_kernel()).items():
            self.installed[prefix] = {"dn": None, "via": hop["via"], "dev": hop["dev"],
                                      "epoch": None, "found_at_start": True}
        self.table.watch(self._changed)
        # the table loads in the background: a store that is down at start delays the
        # reconcile (the routes already in the kernel keep forwarding), not the node
        self.following = defer.ensureDeferred(self._follow())
        self.following.addErrback(lambda f: _log.failure("esr: following the table failed",
                                                         failure=f))

    async def _follow(self):
        try:
            await self.table.start()
        except Exception as e:
            _log.warn("esr: mapping table not readable yet ({e}); routes in the kernel are kept "
                      "until it is", e=e)
            await self.table.when_loaded()
        if not self.running:
            return
        stale = [p for p in self.installed if p not in self.desired]
        for prefix in stale:
            self.desired[prefix] = None
            self.stats["stale_removed"] += 1
            self._apply(prefix)
        self.reconciled = True
        _log.info("esr: following the mapping table ({n} targets; {m} routes found in table "
                  "{t}, {s} stale), proto {p}", n=len(self.table.entries()),
                  m=len(self.installed), t=self.config.table, s=len(stale), p=self.config.proto)

    async def _read_kernel(self) -> dict[str, dict]:
        """Our routes (our proto, our table) as the kernel has them now."""
        versions = {h.via.version for h in self.config.next_hops.values() if h.via is not None}
        found: dict[str, dict] = {}
        for version in sorted(versions or {4}):
            try:
                found.update(await self.routes.owned(version))
            except Exception as e:
                _log.error("esr: cannot read the routing table {t}: {e}", t=self.config.table,
                           e=e)
        return found

    def reconcile(self) -> defer.Deferred:
        """RPC ``esr.reconcile``: read our routes from the kernel again (an operator
        may have changed them) and repair every difference with the table; fires
        with ``{"repaired": [prefix, ...]}``."""
        return defer.ensureDeferred(self._reconcile())

    async def _reconcile(self) -> dict[str, Any]:
        if self.routes is None or not self.reconciled:
            return {"repaired": [], "note": "not started"}
        kernel = await self._read_kernel()
        for prefix in set(self.installed) | set(kernel):
            if prefix in self._busy:
                continue
            if prefix in kernel:
                old = self.installed.get(prefix, {"dn": None, "epoch": None})
                self.installed[prefix] = {**old, "via": kernel[prefix]["via"],
                                          "dev": kernel[prefix]["dev"]}
            else:
                self.installed.pop(prefix, None)
        repaired = []
        for prefix in sorted(set(self.desired) | set(self.installed)):
            if prefix not in self.desired:
                self.desired[prefix] = None
                self.stats["stale_removed"] += 1
            if self._apply(prefix) is not None:
                repaired.append(prefix)
        if repaired:
            _log.info("esr: reconcile repaired {n} routes: {p}", n=len(repaired),
                      p=", ".join(repaired))
        return {"repaired": repaired}

    def stopService(self):
        super().stopService()
        for call in self._retry.values():
            if call.active():
                call.cancel()
        self._retry.clear()
        if self.table is not None:
            self.table.unwatch(self._changed)
            self.table.stop()
        withdraw(self.context, ("esr.routes", "esr.reconcile"), self._collector)
        self._collector = None
        steps = []
        if getattr(self, "_own_netlink", False) and self._netlink is not None:
            steps.append(defer.maybeDeferred(self._netlink.close))
        if self._own_store is not None:
            steps.append(defer.maybeDeferred(self._own_store.stopService))
        return defer.gatherResults(steps, consumeErrors=True).addErrback(
            lambda f: _log.failure("esr: stop", failure=f))

    # ------------------------------------------------------------------
    # the table -> the kernel
    # ------------------------------------------------------------------
    def _changed(self, target: str, entry: dict | None) -> None:
        try:
            prefix = as_prefix(target)
        except ValueError:
            _log.warn("esr: ignoring mapping target {t!r}", t=target)
            return
        self.stats["changes"] += 1
        now = self.reactor.seconds()
        self.unroutable.pop(prefix, None)
        if entry is None:
            self.desired[prefix] = None
        else:
            hop = self.config.next_hops.get(entry["dn"])
            if hop is None:
                self.stats["unknown_dn"] += 1
                self.unroutable[prefix] = f"no next hop configured for DN {entry['dn']!r}"
                _log.warn("esr: {t} is held by {dn}, which has no next hop in "
                          "[services.esr] next_hops; withdrawing our route", t=target,
                          dn=entry["dn"])
                self.desired[prefix] = None
            else:
                self.desired[prefix] = {
                    "dn": entry["dn"], "epoch": entry.get("epoch"), "since": entry.get("since"),
                    "via": str(hop.via) if hop.via is not None else None, "dev": hop.dev,
                    "noticed": now, "live": self.reconciled}
        self._apply(prefix)

    def _apply(self, prefix: str) -> str | None:
        """Bring ``prefix``'s route towards the desired state; returns the
        operation issued ("inject", "withdraw") or None."""
        if prefix in self._busy:
            self._dirty.add(prefix)
            return None
        call = self._retry.pop(prefix, None)
        if call is not None and call.active():
            call.cancel()
        want = self.desired.get(prefix)
        have = self.installed.get(prefix)
        if want is None:
            if have is None:
                self.desired.pop(prefix, None)
                return None
            op = "withdraw"
        else:
            if have is not None and have["via"] == want["via"] and (
                    want["dev"] is None or have["dev"] == want["dev"]):
                have.update(dn=want["dn"], epoch=want["epoch"])
                self.errors.pop(prefix, None)
                return None
            op = "inject"
        if not self.net_admin:
            self.errors[prefix] = "not installed: no CAP_NET_ADMIN"
            return None
        self._busy.add(prefix)
        if op == "inject":
            d = self.routes.inject(prefix, dev=want["dev"], via=want["via"])
        else:
            d = self.routes.withdraw(prefix)
        d.addCallbacks(self._done, self._failed, callbackArgs=(prefix, op, want),
                       errbackArgs=(prefix, op))
        d.addBoth(self._finished, prefix)
        d.addErrback(lambda f: _log.failure("esr: route bookkeeping for {p}", failure=f,
                                            p=prefix))
        return op

    def _done(self, result, prefix: str, op: str, want: dict | None) -> None:
        now = self.reactor.seconds()
        self.errors.pop(prefix, None)
        self._delay.pop(prefix, None)
        if op == "withdraw":
            self.installed.pop(prefix, None)
            if self.desired.get(prefix, False) is None:
                self.desired.pop(prefix, None)
            self.stats["withdrawn"] += 1
            _log.info("esr: withdrew {p}", p=prefix)
            self._tell(prefix, None, None)
            return
        latency = now - want["noticed"]
        self.installed[prefix] = {"dn": want["dn"], "via": want["via"], "dev": want["dev"],
                                  "epoch": want["epoch"], "installed_at": now,
                                  "latency_s": latency}
        self.stats["injected"] += 1
        since = want.get("since")
        if want.get("live"):
            # changes heard while running (not the start's catch-up of old claims)
            self.samples.append(latency)
            if isinstance(since, (int, float)) and 0 <= now - since < 3600:
                self.claim_samples.append(now - since)
        _log.info("esr: {p} -> {dn} ({via}) in {ms:.2f} ms", p=prefix, dn=want["dn"],
                  via=want["via"] or want["dev"], ms=latency * 1000)
        self._tell(prefix, dict(self.installed[prefix]), latency)

    def _tell(self, prefix, route, latency) -> None:
        for listener in list(self.listeners):
            try:
                listener(prefix, route, latency)
            except Exception:
                _log.failure("esr: listener failed")

    def _failed(self, failure, prefix: str, op: str) -> None:
        self.stats["failures"] += 1
        why = failure.getErrorMessage()
        if getattr(failure.value, "errno", None) == errno.EPERM:
            self.net_admin = False
            why += " (no CAP_NET_ADMIN)"
        self.errors[prefix] = f"{op} failed: {why}"
        delay = self._delay.get(prefix, self.config.retry_initial_s)
        self._delay[prefix] = min(delay * 2, self.config.retry_max_s)
        _log.warn("esr: {op} {p} failed: {why}; again in {d:g} s", op=op, p=prefix, why=why,
                  d=delay)
        if self.running:
            self._retry[prefix] = self.reactor.callLater(delay, self._retry_now, prefix)

    def _retry_now(self, prefix: str) -> None:
        self._retry.pop(prefix, None)
        self.stats["retries"] += 1
        self._apply(prefix)

    def _finished(self, _, prefix: str) -> None:
        self._busy.discard(prefix)
        if prefix in self._dirty:
            self._dirty.discard(prefix)
            self._apply(prefix)

    # ------------------------------------------------------------------
    # status
    # ------------------------------------------------------------------
    def pending(self) -> list[str]:
        """Targets whose kernel route is not what the table says (yet)."""
        out = []
        for prefix, want in self.desired.items():
            have = self.installed.get(prefix)
            if want is None:
                if have is not None:
                    out.append(prefix)
            elif have is None or have["via"] != want["via"] or have.get("dn") != want["dn"]:
                out.append(prefix)
        return sorted(out)

    def describe(self) -> dict[str, Any]:
        """RPC ``esr.routes``."""
        routes = {}
        for prefix, r in sorted(self.installed.items()):
            row = {"dn": r.get("dn"), "via": r.get("via"), "dev": r.get("dev"),
                   "epoch": r.get("epoch")}
            if r.get("latency_s") is not None:
                row["latency_ms"] = round(r["latency_s"] * 1000, 3)
            routes[prefix] = row
        lat = {}
        for path, samples in (("notify", self.samples), ("claim", self.claim_samples)):
            if samples:
                lat[path] = {"n": len(samples),
                             "p50_ms": round(quantile(samples, 0.5) * 1000, 3),
                             "p95_ms": round(quantile(samples, 0.95) * 1000, 3),
                             "max_ms": round(max(samples) * 1000, 3)}
        return {"table": self.config.table, "proto": self.config.proto,
                "source": self.config.source if self.config.source == "store"
                else "redis (own connection)",
                "replicating": bool(self.table and self.table.replicating),
                "net_admin": self.net_admin, "reconciled": self.reconciled,
                "next_hops": {dn: h.describe() for dn, h in self.config.next_hops.items()},
                "routes": routes, "pending": self.pending(),
                "errors": {**self.unroutable, **self.errors},
                "latency": lat, "stats": dict(self.stats),
                "mapping": self.table.stats if self.table is not None else {}}
