"""Socket helpers shared by the node's UDP listeners: a large kernel
receive buffer (bursts queue instead of being dropped) and the kernel's
receive time of a datagram (how long it waited in the queue)."""

from __future__ import annotations

import fcntl
import socket
import struct

from twisted.logger import Logger

_log = Logger(namespace="appliance.net.sockets")

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SIOCGSTAMP = 0x8906     # the kernel receive time of the last datagram read from a socket
_TIMEVAL = struct.Struct("@ll")


def set_receive_buffer(sock: socket.socket, size: int) -> int:
    """Ask for a ``size``-byte kernel receive buffer (SO_RCVBUFFORCE when
    allowed, else SO_RCVBUF, which ``net.core.rmem_max`` caps); the size
    the kernel reports back."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except OSError:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        except OSError as e:
            _log.warn("cannot set the receive buffer to {size}: {why}", size=size, why=e)
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def enable_receive_times(sock: socket.socket) -> bool:
    """Have the kernel keep the receive time of each datagram read from
    ``sock``: the first SIOCGSTAMP turns stamping on (it has no time to
    give yet), later ones return the last datagram's arrival."""
    try:
        fcntl.ioctl(sock.fileno(), SIOCGSTAMP, b"\0" * _TIMEVAL.size)
    except FileNotFoundError:          # ENOENT: nothing received yet -- stamping is on now
        return True
    except OSError:
        return False
    return True


def last_received_at(sock: socket.socket | None) -> float | None:
    """When the kernel received the datagram last read from ``sock`` (wall
    clock, SIOCGSTAMP; see :func:`enable_receive_times`), or None where that
    is not available."""
    if sock is None:
        return None
    try:
        sec, usec = _TIMEVAL.unpack(fcntl.ioctl(sock.fileno(), SIOCGSTAMP, b"\0" * _TIMEVAL.size))
    except OSError:
        return None
    return sec + usec / 1e6
