"""The location service: SIP bindings in the node's state store.

Store layout (keys under the store's namespace)::

    sip:aor:<aor>     hash   contact URI -> JSON {uri, expires, q, call_id, cseq,
                                                 path, received, params}
    sip:expiry        zset   "<aor> <contact uri>" -> absolute expiry (store clock)
    sip:user:<aor>    string "1": the AOR has registered once (an INVITE to it
                             with no binding left gets 480, not 404)
    sip:mtime:<aor>   string the AOR's version: the store-clock time of its last
                             change (strictly growing per AOR), written in the same
                             commit; replicas keep the newest state (last writer wins)

Expiry is absolute (the store's clock, i.e. the reactor's seconds), so a
binding read after a restart or by another node means the same instant.
Readers ignore expired bindings; :meth:`Location.sweep` deletes them in pages
(their removal is a write like any other).

One REGISTER is one atomic commit (hash, zset and marker together) and the
200 waits for one durability wait.  With the embedded store
(:class:`IImmediateStore`) the read-decide-write runs synchronously, so two
REGISTERs of one AOR cannot interleave; with Redis the requests of one AOR
are chained so each reads what the previous one wrote.
"""

from __future__ import annotations

import json
from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger

from appliance.store.interface import IImmediateStore, Op
from services.sip.registrar import Binding, Decision

_log = Logger(namespace="services.sip.location")

AOR_PREFIX = "sip:aor:"
EXPIRY = "sip:expiry"
USER_PREFIX = "sip:user:"
MTIME_PREFIX = "sip:mtime:"


def _version(prev, now: float) -> float:
    """The next version of an AOR: now, but always above the previous one."""
    try:
        last = float(prev) if prev is not None else None
    except (TypeError, ValueError):
        last = None
    return now if last is None or now > last else last + 1e-6


def _both(first: defer.Deferred, second: defer.Deferred) -> defer.Deferred:
    """Fire once both fired; fail with ``first``'s failure if it failed (then ``second``'s
    result is still consumed), else with ``second``'s."""
    d = defer.DeferredList([first, second], consumeErrors=True)

    def unpack(results):
        for ok, value in results:
            if not ok:
                return value
        return None
    return d.addCallback(unpack)


def _decode(aor: str, raw: dict) -> dict[str, Binding]:
    out = {}
    for uri, text in raw.items():
        try:
            out[uri] = Binding.from_record(aor, json.loads(text))
        except (ValueError, KeyError, TypeError):
            _log.warn("sip: unreadable binding {aor} {uri} in the store ignored", aor=aor, uri=uri)
    return out


