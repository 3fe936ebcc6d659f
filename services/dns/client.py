"""A small Twisted DNS client: UDP with TCP fallback, several servers in order.

:meth:`DNSClient.exchange` sends one (signed) message and fires with
``(response, server)`` -- the first server that gives an answer the caller
can act on (NOERROR, NXDOMAIN, or a failed UPDATE prerequisite) wins.  A
timeout, a refused port, a garbled answer or an error rcode (REFUSED,
NOTAUTH, BADKEY...) moves on to the next server; when all fail the
Deferred fails with the most telling error (an rcode beats a timeout).

UDP goes through one connected socket per server (so a closed port is
reported at once, not after a timeout) -- an unsigned message through a
connected socket of its own, a random source port per exchange; a reply with TC set, or a message
larger than 512 bytes, goes over TCP (RFC 1035 4.2.2 two-byte framing).
Nothing here blocks the reactor.
"""

from __future__ import annotations

import ipaddress
import random
import struct

import dns.message
import dns.name
from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.logger import Logger
from twisted.protocols.basic import Int16StringReceiver
from twisted.python.failure import Failure

from services.dns.servers import parse_server, show_server  # noqa: F401 (API)
from services.dns.message import (PREREQ_FAILED, DNSError, TransportError, TruncatedAnswer,
                                  UpdateError, PeerTSIGError, rcode_text, read_response)

UDP_MAX = 512
_log = Logger(namespace="appliance.dns")


class _UDPChannel(protocol.DatagramProtocol):
    """One connected UDP socket to one server; replies matched by message id."""

    def __init__(self, server: tuple[str, int]):
        self.server = server
        self.pending: dict[int, defer.Deferred] = {}

    def startProtocol(self):
        self.transport.connect(*self.server)

    def datagramReceived(self, data, addr):
        if len(data) < 2:
            return
        (msg_id,) = struct.unpack("!H", data[:2])
        d = self.pending.pop(msg_id, None)
        if d is not None:
            d.callback(data)

    def connectionRefused(self):
        pending, self.pending = self.pending, {}
        for d in pending.values():
            d.errback(TransportError(f"{show_server(self.server)}: connection refused",
                                     "refused"))

    def stopProtocol(self):
        # The reactor closes a connected UDP port on some socket errors (an
        # ICMP port unreachable seen as EPOLLERR): report like a refusal; the
        # client opens a fresh socket for the next message.
        self.connectionRefused()

    def send(self, msg_id: int, wire: bytes) -> defer.Deferred:
        d = defer.Deferred(lambda _: self.pending.pop(msg_id, None))
        self.pending[msg_id] = d
        try:
            self.transport.write(wire)
        except OSError as e:
            self.pending.pop(msg_id, None)
            return defer.fail(TransportError(f"{show_server(self.server)}: {e}", "refused"))
        return d


class _TCPExchange(Int16StringReceiver):
    """Send one length-prefixed message (RFC 1035 4.2.2), wait for one reply."""

    def __init__(self, wire: bytes):
        self.wire = wire
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self):
        self.sendString(self.wire)

    def stringReceived(self, data):
        if not self.done.called:
            self.done.callback(data)
            self.transport.loseConnection()

    def connectionLost(self, reason):
        if not self.done.called:
            self.done.errback(TransportError("TCP connection closed before the answer",
                                             "refused"))


