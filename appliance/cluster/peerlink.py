"""The peer link: a mutually authenticated TLS stream between cluster nodes.

Both sides present certificates signed by the cluster CA; each side checks
that the other's certificate names the node id it expects (the dialer via
the TLS host name check, the acceptor by the certificate's common name and
the HELLO frame, which must agree).  The node with the smaller id dials,
the other accepts, so each pair has one connection.

Frames are length-prefixed JSON objects:

* ``{"t": "hello", "node": id, "inc": incarnation}`` -- first frame each way.
* ``{"t": "msg", "ch": channel, "seq": n, "body": ...}`` -- per-channel
  sequence numbers starting at 1 for each sender incarnation.
* ``{"t": "ack", "ch": channel, "seq": n}`` -- cumulative: everything up to
  ``n`` was handled (the channel handler's Deferred fired).

Unacked messages stay queued and are resent, in order, after a reconnect;
the receiver drops duplicates by sequence number.  A channel holds at most
``max_unacked`` messages: beyond that :meth:`PeerLink.send` fails with
:class:`Backpressure` so the service can fall back (e.g. to a bulk sync).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import defer, endpoints
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver

_log = Logger(namespace="appliance.peerlink")

MAX_FRAME = 4 * 1024 * 1024


class Backpressure(Exception):
    """Too many unacknowledged messages on a channel."""


class PeerLinkError(Exception):
    pass


@dataclass
class Channel:
    next_seq: int = 1
    unacked: "OrderedDict[int, tuple[Any, defer.Deferred]]" = field(default_factory=OrderedDict)
    sent_at: dict[int, float] = field(default_factory=dict)


@dataclass
class PeerState:
    id: str
    address: str
    proto: "PeerProtocol | None" = None
    channels: dict[str, Channel] = field(default_factory=dict)
    # receive side: (sender incarnation, channel) -> last delivered seq
    delivered: dict[str, int] = field(default_factory=dict)
    remote_inc: int | None = None
    connected_since: float | None = None
    connects: int = 0


class PeerProtocol(Int32StringReceiver):
    MAX_LENGTH = MAX_FRAME

    def __init__(self, link: "PeerLink", expected: str | None):
        self.link = link
        self.expected = expected      # dialer: the peer we dialed; acceptor: None
        self.peer: PeerState | None = None
        self._queue: list[dict] = []
        self._busy = False

    def connectionMade(self):
        self._send({"t": "hello", "node": self.link.node_id, "inc": self.link.incarnation})

    def _send(self, frame: dict):
        self.sendString(json.dumps(frame, separators=(",", ":")).encode())

    def _cert_name(self) -> str | None:
        try:
            cert = self.transport.getPeerCertificate()
        except Exception:
            return None
        if cert is None:
            return None
        from cryptography.x509.oid import NameOID
        names = cert.to_cryptography().subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return names[0].value if names else None

    def lengthLimitExceeded(self, length):
        _log.warn("peer link: frame of {n} bytes exceeds the limit; closing", n=length)
        self.transport.loseConnection()

    def stringReceived(self, data: bytes):
        try:
            frame = json.loads(data)
            kind = frame["t"]
        except (ValueError, KeyError, TypeError):
            self.link.stats["bad_frames"] += 1
            _log.warn("peer link: malformed frame; closing")
            self.transport.loseConnection()
            return
        if self.peer is None:
            if kind != "hello":
                self.transport.loseConnection()
                return
            self._hello(frame)
            return
        if kind == "msg":
            self._queue.append(frame)
            self._drain()
        elif kind == "ack":
            self.link._acked(self.peer, frame.get("ch"), frame.get("seq"))

    def _hello(self, frame: dict):
        claimed = frame.get("node")
        cert_name = self._cert_name()
        expected = self.expected
        problem = None
        if claimed not in self.link.peers:
            problem = f"HELLO from unknown node {claimed!r}"
        elif cert_name != claimed:
            problem = f"certificate names {cert_name!r} but HELLO says {claimed!r}"
        elif expected is not None and claimed != expected:
            problem = f"dialed {expected!r} but reached {claimed!r}"
        if problem:
            self.link.stats["refused"] += 1
            _log.warn("peer link refused: {problem}", problem=problem)
            self.transport.loseConnection()
            return
        self.peer = self.link.peers[claimed]
        self.link._attached(self.peer, self, frame.get("inc"))

    def _drain(self):
        if self._busy or not self._queue:
            return
        frame = self._queue.pop(0)
        channel, seq = frame.get("ch"), frame.get("seq")
        peer = self.peer
        key = f"{peer.remote_inc}:{channel}"
        last = peer.delivered.get(key, 0)
        if not isinstance(seq, int) or seq <= last:
            self._send({"t": "ack", "ch": channel, "seq": last})   # duplicate after resend
            self._drain()
            return
        handler = self.link.handlers.get(channel)
        self._busy = True
        d = (defer.maybeDeferred(handler, peer.id, frame.get("body")) if handler
             else defer.fail(PeerLinkError(f"no handler for channel {channel!r}")))

        def done(_):
            peer.delivered[key] = seq
            self.link.stats["received"] += 1
            if self.transport is not None and self.connected:
                self._send({"t": "ack", "ch": channel, "seq": seq})

        def failed(f):
            # Not acked: the sender keeps it and resends after a reconnect.
            _log.error("peer link: handler for {ch} failed on message {seq} from {peer}: {why}",
                       ch=channel, seq=seq, peer=peer.id, why=f.getErrorMessage())
            self.transport.loseConnection()

        def next_(_):
            self._busy = False
            self._drain()

        d.addCallbacks(done, failed).addBoth(next_)

    def connectionLost(self, reason):
        if self.peer is not None:
            self.link._detached(self.peer, self, reason.getErrorMessage())


class _Factory(Factory):
    def __init__(self, link, expected=None):
        self.link, self.expected = link, expected

    def buildProtocol(self, addr):
        p = PeerProtocol(self.link, self.expected)
        p.factory = self
        return p


def from_config(reactor, node_id: str, incarnation: int, cluster) -> "PeerLink":
    """Build the peer link of ``[cluster]`` (``peer_link`` + ``tls`` files)."""
    from pathlib import Path

    from appliance.admin.listen import split_endpoint
    from appliance.net.tls import client_options, server_options
    kind, args, kwargs = split_endpoint(cluster.peer_link)
    port = int(kwargs.get("port") or args[0])
    interface = kwargs.get("interface") or (str(cluster.bind_address) if cluster.bind_address else "")
    cert, key, ca = (Path(cluster.tls.cert).read_bytes(), Path(cluster.tls.key).read_bytes(),
                     Path(cluster.tls.ca).read_bytes())
    return PeerLink(reactor, node_id=node_id, incarnation=incarnation,
                    peers={p.id: str(p.address) for p in cluster.peers}, port=port,
                    interface=interface, server_options=server_options(cert, key, ca),
                    client_options=lambda peer: client_options(peer, ca, cert, key))


class PeerLink(MultiService):
    """Channels of acked, ordered messages to every peer."""

    name = "peerlink"

    def __init__(self, reactor, *, node_id: str, incarnation: int, peers: dict[str, str],
                 port: int, server_options, client_options: Callable[[str], Any],
                 interface: str = "", max_unacked: int = 10000):
        super().__init__()
        self.reactor = reactor
        self.node_id = node_id
        self.incarnation = incarnation
        self.peers = {pid: PeerState(pid, addr) for pid, addr in peers.items()}
        self.handlers: dict[str, Callable] = {}
        self.max_unacked = max_unacked
        self.listeners: list[Callable] = []
        self.stats = {"sent": 0, "received": 0, "resent": 0, "refused": 0, "bad_frames": 0}
        self._listen_port = port
        self._interface = interface
        self._server_options = server_options
        self._port = None
        for pid, state in self.peers.items():
            if node_id < pid:   # the smaller id dials
                ep = endpoints.SSL4ClientEndpoint(reactor, state.address, port,
                                                  client_options(pid), timeout=5)
                svc = ClientService(ep, _Factory(self, expected=pid),
                                    retryPolicy=backoffPolicy(initialDelay=0.1, maxDelay=2.0),
                                    clock=reactor)
                svc.setName(f"dial-{pid}")
                svc.setServiceParent(self)

    # -- API -------------------------------------------------------------
    def on(self, channel: str, handler: Callable[[str, Any], Any]) -> None:
        """``handler(peer_id, body)`` (may return a Deferred) handles ``channel``."""
        self.handlers[channel] = handler

    def on_connection(self, listener: Callable[[str, bool], None]) -> None:
        """``listener(peer_id, connected)`` hears link up/down."""
        self.listeners.append(listener)

    def connected(self, peer: str) -> bool:
        return self.peers[peer].proto is not None

    def send(self, peer: str, channel: str, body: Any, *, limit: int | None = None) -> defer.Deferred:
        """Queue ``body``; the Deferred fires when the peer acknowledged it.

        Fails at once with :class:`Backpressure` when the channel already holds
        ``limit`` (default ``max_unacked``) unacknowledged messages.
        """
        state = self.peers.get(peer)
        if state is None:
            return defer.fail(PeerLinkError(f"unknown peer {peer!r}"))
        ch = state.channels.setdefault(channel, Channel())
        if len(ch.unacked) >= (limit or self.max_unacked):
            return defer.fail(Backpressure(f"{len(ch.unacked)} unacked messages to {peer} on "
                                           f"{channel}"))
        seq = ch.next_seq
        ch.next_seq += 1
        d = defer.Deferred()
        ch.unacked[seq] = (body, d)
        ch.sent_at[seq] = self.reactor.seconds()
        if state.proto is not None:
            state.proto._send({"t": "msg", "ch": channel, "seq": seq, "body": body})
            self.stats["sent"] += 1
        return d

    def backlog(self, peer: str, channel: str | None = None) -> int:
        chans = self.peers[peer].channels
        if channel is not None:
            return len(chans[channel].unacked) if channel in chans else 0
        return sum(len(c.unacked) for c in chans.values())

    def lag_s(self, peer: str) -> float:
        now = self.reactor.seconds()
        oldest = [min(c.sent_at.values()) for c in self.peers[peer].channels.values() if c.sent_at]
        return now - min(oldest) if oldest else 0.0

    # -- life cycle --------------------------------------------------------
    def startService(self):
        super().startService()
        ep = endpoints.SSL4ServerEndpoint(self.reactor, self._listen_port, self._server_options,
                                          interface=self._interface)
        d = ep.listen(_Factory(self))

        def listening(port):
            self._port = port
            _log.info("peer link listening on {addr}", addr=port.getHost())
            return port

        d.addCallback(listening)
        d.addErrback(lambda f: _log.error("peer link cannot listen on port {port}: {why}",
                                          port=self._listen_port, why=f.getErrorMessage()))
        return d

    def stopService(self):
        d = defer.maybeDeferred(super().stopService)
        for state in self.peers.values():
            if state.proto is not None:
                state.proto.transport.loseConnection()
        if self._port is not None:
            port, self._port = self._port, None
            d.addCallback(lambda _: port.stopListening())
        return d

    # -- internals -----------------------------------------------------------
    def _attached(self, peer: PeerState, proto: PeerProtocol, remote_inc):
        if peer.proto is not None and peer.proto is not proto:
            peer.proto.transport.loseConnection()     # a newer connection replaces it
        peer.proto = proto
        if remote_inc != peer.remote_inc:
            peer.remote_inc = remote_inc
        peer.connected_since = self.reactor.seconds()
        peer.connects += 1
        resent = 0
        for name, ch in peer.channels.items():
            for seq, (body, _) in ch.unacked.items():
                proto._send({"t": "msg", "ch": name, "seq": seq, "body": body})
                resent += 1
        if resent:
            self.stats["resent"] += resent
        _log.info("peer link to {peer} up (resent {n} unacked)", peer=peer.id, n=resent)
        for listener in self.listeners:
            try:
                listener(peer.id, True)
            except Exception:
                _log.failure("peer link listener failed")

    def _detached(self, peer: PeerState, proto: PeerProtocol, why: str):
        if peer.proto is not proto:
            return
        peer.proto = None
        peer.connected_since = None
        _log.info("peer link to {peer} down: {why}", peer=peer.id, why=why)
        for listener in self.listeners:
            try:
                listener(peer.id, False)
            except Exception:
                _log.failure("peer link listener failed")

    def _acked(self, peer: PeerState, channel, seq):
        ch = peer.channels.get(channel)
        if ch is None or not isinstance(seq, int):
            return
        while ch.unacked:
            first = next(iter(ch.unacked))
            if first > seq:
                break
            _, d = ch.unacked.pop(first)
            ch.sent_at.pop(first, None)
            d.callback(first)

    def status(self) -> dict[str, Any]:
        return {pid: {"connected": p.proto is not None, "backlog": self.backlog(pid),
                      "lag_s": round(self.lag_s(pid), 3), "connects": p.connects}
                for pid, p in self.peers.items()}
