"""Gratuitous ARP (IPv4) and unsolicited neighbour advertisements (IPv6).

Two layers:

* pure frame builders, unit-testable byte for byte:
  :func:`arp_announcement` (RFC 5227 announcement, request form, or the
  RFC 5944 reply form) and :func:`unsolicited_na` (RFC 4861 section 7.2.6);
* blocking senders (:func:`send_announcement`, :func:`send_frames`) that
  open an ``AF_PACKET`` raw socket on the interface and write the frames.
  They block (socket calls, ``setns``) and are meant to run in the
  single-thread netlink pool of :class:`appliance.net.netlink.Netlink`,
  never on the reactor thread.

Network namespaces: a raw socket belongs to the namespace of the thread that
created it, forever.  To open one in namespace ``NAME`` the sender switches
*the calling thread only* into ``/run/netns/NAME`` with ``setns(2)``,
creates the socket, and switches back at once (:func:`in_netns`).  We do
this ourselves rather than with ``pyroute2.netns.pushns``/``popns``
because those keep a module-global stack (not safe if two threads use it)
and save ``/proc/self/ns/net`` (the *main* thread's namespace) instead of
the calling thread's; and rather than ``pyroute2.netns.create_socket``
because that forks a helper process per socket (10-30 ms).  The namespace
file is opened read-only without ``O_CREAT``: a mistyped name fails with a
clear error instead of silently creating an empty namespace.  Only the
netlink pool thread (dedicated, size one) ever switches, so no other code
can observe the temporary namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Iterator

ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ARP_REQUEST = 1
ARP_REPLY = 2
ICMPV6_NEIGHBOR_ADVERTISEMENT = 136
ND_OPT_TARGET_LINKADDR = 2
NA_FLAG_ROUTER = 0x80000000
NA_FLAG_SOLICITED = 0x40000000
NA_FLAG_OVERRIDE = 0x20000000

BROADCAST_MAC = b"\xff" * 6
ALL_NODES = ipaddress.IPv6Address("ff02::1")
#: Ethernet minimum frame length without the FCS; short frames are padded.
ETH_MIN_FRAME = 60

NETNS_DIR = "/run/netns"
_CLONE_NEWNET = 0x40000000


class AnnounceError(OSError):
    """A frame could not be sent (interface missing or down, netns gone)."""


# ---------------------------------------------------------------------------
# Pure frame builders
# ---------------------------------------------------------------------------

def _check_mac(mac: bytes) -> bytes:
    mac = bytes(mac)
    if len(mac) != 6:
        raise ValueError(f"MAC address must be 6 bytes, got {len(mac)}")
    return mac


def ethernet_header(dst: bytes, src: bytes, ethertype: int) -> bytes:
    return _check_mac(dst) + _check_mac(src) + struct.pack("!H", ethertype)


def arp_announcement(mac: bytes, ip: str | ipaddress.IPv4Address, *, reply: bool = False) -> bytes:
    """A broadcast gratuitous ARP frame for ``ip`` owned by ``mac``.

    Sender and target protocol addresses are both ``ip``; the sender hardware
    address is ``mac``.  Request form (default, RFC 5227 "ARP Announcement"):
    target hardware address all zeros.  Reply form (``reply=True``, RFC 5944
    4.6): target hardware address is ``mac`` as well.  Both go to the
    Ethernet broadcast address; hosts that ignore one form usually take the
    other, so senders emit both.  The 42-byte frame is zero-padded to the
    60-byte Ethernet minimum.
    """
    mac = _check_mac(mac)
    addr = ipaddress.IPv4Address(ip).packed
    op = ARP_REPLY if reply else ARP_REQUEST
    tha = mac if reply else b"\x00" * 6
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + mac + addr + tha + addr
    frame = ethernet_header(BROADCAST_MAC, mac, ETH_P_ARP) + arp
    return frame.ljust(ETH_MIN_FRAME, b"\x00")


def multicast_mac(ip6: ipaddress.IPv6Address) -> bytes:
    """The Ethernet address of IPv6 multicast group ``ip6`` (RFC 2464)."""
    return b"\x33\x33" + ip6.packed[-4:]


def internet_checksum(data: bytes) -> int:
    """RFC 1071 ones' complement sum of 16-bit words, complemented."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmpv6_checksum(src: ipaddress.IPv6Address, dst: ipaddress.IPv6Address, message: bytes) -> int:
    """Checksum of an ICMPv6 ``message`` (checksum field zero) with the
    RFC 8200 section 8.1 pseudo-header."""
    pseudo = src.packed + dst.packed + struct.pack("!I3xB", len(message), socket.IPPROTO_ICMPV6)
    return internet_checksum(pseudo + message)


