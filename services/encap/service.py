"""The ``encap`` service: a DN on the appliance node.

Wiring only (the logic is :class:`services.encap.dn.DecapNode`): a UDP port
for the tunnel, a TUN device read in the reactor (:mod:`services.encap.tun`),
the EN-DN mapping table on the node's store (:mod:`services.encap.mapping`),
the route injector (:mod:`services.encap.routes`), a cluster resource per
slice this DN backs up, the watchdog (:mod:`services.encap.fd`), RPCs
``encap.sessions``/``encap.mappings``/``encap.stats`` and Prometheus metrics.

Without ``CAP_NET_ADMIN`` (the non-root demo) there is no TUN device: the
service keeps running its control plane (handshakes, address assignment,
mapping table), says ``dn (no TUN: ...)`` as its role in ``system.status``,
and counts every data packet as ``no_tun``.
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application.service import Service
from twisted.internet import defer, protocol, task, threads
from twisted.logger import Logger

from appliance.admin.rpc import Params
from appliance.plugin import start_loop, stop_all, withdraw
from services.encap import tun as T
from services.encap.config import load_keys
from services.encap.dn import DecapNode

_log = Logger(namespace="services.encap")

RPC_METHODS = ("encap.sessions", "encap.mappings", "encap.stats")


class _UDP(protocol.DatagramProtocol):
    def __init__(self, service):
        self.service = service

    def datagramReceived(self, data, addr):
        dn = self.service.dn
        if dn is not None:
            dn.datagram(data, addr)

    def connectionRefused(self):
        if self.service.dn is not None:
            self.service.dn.stats["icmp_unreachable"] += 1


class EncapService(Service):
    name = "encap"
    UDP_READ_BYTES = 256 * 1024
    #: A returning DN waits this long before winning back slices another DN holds.
    HOME_CLAIM_DELAY_S = 1.0

    def __init__(self, config, context):
        self.config = config
        self.context = context
        self.reactor = context.reactor
        self.dn: DecapNode | None = None
        self.udp = None
        self.tun: T.TunReader | None = None
        self.tun_problem: str | None = None
        self.mapping = None
        self.routes = None
        self.rule_routes = None
        self.watchdog = None
        self._sweeper = None
        self._resources: list[str] = []

    @property
    def role(self) -> str:
        if self.tun_problem:
            return f"dn (no TUN: {self.tun_problem})"
        return "dn"

    # ------------------------------------------------------------------
    def startService(self):
        super().startService()
        return defer.ensureDeferred(self._start())

    async def _start(self):
        cfg = self.config
        node_id = self.context.node_id
        self.tun, self.tun_problem = None, None
        keys = load_keys(cfg)
        me = cfg.node(node_id)
        if me is None:
            raise RuntimeError(f"encap: node {node_id!r} is not in [[services.encap.nodes]]")
        self._open_tun()
        self.routes = self._route_injector(254)
        self.mapping = self._mapping_table()
        announce = self._announcer() if cfg.announce_interface else None
        self.dn = DecapNode(self.reactor, cfg, node_id, keys, send=self._udp_send,
                            tun_write=self._tun_write, mapping=self.mapping,
                            routes=self.routes if self.tun is not None else None,
                            announce=announce, store=self.context.store,
                            tun_name=cfg.tun)
        try:
            n = await self.dn.load_leases()
            if n:
                _log.info("encap: {n} EN leases loaded", n=n)
        except Exception as e:
            _log.warn("encap: leases not loaded: {e}", e=e)
        if self.mapping is not None:
            self.mapping.watch(self.dn.mapping_changed)
            try:
                await self.mapping.start()
            except Exception as e:
                _log.error("encap: mapping table did not start: {e}", e=e)
        if self.tun is not None:
            gw = self.dn.plan.gateway(node_id)
            try:
                await T.configure(cfg.tun, str(gw), me.subnet.prefixlen, cfg.mtu)
                self.tun.start()
            except Exception as e:
                self.tun_problem = f"configuring {cfg.tun} failed: {e}"
                _log.error("encap: {why}", why=self.tun_problem)
            await self._source_rule(me)
            if cfg.announce_interface:
                await self._proxy_arp(cfg.announce_interface)
        self.udp = self.reactor.listenUDP(cfg.port, _UDP(self), interface=str(cfg.listen_address))
        self.udp.maxThroughput = self.UDP_READ_BYTES
        try:
            from appliance.net.sockets import set_receive_buffer
            set_receive_buffer(self.udp.socket, 4 * 1024 * 1024)
        except Exception:
            pass
        # in the background: a store that does not answer must not hold the start up
        defer.ensureDeferred(self._claim_home(me)).addErrback(
            lambda f: _log.failure("encap: claiming the home slices", failure=f))
        self._register_slices()
        self._register_rpc()
        metrics = getattr(self.context, "metrics", None)
        if metrics is not None:
            metrics.register(self)
        self._sweeper = start_loop(self.reactor, 1.0, self._sweep, "encap: sweep loop")
        self._start_watchdog()
        _log.info("encap: DN {node} on udp:{addr}:{port}, subnet {subnet}, TUN {tun}",
                  node=node_id, addr=cfg.listen_address, port=self.udp.getHost().port,
                  subnet=me.subnet, tun=cfg.tun if self.tun else f"none ({self.tun_problem})")

    def _open_tun(self) -> None:
        try:
            fd, name = T.open_tun(self.config.tun)
        except T.TunError as e:
            self.tun_problem = str(e)
            _log.warn("encap: {why}; the data plane is off, the control plane runs", why=e)
            return
        self.tun = T.TunReader(self.reactor, fd, name, self._tun_packets,
                               batch=self.config.read_batch)

    def _route_injector(self, table: int):
        try:
            from services.encap.routes import RouteInjector
        except ImportError as e:
            _log.error("encap: no route injector ({e}): takeovers inject no routes", e=e)
            return None
        injector = RouteInjector(self.reactor, table=table)
        start = getattr(injector, "start", None)
        if start is not None:
            start()
        return injector

    def _mapping_table(self):
        try:
            from services.encap.mapping import MappingTable
        except ImportError as e:
            _log.error("encap: no mapping table ({e})", e=e)
            return None
        link = getattr(self.context.cluster, "peerlink", None)
        try:
            return MappingTable(self.reactor, self.context.store, self.context.node_id, link=link)
        except TypeError:
            return MappingTable(self.reactor, self.context.store, self.context.node_id)

    def _announcer(self):
        ifname = self.config.announce_interface

        def announce(address):
            from appliance.net import garp
            return threads.deferToThread(garp.send_announcement, ifname, address)
        return announce

    async def _proxy_arp(self, ifname: str) -> None:
        def write():
            with open(f"/proc/sys/net/ipv4/conf/{ifname}/proxy_arp", "w") as f:
                f.write("1")
        try:
            await threads.deferToThread(write)
        except OSError as e:
            _log.error("encap: proxy ARP on {ifname} not enabled: {e}", ifname=ifname, e=e)

    async def _source_rule(self, me) -> None:
        """Decapsulated traffic (from every DN subnet) goes to the ESR."""
        gw = self.config.esr_gateway
        if not gw:
            return
        self.rule_routes = self._route_injector(self.config.route_table)
        if self.rule_routes is None:
            return
        try:
            await self.rule_routes.inject("0.0.0.0/0", via=gw)
            for n in self.config.nodes:
                await defer.maybeDeferred(self.rule_routes.rule_from, str(n.subnet),
                                          self.config.route_table)
        except Exception as e:
            _log.error("encap: source rule to the ESR {gw} failed: {e}", gw=gw, e=e)

    async def _claim_home(self, me) -> None:
        """Our slices are ours in the mapping table (a returning DN wins them back).

        A slice another DN holds (it took it over while we were dead) is claimed
        only after ``HOME_CLAIM_DELAY_S``: by then our ENs have new sessions with
        us (they retry every handshake_retry_ms), so the routes that come back to us
        find them; until then the other DN still forwards to them."""
        if self.mapping is None:
            return
        when_loaded = getattr(self.mapping, "when_loaded", None)
        if when_loaded is not None:
            try:
                await when_loaded()
            except Exception:
                pass
        held = [net for net, _ in self.dn.plan.slices(me.id)
                if (self.mapping.lookup(str(net)) or {}).get("dn") not in (None, me.id)]
        if held:
            _log.info("encap: home slices {held} held by another DN: claiming them back in "
                      "{d:g} s", held=", ".join(map(str, held)), d=self.HOME_CLAIM_DELAY_S)
            await task.deferLater(self.reactor, self.HOME_CLAIM_DELAY_S, lambda: None)
        for net, _sec in self.dn.plan.slices(me.id):
            try:
                entry = await self.mapping.claim(str(net), me.id, "home")
                if entry.get("dn") != me.id:
                    _log.warn("encap: home slice {net} held by {dn}", net=net, dn=entry.get("dn"))
            except Exception as e:
                _log.warn("encap: claim of home slice {net} failed: {e}", net=net, e=e)

    def _register_slices(self) -> None:
        cluster = self.context.cluster
        peers = getattr(cluster, "peers", None) or {}
        me = self.context.node_id
        for dn in self.dn.plan.nodes:
            for net, sec in self.dn.plan.slices(dn):
                if sec is None or me not in (dn, sec):
                    continue
                other = sec if dn == me else dn
                if other not in peers:
                    continue
                name = f"encap:{dn}:{net}"
                if name in self._resources:
                    # a restart by the watchdog: the listener is there (it calls the new
                    # DecapNode); tell the new one what we own
                    if cluster.role(name) == "owner":
                        self.dn.slice_role(dn, net, "owner")
                    continue
                cluster.register_resource(
                    name,
                    lambda res, role, epoch, dn=dn, net=net: self.dn.slice_role(dn, net, role),
                    priority={dn: 200, sec: 100})
                self._resources.append(name)

    def _start_watchdog(self) -> None:
        if not self.config.watchdog.enabled:
            return
        try:
            from services.encap.fd import Watchdog
        except ImportError:
            return
        previous = self.watchdog
        self.watchdog = Watchdog(self.reactor, self, self.config.watchdog)
        if previous is not None:             # a restart by the watchdog: keep its backoff
            self.watchdog.restarts = previous.restarts
            self.watchdog.backoff = previous.backoff
            self.watchdog.history = previous.history
        self.watchdog.start()

    # ------------------------------------------------------------------
    def _udp_send(self, data: bytes, addr) -> None:
        self.udp.write(data, addr)

    def _tun_write(self, packets) -> int:
        if self.tun is None:
            self.dn.drops["no_tun"] = self.dn.drops.get("no_tun", 0) + len(packets)
            return len(packets)
        return self.tun.write_many(packets)

    def _tun_packets(self, packets) -> None:
        if self.dn is not None:
            self.dn.tun_packets(packets)

    def _sweep(self) -> None:
        try:
            self.dn.sweep()
        except Exception:
            _log.failure("encap: sweep failed")

    # ------------------------------------------------------------------
    def stopService(self):
        super().stopService()
        if self.watchdog is not None:
            self.watchdog.stop()
        withdraw(self.context, RPC_METHODS, self)
        if self.mapping is not None:
            self.mapping.stop()
        if self.dn is not None:
            self.dn.stop()
        udp, self.udp = self.udp, None
        return stop_all(self._sweeper, self.tun, self.routes, self.rule_routes, udp)

    # ------------------------------------------------------------------
    def reconfigure(self, config):
        """``config.reload``: new key files (paths or contents: the config carries
        their digest) are taken by the running DN (:meth:`DecapNode.update_keys`:
        the sessions of removed or re-keyed ENs end); any other change restarts the
        service in place.  Keys that do not load fail the reload and the old ones
        stay."""
        return defer.ensureDeferred(self._reconfigure(config))

    async def _reconfigure(self, config) -> None:
        from dataclasses import replace
        old = self.config
        same_but_keys = replace(old, **{f: getattr(config, f) for f in old.KEY_FIELDS})
        if same_but_keys == config and self.dn is not None:
            keys = await threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                                   load_keys, config)
            self.config = config
            self.dn.config = config
            changed = self.dn.update_keys(keys)
            probe = getattr(self.watchdog, "_probe", None)
            if probe is not None:       # the watchdog's probe session: its key as well
                probe.psk = self.dn.keys.local(probe.ident)
            _log.info("encap: config.reload took the new keys ({c})", c=changed)
            return
        _log.info("encap: config.reload changed more than the keys: restarting the DN")
        await defer.maybeDeferred(self.stopService)
        self.config = config
        await self.startService()

    def _register_rpc(self) -> None:
        rpc = self.context.rpc
        if rpc is None:
            return
        rpc.register("encap.sessions", self.rpc_sessions, params=Params(),
                     doc="EN sessions of this DN: role, address, packets, drops; leases, routes.")
        rpc.register("encap.mappings", self.rpc_mappings, params=Params(),
                     doc="The EN-DN mapping table (target -> dn, epoch, since, reason).")
        rpc.register("encap.stats", self.rpc_stats, params=Params(),
                     doc="Counters, drops by reason, route injection latency, handoffs.")

    def rpc_sessions(self) -> dict:
        out = self.dn.describe_sessions()
        out["tun"] = {"name": self.config.tun, "ok": self.tun is not None,
                      "problem": self.tun_problem,
                      "stats": dict(self.tun.stats) if self.tun else {}}
        return out

    def rpc_mappings(self) -> dict:
        if self.mapping is None:
            return {"entries": {}, "available": False}
        describe = getattr(self.mapping, "describe", None)
        return describe() if describe else {"entries": self.mapping.entries()}

    def rpc_stats(self) -> dict:
        out = self.dn.describe_stats()
        if self.watchdog is not None:
            out["watchdog"] = self.watchdog.describe()
        return out

    # ------------------------------------------------------------------
    def collect(self):
        dn = self.dn
        if dn is None:
            return
        c = CounterMetricFamily("appliance_encap_packets", "Tunnel packets per EN and direction",
                                labels=["en", "direction"])
        for s in dn.sessions.values():
            c.add_metric([s.en, "in"], s.rx_packets)
            c.add_metric([s.en, "out"], s.tx_packets)
        yield c
        d = CounterMetricFamily("appliance_encap_dropped", "Tunnel datagrams dropped, by reason",
                                labels=["reason"])
        for reason, n in sorted(dn.drops.items()):
            d.add_metric([reason], n)
        yield d
        for key, help_ in (("handoffs", "ENs taken over by this DN"),
                           ("route_injections", "Routes injected"),
                           ("route_withdrawals", "Routes withdrawn"),
                           ("handshakes", "Sessions established")):
            m = CounterMetricFamily(f"appliance_encap_{key}", help_)
            m.add_metric([], dn.stats[key])
            yield m
        lat = list(dn.injection_latency)
        g = GaugeMetricFamily("appliance_encap_route_injection_seconds",
                              "Latency of the last route injection")
        g.add_metric([], lat[-1] if lat else 0.0)
        yield g
        s = GaugeMetricFamily("appliance_encap_sessions", "EN sessions")
        s.add_metric([], len(dn.sessions))
        yield s