class DNSClient:
    """Exchanges DNS messages with ``servers``: the last one that answered first,
    then the others in configured order (review M4).

    Within one server a UDP message is sent again at 1/5 and 3/5 of
    ``timeout_s`` when no answer came (a lost datagram costs a fraction of the
    timeout, not the next server).  Host names in ``servers`` are resolved
    through ``reactor.resolve`` (a thread, never the reactor) and cached for
    ``resolve_ttl_s``.
    """

    RESEND_AT = (0.2, 0.6)      # fractions of timeout_s

    def __init__(self, reactor, servers: list[tuple[str, int]], timeout_s: float = 1.0,
                 resolve_ttl_s: float = 60.0):
        self.reactor = reactor
        self.servers = list(servers)
        self.timeout_s = timeout_s
        self.resolve_ttl_s = resolve_ttl_s
        self._channels: dict[tuple[str, int], _UDPChannel] = {}
        self._ports: list = []
        self._resolved: dict[str, tuple[str, float]] = {}
        self.good: tuple[str, int] | None = None     # the last server that answered
        self.tcp_fallbacks = 0
        self.resends = 0
        self.unsigned_ports = 0        # one-exchange sockets opened for unsigned messages

    def close(self) -> defer.Deferred:
        ports, self._ports, self._channels = self._ports, [], {}
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports],
                                   consumeErrors=True)

    def _channel(self, server) -> _UDPChannel:
        ch = self._channels.get(server)
        if ch is None or ch.transport is None:
            ch = _UDPChannel(server)
            bind = "::" if ":" in server[0] else ""
            port = self.reactor.listenUDP(0, ch, interface=bind)
            self._ports = [p for p in self._ports if p.connected] + [port]
            self._channels[server] = ch
        return ch

    def order(self) -> list[tuple[str, int]]:
        """Servers in the order tried: the last good one first."""
        if self.good in self.servers:
            return [self.good] + [s for s in self.servers if s != self.good]
        return list(self.servers)

    @defer.inlineCallbacks
    def _address(self, server):
        """``server`` with its host as an IP literal (resolved off the reactor, cached)."""
        host, port = server
        try:
            ipaddress.ip_address(host)
            return server
        except ValueError:
            pass
        cached = self._resolved.get(host)
        now = self.reactor.seconds()
        if cached is not None and cached[1] > now:
            return cached[0], port
        try:
            address = yield self.reactor.resolve(host, timeout=(max(1, int(self.timeout_s)),))
        except Exception as e:
            raise TransportError(f"{host}: cannot resolve: {e}", "resolve") from None
        self._resolved[host] = (address, now + self.resolve_ttl_s)
        return address, port

    @defer.inlineCallbacks
    def exchange(self, request: dns.message.Message, zone: str, key: str | None,
                 what: str = "update"):
        """Fire with ``(response, server_text)``; see the module docstring."""
        errors: list[DNSError] = []
        for server in self.order():
            try:
                response = yield self._one(server, request)
            except DNSError as e:
                if isinstance(e, PeerTSIGError):
                    e = UpdateError(zone, show_server(server), e.rcode, key, what)
                errors.append(e)
                continue
            rcode = rcode_text(response)
            if rcode in ("NOERROR", "NXDOMAIN") or rcode in PREREQ_FAILED:
                self.good = server
                return response, show_server(server)
            errors.append(UpdateError(zone, show_server(server), rcode, key, what))
        answered = [e for e in errors if isinstance(e, UpdateError)]
        if answered:
            raise answered[0]
        reasons = "; ".join(str(e) for e in errors) or "no servers configured"
        rcode = errors[0].rcode if errors else "error"
        raise TransportError(f"{what} of zone {zone}: no server answered ({reasons})", rcode)

    @defer.inlineCallbacks
    def _one(self, named, request: dns.message.Message):
        server = yield self._address(named)
        ch = self._channels.get(server)
        if ch is not None and len(ch.pending) > 32768:      # review L9: never spin for an id
            raise TransportError(f"{show_server(server)}: {len(ch.pending)} queries "
                                 "outstanding", "overload")
        while ch is not None and request.id in ch.pending:
            request.id = random.randint(0, 65535)
        wire = request.to_wire()
        if len(wire) > UDP_MAX:
            response = yield self._tcp(server, wire, request)
            return response
        if request.keyring is None:
            # unsigned (no TSIG key): a fresh socket, so a random source port, per
            # exchange -- a fixed port and a 16-bit id are easy to spoof (review L10)
            ch = _UDPChannel(server)
            port = self.reactor.listenUDP(0, ch, interface="::" if ":" in server[0] else "")
            self.unsigned_ports += 1
        else:
            ch, port = self._channel(server), None
        d = ch.send(request.id, wire)
        if port is not None:
            d.addBoth(lambda result: (port.stopListening(), result)[1])
        resends = [self.reactor.callLater(self.timeout_s * f, self._resend, ch, request.id, wire)
                   for f in self.RESEND_AT]

        def stop_resends(result):
            for call in resends:
                if call.active():
                    call.cancel()
            return result
        d = self._timeout(d, server, "UDP").addBoth(stop_resends)
        data = yield d
        try:
            return read_response(data, request, udp=True)
        except TruncatedAnswer:                 # TC (verified): ask again over TCP
            self.tcp_fallbacks += 1
        response = yield self._tcp(server, wire, request)
        return response

    def _resend(self, ch: _UDPChannel, msg_id: int, wire: bytes) -> None:
        if msg_id in ch.pending and ch.transport is not None:
            self.resends += 1
            try:
                ch.transport.write(wire)
            except OSError:
                pass      # the refusal arrives through connectionRefused

    def _tcp(self, server, wire: bytes, request) -> defer.Deferred:
        host, port = server
        endpoint = TCP4ClientEndpoint(self.reactor, host, port, timeout=max(1, int(self.timeout_s + 0.999)))
        exchange = _TCPExchange(wire)
        connecting = connectProtocol(endpoint, exchange)

        def failed_connect(f):
            if f.check(DNSError):
                return f
            if not exchange.done.called:
                exchange.done.errback(TransportError(
                    f"{show_server(server)}: TCP connect failed: {f.getErrorMessage()}", "refused"))
        connecting.addErrback(failed_connect)
        d = self._timeout(exchange.done, server, "TCP", on_timeout=lambda: (
            exchange.transport.abortConnection() if exchange.transport else connecting.cancel()))
        return d.addCallback(read_response, request)

    def _timeout(self, d: defer.Deferred, server, how: str, on_timeout=None) -> defer.Deferred:
        out: defer.Deferred = defer.Deferred()

        def expire():
            if on_timeout is not None:
                try:
                    on_timeout()
                except Exception:           # logged, not swallowed (review L8)
                    _log.failure("dns: aborting the {how} exchange with {server} failed",
                                 how=how, server=show_server(server))
            d.cancel()
            if not out.called:
                out.errback(TransportError(f"{show_server(server)}: no {how} answer within "
                                           f"{self.timeout_s:g}s", "timeout"))
        call = self.reactor.callLater(self.timeout_s, expire)

        def finish(result):
            if call.active():
                call.cancel()
            if out.called:
                return None
            if isinstance(result, Failure):
                if not result.check(defer.CancelledError):
                    out.errback(result)
            else:
                out.callback(result)
            return None
        d.addBoth(finish)
        return out


