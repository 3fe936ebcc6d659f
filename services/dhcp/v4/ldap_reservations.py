"""Static host reservations from an LDAP directory (``[services.dhcp4.ldap]``).

Entries such as::

    dn: cn=printer1,ou=hosts,dc=example,dc=net
    objectClass: device / ieee802Device / ipHost
    macAddress: 52:54:00:12:34:56
    ipHostNumber: 10.9.0.50

are read with one paged search (``filter``, ``mac_attribute``,
``ip_attribute``) at start and every ``refresh_interval_s``.  ldap3 is
synchronous, so the search runs in a thread (``deferToThread``); the
servers are tried in order, each with ``timeout_s`` for connecting *and*
for every answer (a server that accepts TCP but never answers counts as
down -- ldap3's ServerPool only fails over when the socket cannot open).

The reactor side (:class:`LdapReservations`) turns entries into
``(mac, IPv4Address)`` pairs (malformed ones are counted and logged, never
fatal), hands the whole set to the lease store and keeps the last good set
in the state store (``dhcp4:ldap-reservations``), so a node that starts
while the directory is down still honours the reservations it last saw.
When every server fails it keeps the current set, counts the error and
retries with backoff (5 s doubling up to ``refresh_interval_s``).
"""

from __future__ import annotations

import json
import math
import struct
from ipaddress import IPv4Address
from typing import Any, Callable

from twisted.internet import defer, threads
from twisted.logger import Logger

from services.dhcp.v4.config import LdapSettings, normalize_mac

_log = Logger(namespace="services.dhcp4.ldap")
CACHE_KEY = "dhcp4:ldap-reservations"


class LdapUnavailable(Exception):
    """No configured LDAP server answered the search."""


def _first(value: Any) -> str | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return None if value is None else str(value)


def fetch_entries(settings: LdapSettings, password: str | None) -> tuple[str, list[dict]]:
    """Thread: ``(server url, [{"dn", "mac", "ip"}])`` from the first server
    that answers; raises :class:`LdapUnavailable` naming every failure."""
    import ldap3
    from ldap3.core.exceptions import LDAPException

    problems = []
    for url in settings.servers:
        conn = None
        try:
            server = ldap3.Server(url, connect_timeout=settings.timeout_s, get_info=ldap3.NONE)
            # ldap3 packs receive_timeout into SO_RCVTIMEO as whole seconds
            conn = ldap3.Connection(server, user=settings.bind_dn, password=password,
                                    receive_timeout=max(1, math.ceil(settings.timeout_s)),
                                    auto_bind=True,
                                    raise_exceptions=True, read_only=True)
            entries = conn.extend.standard.paged_search(
                settings.base_dn, settings.filter, ldap3.SUBTREE,
                attributes=[settings.mac_attribute, settings.ip_attribute],
                paged_size=500, generator=False)
            out = []
            for e in entries:
                if e.get("type") != "searchResEntry":
                    continue
                attrs = e.get("attributes", {})
                out.append({"dn": e.get("dn", "?"), "mac": _first(attrs.get(settings.mac_attribute)),
                            "ip": _first(attrs.get(settings.ip_attribute))})
            return url, out
        except (LDAPException, OSError, ValueError, TypeError, struct.error) as e:
            problems.append(f"{url}: {type(e).__name__}: {e}")
        finally:
            if conn is not None:
                try:
                    conn.unbind()
                except Exception:       # a dead connection: nothing to release
                    pass
    raise LdapUnavailable("; ".join(problems) or "no LDAP servers configured")


def parse_entries(entries: list[dict]) -> tuple[list[tuple[str, IPv4Address]], list[str]]:
    """``([(mac, address)], [problems])``: malformed entries are reported, not used."""
    good, bad = [], []
    for e in entries:
        mac = normalize_mac(e.get("mac") or "")
        try:
            ip = IPv4Address((e.get("ip") or "").strip())
        except ValueError:
            ip = None
        if mac is None or ip is None:
            bad.append(f"{e.get('dn', '?')}: mac {e.get('mac')!r}, ip {e.get('ip')!r}")
            continue
        good.append((mac, ip))
    return good, bad


