"""Route injection for the encapsulation services: kernel routes and rules
through :mod:`appliance.net.netlink` (pyroute2 in its one thread; the reactor
never waits on netlink).

:class:`RouteInjector` owns one routing table (``table``, default 254 =
``main``) and marks every route it writes with one protocol number
(``proto``), so it can list and remove *its* routes and never touches
anybody else's (the kernel's connected routes, a routing daemon's, an
operator's).  ``inject`` has *replace* semantics (``ip route replace``): a
route to the same prefix in the table is swapped in one netlink message, so
moving a slice from one DN to another never leaves a moment without a route.

Protocol numbers (``/etc/iproute2/rt_protos``; 0-4 are the kernel's, 12 is
BIRD, 186-192 other daemons): ``PROTO_ENCAP`` (0xe4) for a DN's own routes
(the EN addresses and slices it serves, which BIRD's ``protocol kernel {
learn; }`` picks up as alien routes), ``PROTO_ESR`` (0xe5) for the ESR route
agent's routes towards the DNs.

``inject`` fires with the latency in seconds from the call to the kernel's
acknowledgement (what the ``esr`` service reports as its netlink share of the
mapping-change-to-route latency).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from appliance.net.netlink import Netlink, NetlinkError

PROTO_ENCAP = 0xE4
PROTO_ESR = 0xE5
MAIN_TABLE = 254

_log = Logger(namespace="services.encap.routes")


def as_prefix(prefix: str) -> str:
    """``"10.200.0.5"`` -> ``"10.200.0.5/32"``; a network stays itself (host
    bits set raise ``ValueError``)."""
    if "/" not in str(prefix):
        ip = ipaddress.ip_address(prefix)
        return f"{ip}/{ip.max_prefixlen}"
    return str(ipaddress.ip_network(prefix, strict=True))


class RouteInjector:
    """Routes and rules in one table, marked with one protocol number.

    ``netlink``: a :class:`~appliance.net.netlink.Netlink` (or anything with
    its route/rule methods, e.g. a test fake); ``None`` builds one for the
    host namespace (or ``netns``).  :meth:`start` starts it, :meth:`close`
    closes it if this object built it.  Every method returns a Deferred and
    never raises synchronously; failures are :class:`NetlinkError`.
    """

    def __init__(self, reactor, netlink=None, table: int = MAIN_TABLE, *,
                 proto: int = PROTO_ENCAP, netns: str | None = None):
        self.reactor = reactor
        self._own = netlink is None
        self.netlink = netlink if netlink is not None else Netlink(
            reactor, netns, name=f"routes-{netns or 'host'}")
        self.table = int(table)
        self.proto = int(proto)
        #: prefix -> {"dev", "via"} as last injected by this object
        self.injected: dict[str, dict[str, Any]] = {}
        self.stats = {"injected": 0, "withdrawn": 0, "failures": 0, "rules": 0,
                      "latency_s_sum": 0.0, "latency_s_max": 0.0}

    def start(self) -> None:
        start = getattr(self.netlink, "start", None)
        if start is not None:
            start()

    def close(self) -> defer.Deferred:
        if self._own:
            return self.netlink.close()
        return defer.succeed(None)

    # ------------------------------------------------------------------
    def inject(self, prefix: str, dev: str | None = None,
               via: str | None = None) -> defer.Deferred:
        """Install (or replace) the route to ``prefix`` (an address is a host
        route) out of ``dev`` and/or via ``via``; fires with the latency in s."""
        try:
            dst = as_prefix(prefix)
            if dev is None and via is None:
                raise ValueError("a route needs dev or via")
        except ValueError as e:
            return defer.fail(NetlinkError(f"inject {prefix}: {e}"))
        started = self.reactor.seconds()
        d = self.netlink.route_replace(dst, dev=dev, via=via, table=self.table, proto=self.proto)

        def done(_):
            latency = self.reactor.seconds() - started
            self.injected[dst] = {"dev": dev, "via": via}
            self.stats["injected"] += 1
            self.stats["latency_s_sum"] += latency
            self.stats["latency_s_max"] = max(self.stats["latency_s_max"], latency)
            return latency
        d.addCallbacks(done, self._failed)
        return d

    def withdraw(self, prefix: str) -> defer.Deferred:
        """Remove this injector's route to ``prefix`` (only one carrying our
        protocol number); fires True if there was one, False otherwise."""
        try:
            dst = as_prefix(prefix)
        except ValueError as e:
            return defer.fail(NetlinkError(f"withdraw {prefix}: {e}"))
        d = self.netlink.route_delete(dst, table=self.table, proto=self.proto)

        def done(removed):
            self.injected.pop(dst, None)
            if removed:
                self.stats["withdrawn"] += 1
            return removed
        d.addCallbacks(done, self._failed)
        return d

    def rule_from(self, source_prefix: str, table: int, *,
                  priority: int | None = None) -> defer.Deferred:
        """``ip rule add from SOURCE lookup TABLE`` (once: an existing
        identical rule is left as it is); fires True if added."""
        d = self.netlink.rule_add(source_prefix, int(table), priority=priority)

        def done(added):
            if added:
                self.stats["rules"] += 1
            return added
        d.addCallbacks(done, self._failed)
        return d

    def rule_remove(self, source_prefix: str, table: int) -> defer.Deferred:
        """Remove the ``from SOURCE lookup TABLE`` rule(s); fires True if any."""
        return self.netlink.rule_delete(source_prefix, int(table)).addErrback(self._failed)

    def owned(self, version: int = 4) -> defer.Deferred:
        """Fires with ``{prefix: {"dev", "via"}}``: the routes in our table
        that carry our protocol number (what a restart finds in the kernel)."""
        d = self.netlink.routes(table=self.table, proto=self.proto, version=version)
        d.addCallback(lambda rows: {r["dst"]: {"dev": r["dev"], "via": r["via"]} for r in rows})
        return d

    def _failed(self, failure):
        self.stats["failures"] += 1
        return failure
