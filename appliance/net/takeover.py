"""The takeover's fast path: add a VIP and announce it from the reactor thread.

A takeover used to add the address with pyroute2 and send the first
gratuitous ARP / NA in the netlink worker thread: a thread hop, pyroute2's
Python message machinery and, on the first takeover, an interface lookup (a
dump of every link) and a fresh packet socket -- ~1.5-3 ms between the
deadline and the GARP on a busy box, where keepalived (C) needs ~0.9 ms
(bench/failover.py, the deadline -> GARP split).

:class:`PreparedInterface` is made in advance, in the worker thread (it may
enter a network namespace): the interface index, a packet socket bound to
the interface with its MAC, and a non-blocking rtnetlink socket.  At the
takeover, :meth:`PreparedInterface.add_and_announce` sends one RTM_NEWADDR
(the kernel handles a NETLINK_ROUTE request inside ``sendmsg``: the address
is there when the call returns and the ack is already queued) and writes the
announcement frames: tens of microseconds, nothing that waits.  A message
that cannot be completed so (no ack queued, any error but EEXIST) raises
:class:`FastPathUnavailable` and the caller takes the worker-thread path.

The RTM_NEWADDR message is hand-packed (a 40-60 byte struct): pyroute2 stays
the library for everything else (dumps, routes, links).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from typing import Any

from appliance.net import garp

NETLINK_ROUTE = 0
RTM_NEWADDR = 20
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_F_NODAD = 0x02

_NLMSGHDR = struct.Struct("=IHHII")       # len, type, flags, seq, pid
_IFADDRMSG = struct.Struct("=BBBBI")      # family, prefixlen, flags, scope, index
_RTATTR = struct.Struct("=HH")            # len, type


class FastPathUnavailable(Exception):
    """The fast path could not complete; use the worker-thread path."""


def _attr(kind: int, data: bytes) -> bytes:
    length = _RTATTR.size + len(data)
    return _RTATTR.pack(length, kind) + data + b"\0" * ((4 - length % 4) % 4)


def newaddr_message(index: int, iface: Any, seq: int) -> bytes:
    """RTM_NEWADDR (create, exclusive, ack) of ``iface`` on interface ``index``:
    what ``ip address add`` sends (IPv4: IFA_LOCAL and IFA_ADDRESS; IPv6:
    IFA_ADDRESS with ``nodad``: a VIP answers at once)."""
    iface = ipaddress.ip_interface(iface)
    packed = iface.ip.packed
    if iface.version == 4:
        family, flags = socket.AF_INET, 0
        attrs = _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed)
    else:
        family, flags = socket.AF_INET6, IFA_F_NODAD
        attrs = _attr(IFA_ADDRESS, packed) + _attr(IFA_FLAGS, struct.pack("=I", IFA_F_NODAD))
    body = _IFADDRMSG.pack(family, iface.network.prefixlen, flags, 0, index) + attrs
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_NEWADDR,
                          NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
                          seq, 0) + body


def ack_error(data: bytes, seq: int) -> int | None:
    """The errno (0: success) the kernel acknowledged request ``seq`` with, or
    None when ``data`` holds no acknowledgement of it."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, got_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            return None
        if kind == NLMSG_ERROR and got_seq == seq and length >= _NLMSGHDR.size + 4:
            (code,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
            return -code
        offset += (length + 3) & ~3
    return None


class PreparedInterface:
    """One interface made ready for a takeover (see the module docstring)."""

    def __init__(self, ifname: str, netns: str | None = None):
        self.ifname = ifname
        with garp.in_netns(netns):
            nl = socket.socket(socket.AF_NETLINK,
                               socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                               NETLINK_ROUTE)
        try:
            nl.bind((0, 0))
            self.packet = garp.open_packet_socket(ifname, netns)
        except OSError:
            nl.close()
            raise
        self.nl = nl
        try:
            self.mac = garp.interface_mac(self.packet)
            self.index = _index_in(self.packet)     # in the socket's own namespace
        except OSError:
            self.close()
            raise
        self._seq = 0

    def add_and_announce(self, iface: Any) -> tuple[bool, Any]:
        """Add ``iface``; fires ``(added_now, frames sent or the OSError)``.
        Raises :class:`FastPathUnavailable` when the add's outcome is not known
        (the caller then takes the worker-thread path)."""
        self._seq = (self._seq + 1) & 0x7FFFFFFF or 1
        seq = self._seq
        try:
            self._drain()
            self.nl.send(newaddr_message(self.index, iface, seq))
            data = self.nl.recv(65536, socket.MSG_DONTWAIT)
        except OSError as e:
            raise FastPathUnavailable(f"rtnetlink: {e.strerror or e}") from e
        code = ack_error(data, seq)
        if code is None:
            raise FastPathUnavailable("rtnetlink: no acknowledgement queued")
        if code not in (0, errno.EEXIST):
            raise FastPathUnavailable(f"rtnetlink: {os.strerror(code)}")
        added = code == 0
        ip = ipaddress.ip_interface(iface).ip
        try:
            frames = garp.announcement_frames(self.mac, ip)
            for frame in frames:
                self.packet.send(frame)
            sent: Any = len(frames)
        except OSError as e:
            sent = e
        return added, sent

    def _drain(self) -> None:
        """Drop anything left unread (an earlier ack read as stale)."""
        while True:
            try:
                self.nl.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return

    def close(self) -> None:
        for sock in (self.nl, self.packet):
            try:
                sock.close()
            except OSError:
                pass


def _index_in(packet: socket.socket) -> int:
    """The interface index of a bound AF_PACKET socket (its own namespace)."""
    import fcntl
    SIOCGIFINDEX = 0x8933
    name = packet.getsockname()[0]
    req = struct.pack("16si", name.encode()[:15], 0)
    res = fcntl.ioctl(packet.fileno(), SIOCGIFINDEX, req)
    return struct.unpack("16si", res)[1]
