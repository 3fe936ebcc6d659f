"""Digest credentials from LDAP directories (``[services.sip.auth.ldap]``).

A user is looked up with ``filter`` (``{user}`` replaced by the escaped user
name) under ``base_dn``; its ``password_attribute`` must hold the cleartext
password (the HA1 of each algorithm is computed from it; a ``{SCHEME}``
hashed value cannot serve digest and counts as no credentials).

ldap3 is synchronous: each lookup runs in the reactor's thread pool.  The
servers are tried in turn -- ``strategy = "first"`` always from the first,
``"round_robin"`` from the next one each time -- each with ``timeout_s`` to
connect *and* to answer.  (ldap3's own ``ServerPool`` fails over only when
the socket cannot open; a server that accepts TCP and never answers would
stall it -- measured in TESTBED.md -- so the pool is walked here.)

Answers (found or not) are cached for ``cache_ttl_s``.  When every server
fails, the last good answer for that user is used if it is younger than
``stale_max_s`` (``serve_stale = true``), counted as ``stale_served``;
otherwise the lookup fails with :class:`DirectoryUnavailable` and the
registrar answers 503.  Concurrent lookups of one user share one search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from twisted.internet import defer, threads
from twisted.logger import Logger

from services.sip.auth import ha1

_log = Logger(namespace="services.sip.ldap")


class DirectoryUnavailable(Exception):
    """No LDAP server answered and no usable cached answer exists."""


@dataclass(frozen=True)
class LdapSettings:
    servers: tuple[str, ...]
    base_dn: str
    bind_dn: str | None = None
    password: str | None = None
    filter: str = "(uid={user})"
    password_attribute: str = "userPassword"
    strategy: str = "first"            # "first" | "round_robin"
    timeout_s: float = 2.0
    cache_ttl_s: float = 60.0
    serve_stale: bool = True
    stale_max_s: float = 86400.0


def fetch_password(settings: LdapSettings, user: str, start: int = 0) -> tuple[str, str | None]:
    """Thread: ``(server url, cleartext password or None)`` from the first server that
    answers, trying them from index ``start``; raises DirectoryUnavailable naming each failure."""
    import ldap3
    from ldap3.utils.conv import escape_filter_chars

    problems = []
    n = len(settings.servers)
    for i in range(n):
        url = settings.servers[(start + i) % n]
        conn = None
        try:
            server = ldap3.Server(url, connect_timeout=settings.timeout_s, get_info=ldap3.NONE)
            conn = ldap3.Connection(server, user=settings.bind_dn, password=settings.password,
                                    receive_timeout=max(1, math.ceil(settings.timeout_s)),
                                    auto_bind=True, raise_exceptions=True, read_only=True)
            flt = settings.filter.replace("{user}", escape_filter_chars(user))
            conn.search(settings.base_dn, flt, ldap3.SUBTREE,
                        attributes=[settings.password_attribute], size_limit=2)
            entries = [e for e in conn.response or () if e.get("type") == "searchResEntry"]
            if len(entries) != 1:
                return url, None
            value = entries[0].get("attributes", {}).get(settings.password_attribute)
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            if value is None or (value.startswith("{") and "}" in value):
                return url, None       # absent, or hashed: no digest possible
            return url, str(value)
        except Exception as e:        # ldap3 errors, sockets, timeouts: try the next one
            problems.append(f"{url}: {type(e).__name__}: {e}")
        finally:
            if conn is not None:
                try:
                    conn.unbind()
                except Exception:
                    pass
    raise DirectoryUnavailable("; ".join(problems) or "no LDAP server configured")


class LdapCredentials:
    """``lookup(user, realm, algorithm)`` -> Deferred[HA1 | None] from LDAP, cached."""

    def __init__(self, reactor, settings: LdapSettings, *,
                 fetch: Callable = fetch_password, in_thread: Callable | None = None):
        self.reactor = reactor
        self.settings = settings
        self._fetch = fetch
        self._in_thread = in_thread or (
            lambda f, *a: threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *a))
        self.cache: dict[str, tuple[float, str | None]] = {}   # user -> (fetched at, password)
        self._inflight: dict[str, list[defer.Deferred]] = {}
        self._next = 0
        self.stats = {"searches": 0, "cache_hits": 0, "errors": 0, "stale_served": 0}
        self.last_error: str | None = None
        self.last_server: str | None = None

    def lookup(self, user: str, realm: str, algorithm: str) -> defer.Deferred:
        d = self._password(user)
        return d.addCallback(lambda pw: None if pw is None else ha1(algorithm, user, realm, pw))

    def _password(self, user: str) -> defer.Deferred:
        now = self.reactor.seconds()
        hit = self.cache.get(user)
        if hit is not None and now - hit[0] < self.settings.cache_ttl_s:
            self.stats["cache_hits"] += 1
            return defer.succeed(hit[1])
        waiter: defer.Deferred = defer.Deferred()
        if user in self._inflight:
            self._inflight[user].append(waiter)
            return waiter
        self._inflight[user] = [waiter]
        start = 0
        if self.settings.strategy == "round_robin":
            start = self._next
            self._next = (self._next + 1) % max(1, len(self.settings.servers))
        self.stats["searches"] += 1
        try:
            d = self._in_thread(self._fetch, self.settings, user, start)
        except Exception:
            d = defer.fail()
        d.addCallbacks(self._found, self._failed, callbackArgs=(user,), errbackArgs=(user,))
        d.addErrback(lambda f: _log.failure("sip: LDAP lookup bookkeeping failed", failure=f))
        return waiter

    def _release(self, user: str, result) -> None:
        for w in self._inflight.pop(user, []):
            if isinstance(result, Exception):
                w.errback(result)
            else:
                w.callback(result)

    def _found(self, result, user: str) -> None:
        url, password = result
        if self.last_error is not None:
            _log.info("sip: LDAP answers again ({url})", url=url)
        self.last_error = None
        self.last_server = url
        self.cache[user] = (self.reactor.seconds(), password)
        self._release(user, password)

    def _failed(self, failure, user: str) -> None:
        self.stats["errors"] += 1
        why = failure.getErrorMessage()
        if self.last_error != why:
            _log.warn("sip: LDAP lookup of {user} failed: {why}", user=user, why=why)
        self.last_error = why
        hit = self.cache.get(user)
        if (self.settings.serve_stale and hit is not None
                and self.reactor.seconds() - hit[0] < self.settings.stale_max_s):
            self.stats["stale_served"] += 1
            self._release(user, hit[1])
            return
        self._release(user, DirectoryUnavailable(why))
