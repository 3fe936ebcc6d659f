"""Local health: the flags this node advertises in its heartbeats.

Node-wide flags (``maintenance``, ``interface_down`` while a VIP interface
has no carrier, ``store_down``) make the node unable for every resource;
``unable:<resource>`` (a VIP whose address could not be added) only for
that resource, until its retry time.

Per service (review M6): ``service_failed:<name>`` while the node's service
``name`` failed, and ``unable:<resource>`` for every resource colocated with
it (a VIP whose ``service`` names it, a resource that service registered
with ``kind = name``): the peers exclude this node for those resources only,
and so does this node's own election (:meth:`LocalHealth.unable_resources`),
so they move to a node whose service runs; everything else stays.

Two sources report, each set and cleared on its own: node.py (``source =
"start"``: the start failed / the service started), and the service itself
at any time (``source = "service"``, the default of
``ClusterManager.service_failed``: e.g. ``("sip", "syncing")`` until its
bindings are synced, then ``("sip", None)``).  The service is failed while
either source says so, so a successful start does not clear what the
service reported about itself.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger

from appliance.cluster.heartbeat import UNABLE_FLAGS

_log = Logger(namespace="appliance.cluster")

LINK_CHECK_S = 0.5         # how often VIP interfaces are checked for carrier


class LocalHealth:
    def __init__(self, clock, *, store: Callable, vip_manager: Callable,
                 changed: Callable[[], None]):
        self.clock = clock
        self._store, self._vip_manager = store, vip_manager   # read at call time
        self.changed = changed
        self.flags_set: set[str] = set()
        self.maintenance = False
        self.unable: dict[str, float] = {}     # resource -> retry time (failed VIP add)
        self.interfaces_down: list[str] = []
        self.failed_services: dict[str, str] = {}   # service -> why it failed (all sources)
        self._reports: dict[str, dict[str, str]] = {}   # service -> {source: why}
        self.colocated: dict[str, str] = {}         # resource -> the service it follows
        self.kinds: Callable[[], dict[str, str]] = dict   # resource -> registering service
        self._link_check_at = 0.0
        self._link_checking = False

    def flags(self) -> tuple[str, ...]:
        flags = set(self.flags_set)
        flags.update(f"unable:{name}" for name in self.unable)
        flags.update(f"service_failed:{name}" for name in self.failed_services)
        flags.update(f"unable:{name}" for name in self.service_unable())
        if self.maintenance:
            flags.add("maintenance")
        store = self._store()
        if store is not None and not getattr(store, "healthy", True):
            flags.add("store_down")
        return tuple(sorted(flags))

    def service_failed(self, name: str, reason: str | None, source: str = "service") -> bool:
        """The node's service ``name`` failed (``reason``) or is fine again
        (None), as ``source`` sees it; True if the service's state changed.
        ``source=None`` with ``reason=None`` clears every source (the
        service is gone from this node)."""
        reports = self._reports.setdefault(name, {})
        if reason is None:
            if source is None:
                reports.clear()
            else:
                reports.pop(source, None)
        else:
            reports[source or "service"] = reason
        if not reports:
            del self._reports[name]
        why = "; ".join(reports[k] for k in sorted(reports)) if reports else None
        before = self.failed_services.get(name)
        if why == before:
            return False
        if why is None:
            del self.failed_services[name]
            _log.info("service {service} runs again: resources that follow it may come back "
                      "({resources})", service=name,
                      resources=", ".join(self._following(name)) or "none",
                      health_change={"flag": f"service_failed:{name}", "reason": None})
        else:
            self.failed_services[name] = why
            if before is None:
                _log.warn("service {service} failed ({why}): flagged service_failed:{service}; "
                          "resources that follow it move to a peer ({resources})",
                          service=name, why=why,
                          resources=", ".join(self._following(name)) or "none",
                          health_change={"flag": f"service_failed:{name}", "reason": why})
            else:
                return True     # a new reason while still failed: same flags, nothing to tell
        self.changed()
        return True

    def _following(self, service: str) -> list[str]:
        kinds = self.kinds()
        return sorted({r for r, s in self.colocated.items() if s == service}
                      | {r for r, k in kinds.items() if k == service})

    def service_unable(self) -> set[str]:
        """Resources whose service failed on this node."""
        out: set[str] = set()
        for service in self.failed_services:
            out.update(self._following(service))
        return out

    def unable_resources(self) -> set[str]:
        """Every resource this node must not own while another can: failed
        VIP adds and resources whose service failed here."""
        return set(self.unable) | self.service_unable()

    def able(self) -> bool:
        return not any(f in UNABLE_FLAGS for f in self.flags())

    def check_links(self):
        """Flag ``interface_down`` while a VIP's interface has no carrier."""
        now = self.clock.seconds()
        checker = getattr(self._vip_manager(), "interfaces_down", None)
        if checker is None or self._link_checking or now < self._link_check_at:
            return
        self._link_check_at = now + LINK_CHECK_S
        self._link_checking = True

        def got(down):
            self._link_checking = False
            if down != self.interfaces_down:
                _log.warn("client-facing interfaces down: {down}; this node {verdict}",
                          down=", ".join(down) or "none",
                          verdict="cannot serve" if down else "can serve again")
                self.interfaces_down = down
                if down:
                    self.flags_set.add("interface_down")
                else:
                    self.flags_set.discard("interface_down")
                self.changed()

        def failed(f):
            self._link_checking = False
            _log.warn("interface check failed: {why}", why=f.getErrorMessage())

        d = defer.maybeDeferred(checker).addCallbacks(got, failed)
        d.addErrback(lambda f: _log.failure("interface check bookkeeping", failure=f))

    def expired_unable(self) -> list[str]:
        """Resources whose retry time came (their flag is dropped)."""
        now = self.clock.seconds()
        due = [name for name, until in self.unable.items() if now >= until]
        for name in due:
            del self.unable[name]
        return due