class Location:
    """Bindings per AOR on an ``IStateStore``."""

    def __init__(self, store, now: Callable[[], float]):
        self.store = store
        self.now = now
        self.immediate = IImmediateStore.providedBy(store)
        self._tails: dict[str, defer.Deferred] = {}
        #: bindings written by this process (a gauge; corrected by count())
        self.count = 0

    # -- reads ----------------------------------------------------------
    def read(self, aor: str) -> defer.Deferred:
        """Fire with ``(bindings, known)``: unexpired bindings (uri -> Binding)
        and whether the AOR ever registered."""
        if self.immediate:
            try:
                return defer.succeed(self._read_now(aor))
            except Exception:
                return defer.fail()
        d1 = self.store.hgetall(AOR_PREFIX + aor)
        d2 = self.store.get(USER_PREFIX + aor)
        d = defer.gatherResults([d1, d2], consumeErrors=True)
        d.addErrback(lambda f: f.value.subFailure if isinstance(f.value, defer.FirstError) else f)
        now = self.now()
        return d.addCallback(lambda r: ({u: b for u, b in _decode(aor, r[0]).items()
                                         if b.expires > now}, r[1] is not None or bool(r[0])))

    def mtime(self, aor: str) -> defer.Deferred:
        """Fire with the AOR's version (None: never changed with a version)."""
        return self.store.get(MTIME_PREFIX + aor).addCallback(
            lambda v: None if v is None else float(v))

    def _read_now(self, aor: str) -> tuple[dict[str, Binding], bool]:
        raw = self.store.hgetall_now(AOR_PREFIX + aor)
        now = self.now()
        bindings = {u: b for u, b in _decode(aor, raw).items() if b.expires > now}
        known = bool(raw) or self.store.get_now(USER_PREFIX + aor) is not None
        return bindings, known

    # -- writes ---------------------------------------------------------
    def _ops(self, aor: str, before: dict[str, Binding], decision: Decision, known: bool) -> list:
        ops = []
        key = AOR_PREFIX + aor
        gone = [b.uri for b in decision.removed]
        # expired bindings still in the hash go with this write too
        stale = [u for u in getattr(decision, "_stale", ()) if u not in decision.bindings]
        if gone or stale:
            ops.append(Op.hdel(key, gone + stale))
            ops.append(Op.zrem(EXPIRY, [f"{aor} {u}" for u in gone + stale]))
        if decision.added:
            encoded = decision.encoded = {b.uri: b.to_json() for b in decision.added}
            ops.append(Op.hset(key, encoded))
            ops.append(Op.zadd(EXPIRY, {f"{aor} {b.uri}": b.expires for b in decision.added}))
            if not known:
                ops.append(Op.set(USER_PREFIX + aor, "1"))
        return ops

    def update(self, aor: str, decide: Callable[[dict[str, Binding]], Decision],
               decided: Callable[[str, Decision], defer.Deferred | None] | None = None
               ) -> defer.Deferred:
        """Read ``aor``'s bindings, ``decide``, write the decision in one commit;
        fire with the Decision once it is durable.

        ``decided`` (embedded store only): called with the AOR and a decision that changed something
        as soon as it is in the store's mirror, before it is durable; the Deferred it
        returns (if any) is waited for too (both together: the sync replication to the
        backups runs while the local commit does, instead of after it).  The decision
        gets ``early = True`` when it was called."""
        if self.immediate:
            try:
                raw = self.store.hgetall_now(AOR_PREFIX + aor)
                now = self.now()
                bindings = {u: b for u, b in _decode(aor, raw).items() if b.expires > now} \
                    if raw else {}
                known = bool(raw) or self.store.get_now(USER_PREFIX + aor) is not None
                decision = decide(bindings)
                if decision.bindings is None or not (decision.changes or len(raw) > len(bindings)):
                    return defer.succeed(decision)
                decision._stale = [u for u in raw if u not in bindings]
                decision.mtime = _version(self.store.get_now(MTIME_PREFIX + aor), self.now())
                self.store.commit_now(self._ops(aor, bindings, decision, known)
                                      + [Op.set(MTIME_PREFIX + aor, repr(decision.mtime))])
                self.count += len(decision.bindings) - len(bindings)
                durable = self.store.durable()
                waits = decided(aor, decision) if decided is not None and decision.changes else None
                if decided is not None and decision.changes:
                    decision.early = True
                if waits is None:
                    return durable.addCallback(lambda _: decision)
                return _both(durable, waits).addCallback(lambda _: decision)
            except Exception:
                return defer.fail()
        previous = self._tails.get(aor)
        d = defer.Deferred()
        self._tails[aor] = d

        def run(_):
            r = defer.gatherResults([self.read(aor), self.store.get(MTIME_PREFIX + aor)],
                                    consumeErrors=True)
            r.addErrback(lambda f: f.value.subFailure if isinstance(f.value, defer.FirstError)
                         else f)

            def decided(result):
                (bindings, known), prev = result
                decision = decide(bindings)
                if decision.bindings is None or not decision.changes:
                    return decision
                decision.mtime = _version(prev, self.now())
                ops = self._ops(aor, bindings, decision, known)
                ops.append(Op.set(MTIME_PREFIX + aor, repr(decision.mtime)))
                self.count += len(decision.bindings) - len(bindings)
                return self.store.commit(ops).addCallback(lambda _: decision)
            return r.addCallback(decided)

        start = defer.succeed(None) if previous is None else previous
        result = defer.Deferred()

        def finish(outcome):
            if self._tails.get(aor) is d:
                del self._tails[aor]
            d.callback(None)
            result.callback(outcome) if not isinstance(outcome, defer.Failure) else \
                result.errback(outcome)
        start.addCallback(run).addBoth(finish)
        return result

    def remove_aor(self, aor: str) -> defer.Deferred:
        """Remove every binding of ``aor`` (RPC ``sip.unregister``); fire with how many."""
        def decide(bindings):
            return Decision(200, bindings={}, removed=list(bindings.values()))
        return self.update(aor, decide).addCallback(lambda d: len(d.removed))

    def sweep(self, limit: int = 1000) -> defer.Deferred:
        """Delete up to ``limit`` expired bindings; fire with how many went."""
        now = self.now()
        d = self.store.zrangebyscore(EXPIRY, float("-inf"), now, limit=limit)

        def got(rows):
            by_aor: dict[str, list[str]] = {}
            for member, _score in rows:
                aor, _, uri = member.partition(" ")
                by_aor.setdefault(aor, []).append(uri)
            ds = []
            for aor, uris in by_aor.items():
                ds.append(self._expire(aor, uris, now))
            return defer.gatherResults(ds, consumeErrors=True).addCallback(sum)
        return d.addCallback(got)

    def _expire(self, aor: str, uris: list[str], now: float) -> defer.Deferred:
        def decide(bindings):
            # ``bindings`` holds the unexpired ones; the expired ones are stale entries
            return Decision(200, bindings=dict(bindings), removed=[])

        def drop(raw):
            current = _decode(aor, raw)
            dead = [u for u in uris if u not in current or current[u].expires <= now]
            if not dead:
                return 0
            ops = [Op.hdel(AOR_PREFIX + aor, dead),
                   Op.zrem(EXPIRY, [f"{aor} {u}" for u in dead])]
            self.count -= len([u for u in dead if u in current])
            return self.store.commit(ops).addCallback(lambda _: len(dead))
        return self.store.hgetall(AOR_PREFIX + aor).addCallback(drop)

    def all_aors(self) -> defer.Deferred:
        """Fire with every AOR that has a bindings hash (paged scan)."""
        aors: list[str] = []

        def page(result):
            cursor, keys = result
            aors.extend(k[len(AOR_PREFIX):] for k in keys)
            if cursor is None:
                return sorted(set(aors))
            return self.store.scan(AOR_PREFIX, cursor, 1000).addCallback(page)
        return self.store.scan(AOR_PREFIX, None, 1000).addCallback(page)

    def recount(self) -> defer.Deferred:
        """Count the unexpired bindings in the store (at start)."""
        return self.store.zcard(EXPIRY).addCallback(self._set_count)

    def _set_count(self, n):
        self.count = int(n or 0)
        return self.count