class LdapReservations:
    """Keeps the lease store's LDAP reservations fresh (see the module docstring).

    ``apply(pairs)`` receives the whole current set and returns what it
    could not place (e.g. addresses outside every subnet) as a list of texts.
    """

    MIN_RETRY_S = 5.0

    def __init__(self, reactor, settings: LdapSettings, apply: Callable[[list], list], *,
                 store=None, fetch: Callable = fetch_entries,
                 run_in_thread: Callable | None = None):
        self.reactor = reactor
        self.settings = settings
        self.apply = apply
        self.store = store
        self.fetch = fetch
        self.run_in_thread = run_in_thread or (
            lambda f, *a: threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *a))
        self._call = None
        self._failures = 0
        self._running = False
        self.stats: dict[str, Any] = {"refreshes": 0, "errors": 0, "entries": 0, "invalid": 0,
                                      "unplaced": 0, "server": None, "last_ok": None,
                                      "last_error": None, "source": None}

    # -- life cycle ----------------------------------------------------------
    def start(self) -> defer.Deferred:
        """Apply the cached set (if any), then refresh from LDAP in the background."""
        self._running = True
        d = self._load_cached()
        d.addBoth(lambda _: self._schedule(0))
        return d

    def stop(self) -> None:
        self._running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self, delay: float) -> None:
        if not self._running:
            return
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = self.reactor.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._call = None
        self.refresh().addErrback(self._refresh_broke)

    def _refresh_broke(self, failure) -> None:
        if failure.check(LdapUnavailable):
            return                      # logged and rescheduled by _failed
        _log.failure("dhcp4 ldap: applying the reservations failed", failure=failure)
        self.stats["errors"] += 1
        self.stats["last_error"] = failure.getErrorMessage()
        self._schedule(self.MIN_RETRY_S)

    # -- one refresh ---------------------------------------------------------
    def refresh(self) -> defer.Deferred:
        """Search now; fires with the number of reservations applied (or the failure)."""
        try:
            password = self.settings.password()
        except OSError as e:
            return self._failed(f"cannot read password_file: {e}")
        d = self.run_in_thread(self.fetch, self.settings, password)
        d.addCallbacks(self._fetched, lambda f: self._failed(f.getErrorMessage()))
        return d

    def _fetched(self, result) -> int:
        url, entries = result
        pairs, bad = parse_entries(entries)
        for problem in bad:
            _log.warn("dhcp4 ldap: entry ignored ({problem})", problem=problem)
        unplaced = self.apply(pairs) or []
        for problem in unplaced:
            _log.warn("dhcp4 ldap: reservation not used: {problem}", problem=problem)
        self._failures = 0
        self.stats.update(refreshes=self.stats["refreshes"] + 1, entries=len(pairs),
                          invalid=len(bad), unplaced=len(unplaced), server=url,
                          last_ok=self.reactor.seconds(), source="ldap")
        _log.info("dhcp4 ldap: {n} reservations from {url} ({bad} malformed, {un} unplaced)",
                  n=len(pairs), url=url, bad=len(bad), un=len(unplaced))
        self._save_cache(pairs)
        self._schedule(self.settings.refresh_interval_s)
        return len(pairs)

    def _failed(self, why: str):
        self._failures += 1
        self.stats["errors"] += 1
        self.stats["last_error"] = why
        delay = min(self.settings.refresh_interval_s,
                    self.MIN_RETRY_S * 2 ** min(self._failures - 1, 10))
        _log.warn("dhcp4 ldap: reservations not refreshed ({why}); keeping the current "
                  "{n}, retrying in {delay:.0f} s", why=why, n=self.stats["entries"], delay=delay)
        self._schedule(delay)
        return defer.fail(LdapUnavailable(why))

    # -- the last good set in the state store ---------------------------------
    def _save_cache(self, pairs) -> None:
        if self.store is None:
            return
        text = json.dumps([[mac, str(ip)] for mac, ip in pairs])
        self.store.set(CACHE_KEY, text).addErrback(
            lambda f: _log.warn("dhcp4 ldap: cannot cache reservations: {why}",
                                why=f.getErrorMessage()))

    def _load_cached(self) -> defer.Deferred:
        if self.store is None:
            return defer.succeed(None)
        d = self.store.get(CACHE_KEY)

        def loaded(text):
            if not text or self.stats["source"] == "ldap":
                return
            try:
                pairs = [(mac, IPv4Address(ip)) for mac, ip in json.loads(text)]
            except (ValueError, TypeError):
                _log.warn("dhcp4 ldap: cached reservations unreadable; ignored")
                return
            unplaced = self.apply(pairs) or []
            self.stats.update(entries=len(pairs), unplaced=len(unplaced), source="cache")
            _log.info("dhcp4 ldap: {n} reservations from the cache until LDAP answers",
                      n=len(pairs))

        d.addCallback(loaded)
        d.addErrback(lambda f: _log.warn("dhcp4 ldap: cached reservations not read: {why}",
                                         why=f.getErrorMessage()))
        return d

    def status(self) -> dict[str, Any]:
        return {"servers": list(self.settings.servers), **self.stats}
