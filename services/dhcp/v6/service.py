"""The ``dhcp6`` service: UDP listener, lease store, reclaim loop, RPC, metrics.

Relayed clients (and the demo): ``listen_address = "::1"`` (any port):
RELAY-FORW messages are answered by RELAY-REPL to the address and port the
relay sent from.  Direct clients: ``interface = "veth0"`` binds ``[::]:port``
to that device (SO_BINDTODEVICE), joins ff02::1:2 (All_DHCP_Relay_Agents_and_Servers)
on it, and answers each client at its (link-local) source address and port.
A REPLY that commits a lease leaves only once the lease is durable in the store.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
import uuid

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application.service import Service
from twisted.application.internet import TimerService
from twisted.internet import defer, protocol
from twisted.logger import Logger

from appliance.admin.rpc import ApplicationError, InvalidParams, Param, Params
from appliance.net.sockets import enable_receive_times, last_received_at, set_receive_buffer
from appliance.plugin import withdraw
from appliance.store.interface import IImmediateStore
from services.dhcp.failover.pools import COMM_INTERRUPTED
from services.dhcp.v6 import codec as C
from services.dhcp.v6.config import Dhcp6Config, normalize_duid
from services.dhcp.v6.handler import Dhcp6Handler
from services.dhcp.v6.leases import KINDS, NA, PD, STATES, address_key

_log = Logger(namespace="services.dhcp6")
_PEEK_TYPES = C.TO_A_SERVER | {C.RELAY_FORW}
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
ALL_DHCP = "ff02::1:2"
DUID_KEY = "dhcp6:server-duid:"
RPC_METHODS = ("dhcp6.leases", "dhcp6.lease", "dhcp6.release", "dhcp6.scopes", "dhcp6.stats")


def interface_addresses(ifname: str, path: str = "/proc/net/if_inet6") -> list[str]:
    """The IPv6 addresses of ``ifname`` (procfs; read once at start)."""
    out = []
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[5] == ifname:
                    out.append(str(ipaddress.IPv6Address(bytes.fromhex(parts[0]))))
    except OSError:
        pass
    return out


def new_duid() -> bytes:
    """A DUID-UUID (RFC 6355): type 4 and 16 random octets."""
    return struct.pack("!H", 4) + uuid.uuid4().bytes


class _Protocol(protocol.DatagramProtocol):
    """Each datagram goes to ``receive`` (Dhcp6Service.received: never raises)."""

    def __init__(self, receive):
        self.datagramReceived = receive


class Dhcp6Service(Service):
    """``MAX_INFLIGHT``: REPLYs waiting for their binding to be durable beyond which new
    SOLICITs are dropped and counted as "overload" (the exchanges under way finish instead
    of ADVERTISEs crowding out their REPLYs); in a split-scope pair in NORMAL the node
    still answers its own clients by DUID hash up to twice that, the partner the others
    (``Dhcp6Partner.answers_overloaded``).  ``READ_BATCH_BYTES``: datagrams read per
    reactor turn (Twisted reads 256 KiB): smaller batches release finished REPLYs sooner."""

    name = "dhcp6"
    MAX_INFLIGHT, READ_BATCH_BYTES = 256, 32 * 1024

    def __init__(self, config: Dhcp6Config, context):
        self.config, self.context, self.reactor = config, context, context.reactor
        self.leases = self._make_allocator()
        self.port = None
        self.handler: Dhcp6Handler | None = None
        self.server_duid: bytes | None = None
        self.drops: dict[str, int] = {r: 0 for r in C.DROP_REASONS}
        self.drops.update(store_error=0, reply_too_large=0, overload=0, stale=0, not_owner=0,
                          not_our_server_id=0)
        self._max_age_s = config.solicit_max_age_ms / 1000.0
        self._inflight = 0
        #: SOLICITs answered while overloaded: this node's own clients by DUID hash, in a
        #: split-scope pair in NORMAL (the partner answers the rest; Dhcp6Partner)
        self.overload_answered = 0
        self._ifindex = 0
        self._reclaim = None
        self._ddns = None

    @property
    def role(self) -> str:
        """What ``appliancectl status`` shows: standalone, or the failover role and state."""
        partner = getattr(self, "failover", None)
        f = self.config.failover
        if partner is None or f is None:
            return "standalone"
        return f"{f.role} ({partner.view.state})"

    def _make_allocator(self):
        """The lease stores behind the handler (leases.py's ``Allocator``): the failover
        core's, one per lease type (services/dhcp/v6/failover.py); with ``failover``
        also ``self.failover``, the partner relationship."""
        from services.dhcp.v6.failover import CoreAllocator, make_allocator
        if self.config.failover is not None:
            return make_allocator(self)
        return CoreAllocator(self.context.store, self.config, self.context.node_id,
                             now=self.reactor.seconds)

    def _may_serve(self) -> bool | None:
        """None (always serve) for a single server; failover: the partner rules."""
        partner = getattr(self, "failover", None)
        return partner.may_serve() if partner is not None else None

    # ------------------------------------------------------------------
    def startService(self):
        super().startService()
        d = defer.ensureDeferred(self._start())
        return d

    async def _start(self):
        cfg = self.config
        if not IImmediateStore.providedBy(self.context.store):
            # the handler decides synchronously on the lease stores' in-memory view
            raise ValueError("dhcp6 needs the embedded store ([store] backend = \"memory\"); "
                             "the failover peer link replicates its leases to the partner")
        n = await self.leases.load()
        self.server_duid = await self._server_duid()
        from services.dhcp.v6.ddns import Ddns6     # DDNS glue (no-op without a provider)
        self._ddns = Ddns6(self)
        local = None
        if cfg.interface:     # direct clients: the subnet of one of the interface's addresses
            local = next((sub for sub in map(cfg.subnet_for, interface_addresses(cfg.interface))
                          if sub is not None), None)
        self.handler = Dhcp6Handler(cfg, self.leases, self.server_duid, now=self.reactor.seconds,
                                    local_subnet=local,
                                    on_lease=self._lease_changed,
                                    fqdn_answer=self._ddns.answer,
                                    may_serve=None if cfg.failover is None else self._may_serve)
        if getattr(self, "failover", None) is not None:
            self.failover.start(n)      # the partner relationship (services/dhcp/v6/failover.py)
        if cfg.interface:
            try:
                self._ifindex = socket.if_nametoindex(cfg.interface)
            except OSError:
                raise ValueError(f"dhcp6: interface {cfg.interface!r} does not exist") from None
            self.port = self.reactor.listenUDP(cfg.port, _Protocol(self.received), interface="::")
            sock = self.port.socket
            sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, cfg.interface.encode())
            mreq = socket.inet_pton(socket.AF_INET6, ALL_DHCP) + struct.pack("@I", self._ifindex)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
        else:
            self.port = self.reactor.listenUDP(cfg.port, _Protocol(self.received),
                                               interface=str(cfg.listen_address))
        self.port.maxThroughput = self.READ_BATCH_BYTES
        # bursts queue in the kernel instead of being dropped while a commit is on the disk
        rcvbuf = set_receive_buffer(self.port.socket, cfg.receive_buffer_bytes)
        if self._max_age_s and not enable_receive_times(self.port.socket):
            self._max_age_s = 0.0               # no kernel receive times here: no age check
        self._register_rpc()
        self.context.metrics.register(self)
        self._reclaim = TimerService(cfg.reclaim_interval_s, self._reclaim_due)
        self._reclaim.clock = self.reactor      # (TimerService logs a failed call itself)
        self._reclaim.startService()
        _log.info("dhcp6 serving {n} subnet(s) on {where}:{port} as DUID {duid}; "
                  "{leases} lease record(s) loaded; receive buffer {rcvbuf} bytes",
                  n=len(cfg.subnets), where=cfg.interface or str(cfg.listen_address),
                  port=cfg.port, duid=self.server_duid.hex(), leases=n, rcvbuf=rcvbuf)

    async def _server_duid(self) -> bytes:
        if self.config.server_duid is not None:
            return bytes.fromhex(self.config.server_duid)
        key = DUID_KEY + self.context.node_id
        stored = await self.context.store.get(key)
        if stored and normalize_duid(stored):
            return bytes.fromhex(stored)
        duid = new_duid()
        await self.context.store.set(key, duid.hex())
        _log.info("dhcp6: new server DUID {duid} (kept in the store as {key})",
                  duid=duid.hex(), key=key)
        return duid

    def stopService(self):
        super().stopService()
        if self._reclaim is not None and self._reclaim.running:
            self._reclaim.stopService()
        if getattr(self, "failover", None) is not None:
            self.failover.stop()
        withdraw(self.context, RPC_METHODS, self)
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)

    def received(self, data: bytes, addr) -> None:
        """The listener's callback: one datagram, whatever happens in it stays here."""
        try:
            self.datagram(data, addr)
        except Exception:
            self.drops["crash"] = self.drops.get("crash", 0) + 1
            _log.failure("dhcp6: datagram from {addr} crashed the handler", addr=addr)

    def datagram(self, data: bytes, addr) -> None:
        if self.handler is None:
            return
        if data[:1] and data[0] in _PEEK_TYPES:
            sid = C.peek_server_id(data)
            if sid is not None and sid != self.server_duid and not self._evidence_wanted():
                # a REQUEST/RENEW/RELEASE/DECLINE for another server (in a pair: the
                # partner's, every client message reaches both): dropped before the
                # parse, as the handler would drop it after (not_our_server_id)
                self.drops["not_our_server_id"] += 1
                return
        try:
            msg = C.parse(data)
        except C.MalformedMessage as e:
            self.drops[e.reason] = self.drops.get(e.reason, 0) + 1
            return
        if getattr(self, "failover", None) is not None:
            self.failover.observe(msg)          # client evidence (COMMUNICATIONS-INTERRUPTED)
        inner = msg.innermost() if isinstance(msg, C.RelayMessage) else msg
        if inner is not None and inner.msg_type == C.SOLICIT:
            partner = getattr(self, "failover", None)
            if partner is not None and not partner.answers_solicit(inner):
                self.drops["not_owner"] += 1    # load-balancing: the partner's client
                return
            if self._inflight >= self.MAX_INFLIGHT:
                # overloaded: a split-scope partner in NORMAL still answers the clients it
                # owns by DUID hash (the partner the others), up to twice the limit
                if partner is None or self._inflight >= 2 * self.MAX_INFLIGHT \
                        or not partner.answers_overloaded(inner):
                    self.drops["overload"] += 1
                    return
                self.overload_answered += 1
            if self._max_age_s and self._stale():
                # it waited in the socket queue (a burst, this box busy) longer than
                # solicit_max_age_ms: the client has retransmitted or given up; answering
                # it would only delay the fresh ones (as dhcp4's stale DISCOVERs)
                self.drops["stale"] += 1
                return
        writes = self.leases.writes
        reply = self.handler.handle(msg)
        if reply is None:
            return
        if self.leases.writes == writes:          # nothing committed (ADVERTISE, CONFIRM)
            self._send(reply, addr)
            return
        self._inflight += 1
        d = self.leases.durable()
        d.addCallback(lambda _: self._send(reply, addr))
        d.addErrback(self._failed, msg)
        d.addBoth(self._done_one)

    def _evidence_wanted(self) -> bool:
        """The partner's clients' messages are client evidence now (failover.observe:
        COMMUNICATIONS-INTERRUPTED): they must be parsed even when not for us."""
        partner = getattr(self, "failover", None)
        return partner is not None and partner.view.state == COMM_INTERRUPTED

    def _stale(self) -> bool:
        at = last_received_at(getattr(self.port, "socket", None))
        return at is not None and time.time() - at > self._max_age_s

    def _done_one(self, _):
        self._inflight -= 1

    def _send(self, reply, addr) -> None:
        if self.port is None:
            return
        try:
            data = C.encode(reply)
        except (ValueError, TypeError) as e:
            self.drops["reply_too_large"] += 1
            _log.error("dhcp6: reply not encodable: {why}", why=e)
            return
        host, port = addr[0], addr[1]
        to = (host, port, 0, self._ifindex) if self._ifindex and host.lower().startswith("fe80") \
            else (host, port)
        try:
            self.port.write(data, to)
        except OSError as e:          # unreachable, no buffer space: the client retransmits
            self.drops["send_error"] = self.drops.get("send_error", 0) + 1
            _log.warn("dhcp6: reply to {to} not sent: {why}", to=to, why=e)

    def _failed(self, failure, msg):
        self.drops["store_error"] += 1
        _log.error("dhcp6: {type} not answered: the lease is not durable: {why}",
                   type=msg.name, why=failure.getErrorMessage())

    RECLAIM_BATCH, RECLAIM_ROUNDS = 500, 20

    def _reclaim_due(self):
        """Expire what is due.  In failover the core's reclaim (the partner's: it also
        unlocks pending-free addresses in PARTNER-DOWN and batches while batches are
        full); alone, up to RECLAIM_ROUNDS batches a tick, DDNS removal for each."""
        partner = getattr(self, "failover", None)
        if partner is not None:
            return partner._reclaim_due()
        try:
            for _ in range(self.RECLAIM_ROUNDS):
                expired = self.leases.reclaim(self.RECLAIM_BATCH)
                for lease in expired:
                    self._lease_changed("expired", lease)
                if len(expired) < self.RECLAIM_BATCH:
                    break
        except Exception:
            _log.failure("dhcp6 reclaim failed")
        return None

    def _lease_changed(self, event: str, lease) -> None:
        if self._ddns is not None:
            self._ddns.lease_changed(event, lease, self.handler.binding if self.handler else None)

    # ------------------------------------------------------------------
    # admin
    # ------------------------------------------------------------------
    def _register_rpc(self):
        maybe = lambda kind: Param(kind, nullable=True)   # noqa: E731
        table = {
            "dhcp6.leases": (self.rpc_leases, "{subnet?, state?, type?, limit?, cursor?} -> "
                             "{leases, cursor}", Params(
                                 subnet=Param("any"), state=Param("str", choices=STATES,
                                                                  nullable=True),
                                 type=Param("str", choices=KINDS, nullable=True),
                                 limit=Param("int", default=100, min=1, max=1000),
                                 cursor=maybe("str"))),
            "dhcp6.lease": (self.rpc_lease, "{address | prefix | duid} -> lease(s)", Params(
                exactly_one_of=("address", "prefix", "duid"), address=maybe("str"),
                prefix=maybe("str"), duid=maybe("str"))),
            "dhcp6.release": (self.rpc_release, "{address | prefix}: free it now", Params(
                exactly_one_of=("address", "prefix"), address=maybe("str"),
                prefix=maybe("str"))),
            "dhcp6.scopes": (self.rpc_scopes, "subnets, pools, prefix pools, free counts",
                             Params()),
            "dhcp6.stats": (self.rpc_stats, "packet counters, drops, leases by type and state",
                            Params()),
        }
        for name, (method, doc, params) in table.items():
            self.context.rpc.register(name, method, doc=doc, params=params)

    def _subnet_param(self, subnet) -> int | None:
        """``params.subnet``: a subnet id, or an IPv6 network or address inside one."""
        if subnet is None or (isinstance(subnet, int) and not isinstance(subnet, bool)
                              and self.config.subnet(subnet) is not None):
            return subnet
        found, why = None, "is not a configured subnet"
        if isinstance(subnet, str):
            try:
                found = self.config.subnet_for(ipaddress.IPv6Address(subnet.split("/")[0]))
            except ValueError:
                why = "is not an IPv6 network or address"
        elif not isinstance(subnet, int) or isinstance(subnet, bool):
            why = "is not a subnet id, network or address"
        if found is None:
            raise InvalidParams.because(f"params.subnet: {subnet!r} {why}")
        return found.id

    def rpc_leases(self, subnet=None, state=None, type=None, limit=100, cursor=None):
        return self.leases.leases(subnet=self._subnet_param(subnet), state=state, kind=type,
                                  limit=limit, cursor=cursor)

    @staticmethod
    def _key(kind: str, text: str) -> str:
        try:
            return address_key(kind, text)
        except ValueError:
            what = "an IPv6 address" if kind == NA else "an IPv6 prefix (net/len)"
            field = "address" if kind == NA else "prefix"
            raise InvalidParams.because(f"params.{field}: {text!r} is not {what}") from None

    def rpc_lease(self, address=None, prefix=None, duid=None):
        if duid is not None:
            key = normalize_duid(duid)
            if key is None:
                raise InvalidParams.because(f"params.duid: {duid!r} is not a DUID")
            found = self.leases.find_duid(key)
            if not found:
                raise ApplicationError(f"no lease for DUID {duid}", code=-32040)
            return {"leases": [le.to_json() for le in found]}
        kind, text = (NA, address) if address is not None else (PD, prefix)
        lease = self.leases.get(kind, self._key(kind, text))
        if lease is None or lease.state == "offered":
            raise ApplicationError(f"no lease for {text}", code=-32040)
        return lease.to_json()

    def rpc_release(self, address=None, prefix=None):
        """Free a bound address or prefix now; answered once the release is durable."""
        kind, text = (NA, address) if address is not None else (PD, prefix)
        lease = self.leases.release(kind, self._key(kind, text))
        if lease is None:
            raise ApplicationError(f"{text} is not leased", code=-32041)

        def released(_):
            self._lease_changed("released", lease)
            return lease.to_json()
        return self.leases.durable().addCallback(released)

    def _scope(self, s) -> dict:
        return {"id": s.id, "subnet": str(s.network),
                "pools": [f"{p.first}-{p.last}" for p in s.pools],
                "pd_pools": [f"{p.prefix}:{p.delegated_length}" for p in s.pd_pools],
                "free": self.leases.free_count(NA, s.id),
                "free_prefixes": self.leases.free_count(PD, s.id),
                "preferred_lifetime_s": s.preferred_lifetime_s,
                "valid_lifetime_s": s.valid_lifetime_s}

    def rpc_scopes(self):
        partner = getattr(self, "failover", None)
        return {"scopes": [self._scope(s) for s in self.config.subnets],
                "server_duid": self.server_duid.hex() if self.server_duid else None,
                "failover": partner.status() if partner is not None else None}

    def rpc_stats(self):
        return {"packets": dict(self.handler.counters) if self.handler else {},
                "drops": {k: v for k, v in self.drops.items() if v},
                "overload_answered": self.overload_answered,
                "leases": self.leases.stats(),
                "ddns": dict(self._ddns.stats) if self._ddns is not None else {},
                "failover": (self.failover.status()
                             if getattr(self, "failover", None) is not None else None)}

    # ------------------------------------------------------------------
    def collect(self):
        packets = CounterMetricFamily("appliance_dhcp6_packets",
                                      "DHCPv6 messages by direction and type, and handler "
                                      "drops", labels=["counter"])
        for name, value in (self.handler.counters.items() if self.handler else []):
            packets.add_metric([name], value)
        yield packets
        drops = CounterMetricFamily("appliance_dhcp6_dropped",
                                    "DHCPv6 datagrams dropped before handling, by reason",
                                    labels=["reason"])
        for reason, value in self.drops.items():
            drops.add_metric([reason], value)
        yield drops
        yield CounterMetricFamily("appliance_dhcp6_overload_answered",
                                  "SOLICITs answered while overloaded: this node's own "
                                  "clients by DUID hash (split-scope pair in NORMAL)",
                                  value=self.overload_answered)
        leases = GaugeMetricFamily("appliance_dhcp6_leases", "DHCPv6 lease records by type "
                                   "and state", labels=["type", "state"])
        for kind, counts in self.leases.stats().items():
            for state, value in counts.items():
                leases.add_metric([kind, state], value)
        yield leases
        free = GaugeMetricFamily("appliance_dhcp6_free", "Free addresses / prefixes per subnet",
                                 labels=["subnet", "type"])
        for s in self.config.subnets:
            for kind in KINDS:
                free.add_metric([str(s.network), kind], self.leases.free_count(kind, s.id))
        yield free
