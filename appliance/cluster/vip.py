"""Virtual IP takeover: add/remove VIP addresses and announce them.

:class:`VIPManager` is the side-effect end of ownership: the cluster tells
it ``acquire(name, reason)`` when this node becomes owner of a VIP and
``release(name, reason)`` when it stops being owner.  It

* adds the address to the configured interface (via :class:`Netlink`, so
  in a dedicated thread, never on the reactor),
* announces it at once and ``announce_count - 1`` more times
  ``announce_interval_s`` apart (gratuitous ARP request + reply for IPv4,
  unsolicited neighbour advertisement for IPv6), so switches and hosts move
  their caches to this node's MAC without waiting for ARP timeouts,
* while held, every ``refresh_interval_s`` makes sure the address is still
  there (re-adding it if something removed it) and announces it again,
* on release stops all of that and removes the address.

A VIP with ``vmac = VRID`` (keepalived's ``use_vmac``) lives on a macvlan
``vrrp.<VRID>`` over its interface with the VRRP MAC 00:00:5e:00:01:<VRID>:
acquire creates it (up) and adds the address there, announcements leave
from it, release deletes it.  Every owner answers with the same MAC, so a
client's ARP entry stays right across a takeover (only the switch learns the
MAC's new port, from the announcement); a client that missed the GARP still
reaches the new owner.

Every Deferred it returns fires (never fails): ``True`` on success,
``False`` when the operation failed, which is logged with the reason and
counted in ``stats["errors"]``.  Netlink operations are serialised in one
thread in call order, and a generation number per VIP makes a late
completion of a superseded acquire (say, acquire then release before the
add came back) a no-op, so the last call always wins.  (A takeover's first
announcement leaves in the same netlink job as the add, so a superseded
acquire may have sent that one; the release that superseded it runs right
after in the same thread, and the next owner announces again.)
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.net.netlink import Netlink, NetlinkError


class VIPManager(Service):
    """Adds, announces and removes this node's virtual IP addresses."""

    name = "vip"
    log = Logger(namespace="appliance.cluster.vip")

    def __init__(self, reactor: Any, vips: Iterable[Any], *, netns: str | None = None,
                 announce_count: int = 3, announce_interval_s: float = 0.05,
                 refresh_interval_s: float = 15.0, netlink: Any = None):
        self._reactor = reactor
        self._vips: dict[str, Any] = {}
        for vip in vips:
            if vip.name in self._vips:
                raise ValueError(f"duplicate VIP name {vip.name!r}")
            self._vips[vip.name] = vip
        self.netns = netns
        self.announce_count = max(1, int(announce_count))
        self.announce_interval_s = float(announce_interval_s)
        self.refresh_interval_s = float(refresh_interval_s)
        self._netlink = netlink if netlink is not None else Netlink(
            reactor, netns=netns, name=f"vip-netlink-{netns or 'host'}")
        self._held: set[str] = set()
        self._wanted: dict[str, bool] = {}
        self._gen: dict[str, int] = {}
        self._timers: dict[str, list[Any]] = {}
        self._refreshers: dict[str, LoopingCall] = {}
        self._inflight: set[defer.Deferred] = set()
        self.stats: dict[str, int] = {"acquired": 0, "released": 0,
                                      "announcements": 0, "errors": 0,
                                      "readded": 0}

    # -- queries -------------------------------------------------------------

    def held(self) -> set[str]:
        """Names of the VIPs this manager believes it holds (added, not released)."""
        return set(self._held)

    def vip(self, name: str) -> Any:
        return self._vips[name]

    def interfaces_down(self) -> defer.Deferred:
        """Fire with the sorted names of VIP interfaces that are down (no
        carrier, or missing): a node with one cannot serve those clients."""
        names = sorted({v.interface for v in self._vips.values()})

        def check(ifname: str) -> defer.Deferred:
            d = self._netlink.link_up(ifname)
            d.addErrback(lambda _f: False)     # missing interface counts as down
            return d.addCallback(lambda up: None if up else ifname)

        d = defer.gatherResults([check(n) for n in names])
        return d.addCallback(lambda down: sorted(n for n in down if n))

    # -- service -------------------------------------------------------------

    def startService(self) -> defer.Deferred:
        """Start the netlink thread, then remove configured VIP addresses left
        on their interfaces (by a crashed earlier run) that we do not hold."""
        super().startService()
        self._netlink.start()
        steps = [self._track(self._remove_stale())]
        prepare = getattr(self._netlink, "prepare_takeover", None)
        if prepare is not None:
            # the takeover's add + first announcement from the reactor thread
            # (appliance.net.takeover); an interface that cannot be prepared
            # keeps the worker-thread path (prepare never fails)
            for ifname in sorted({vip.interface for vip in self._vips.values()
                                  if self.vmac_of(vip) is None}):
                steps.append(self._track(prepare(ifname)))
        d = defer.gatherResults(steps, consumeErrors=True)
        d.addErrback(lambda f: f.value.subFailure)     # the first failure, unwrapped
        return d.addCallback(lambda _: None)

    def stopService(self) -> defer.Deferred:
        """Release every held VIP, wait for pending work, stop the thread."""
        super().stopService()
        names = sorted(self._held | {n for n, w in self._wanted.items() if w})
        ds = [self.release(n, reason="service stopping") for n in names]

        def settle(_: Any) -> defer.Deferred:
            pending = list(self._inflight)
            return defer.DeferredList(pending, consumeErrors=True)

        d = defer.DeferredList(ds, consumeErrors=True)
        d.addCallback(settle)
        d.addCallback(lambda _: self._netlink.close())
        d.addErrback(self._log_failure, "stop", None, "service stopping")
        d.addCallback(lambda _: None)
        return d

    # -- acquire / release ---------------------------------------------------

    @staticmethod
    def vmac_of(vip: Any) -> tuple[str, str] | None:
        """``(macvlan name, MAC)`` of a VIP with ``vmac``, else None."""
        vrid = getattr(vip, "vmac", None)
        if vrid is None:
            return None
        return f"vrrp.{vrid}", f"00:00:5e:00:01:{vrid:02x}"

    def ifname(self, name: str) -> str:
        """The interface VIP ``name``'s address lives on (its macvlan with vmac)."""
        vip = self._vips[name]
        vm = self.vmac_of(vip)
        return vm[0] if vm else vip.interface

    def _add(self, vip: Any, announce: bool = False) -> defer.Deferred:
        """Add the address (on its macvlan with vmac); fires ``added_now``,
        or with ``announce`` (the takeover) ``(added_now, frames or error)``:
        the first announcement then leaves from the same netlink job as the
        add (:meth:`Netlink.add_and_announce`), not one reactor turn later."""
        vm = self.vmac_of(vip)
        ifname = vm[0] if vm else vip.interface
        both = getattr(self._netlink, "add_and_announce", None) if announce else None

        def add(created: bool = False) -> defer.Deferred:
            if both is not None:
                d = both(ifname, vip.address)
                return d.addCallback(lambda r: (r[0] or created, r[1]))
            d = self._netlink.add_address(ifname, vip.address)
            return d.addCallback(lambda added: added or created)

        if vm is None:
            return add()
        return self._netlink.ensure_macvlan(vip.interface, vm[0], vm[1]).addCallback(add)

    def acquire(self, name: str, reason: str = "") -> defer.Deferred:
        """Add VIP ``name`` and announce it; fires True/False (never fails)."""
        vip = self._vips.get(name)
        if vip is None:
            return self._unknown("acquire", name, reason)
        gen = self._next_gen(name)
        self._wanted[name] = True
        d = self._add(vip, announce=True)
        d.addCallback(self._added, name, gen, reason)
        d.addErrback(self._op_failed, "add", name, reason)
        return self._track(d)

    def release(self, name: str, reason: str = "") -> defer.Deferred:
        """Stop announcing VIP ``name`` and remove it; fires True/False.
        Releasing a VIP that is not there is fine (logged, True)."""
        vip = self._vips.get(name)
        if vip is None:
            return self._unknown("release", name, reason)
        self._next_gen(name)
        self._wanted[name] = False
        was_held = name in self._held
        self._held.discard(name)
        vm = self.vmac_of(vip)
        if vm is not None:
            d = self._netlink.delete_link(vm[0])      # the address goes with it
        else:
            d = self._netlink.remove_address(vip.interface, vip.address)
        d.addCallback(self._removed, name, was_held, reason)
        d.addErrback(self._op_failed, "remove", name, reason)
        return self._track(d)

    # -- internals -----------------------------------------------------------

    def _track(self, d: defer.Deferred) -> defer.Deferred:
        self._inflight.add(d)

        def done(result: Any) -> Any:
            self._inflight.discard(d)
            return result

        d.addBoth(done)
        return d

    def _next_gen(self, name: str) -> int:
        """Supersede whatever ran for ``name``: cancel its timers and refresh."""
        gen = self._gen.get(name, 0) + 1
        self._gen[name] = gen
        for call in self._timers.pop(name, []):
            if call.active():
                call.cancel()
        loop = self._refreshers.pop(name, None)
        if loop is not None and loop.running:
            loop.stop()
        return gen

    def _current(self, name: str, gen: int) -> bool:
        return self._gen.get(name) == gen

    def _fields(self, name: str, reason: str) -> dict[str, Any]:
        vip = self._vips[name]
        return {"vip": name, "address": str(vip.address), "interface": vip.interface,
                "reason": reason, "why": f": {reason}" if reason else "",
                "netns": self.netns}

    def _added(self, added_now: Any, name: str, gen: int, reason: str) -> bool:
        announced: Any = None
        if isinstance(added_now, tuple):       # add_and_announce: the first GARP is out
            added_now, announced = added_now
        if not self._current(name, gen):
            # Released (or re-acquired) while the add was in flight: the
            # later call owns the outcome; its remove runs after our add.
            return False
        fields = self._fields(name, reason)
        if name not in self._held:
            self._held.add(name)
            self.stats["acquired"] += 1
        if added_now:
            self.log.info("vip {vip} {address} added on {interface}{why}",
                          event_type="vip_added", **fields)
        else:
            self.log.info("vip {vip} {address} already present on {interface}{why}",
                          event_type="vip_added", **fields)
        first_sent = isinstance(announced, int)
        if first_sent:
            self.stats["announcements"] += 1
        elif announced is not None:
            self._log_failure(Failure(announced), "announce", name, "")
        self._start_announcing(name, gen, first_sent=first_sent)
        return True

    def _start_announcing(self, name: str, gen: int, first_sent: bool = False) -> None:
        if not first_sent:
            self._announce(name, gen)
        timers = self._timers.setdefault(name, [])
        for i in range(1, self.announce_count):
            timers.append(self._reactor.callLater(
                i * self.announce_interval_s, self._announce, name, gen))
        if self.refresh_interval_s > 0:
            loop = LoopingCall(self._refresh, name, gen)
            loop.clock = self._reactor
            self._refreshers[name] = loop
            d = loop.start(self.refresh_interval_s, now=False)
            d.addErrback(self._log_failure, "refresh", name, "")

    def _announce(self, name: str, gen: int) -> defer.Deferred | None:
        if not self._current(name, gen) or name not in self._held:
            return None
        vip = self._vips[name]
        d = self._netlink.announce(self.ifname(name), vip.address)

        def sent(_: Any) -> bool:
            self.stats["announcements"] += 1
            self.log.debug("vip {vip} {address} announced on {interface}",
                           event_type="vip_announced", **self._fields(name, ""))
            return True

        d.addCallbacks(sent, self._op_failed, errbackArgs=("announce", name, ""))
        return self._track(d)

    def _refresh(self, name: str, gen: int) -> None:
        """Periodic, while held: make sure the address is there, re-announce.
        Never raises (a LoopingCall stops for good on the first exception)."""
        try:
            if not self._current(name, gen) or name not in self._held:
                return
            vip = self._vips[name]
            d = self._add(vip)

            def check(added_now: bool) -> None:
                if added_now and self._current(name, gen):
                    self.stats["readded"] += 1
                    self.log.warn("vip {vip} {address} was missing from {interface}: re-added",
                                  event_type="vip_readded", **self._fields(name, "refresh"))
                self._announce(name, gen)

            d.addCallback(check)
            d.addErrback(self._op_failed, "refresh", name, "")
            self._track(d)
        except Exception:
            self._log_failure(Failure(), "refresh", name, "")

    def _removed(self, removed: bool, name: str, was_held: bool, reason: str) -> bool:
        fields = self._fields(name, reason)
        if removed or was_held:
            self.stats["released"] += 1
        if removed:
            self.log.info("vip {vip} {address} removed from {interface}{why}",
                          event_type="vip_removed", **fields)
        else:
            self.log.info("vip {vip} {address} not present on {interface}, nothing to remove{why}",
                          event_type="vip_removed", **fields)
        return True

    def _remove_stale(self) -> defer.Deferred:
        by_interface: dict[str, list[str]] = {}
        for name, vip in self._vips.items():
            by_interface.setdefault(vip.interface, []).append(name)
        ds = []
        for name, vip in self._vips.items():
            vm = self.vmac_of(vip)
            if vm is not None and not self._wanted.get(name):
                d = self._netlink.delete_link(vm[0])       # a crashed run's macvlan
                d.addCallback(lambda gone, n=name: gone and self._stale_removed(
                    True, n, self._vips[n].address))
                d.addErrback(self._op_failed, "stale remove", name, "not held at start")
                ds.append(d)
        for ifname, names in by_interface.items():
            d = self._netlink.addresses(ifname)
            d.addCallback(self._got_addresses, ifname, names)
            d.addErrback(self._op_failed, "stale check", names[0],
                         f"start (interface {ifname}, VIPs {', '.join(names)})")
            ds.append(d)
        d = defer.DeferredList(ds, consumeErrors=True)
        d.addCallback(lambda _: None)
        return d

    def _got_addresses(self, present: list[Any], ifname: str, names: list[str]) -> defer.Deferred:
        ds = []
        for name in names:
            if self._wanted.get(name):
                continue  # acquired meanwhile: not stale
            want_ip = ipaddress.ip_interface(self._vips[name].address).ip
            for iface in present:
                if iface.ip != want_ip:
                    continue
                d = self._netlink.remove_address(ifname, iface)
                d.addCallback(self._stale_removed, name, iface)
                d.addErrback(self._op_failed, "stale remove", name, "not held at start")
                ds.append(d)
        return defer.DeferredList(ds, consumeErrors=True)

    def _stale_removed(self, removed: bool, name: str, iface: Any) -> None:
        if removed:
            fields = self._fields(name, "stale, not held at start")
            fields["address"] = str(iface)
            self.log.info("vip {vip} {address} removed from {interface}{why}",
                          event_type="vip_removed", **fields)

    def _unknown(self, op: str, name: str, reason: str) -> defer.Deferred:
        self.stats["errors"] += 1
        self.log.error("vip {vip}: cannot {op}, no such VIP configured ({reason})",
                       vip=name, op=op, reason=reason, event_type="vip_error")
        return defer.succeed(False)

    def _op_failed(self, failure: Failure, op: str, name: str, reason: str) -> bool:
        self._log_failure(failure, op, name, reason)
        return False

    def _log_failure(self, failure: Failure, op: str, name: str | None, reason: str) -> None:
        self.stats["errors"] += 1
        if name is not None and name in self._vips:
            fields = self._fields(name, reason)
        else:
            fields = {"vip": name, "address": None, "interface": None, "reason": reason,
                      "why": f" ({reason})" if reason else "", "netns": self.netns}
        if failure.check(NetlinkError, OSError):
            self.log.error("vip {vip} {address}: {op} failed: {error}",
                           op=op, error=str(failure.value), event_type="vip_error", **fields)
        else:
            self.log.failure("vip {vip} {address}: {op} failed unexpectedly",
                             failure=failure, op=op, event_type="vip_error", **fields)
