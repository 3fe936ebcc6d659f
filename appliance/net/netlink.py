"""Netlink (pyroute2) off the reactor thread.

:class:`Netlink` owns one synchronous pyroute2 ``IPRoute`` and one
dedicated, named :class:`~twisted.python.threadpool.ThreadPool` of exactly
one thread.  Every netlink call (and every raw-socket announcement, see
:mod:`appliance.net.garp`) runs in that thread via ``deferToThreadPool``,
so:

* the reactor thread never blocks on netlink (one exception, made not to
  block: a takeover's address add and first announcement go out from the
  reactor thread on sockets prepared in this thread beforehand,
  :mod:`appliance.net.takeover`; anything it cannot finish at once falls back
  to this thread);
* calls run one at a time, in the order they were made (an ``add`` issued
  before a ``remove`` of the same address is applied before it);
* the ``IPRoute`` object (not thread-safe) is only ever touched by one
  thread, and that thread may switch network namespace briefly to open raw
  sockets without anyone else noticing.

Why the sync ``IPRoute`` in a thread and not ``AsyncIPRoute``: pyroute2 0.9
runs its own asyncio loop inside; with Twisted's default epoll reactor the
sync class in a thread is the combination that works (TESTBED.md).

Namespaces: ``IPRoute(netns=NAME)`` forks a helper that enters the
namespace, and it *creates* the namespace if it does not exist (flags
default to ``O_CREAT``), so a typo would silently give an empty namespace.
We check ``/run/netns/NAME`` exists first and raise :class:`NetlinkError`
otherwise, and pass ``flags=0`` as a second guard.  The ``IPRoute`` is
opened lazily on first use (in the pool thread) and reused.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from typing import Any, Callable, TypeVar

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from appliance.net import garp
from appliance.net.takeover import FastPathUnavailable, PreparedInterface

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
IFA_F_NODAD = 0x02

T = TypeVar("T")
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class NetlinkError(Exception):
    """A netlink operation failed; the text says what, where and why:
    ``add 10.9.0.100/24 on veth0: No such device``.  ``errno`` is the kernel
    error number when there is one."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


