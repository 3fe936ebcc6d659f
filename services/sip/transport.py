"""SIP over UDP and over streams (TCP, TLS) -- framing only, no SIP logic.

Each received message goes to ``core.received(data, source, stream)`` where
``source`` is a :class:`Source` that can send bytes back where the request
came from (RFC 3261 §18.2.2 with rport behaviour: the source address and
port of the datagram; on a stream, the same connection).

Streams (§18.3): a message is its head up to the blank line plus exactly
Content-Length bytes of body.  CRLF keep-alives between messages (RFC 5626
§3.5.1: a double CRLF "ping") are answered with one CRLF "pong".  A head
without Content-Length, a bad one, or a head larger than
:data:`MAX_HEAD` loses the framing: the connection gets a 400 (when the
request allows one) and is closed, counted as a drop.
"""

from __future__ import annotations

import re

from twisted.internet import protocol
from twisted.logger import Logger

from services.sip.message import MAX_MESSAGE_BYTES, split_head

_log = Logger(namespace="services.sip.transport")

MAX_HEAD = 16 * 1024
_CL = re.compile(rb"^(?:content-length|l)[ \t]*:[ \t]*(\S*)[ \t]*$", re.IGNORECASE | re.MULTILINE)


class Source:
    """Where a message came from; ``send`` answers there."""

    __slots__ = ("transport", "host", "port", "_write", "reliable")

    def __init__(self, transport: str, host: str, port: int, write, reliable: bool):
        self.transport = transport
        self.host = host
        self.port = port
        self._write = write
        self.reliable = reliable

    def send(self, data: bytes) -> None:
        self._write(data)

    def __str__(self) -> str:
        return f"{self.transport}:{self.host}:{self.port}"


class UDPProtocol(protocol.DatagramProtocol):
    def __init__(self, core):
        self.core = core

    def datagramReceived(self, data, addr):
        host, port = addr[0], addr[1]
        if data in (b"\r\n\r\n", b"\r\n"):        # keep-alive: nothing to answer on UDP
            return
        src = Source("udp", host, port, lambda b, a=addr: self._write(b, a), False)
        try:
            self.core.received(data, src, False)
        except Exception:
            self.core.drop("internal_error")
            _log.failure("sip: datagram from {addr} crashed the handler", addr=addr)

    def _write(self, data: bytes, addr) -> None:
        if self.transport is not None:
            try:
                # the socket's sendto: ``addr`` is the datagram's source (an IP address
                # already), so Port.write's address checks are skipped
                sock = getattr(self.transport, "socket", None)
                if sock is not None:
                    sock.sendto(data, addr)
                else:
                    self.transport.write(data, addr)
            except OSError as e:
                self.core.drop("send_error")
                _log.debug("sip: send to {addr} failed: {why}", addr=addr, why=e)


class StreamProtocol(protocol.Protocol):
    """One TCP or TLS connection: frames messages by Content-Length."""

    def __init__(self, core, name: str):
        self.core = core
        self.name = name
        self.buffer = b""
        self.source: Source | None = None

    def connectionMade(self):
        peer = self.transport.getPeer()
        self.source = Source(self.name, getattr(peer, "host", "?"), getattr(peer, "port", 0),
                             self._write, True)
        self.core.connections += 1

    def connectionLost(self, reason=protocol.connectionDone):
        self.core.connections -= 1

    def _write(self, data: bytes) -> None:
        if self.transport is not None and self.connected:
            self.transport.write(data)

    def dataReceived(self, data: bytes):
        self.buffer += data
        try:
            self._frames()
        except Exception:
            self.core.drop("internal_error")
            _log.failure("sip: stream data from {src} crashed the handler", src=str(self.source))
            self.buffer = b""
            self.transport.loseConnection()

    def _frames(self) -> None:
        while self.buffer:
            stripped = self.buffer.lstrip(b"\r\n")
            skipped = self.buffer[:len(self.buffer) - len(stripped)]
            if b"\r\n\r\n" in skipped:
                self._write(b"\r\n")                     # RFC 5626 pong
            self.buffer = stripped
            if not self.buffer:
                return
            parts = split_head(self.buffer)
            if parts is None:
                if len(self.buffer) > MAX_HEAD:
                    self._lose("head too large")
                return
            head, rest = parts
            if len(head) > MAX_HEAD:
                self._lose("head too large")
                return
            m = _CL.search(head)
            if m is None or not m.group(1).isdigit() or int(m.group(1)) > MAX_MESSAGE_BYTES:
                # framing lost: let the parser build the 400 if it can, then close
                self.core.received(head + b"\r\n\r\n", self.source, True)
                self._lose(None)
                return
            length = int(m.group(1))
            if len(rest) < length:
                return
            frame = self.buffer[:len(self.buffer) - len(rest) + length]
            self.buffer = rest[length:]
            self.core.received(frame, self.source, True)

    def _lose(self, reason: str | None) -> None:
        if reason is not None:
            self.core.drop(reason.replace(" ", "_"))
        self.buffer = b""
        self.transport.loseConnection()


class StreamFactory(protocol.Factory):
    def __init__(self, core, name: str):
        self.core = core
        self.name = name

    def buildProtocol(self, addr):
        p = StreamProtocol(self.core, self.name)
        p.factory = self
        return p