def unsolicited_na(mac: bytes, ip6: str | ipaddress.IPv6Address, *,
                   src: str | ipaddress.IPv6Address | None = None,
                   router: bool = False) -> bytes:
    """An unsolicited neighbour advertisement frame for ``ip6`` at ``mac``.

    Ethernet to 33:33:00:00:00:01, IPv6 to ff02::1 with hop limit 255 (a
    receiver drops NAs with any other hop limit), ICMPv6 type 136 code 0 with
    the Override flag set (Solicited clear, as it must be for a multicast
    destination), target ``ip6``, and a Target Link-Layer Address option
    carrying ``mac``.  The IPv6 source is ``src`` or, by default, ``ip6``
    itself (an address of the sending interface, as RFC 4861 7.2.6 asks).
    """
    mac = _check_mac(mac)
    target = ipaddress.IPv6Address(ip6)
    source = ipaddress.IPv6Address(src) if src is not None else target
    flags = NA_FLAG_OVERRIDE | (NA_FLAG_ROUTER if router else 0)
    option = struct.pack("!BB", ND_OPT_TARGET_LINKADDR, 1) + mac
    body = struct.pack("!I", flags) + target.packed + option
    unsummed = struct.pack("!BBH", ICMPV6_NEIGHBOR_ADVERTISEMENT, 0, 0) + body
    checksum = icmpv6_checksum(source, ALL_NODES, unsummed)
    icmp = struct.pack("!BBH", ICMPV6_NEIGHBOR_ADVERTISEMENT, 0, checksum) + body
    ip_header = struct.pack("!IHBB", 6 << 28, len(icmp), socket.IPPROTO_ICMPV6, 255)
    ip_header += source.packed + ALL_NODES.packed
    return ethernet_header(multicast_mac(ALL_NODES), mac, ETH_P_IPV6) + ip_header + icmp


def announcement_frames(mac: bytes, ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[bytes]:
    """Frames for one announcement of ``ip``: ARP request + ARP reply for
    IPv4, one unsolicited NA for IPv6."""
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        return [arp_announcement(mac, addr), arp_announcement(mac, addr, reply=True)]
    return [unsolicited_na(mac, addr)]


# ---------------------------------------------------------------------------
# Namespaces and blocking senders (run these in the netlink thread)
# ---------------------------------------------------------------------------

_libc = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def netns_path(netns: str) -> str:
    """``/run/netns/NAME`` for a name, or the path itself if one is given."""
    return netns if "/" in netns else os.path.join(NETNS_DIR, netns)


@contextlib.contextmanager
def in_netns(netns: str | None) -> Iterator[None]:
    """Run the body with the *calling thread* in network namespace ``netns``.

    Never creates a namespace: a missing one raises ``FileNotFoundError``
    naming it.  The thread always returns to its previous namespace.
    """
    if netns is None:
        yield
        return
    path = netns_path(netns)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(2, f"network namespace {netns!r} does not exist", path) from None
    try:
        saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(saved)
        finally:
            os.close(saved)
    finally:
        os.close(target)


def open_packet_socket(ifname: str, netns: str | None = None) -> socket.socket:
    """A raw ``AF_PACKET`` socket bound to ``ifname`` in ``netns``."""
    with in_netns(netns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.bind((ifname, 0))
    except OSError:
        sock.close()
        raise
    return sock


def interface_mac(sock: socket.socket) -> bytes:
    """The hardware address of the interface a packet socket is bound to."""
    return bytes(sock.getsockname()[4])


def send_frames(ifname: str, frames: Iterable[bytes], netns: str | None = None) -> int:
    """Blocking: write raw Ethernet ``frames`` on ``ifname``; returns how many."""
    sock = open_packet_socket(ifname, netns)
    try:
        sent = 0
        for frame in frames:
            sock.send(frame)
            sent += 1
        return sent
    finally:
        sock.close()


def send_announcement(ifname: str, ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
                      netns: str | None = None) -> int:
    """Blocking: announce ``ip`` on ``ifname`` from the interface's own MAC.

    IPv4: a gratuitous ARP request and a gratuitous ARP reply.  IPv6: one
    unsolicited neighbour advertisement.  Returns the number of frames sent.
    Raises :class:`AnnounceError` with the interface and address in the text.
    """
    try:
        sock = open_packet_socket(ifname, netns)
        try:
            frames = announcement_frames(interface_mac(sock), ip)
            for frame in frames:
                sock.send(frame)
            return len(frames)
        finally:
            sock.close()
    except OSError as e:
        raise AnnounceError(e.errno, f"announce {ip} on {ifname}: {e.strerror or e}") from e