def _reason(exc: BaseException) -> tuple[str, int | None]:
    """``(human reason, errno)`` of an OSError or a pyroute2 NetlinkError."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror, exc.errno
    code = getattr(exc, "code", None)  # pyroute2 NetlinkError
    if not isinstance(code, int):
        code = getattr(exc, "errno", None)
    if isinstance(code, int) and code > 0:
        return os.strerror(code), code
    return str(exc) or type(exc).__name__, None


def _no_device() -> OSError:
    return OSError(errno.ENODEV, os.strerror(errno.ENODEV))


class Netlink:
    """One ``IPRoute`` (optionally in namespace ``netns``) behind one thread.

    Call :meth:`start` before use (the owning service does it in
    ``startService``) and :meth:`close` when done.  All public methods
    return Deferreds and never raise synchronously; failures are
    :class:`NetlinkError`.
    """

    def __init__(self, reactor: Any, netns: str | None = None, *, name: str | None = None):
        self._reactor = reactor
        self.netns = netns
        self.name = name or f"netlink-{netns or 'host'}"
        self._pool: ThreadPool | None = None
        self._ipr: Any = None
        #: ifname -> index for the address add (the takeover's path): one
        #: netlink round trip less; a stale entry (the interface was
        #: re-created) fails with ENODEV and is looked up again
        self._add_index: dict[str, int] = {}
        self._shutdown_trigger: Any = None
        self._closing: defer.Deferred | None = None
        #: ifname -> sockets ready for a takeover from the reactor thread
        #: (prepare_takeover); dropped when they fail, prepared again later
        self._prepared: dict[str, PreparedInterface] = {}
        self._to_prepare: set[str] = set()
        self.fast_adds = 0
        self.fast_fallbacks = 0

    # -- lifecycle ---------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._pool is not None

    def start(self) -> None:
        """Start the (single, named) worker thread.  Idempotent."""
        if self._pool is not None:
            return
        self._closing = None
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=self.name)
        self._pool.start()
        # If the reactor stops without our owner's stopService, still join
        # the thread so the process can exit.
        self._shutdown_trigger = self._reactor.addSystemEventTrigger(
            "during", "shutdown", self._stop_pool)

    def close(self) -> defer.Deferred:
        """Close the ``IPRoute`` (in the worker thread), then stop the pool."""
        self._to_prepare.clear()
        for prep in self._prepared.values():
            prep.close()
        self._prepared.clear()
        if self._pool is None:
            return defer.succeed(None)
        if self._closing is not None:
            return self._closing
        d = deferToThreadPool(self._reactor, self._pool, self._close_ipr)
        d.addErrback(lambda _: None)  # closing a broken IPRoute is not worth failing for
        d.addBoth(lambda _: self._stop_pool())
        self._closing = d
        return d

    def _stop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if self._shutdown_trigger is not None:
            try:
                self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            except (ValueError, KeyError):
                pass
            self._shutdown_trigger = None
        if pool is not None:
            pool.stop()  # the worker is idle by now: a short join

    def _close_ipr(self) -> None:
        ipr, self._ipr = self._ipr, None
        if ipr is not None:
            ipr.close()

    # -- plumbing ----------------------------------------------------------

    def _run(self, what: str, func: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred:
        """Run ``func`` in the worker; wrap any failure as ``"<what>: <why>"``."""
        if self._pool is None:
            return defer.fail(NetlinkError(f"{what}: netlink not started"))

        def call() -> T:
            try:
                return func(*args, **kwargs)
            except garp.AnnounceError as e:  # already says "announce X on IF: why"
                raise NetlinkError(e.strerror, e.errno) from e
            except Exception as e:
                why, code = _reason(e)
                raise NetlinkError(f"{what}: {why}", code) from e

        return deferToThreadPool(self._reactor, self._pool, call)

    def _iproute(self) -> Any:
        """The shared ``IPRoute``; worker thread only."""
        if self._ipr is None:
            from pyroute2 import IPRoute

            if self.netns is None:
                self._ipr = IPRoute()
            else:
                path = garp.netns_path(self.netns)
                if not os.path.exists(path):
                    raise FileNotFoundError(
                        errno.ENOENT, f"network namespace {self.netns!r} does not exist ({path})")
                # flags=0: never create the namespace (pyroute2 defaults to O_CREAT)
                self._ipr = IPRoute(netns=self.netns, flags=0)
        return self._ipr

    def _index(self, ifname: str) -> int:
        found = self._iproute().link_lookup(ifname=ifname)
        if not found:
            raise _no_device()
        return found[0]

    # -- blocking bodies (worker thread) -----------------------------------

    def _addresses(self, ifname: str) -> list[IPInterface]:
        ipr = self._iproute()
        out: list[IPInterface] = []
        for msg in ipr.get_addr(index=self._index(ifname)):
            if msg["family"] == socket.AF_INET:
                addr = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
            else:
                addr = msg.get("IFA_ADDRESS")
            if addr:
                out.append(ipaddress.ip_interface(f"{addr}/{msg['prefixlen']}"))
        return out

    def _add_address(self, ifname: str, iface: IPInterface) -> bool:
        ipr = self._iproute()
        kwargs: dict[str, Any] = {}
        if iface.version == 6:
            # A VIP must answer at once, not after duplicate address detection.
            kwargs["flags"] = IFA_F_NODAD
        from pyroute2.netlink.exceptions import NetlinkError as _PyNLError

        cached = ifname in self._add_index
        for attempt in (0, 1):
            index = self._add_index.get(ifname)
            if index is None:
                index = self._add_index[ifname] = self._index(ifname)
            try:
                ipr.addr("add", index=index, address=str(iface.ip),
                         prefixlen=iface.network.prefixlen, **kwargs)
            except _PyNLError as e:
                if e.code == errno.EEXIST:
                    return False
                self._add_index.pop(ifname, None)
                if e.code == errno.ENODEV and cached and attempt == 0:
                    continue          # re-created under the same name: look it up again
                raise
            return True
        raise _no_device()          # pragma: no cover (the loop returns or raises)

    def _remove_address(self, ifname: str, iface: IPInterface) -> bool:
        ipr = self._iproute()
        from pyroute2.netlink.exceptions import NetlinkError as _PyNLError

        try:
            ipr.addr("del", index=self._index(ifname), address=str(iface.ip),
                     prefixlen=iface.network.prefixlen)
        except _PyNLError as e:
            if e.code in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
                return False
            raise
        return True

    def _link_up(self, ifname: str) -> bool:
        links = self._iproute().get_links(self._index(ifname))
        if not links:
            raise _no_device()
        flags = links[0]["flags"]
        return bool(flags & IFF_UP) and bool(flags & IFF_LOWER_UP)

    def _mac(self, ifname: str) -> bytes:
        links = self._iproute().get_links(self._index(ifname))
        addr = links[0].get("IFLA_ADDRESS") if links else None
        if not addr:
            raise _no_device()
        return bytes.fromhex(addr.replace(":", ""))

    def _ensure_macvlan(self, parent: str, ifname: str, mac: str) -> bool:
        """A macvlan ``ifname`` on ``parent`` with hardware address ``mac``,
        up; True if it was created now.  The parent answers ARP only for its
        own addresses (arp_ignore = 1) and asks with its own address
        (arp_announce = 2: a reply sent from the VIP would otherwise make an
        ARP request with the VIP as sender and the parent's MAC, which
        re-points the client's entry), so the VIP is known by ``mac`` alone
        (keepalived's use_vmac sets the same)."""
        ipr = self._iproute()
        created = False
        self._add_index.pop(ifname, None)
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            ipr.link("add", ifname=ifname, kind="macvlan", link=self._index(parent),
                     macvlan_mode="private", address=mac)
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                raise _no_device()
            created = True
        else:
            links = ipr.get_links(found[0])
            have = (links[0].get("IFLA_ADDRESS") or "").lower() if links else ""
            if have != mac.lower():
                ipr.link("set", index=found[0], address=mac)
        for dev in (parent, ifname):
            self._sysctl(f"net/ipv4/conf/{dev}/arp_ignore", "1")
            self._sysctl(f"net/ipv4/conf/{dev}/arp_announce", "2")
        ipr.link("set", index=found[0], state="up")
        return created

    def _sysctl(self, key: str, value: str) -> None:
        # /proc/sys/net shows the namespace of the thread that opens it
        with garp.in_netns(self.netns):
            with open(f"/proc/sys/{key}", "w") as f:
                f.write(value)

    def _delete_link(self, ifname: str) -> bool:
        ipr = self._iproute()
        self._add_index.pop(ifname, None)
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return False
        ipr.link("del", index=found[0])
        return True

    # -- routes and rules (worker thread) -----------------------------------

    def _route_replace(self, dst: Any, dev: str | None, via: str | None, table: int,
                       proto: int | None, metric: int | None) -> None:
        kwargs: dict[str, Any] = {"dst": str(dst.network_address), "dst_len": dst.prefixlen,
                                  "family": socket.AF_INET if dst.version == 4 else socket.AF_INET6,
                                  "table": table}
        if dev is not None:
            kwargs["oif"] = self._index(dev)
        if via is not None:
            kwargs["gateway"] = str(via)
        if proto is not None:
            kwargs["proto"] = proto
        if metric is not None:
            kwargs["priority"] = metric
        self._iproute().route("replace", **kwargs)

    def _route_delete(self, dst: Any, table: int, proto: int | None) -> bool:
        from pyroute2.netlink.exceptions import NetlinkError as _PyNLError
        ipr = self._iproute()
        kwargs: dict[str, Any] = {"dst": str(dst.network_address), "dst_len": dst.prefixlen,
                                  "family": socket.AF_INET if dst.version == 4 else socket.AF_INET6,
                                  "table": table}
        if proto is not None:
            # only ours: look first (the kernel's delete ignores proto on some paths)
            if not any(r["proto"] == proto for r in self._route_dump(
                    dst.version, table, None) if r["dst"] == str(dst)):
                return False
            kwargs["proto"] = proto
        try:
            ipr.route("del", **kwargs)
        except _PyNLError as e:
            if e.code in (errno.ESRCH, errno.ENOENT):
                return False
            raise
        return True

    def _route_dump(self, version: int, table: int, proto: int | None) -> list[dict[str, Any]]:
        ipr = self._iproute()
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        names: dict[int, str] = {}
        out: list[dict[str, Any]] = []
        for msg in ipr.get_routes(family=family, table=table):
            rtable = msg.get("RTA_TABLE") or msg["table"]
            if rtable != table or (proto is not None and msg["proto"] != proto):
                continue
            if msg["type"] != 1:          # RTN_UNICAST only (no local/broadcast)
                continue
            dst = msg.get("RTA_DST")
            if dst is None:
                dst = "0.0.0.0" if version == 4 else "::"
            oif = msg.get("RTA_OIF")
            dev = None
            if oif is not None:
                if oif not in names:
                    links = ipr.get_links(oif)
                    names[oif] = links[0].get_attr("IFLA_IFNAME") if links else str(oif)
                dev = names[oif]
            out.append({"dst": str(ipaddress.ip_network(f"{dst}/{msg['dst_len']}")),
                        "via": msg.get("RTA_GATEWAY"), "dev": dev, "proto": msg["proto"],
                        "table": rtable, "metric": msg.get("RTA_PRIORITY")})
        return out

    def _rule_add(self, src: Any, table: int, priority: int | None) -> bool:
        from pyroute2.netlink.exceptions import NetlinkError as _PyNLError
        kwargs: dict[str, Any] = {"table": table, "src": str(src.network_address),
                                  "src_len": src.prefixlen,
                                  "family": socket.AF_INET if src.version == 4 else socket.AF_INET6}
        if priority is not None:
            kwargs["priority"] = priority
        if self._rule_find(src, table):
            return False
        try:
            self._iproute().rule("add", **kwargs)
        except _PyNLError as e:
            if e.code == errno.EEXIST:
                return False
            raise
        return True

    def _rule_find(self, src: Any, table: int) -> list[Any]:
        family = socket.AF_INET if src.version == 4 else socket.AF_INET6
        found = []
        for msg in self._iproute().get_rules(family=family):
            rtable = msg.get("FRA_TABLE") or msg["table"]
            if (rtable == table and msg.get("FRA_SRC") == str(src.network_address)
                    and msg["src_len"] == src.prefixlen):
                found.append(msg)
        return found

    def _rule_delete(self, src: Any, table: int) -> bool:
        msgs = self._rule_find(src, table)
        for msg in msgs:
            self._iproute().rule("del", table=table, src=str(src.network_address),
                                 src_len=src.prefixlen, family=msg["family"],
                                 priority=msg.get("FRA_PRIORITY"))
        return bool(msgs)

    # -- public API (Deferreds) --------------------------------------------

    def addresses(self, ifname: str) -> defer.Deferred:
        """Fires with the list of ``ip_interface`` configured on ``ifname``."""
        return self._run(f"addresses of {ifname}", self._addresses, ifname)

    def add_address(self, ifname: str, iface: IPInterface) -> defer.Deferred:
        """Add ``iface`` on ``ifname``; fires True if added, False if it was
        already there (EEXIST is success).  IPv6 is added with ``nodad``."""
        iface = ipaddress.ip_interface(iface)
        return self._run(f"add {iface} on {ifname}", self._add_address, ifname, iface)

    def prepare_takeover(self, ifname: str) -> defer.Deferred:
        """Make ``ifname`` ready for :meth:`add_and_announce`'s fast path (its
        index, a packet socket and an rtnetlink socket, opened in the worker
        thread); fires True, or False when it cannot be (the interface is
        missing: the worker-thread path stays).  Prepared again after a failure."""
        self._to_prepare.add(ifname)
        d = self._run(f"prepare {ifname} for a takeover", PreparedInterface, ifname, self.netns)

        def ready(prep: PreparedInterface) -> bool:
            old = self._prepared.pop(ifname, None)
            if old is not None:
                old.close()
            if ifname not in self._to_prepare or self._pool is None:
                prep.close()                    # closed meanwhile
                return False
            self._prepared[ifname] = prep
            return True

        d.addCallback(ready)
        d.addErrback(lambda _: False)
        return d

    def _drop_prepared(self, ifname: str) -> None:
        prep = self._prepared.pop(ifname, None)
        if prep is not None:
            prep.close()
            self.fast_fallbacks += 1

    def _reprepare(self, result: Any, ifname: str) -> Any:
        if ifname in self._to_prepare and ifname not in self._prepared and self._pool is not None:
            self.prepare_takeover(ifname)
        return result

    def add_and_announce(self, ifname: str, iface: IPInterface) -> defer.Deferred:
        """:meth:`add_address`, then at once, in the same worker job, one
        :meth:`announce`: the takeover's first gratuitous ARP / NA leaves
        without a round trip through the reactor (and its GIL hand-overs)
        between the two.  Fires ``(added_now, frames_sent)``; a failed
        announcement does not fail the add: ``frames_sent`` is then the
        :class:`NetlinkError` saying why (the caller announces again)."""
        iface = ipaddress.ip_interface(iface)
        prep = self._prepared.get(ifname)
        if prep is not None and self._pool is not None:
            try:
                added, sent = prep.add_and_announce(iface)
            except FastPathUnavailable:
                self._drop_prepared(ifname)     # the worker-thread path below decides
            else:
                self.fast_adds += 1
                if isinstance(sent, OSError):
                    self._drop_prepared(ifname)
                    why, code = _reason(sent)
                    sent = NetlinkError(f"announce {iface.ip} on {ifname}: {why}", code)
                    self._reactor.callLater(0, self._reprepare, None, ifname)
                return defer.succeed((added, sent))

        def both() -> tuple[bool, Any]:
            added = self._add_address(ifname, iface)
            try:
                frames: Any = garp.send_announcement(ifname, iface.ip, self.netns)
            except garp.AnnounceError as e:     # already says "announce X on IF: why"
                frames = NetlinkError(e.strerror, e.errno)
            except Exception as e:
                why, code = _reason(e)
                frames = NetlinkError(f"announce {iface.ip} on {ifname}: {why}", code)
            return added, frames

        d = self._run(f"add {iface} on {ifname}", both)
        if ifname in self._to_prepare:
            d.addBoth(self._reprepare, ifname)
        return d

    def remove_address(self, ifname: str, iface: IPInterface) -> defer.Deferred:
        """Remove ``iface`` from ``ifname``; fires True if removed, False if
        it was not there.  A missing interface is an error."""
        iface = ipaddress.ip_interface(iface)
        return self._run(f"remove {iface} from {ifname}", self._remove_address, ifname, iface)

    def link_index(self, ifname: str) -> defer.Deferred:
        """Fires with the interface index of ``ifname``."""
        return self._run(f"index of {ifname}", self._index, ifname)

    def link_up(self, ifname: str) -> defer.Deferred:
        """Fires True when ``ifname`` is administratively up *and* has
        carrier (IFF_UP and IFF_LOWER_UP)."""
        return self._run(f"state of {ifname}", self._link_up, ifname)

    def mac_address(self, ifname: str) -> defer.Deferred:
        """Fires with the 6-byte hardware address of ``ifname``."""
        return self._run(f"mac of {ifname}", self._mac, ifname)

    def ensure_macvlan(self, parent: str, ifname: str, mac: str) -> defer.Deferred:
        """Create (if missing) and bring up macvlan ``ifname`` on ``parent``
        with address ``mac`` (``"00:00:5e:00:01:33"``); fires True if created."""
        return self._run(f"macvlan {ifname} ({mac}) on {parent}", self._ensure_macvlan,
                         parent, ifname, mac)

    def delete_link(self, ifname: str) -> defer.Deferred:
        """Delete interface ``ifname``; fires True if deleted, False if missing."""
        return self._run(f"delete {ifname}", self._delete_link, ifname)

    def announce(self, ifname: str, ip: Any) -> defer.Deferred:
        """Send one gratuitous ARP (request + reply) or unsolicited NA for
        ``ip`` on ``ifname`` from this namespace; fires with frames sent."""
        addr = ip.ip if isinstance(ip, (ipaddress.IPv4Interface, ipaddress.IPv6Interface)) else ip
        return self._run(f"announce {addr} on {ifname}", garp.send_announcement,
                         ifname, addr, self.netns)

    def route_replace(self, prefix: Any, *, dev: str | None = None, via: str | None = None,
                      table: int = 254, proto: int | None = None,
                      metric: int | None = None) -> defer.Deferred:
        """``ip route replace PREFIX [via VIA] [dev DEV] table TABLE [proto P]``:
        adds the route or replaces the one with the same prefix (and metric)
        in ``table``; fires None."""
        try:
            dst = ipaddress.ip_network(prefix, strict=True)
        except ValueError as e:
            return defer.fail(NetlinkError(f"route {prefix}: {e}"))
        where = f"route {dst}" + (f" via {via}" if via else "") + (f" dev {dev}" if dev else "")
        return self._run(f"replace {where} table {table}", self._route_replace, dst, dev, via,
                         table, proto, metric)

    def route_delete(self, prefix: Any, *, table: int = 254,
                     proto: int | None = None) -> defer.Deferred:
        """Delete the route to ``prefix`` in ``table`` (with ``proto``: only a
        route of that protocol); fires True if one was deleted, False if none."""
        try:
            dst = ipaddress.ip_network(prefix, strict=True)
        except ValueError as e:
            return defer.fail(NetlinkError(f"route {prefix}: {e}"))
        return self._run(f"delete route {dst} table {table}", self._route_delete, dst, table, proto)

    def routes(self, *, table: int = 254, proto: int | None = None,
               version: int = 4) -> defer.Deferred:
        """Fires with the unicast routes of ``table`` (only ``proto``'s if
        given) as ``[{"dst", "via", "dev", "proto", "table", "metric"}]``."""
        return self._run(f"routes of table {table}", self._route_dump, version, table, proto)

    def rule_add(self, source: Any, table: int, *, priority: int | None = None) -> defer.Deferred:
        """``ip rule add from SOURCE lookup TABLE [priority P]``; fires True if
        added, False if such a rule was already there."""
        try:
            src = ipaddress.ip_network(source, strict=True)
        except ValueError as e:
            return defer.fail(NetlinkError(f"rule from {source}: {e}"))
        return self._run(f"rule from {src} lookup {table}", self._rule_add, src, table, priority)

    def rule_delete(self, source: Any, table: int) -> defer.Deferred:
        """Delete every ``from SOURCE lookup TABLE`` rule; fires True if any was there."""
        try:
            src = ipaddress.ip_network(source, strict=True)
        except ValueError as e:
            return defer.fail(NetlinkError(f"rule from {source}: {e}"))
        return self._run(f"delete rule from {src} lookup {table}", self._rule_delete, src, table)
