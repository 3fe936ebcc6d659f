"""The peer link: a mutually authenticated TLS stream between cluster nodes.

Both sides present certificates signed by the cluster CA; each side checks
that the other's certificate names the node id it expects (the dialer via
the TLS host name check, the acceptor by the certificate's common name and
the HELLO frame, which must agree).  The node with the smaller id dials,
the other accepts, so each pair has one connection.

Frames are length-prefixed JSON objects:

* ``{"t": "hello", "node": id, "inc": incarnation, "v": version, "caps": [...]}``
  -- first frame each way.  ``v`` is the peer-link wire version
  (:data:`VERSION`; a hello without it is version 1, the releases up to
  33b2f38), ``caps`` the capabilities the sender's services advertised
  (:meth:`PeerLink.advertise`; none without the key).  A hello whose version
  is not within one of ours (:data:`MIN_VERSION`..``VERSION + 1``) is refused.
  The rule for changing the format (rolling upgrades, issue 17): frames are
  read by key and unknown keys and unknown frame types (``t``) are ignored,
  so a version may only add keys and frame types; a new behaviour that the
  peer must support is a capability a service checks with
  :meth:`PeerLink.peer_capabilities` before relying on it.
* ``{"t": "msg", "ch": channel, "seq": n, "body": ...}`` -- per-channel
  sequence numbers starting at 1 for each sender incarnation.
* ``{"t": "ack", "ch": channel, "seq": n}`` -- cumulative: everything up to
  ``n`` was handled (the channel handler's Deferred fired).

* ``{"t": "ping"}`` / ``{"t": "pong"}`` -- keepalive: each side pings every
  ``keepalive_s``; a connection that received nothing for ``idle_timeout_s``
  is aborted and redialled (a half-open link after a peer's power loss is
  noticed in seconds, not after ``tcp_retries2``).

Unacked messages stay queued and are resent, in order, after a reconnect;
the receiver drops duplicates by sequence number.

Receiving is strictly serial per peer (one handler at a time, whatever
connection the frame came on) and nothing is ever acked past a message
whose handler failed: the failed message is retried in place with
exponential backoff while later ones wait behind it.  After
``poison_after`` failures it is *parked* (kept in :attr:`PeerState.parked`,
counted in ``stats["parked"]``, logged as critical and shown in
``status()``), then acked, so one poison message cannot block the channel
forever and is never silently skipped.  The receive queue is bounded: past
``RECV_HIGH`` frames the connection stops reading (TCP flow control pushes
back on the sender) until it drains below ``RECV_LOW``.  A channel holds at most
``max_unacked`` messages: beyond that :meth:`PeerLink.send` fails with
:class:`Backpressure` so the service can fall back (e.g. to a bulk sync).
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import defer, endpoints
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver

_log = Logger(namespace="appliance.peerlink")

VERSION = 1               # peer-link wire version sent in the hello
MIN_VERSION = 1           # the oldest read (a hello without "v" is 1)
MAX_FRAME = 4 * 1024 * 1024
RECV_HIGH = 1000          # queued frames per peer before the connection stops reading
RECV_LOW = 100            # ... and resumes
RETRY_BASE_S = 0.1        # first retry of a failed handler; doubles up to RETRY_MAX_S
RETRY_MAX_S = 5.0
POISON_AFTER = 8          # failures of one message before it is parked (~13 s of retries)


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
    # receive side, per peer (not per connection): serial handling, retries
    inbox: deque = field(default_factory=deque)     # (proto, key, frame)
    busy: bool = False
    retry: Any = None                               # DelayedCall of a handler retry
    failures: dict[str, int] = field(default_factory=dict)   # "key:seq" -> failures
    parked: list[dict] = field(default_factory=list)
    paused: Any = None                              # the proto whose reading is paused
    version: int | None = None                      # the peer's hello: wire version
    caps: frozenset = frozenset()                   # ... and capabilities


class PeerProtocol(Int32StringReceiver):
    MAX_LENGTH = MAX_FRAME

    def __init__(self, link: "PeerLink", expected: str | None):
        self.link = link
        self.expected = expected      # dialer: the peer we dialed; acceptor: None
        self.peer: PeerState | None = None
        self.last_rx = link.clock.seconds()
        self._keepalive = None

    def connectionMade(self):
        self._send({"t": "hello", "node": self.link.node_id, "inc": self.link.incarnation,
                    "v": VERSION, "caps": sorted(self.link.capabilities)})
        self._keepalive = self.link.clock.callLater(self.link.keepalive_s, self._ping)

    def _ping(self):
        self._keepalive = None
        if not self.connected or self.transport is None:
            return
        idle = self.link.clock.seconds() - self.last_rx
        if idle > self.link.idle_timeout_s:
            self.link.stats["idle_timeouts"] += 1
            _log.warn("peer link to {peer}: nothing received for {ms} ms; aborting",
                      peer=self.peer.id if self.peer else self.expected or "?",
                      ms=round(idle * 1000))
            self.transport.abortConnection()
            return
        self._send({"t": "ping"})
        self._keepalive = self.link.clock.callLater(self.link.keepalive_s, self._ping)

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
        self.last_rx = self.link.clock.seconds()
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
            self.link._received(self.peer, self, frame)
        elif kind == "ack":
            self.link._acked(self.peer, frame.get("ch"), frame.get("seq"))
        elif kind == "ping":
            self._send({"t": "pong"})

    def _hello(self, frame: dict):
        claimed = frame.get("node")
        cert_name = self._cert_name()
        expected = self.expected
        problem = None
        version = frame.get("v", 1)
        caps = frame.get("caps", [])
        if not isinstance(caps, list):
            caps = []
        if not isinstance(version, int) or not MIN_VERSION <= version <= VERSION + 1:
            problem = (f"HELLO from {claimed!r} speaks peer-link version {version!r}; this "
                       f"node reads {MIN_VERSION}..{VERSION + 1} (upgrade one release at a time)")
        elif claimed not in self.link.peers:
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
        self.peer.version = version
        self.peer.caps = frozenset(c for c in caps if isinstance(c, str))
        self.link._attached(self.peer, self, frame.get("inc"))

    def connectionLost(self, reason):
        if self._keepalive is not None and self._keepalive.active():
            self._keepalive.cancel()
        self._keepalive = None
        if self.peer is not None:
            self.link._detached(self.peer, self, reason.getErrorMessage())


class _Factory(Factory):
    def __init__(self, link, expected=None):
        self.link, self.expected = link, expected

    def buildProtocol(self, addr):
        p = PeerProtocol(self.link, self.expected)
        p.factory = self
        return p


def from_config(reactor, node_id: str, incarnation: int, cluster, clock=None) -> "PeerLink":
    """Build the peer link of ``[cluster]`` (``peer_link`` + ``tls`` files)."""
    from pathlib import Path

    from appliance.net.endpoints import split_endpoint
    from appliance.net.tls import client_options, server_options
    kind, args, kwargs = split_endpoint(cluster.peer_link)
    port = int(kwargs.get("port") or args[0])
    interface = kwargs.get("interface") or (str(cluster.bind_address) if cluster.bind_address else "")
    cert, key, ca = (Path(cluster.tls.cert).read_bytes(), Path(cluster.tls.key).read_bytes(),
                     Path(cluster.tls.ca).read_bytes())
    # Keepalive at the heartbeat interval; a silent link is dropped after
    # (dead_after + 0.5) intervals, but never under 1 s: TCP's minimum RTO is
    # 200 ms and a lost retransmission doubles it, so a tighter bound would
    # reconnect needlessly under packet loss.
    interval = cluster.heartbeat_interval_ms / 1000.0
    return PeerLink(reactor, node_id=node_id, incarnation=incarnation,
                    peers={p.id: str(p.address) for p in cluster.peers}, port=port,
                    interface=interface, server_options=server_options(cert, key, ca),
                    client_options=lambda peer: client_options(peer, ca, cert, key),
                    keepalive_s=max(interval, 0.05), clock=clock,
                    idle_timeout_s=max((cluster.dead_after + 0.5) * interval, 1.0))


class PeerLink(MultiService):
    """Channels of acked, ordered messages to every peer."""

    name = "peerlink"

    def __init__(self, reactor, *, node_id: str, incarnation: int, peers: dict[str, str],
                 port: int, server_options, client_options: Callable[[str], Any],
                 interface: str = "", max_unacked: int = 10000, keepalive_s: float = 1.0,
                 idle_timeout_s: float = 3.0, poison_after: int = POISON_AFTER, clock=None):
        super().__init__()
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor   # keepalive and retry timers
        self.node_id = node_id
        self.incarnation = incarnation
        self.peers = {pid: PeerState(pid, addr) for pid, addr in peers.items()}
        self.handlers: dict[str, Callable] = {}
        self.max_unacked = max_unacked
        self.keepalive_s = keepalive_s
        self.idle_timeout_s = max(idle_timeout_s, 2 * keepalive_s)
        self.poison_after = max(1, poison_after)
        self.listeners: list[Callable] = []
        self.capabilities: set[str] = set()     # advertised in our hello
        self.stats = {"sent": 0, "received": 0, "resent": 0, "refused": 0, "bad_frames": 0,
                      "handler_failures": 0, "parked": 0, "idle_timeouts": 0, "paused": 0,
                      "too_big": 0}
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

    def advertise(self, *capabilities: str) -> None:
        """Announce ``capabilities`` (e.g. ``"dhcp4.stored"``) in our hello
        (call before the link starts: a hello already sent is not resent)."""
        self.capabilities.update(capabilities)

    def peer_capabilities(self, peer: str) -> frozenset | None:
        """What ``peer``'s hello advertised on the current connection (an
        older peer: empty); None while no connection is up."""
        state = self.peers.get(peer)
        return state.caps if state is not None and state.proto is not None else None

    def peer_version(self, peer: str) -> int | None:
        """``peer``'s peer-link wire version (its last hello); None before one."""
        state = self.peers.get(peer)
        return state.version if state is not None else None

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
        size = len(json.dumps(body, separators=(",", ":")))
        if size > MAX_FRAME - 256:
            self.stats["too_big"] += 1
            return defer.fail(PeerLinkError(f"message of {size} bytes on {channel} exceeds the "
                                            f"{MAX_FRAME}-byte frame limit"))
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
            if state.retry is not None and state.retry.active():
                state.retry.cancel()
            state.retry = None
            if state.proto is not None:
                state.proto.transport.loseConnection()
            # Nobody will ack these now: tell the senders instead of leaving
            # their Deferreds pending forever.
            for name, ch in state.channels.items():
                pending = list(ch.unacked.items())
                ch.unacked.clear()
                ch.sent_at.clear()
                for seq, (_, waiting) in pending:
                    waiting.errback(PeerLinkError(f"peer link stopping ({name} #{seq} unacked)"))
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

    def reset(self, peer: str, why: str) -> None:
        """Drop the connection to ``peer`` (it restarted, or was declared
        dead); the dialer redials and unacked messages are resent."""
        state = self.peers.get(peer)
        if state is not None and state.proto is not None and state.proto.transport is not None:
            _log.info("peer link to {peer} reset: {why}", peer=peer, why=why)
            state.proto.transport.abortConnection()

    # -- receive side: serial, retried, never acked past a failure ------------
    def _received(self, peer: PeerState, proto: PeerProtocol, frame: dict):
        peer.inbox.append((proto, f"{peer.remote_inc}:{frame.get('ch')}", frame))
        if len(peer.inbox) >= RECV_HIGH and peer.paused is None:
            peer.paused = proto
            self.stats["paused"] += 1
            proto.transport.pauseProducing()
        self._drain(peer)

    def _drain(self, peer: PeerState):
        while not peer.busy and peer.retry is None and peer.inbox:
            proto, key, frame = peer.inbox[0]
            if proto is not peer.proto:
                # Its connection is gone: the sender resends whatever we do
                # not ack, on the new one.
                self._pop(peer)
                continue
            channel, seq = frame.get("ch"), frame.get("seq")
            last = peer.delivered.get(key, 0)
            if not isinstance(seq, int) or seq <= last:
                self._pop(peer)
                proto._send({"t": "ack", "ch": channel, "seq": last})   # duplicate after resend
                continue
            self._handle(peer, proto, key, frame)

    def _pop(self, peer: PeerState):
        peer.inbox.popleft()
        if peer.paused is not None and len(peer.inbox) <= RECV_LOW:
            paused, peer.paused = peer.paused, None
            if paused.transport is not None and paused.connected:
                paused.transport.resumeProducing()

    def _handle(self, peer: PeerState, proto: PeerProtocol, key: str, frame: dict):
        channel, seq = frame.get("ch"), frame["seq"]
        handler = self.handlers.get(channel)
        peer.busy = True
        d = (defer.maybeDeferred(handler, peer.id, frame.get("body")) if handler
             else defer.fail(PeerLinkError(f"no handler for channel {channel!r}")))

        def settle(ok: bool):
            peer.delivered[key] = max(peer.delivered.get(key, 0), seq)
            peer.failures.pop(f"{key}:{seq}", None)
            if ok:
                self.stats["received"] += 1
            if peer.inbox and peer.inbox[0][2] is frame:
                self._pop(peer)
            if proto is peer.proto and proto.connected:
                proto._send({"t": "ack", "ch": channel, "seq": seq})

        def done(_):
            settle(True)

        def failed(f):
            # Not acked, not skipped: retried in place, later frames wait.
            self.stats["handler_failures"] += 1
            tag = f"{key}:{seq}"
            n = peer.failures[tag] = peer.failures.get(tag, 0) + 1
            if n >= self.poison_after:
                self.stats["parked"] += 1
                peer.parked.append({"channel": channel, "seq": seq, "body": frame.get("body"),
                                    "error": f.getErrorMessage(), "failures": n,
                                    "at": self.clock.seconds()})
                _log.critical("peer link: message {seq} on {ch} from {peer} failed {n} times "
                              "({why}); PARKED for the operator and acknowledged",
                              seq=seq, ch=channel, peer=peer.id, n=n, why=f.getErrorMessage(),
                              event_type="peerlink_parked")
                settle(False)
                return
            delay = min(RETRY_BASE_S * 2 ** (n - 1), RETRY_MAX_S)
            _log.error("peer link: handler for {ch} failed on message {seq} from {peer} "
                       "({why}); retry {n} in {delay:.1f}s", ch=channel, seq=seq, peer=peer.id,
                       why=f.getErrorMessage(), n=n, delay=delay)
            peer.retry = self.clock.callLater(delay, self._retry, peer)

        def next_(_):
            peer.busy = False
            self._drain(peer)

        d.addCallbacks(done, failed).addBoth(next_)
        d.addErrback(lambda f: _log.failure("peer link receive bookkeeping failed", failure=f))

    def _retry(self, peer: PeerState):
        peer.retry = None
        self._drain(peer)

    def _detached(self, peer: PeerState, proto: PeerProtocol, why: str):
        if peer.paused is proto:
            peer.paused = None
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
                      "lag_s": round(self.lag_s(pid), 3), "connects": p.connects,
                      "inbox": len(p.inbox), "retrying": p.retry is not None,
                      "version": p.version, "caps": sorted(p.caps),
                      "parked": [{k: v for k, v in m.items() if k != "body"} for m in p.parked]}
                for pid, p in self.peers.items()}
