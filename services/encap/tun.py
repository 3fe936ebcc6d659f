"""TUN devices opened with ``/dev/net/tun`` and read in the reactor.

:func:`open_tun` creates (or attaches to) a TUN device with ``TUNSETIFF``
(``IFF_TUN | IFF_NO_PI``: every read is one IP packet) and makes the fd
non-blocking.  :class:`TunReader` is an ``IReadDescriptor``: on each
readiness it reads up to ``batch`` packets (one reactor turn), hands them to
``received(packets)`` as a list, and stops at ``EAGAIN``.  Writes go straight
to the fd (:meth:`TunReader.write_many`); a full queue (``EAGAIN``/``ENOBUFS``)
is a counted drop, never a block.  Address, MTU and link state are set with
netlink (pyroute2) in a thread: :func:`configure`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import Callable

from twisted.internet import threads
from twisted.logger import Logger
from twisted.python import failure
from zope.interface import implementer
from twisted.internet.interfaces import IReadDescriptor

_log = Logger(namespace="services.encap.tun")

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
MAX_PACKET = 65535
_FATAL = {errno.EBADFD, errno.EBADF, errno.ENODEV, errno.EIO, errno.ENXIO}


class TunError(Exception):
    pass


def open_tun(name: str) -> tuple[int, str]:
    """``(fd, actual name)``; raises :class:`TunError` with the reason."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise TunError(f"cannot open /dev/net/tun: {e.strerror}") from e
    try:
        ifr = struct.pack("16sH", name.encode()[:15], IFF_TUN | IFF_NO_PI)
        res = fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as e:
        os.close(fd)
        hint = " (needs CAP_NET_ADMIN)" if e.errno == errno.EPERM else ""
        raise TunError(f"cannot create TUN device {name!r}: {e.strerror}{hint}") from e
    actual = res[:16].rstrip(b"\0").decode()
    return fd, actual


def _configure(ifname: str, address: str | None, prefixlen: int, mtu: int,
               netns: str | None = None) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise TunError(f"{ifname}: no such device")
        idx = idx[0]
        ipr.link("set", index=idx, mtu=mtu)
        if address:
            try:
                ipr.addr("add", index=idx, address=address, prefixlen=prefixlen)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
        ipr.link("set", index=idx, state="up")


def configure(ifname: str, address: str | None, prefixlen: int = 32, mtu: int = 1400):
    """Set MTU, add ``address/prefixlen`` (if any) and bring ``ifname`` up,
    in a thread; returns a Deferred."""
    return threads.deferToThread(_configure, ifname, address, prefixlen, mtu)


@implementer(IReadDescriptor)
class TunReader:
    """The TUN fd in the reactor: batched reads, direct non-blocking writes."""

    def __init__(self, reactor, fd: int, name: str, received: Callable[[list], None],
                 batch: int = 64):
        self.reactor = reactor
        self.fd = fd
        self.name = name
        self.received = received
        self.batch = batch
        self.stats = {"rx": 0, "tx": 0, "rx_errors": 0, "tx_errors": 0, "tx_full": 0,
                      "read_batches": 0}
        self.last_error: str | None = None
        #: set when the device is gone or the fd unusable (EBADFD, ENODEV, EIO...):
        #: nothing will work until the TUN is opened again
        self.broken: str | None = None
        self._reading = False

    # IReadDescriptor
    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return f"tun:{self.name}"

    def connectionLost(self, reason: failure.Failure) -> None:
        self._reading = False

    def start(self) -> None:
        if not self._reading and self.fd >= 0:
            self._reading = True
            self.reactor.addReader(self)

    def stop(self) -> None:
        if self._reading:
            self.reactor.removeReader(self)
            self._reading = False

    def close(self) -> None:
        self.stop()
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1

    def doRead(self):
        packets = []
        read = os.read
        for _ in range(self.batch):
            try:
                packets.append(read(self.fd, MAX_PACKET))
            except BlockingIOError:
                break
            except OSError as e:
                self.stats["rx_errors"] += 1
                self.last_error = f"read: {e.strerror}"
                if e.errno in _FATAL:
                    self.broken = self.last_error
                    self.stop()
                break
        if packets:
            self.stats["rx"] += len(packets)
            self.stats["read_batches"] += 1
            try:
                self.received(packets)
            except Exception:
                _log.failure("tun {name}: packet handler failed", name=self.name)
        return None

    def write_many(self, packets) -> int:
        """Write each packet; returns how many went out."""
        n = 0
        write = os.write
        for p in packets:
            try:
                write(self.fd, p)
                n += 1
            except (BlockingIOError, InterruptedError):
                self.stats["tx_full"] += 1
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.stats["tx_full"] += 1
                else:
                    self.stats["tx_errors"] += 1
                    self.last_error = f"write: {e.strerror}"
                    if e.errno in _FATAL:
                        self.broken = self.last_error
        self.stats["tx"] += n
        return n
