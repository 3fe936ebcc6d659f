"""The ``dhcp4`` service: UDP listener, lease store, reclaim loop, RPC, metrics.

Direct clients: ``interface = "veth0"`` binds the socket to that device
(SO_BINDTODEVICE) on port 67 and broadcasts replies as RFC 2131 4.1 asks.
Relayed clients only: ``listen_address = "10.9.0.10"`` (any port), replies
go back to the relay's giaddr, port 67.  On a loopback ``listen_address``
(the demo) the relay must be on this box: replies go to the address and
port the relayed request came from.  Failover (lazy updates to the partner over
the peer link, partner states from the cluster manager) is wired when
``failover`` is configured.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
import time
from ipaddress import IPv4Address

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application.service import Service
from twisted.internet import defer, protocol, task
from twisted.logger import Logger

from appliance.admin.rpc import ApplicationError, InvalidParams, Param, Params
from appliance.plugin import withdraw
from appliance.net.sockets import enable_receive_times, last_received_at, set_receive_buffer
from services.dhcp.v4 import codec as C
from services.dhcp.v4 import pools as P
from services.dhcp.v4.config import Dhcp4Config, failover_notes
from services.dhcp.failover.partner import FailoverPartner
from services.dhcp.v4.handler import Dhcp4Handler
from services.dhcp.v4.ldap_reservations import LdapReservations
from services.dhcp.v4.leases import STATES as LEASE_STATES, Lease, LeaseStore

_log = Logger(namespace="services.dhcp4")
_ZERO = IPv4Address(0)
_BROADCAST = IPv4Address("255.255.255.255")
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
SIOCGIFADDR = 0x8915
CHANNEL = "dhcp4"
SYNC_BATCH = 256        # leases per peer-link message in a recovery sync
#: What this version does on the dhcp4 channel beyond the first release
#: (FailoverPartner.failover_caps)
CAPS = ("dhcp4.stored", "dhcp4.update-done")


def interface_address(ifname: str) -> IPv4Address:
    """The first IPv4 address of ``ifname`` (one ioctl; no netlink needed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", ifname.encode()[:15]))
    return IPv4Address(packed[20:24])


class _Protocol(protocol.DatagramProtocol):
    def __init__(self, service: "Dhcp4Service"):
        self.service = service

    def datagramReceived(self, data, addr):
        try:
            self.service.datagram(data, addr)
        except Exception:
            _log.failure("dhcp4: datagram from {addr} crashed the handler", addr=addr)


class Dhcp4Service(FailoverPartner, Service):
    """The DHCPv4 server; its partner relationship (states, lazy updates,
    recovery sync, merge) is the failover core's :class:`FailoverPartner`."""

    name = "dhcp4"
    failover_channel = CHANNEL
    #: Requests being handled (waiting for the store) beyond which new
    #: DISCOVERs are dropped and counted as "overload" (measured: a larger
    #: queue at saturation only makes every answer late).
    MAX_INFLIGHT = 256
    #: Bytes of datagrams handled per reactor turn (Twisted's default is
    #: 256 KiB: ~850 DHCP packets, 100+ ms during which finished journal
    #: writes cannot release their ACKs and the peer link is not read).
    #: ~100 packets a turn keeps those waits short under a backlog.
    READ_BATCH_BYTES = 32 * 1024

    def __init__(self, config: Dhcp4Config, context):
        self.config = config
        self.context = context
        self.reactor = context.reactor
        # writes applied at once; replies, partner acks and RPC answers wait on
        # leases.durable() (one wait per reply instead of a Deferred chain)
        self.leases = LeaseStore(context.store, config, context.node_id, now=self.reactor.seconds,
                                 immediate_writes=True)
        self.port = None
        self._loopback = False
        self.ldap: LdapReservations | None = None  # reservations from a directory
        self._inflight = 0
        self._max_age_s = config.discover_max_age_ms / 1000.0
        self.handler: Dhcp4Handler | None = None
        self.drops: dict[str, int] = {r: 0 for r in C.DROP_REASONS}
        self.drops.update(overload=0, stale=0, store_error=0, reply_too_large=0)
        self._reclaim = None
        # the partner relationship: outbox, states, catch-up, view, stats
        self._init_failover()

    @property
    def role(self) -> str:
        f = self.config.failover
        if f is None:
            return "standalone"
        return f"{f.role} ({self.view.state})"

    # ------------------------------------------------------------------
    def startService(self):
        super().startService()
        return defer.ensureDeferred(self._start())

    async def _start(self):
        cfg = self.config
        self._records_at_start = await self.leases.load()
        self._marked = False
        if self._records_at_start and cfg.failover is not None:
            self._owed_marker_now()
        for note in failover_notes(cfg):
            _log.info("dhcp4 note: {note}", note=note)
        if cfg.ldap is not None:
            self.ldap = LdapReservations(self.reactor, cfg.ldap,
                                         self.leases.set_external_reservations,
                                         store=self.context.store)
            await self.ldap.start()
        if cfg.server_id is not None:
            server_id = cfg.server_id
        elif cfg.listen_address is not None:
            server_id = cfg.listen_address
        elif cfg.interface:
            server_id = interface_address(cfg.interface)
        else:
            raise ValueError("dhcp4 needs server_id, listen_address or interface")
        local = None
        if cfg.interface:
            local = cfg.subnet_for(server_id)
        self.handler = Dhcp4Handler(cfg, self.leases, server_id, now=self.reactor.seconds,
                                    failover=self.view, local_subnet=local,
                                    on_lease=self._lease_changed)
        listen_on = str(cfg.listen_address) if cfg.listen_address else ""
        self._loopback = bool(cfg.listen_address is not None and cfg.listen_address.is_loopback)
        self.port = self.reactor.listenUDP(cfg.port, _Protocol(self), interface=listen_on)
        self.port.maxThroughput = self.READ_BATCH_BYTES
        sock = self.port.socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        rcvbuf = set_receive_buffer(sock, cfg.receive_buffer_bytes)
        if cfg.discover_max_age_ms and not enable_receive_times(sock):
            _log.warn("dhcp4: no kernel receive times on this socket: discover_max_age_ms "
                      "is not enforced")
        if cfg.interface:
            sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, cfg.interface.encode())
        self._register_rpc()
        self.context.metrics.register(self)
        self._setup_failover()
        self._reclaim = task.LoopingCall(self._reclaim_due)
        self._reclaim.clock = self.reactor
        self._reclaim.start(cfg.reclaim_interval_s, now=False).addErrback(
            lambda f: _log.failure("dhcp4 reclaim loop stopped", failure=f))
        _log.info("dhcp4 serving {n} subnet(s) on {where}:{port} as {sid} ({role}); "
                  "receive buffer {rcvbuf} bytes",
                  n=len(cfg.subnets), where=cfg.interface or listen_on or "*", port=cfg.port,
                  sid=str(server_id), role=self.role, rcvbuf=rcvbuf)
        from services.dhcp.v4.ddns import service_started   # DDNS: held removals (never raises)
        service_started(self)

    def stopService(self):
        super().stopService()
        if self._reclaim is not None and self._reclaim.running:
            self._reclaim.stop()
        self._stop_failover()
        if self.ldap is not None:
            self.ldap.stop()
        withdraw(self.context, ("dhcp4.leases", "dhcp4.lease", "dhcp4.release", "dhcp4.scopes",
                                "dhcp4.stats"), self)
        if self.port is not None:
            port, self.port = self.port, None
            return defer.maybeDeferred(port.stopListening)
        return defer.succeed(None)

    # ------------------------------------------------------------------
    def datagram(self, data: bytes, addr) -> None:
        try:
            pkt = C.parse(data)
        except C.MalformedPacket as e:
            self.drops[e.reason] = self.drops.get(e.reason, 0) + 1
            return
        if pkt.message_type == C.DISCOVER:
            if self._inflight >= self.MAX_INFLIGHT:
                # Overloaded: an OFFER that arrives late is wasted (the client has
                # moved on), so shed new DISCOVERs and keep finishing REQUESTs.
                self.drops["overload"] = self.drops.get("overload", 0) + 1
                return
            if self._max_age_s and self._stale(getattr(self.port, "socket", None)):
                # It waited in the socket queue (a storm, or this box busy) for
                # longer than discover_max_age_ms: the client has retransmitted
                # or moved on; answering it would only delay the fresh ones.
                self.drops["stale"] = self.drops.get("stale", 0) + 1
                return
        if (self.view.state == P.COMM_INTERRUPTED and self._evidence_to is not None
                and not self._catching_up and pkt.secs >= self._max_ack_delay_s):
            self._client_evidence(pkt)
        writes = self.leases.writes
        result = self.handler.handle(pkt)
        if not isinstance(result, defer.Deferred):      # answered from memory
            if result is None or self.leases.writes == writes:
                self._send(result, pkt, addr)           # nothing written (an OFFER)
                return
            # the lease is written in memory: the reply waits until it is on disk
            result = self.leases.durable().addCallback(lambda _, reply=result: reply)
        else:
            result.addCallback(self._once_durable, writes)   # it may write after waiting
        self._inflight += 1
        result.addCallback(self._send, pkt, addr)
        result.addErrback(self._failed, pkt)
        result.addBoth(self._done_one)

    def _once_durable(self, reply, writes: int):
        if reply is None or self.leases.writes == writes:
            return reply
        return self.leases.durable().addCallback(lambda _: reply)

    def _stale(self, sock) -> bool:
        at = last_received_at(sock)
        return at is not None and time.time() - at > self._max_age_s

    def _done_one(self, _):
        self._inflight -= 1

    def _send(self, result, pkt, source):
        if result is None or self.port is None:
            return
        reply, (ip, port, _broadcast) = result
        if self._loopback and pkt.giaddr != _ZERO:
            # A loopback listener only hears relays on this box: answer the
            # relay where it sent from (giaddr is not reachable from lo).
            ip, port = IPv4Address(source[0]), source[1]
        try:
            data = C.encode(reply, max_size=pkt.max_message_size)
        except (ValueError, TypeError) as e:
            self.drops["reply_too_large"] = self.drops.get("reply_too_large", 0) + 1
            _log.error("dhcp4: reply not encodable: {why}", why=e)
            return
        if _broadcast or ip == _BROADCAST:
            ip = _BROADCAST
        self.port.write(data, (str(ip), port))

    def _failed(self, failure, pkt):
        self.drops["store_error"] = self.drops.get("store_error", 0) + 1
        _log.error("dhcp4: {type} from {hw} not answered: {why}",
                   type=pkt.message_type_name, hw=pkt.hwaddr.hex(":"),
                   why=failure.getErrorMessage())

    # ------------------------------------------------------------------
    # v4 only: which clients are the partner's (client evidence), DDNS
    # ------------------------------------------------------------------
    def _sync_batch(self) -> int:
        return SYNC_BATCH          # the module's (tests shrink it)

    def _partner_client(self, pkt) -> bool:
        """Whether the client of ``pkt`` is the partner's: the address it asks
        for or holds lies in the partner's segment, or (a new client) its hash
        bucket is the partner's; in hot-standby every client is the primary's."""
        f = self.config.failover
        address = pkt.requested_ip
        if address is None and pkt.ciaddr != _ZERO:
            address = pkt.ciaddr
        role = self.leases.segment_role(str(address)) if address is not None else None
        key = P.client_hash_key(pkt.client_id, pkt.hwaddr)
        if f.mode == "split-scope" and role in (P.PRIMARY, P.SECONDARY):
            return role == f.partner_role
        return P.owner_of(f.mode, key, f.split, role) == f.partner_role

    def _client_evidence(self, pkt):
        """A DISCOVER/REQUEST with ``secs >= max_ack_delay_s`` in
        COMMUNICATIONS-INTERRUPTED: if the client is the partner's, nobody has
        answered it for that long -- evidence that the partner is really down
        (not merely cut from us).  The count of distinct such clients within
        EVIDENCE_WINDOW_S goes to ``cluster.report_client_evidence(peer, n)``;
        the cluster decides what it proves."""
        if pkt.message_type not in (C.DISCOVER, C.REQUEST) or not self._partner_client(pkt):
            return
        self._evidence[P.client_hash_key(pkt.client_id, pkt.hwaddr)] = self.reactor.seconds()
        self._evidence_report()

    def _lease_changed(self, event: str, lease: Lease):
        # the partner's update is already queued (LeaseStore.on_unsynced, in the
        # write itself); DDNS can never keep it from the partner (review M4)
        if self.outbox is not None and not lease.synced:
            self.outbox.add(lease)
        try:
            self._ddns(event, lease)
        except Exception:
            _log.failure("dhcp4: DDNS for {address} failed", address=lease.address)

    def _ddns(self, event: str, lease: Lease):
        """DDNS for a lease change: services/dhcp/v4/ddns.py (option 81, what is
        published recorded on the lease, removal by the lease owner; never raises)."""
        from services.dhcp.v4.ddns import lease_event
        lease_event(self, event, lease)


    # ------------------------------------------------------------------
    # admin
    # ------------------------------------------------------------------
    def _register_rpc(self):
        rpc = self.context.rpc
        rpc.register("dhcp4.leases", self.rpc_leases,
                     doc="{subnet?, state?, limit?, cursor?} -> {leases, cursor}",
                     params=Params(
                         subnet=Param("any"),     # an id, a network or an address in it
                         state=Param("str", choices=LEASE_STATES, nullable=True),
                         limit=Param("int", default=100, min=1, max=1000),
                         cursor=Param("ipv4", nullable=True)))
        rpc.register("dhcp4.lease", self.rpc_lease, doc="{address | hwaddr} -> one lease",
                     params=Params(exactly_one_of=("address", "hwaddr"),
                                   address=Param("ipv4", nullable=True),
                                   hwaddr=Param("hwaddr", nullable=True)))
        rpc.register("dhcp4.release", self.rpc_release, doc="{address}: free it now",
                     params=Params(address=Param("ipv4", required=True)))
        rpc.register("dhcp4.scopes", self.rpc_scopes, doc="subnets, pools, free counts",
                     params=Params())
        rpc.register("dhcp4.stats", self.rpc_stats, doc="packet counters, drops, leases",
                     params=Params())

    def _subnet_param(self, subnet) -> int | None:
        """``params.subnet``: a configured subnet id, its network, or an address in it."""
        if subnet is None:
            return None
        ids = {s.id for s in self.config.subnets}
        if isinstance(subnet, int) and not isinstance(subnet, bool):
            if subnet not in ids:
                raise InvalidParams.because(f"params.subnet: no subnet with id {subnet} "
                                            f"(ids: {', '.join(map(str, sorted(ids)))})")
            return subnet
        if not isinstance(subnet, str):
            raise InvalidParams.because("params.subnet: expected a subnet id, a network or an "
                                        f"address, got {type(subnet).__name__}")
        try:
            if "/" in subnet:
                network = ipaddress.IPv4Network(subnet, strict=False)
                sub = self.config.subnet_for(network.network_address)
            else:
                sub = self.config.subnet_for(ipaddress.IPv4Address(subnet))
        except ValueError:
            raise InvalidParams.because(f"params.subnet: {subnet!r} is not an IPv4 network or "
                                        "address") from None
        if sub is None:
            raise InvalidParams.because(f"params.subnet: {subnet!r} is not a configured subnet")
        return sub.id

    def rpc_leases(self, subnet=None, state=None, limit=100, cursor=None):
        subnet = self._subnet_param(subnet)
        d = self.leases.leases(subnet=subnet, state=state, limit=limit, cursor=cursor)
        return d

    @defer.inlineCallbacks
    def rpc_lease(self, address=None, hwaddr=None):
        if address:
            lease = yield self.leases.get(str(address))
        elif hwaddr:
            found = yield self.leases.find_hwaddr(hwaddr)
            lease = max(found, key=lambda le: le.cltt) if found else None
        else:
            raise InvalidParams("give address or hwaddr")
        if lease is None:
            raise ApplicationError(f"no lease for {address or hwaddr}", code=-32040)
        return lease.to_json()

    @defer.inlineCallbacks
    def rpc_release(self, address):
        lease = yield self.leases.release(str(address))
        yield self.leases.durable()
        if lease is None:
            raise ApplicationError(f"{address} is not leased", code=-32041)
        self._lease_changed("released", lease)
        return lease.to_json()

    def rpc_scopes(self):
        out = []
        for s in self.config.subnets:
            out.append({"id": s.id, "subnet": str(s.network),
                        "pools": [f"{p.first}-{p.last}" for p in s.pools],
                        "free": self.leases.free_count(s.id),
                        "lease_time_s": s.lease_time_s})
        return {"scopes": out, "failover": None if self.config.failover is None else {
            "peer": self.config.failover.peer, "role": self.config.failover.role,
            "mode": self.config.failover.mode, "state": self.view.state}}

    def rpc_stats(self):
        return {"packets": dict(self.handler.counters) if self.handler else {},
                "drops": {k: v for k, v in self.drops.items() if v},
                "leases": self.leases.stats(), "replication": dict(self.stats),
                "merge_held_by_skew": self.skew_hold,
                "failover": None if self.config.failover is None else {
                    "cluster_state": self._cluster_state, "serving_as": self.view.state,
                    "hold": self.view.hold, "catching_up": self._catching_up,
                    "partner_caps": (None if self._partner_caps is None
                                     else sorted(self._partner_caps))},
                "reservations": {"count": self.leases.reservation_count,
                                 "ldap": self.ldap.status() if self.ldap else None}}

    # ------------------------------------------------------------------
    def collect(self):
        packets = CounterMetricFamily("appliance_dhcp4_packets", "DHCPv4 packets by direction and type",
                                      labels=["counter"])
        for name, value in (self.handler.counters.items() if self.handler else []):
            packets.add_metric([name], value)
        yield packets
        drops = CounterMetricFamily("appliance_dhcp4_dropped", "DHCPv4 packets dropped, by reason",
                                    labels=["reason"])
        for reason, value in self.drops.items():
            drops.add_metric([reason], value)
        yield drops
        free = GaugeMetricFamily("appliance_dhcp4_free_addresses", "Free addresses per subnet",
                                 labels=["subnet"])
        for s in self.config.subnets:
            free.add_metric([str(s.network)], self.leases.free_count(s.id))
        yield free
        res = GaugeMetricFamily("appliance_dhcp4_reservations", "Static host reservations in use")
        res.add_metric([], self.leases.reservation_count)
        yield res
        if self.ldap is not None:
            ldap_errors = CounterMetricFamily("appliance_dhcp4_ldap_refresh_errors",
                                              "LDAP reservation refreshes that failed")
            ldap_errors.add_metric([], self.ldap.stats["errors"])
            yield ldap_errors
        repl = CounterMetricFamily("appliance_dhcp4_replication", "Lease updates to/from the partner",
                                   labels=["event"])
        for k, v in self.stats.items():
            repl.add_metric([k], v)
        yield repl
        f = self.config.failover
        link = getattr(self.context.cluster, "peerlink", None)
        if f is not None and link is not None:
            backlog = GaugeMetricFamily("appliance_dhcp4_replication_backlog",
                                        "Lease updates not yet acknowledged by the partner",
                                        labels=["peer"])
            backlog.add_metric([f.peer], self.outbox.backlog if self.outbox else 0)
            yield backlog
            lag = GaugeMetricFamily("appliance_dhcp4_replication_lag_seconds",
                                    "Age of the oldest unacknowledged update", labels=["peer"])
            lag.add_metric([f.peer], link.lag_s(f.peer))
            yield lag