class PrimaryDiscoveryClient(DNSClient):
    """A zone's client that sends to the zone's primary as its SOA MNAME names it
    (what ``nsupdate`` does without a ``server`` line; RFC 2136 section 4), looked up
    through the configured ``servers`` (a secondary or a resolver: the SOA and the
    MNAME's address are asked of them, recursion desired), then the system resolver
    for the address.  The primary is tried first, the configured servers after it;
    it is looked up again after ``discover_ttl_s`` (and after a failed lookup, at the
    next exchange)."""

    def __init__(self, reactor, zone: str, servers: list[tuple[str, int]],
                 timeout_s: float = 1.0, primary_port: int = 53, discover_ttl_s: float = 300.0):
        super().__init__(reactor, servers, timeout_s)
        self.zone = zone
        self.configured = list(servers)
        self.primary_port = primary_port
        self.discover_ttl_s = discover_ttl_s
        self.primary: tuple[str, int] | None = None
        self.mname: str | None = None
        self._until = 0.0
        self._finding: defer.Deferred | None = None

    def order(self) -> list[tuple[str, int]]:
        if self.primary is None:
            return super().order()
        return [self.primary] + [s for s in self.configured if s != self.primary]

    @defer.inlineCallbacks
    def _ask(self, name: str, rdtype: str):
        from services.dns.message import answer_rdatas
        q = dns.message.make_query(name, rdtype)        # RD set: a resolver may be asked
        saved, self.servers = self.servers, self.configured
        try:
            response, _ = yield DNSClient.exchange(self, q, self.zone, None, "query")
        finally:
            self.servers = saved
        return answer_rdatas(response, dns.name.from_text(name), rdtype)

    @defer.inlineCallbacks
    def _discover(self):
        try:
            soa = yield self._ask(self.zone, "SOA")
            if not soa:
                raise TransportError(f"no SOA of {self.zone} from the configured servers",
                                     "discover")
            mname = next(iter(soa)).mname.to_text()
            found = yield self._ask(mname, "A")
            if found:
                address = next(iter(found)).address
            else:
                address = yield self.reactor.resolve(mname.rstrip("."),
                                                     timeout=(max(1, int(self.timeout_s)),))
            primary = (address, self.primary_port)
            if primary != self.primary:
                _log.info("dns: primary of {zone} is {mname} ({server}) by its SOA",
                          zone=self.zone, mname=mname, server=show_server(primary))
            self.primary, self.mname = primary, mname
            self.servers = self.order()
            self._until = self.reactor.seconds() + self.discover_ttl_s
        except Exception as e:
            # not at every exchange: a lookup costs up to a timeout per server
            self._until = self.reactor.seconds() + min(self.RETRY_DISCOVER_S, self.discover_ttl_s)
            _log.warn("dns: finding the primary of {zone} from its SOA failed ({why}); "
                      "using {servers}", zone=self.zone, why=e,
                      servers=", ".join(show_server(s) for s in self.order()))

    RETRY_DISCOVER_S = 30.0

    def _found(self, result):
        self._finding = None
        return result

    @defer.inlineCallbacks
    def exchange(self, request: dns.message.Message, zone: str, key: str | None,
                 what: str = "update"):
        finding = self._finding
        if finding is None and self.reactor.seconds() >= self._until:
            finding = self._discover()
            if not finding.called:
                self._finding = finding      # exchanges meanwhile wait for the same lookup
                finding.addBoth(self._found)
        if finding is not None:
            yield finding
        result = yield DNSClient.exchange(self, request, zone, key, what)
        return result

