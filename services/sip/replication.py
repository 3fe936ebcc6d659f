"""Registration replication to backup registrars over the peer link (channel ``sip``).

After a REGISTER changed an AOR, the AOR's whole new state (every binding it
holds, and the contacts that went) goes to each backup as one peer-link
message ``{"aor", "set": {uri: record}, "del": [uri]}``.  Sending whole AOR
states makes applying idempotent and order-safe per AOR: the backup replaces
what it has for that AOR, so a resend or a late duplicate cannot resurrect a
removed contact (the anchors' "deletes not replicated" bug, ANCHORS.md §3.4).

States queued in one reactor turn leave together as one message
``{"states": [...]}`` (one backup commit, one ack for the batch).

- ``sync``: the 200 OK waits until every *live* backup acknowledged; the peer
  link acknowledges a message after the backup's handler finished, i.e. after
  the backup's store made the state durable.  A backup whose link is down, or
  that does not acknowledge within ``timeout_s``, is not live: the AOR is
  remembered as missed for it and the 200 goes out (the binding is durable here).
- ``async``: the 200 goes out after the local write; the send happens anyway.

Missed AORs (per backup, in memory) are sent again -- their current state,
read from the store -- when that backup's link comes back: a delta resync,
``batch`` AORs at a time, one batch in flight, so a returning backup never
gets a storm.  Not yet: surviving this node's own restart with a missed set
(a restarted primary needs a full paged resync), ownership (which node may
serve), and a bound on the missed set.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from appliance.store.interface import Op
from services.sip.location import AOR_PREFIX, EXPIRY, USER_PREFIX, _decode

_log = Logger(namespace="services.sip.replication")

CHANNEL = "sip"


def state_body(aor: str, bindings: dict, removed: list[str]) -> dict:
    return {"aor": aor,
            "set": {u: json.dumps(b.to_record(), separators=(",", ":"))
                    for u, b in bindings.items()},
            "del": sorted(set(removed) - set(bindings))}


class Replicator:
    #: AOR states per peer-link message (~300 bytes each; the frame limit is 4 MiB)
    MESSAGE_STATES = 512

    def __init__(self, reactor, link, peers: tuple[str, ...], mode: str, location, *,
                 timeout_s: float = 2.0, batch: int = 100, max_unacked: int = 10_000):
        self.reactor = reactor
        self.link = link
        self.peers = tuple(peers)
        self.mode = mode
        self.location = location
        self.timeout_s = timeout_s
        self.batch = batch
        self.max_unacked = max_unacked
        self.missed: dict[str, set[str]] = {p: set() for p in self.peers}
        self._resyncing: set[str] = set()
        self.stats = {"sent": 0, "acked": 0, "timeouts": 0, "failed": 0, "applied": 0,
                      "resent": 0, "skipped_down": 0, "messages": 0}
        self._queue: dict[str, list] = {}
        self._flush_calls: dict[str, object] = {}

    def start(self) -> None:
        self.link.on(CHANNEL, self.apply)
        if hasattr(self.link, "on_connection"):
            self.link.on_connection(self._connection)

    def stop(self) -> None:
        """Send what is queued now (the link keeps it until acknowledged)."""
        for peer in list(self._flush_calls):
            call = self._flush_calls.get(peer)
            if call is not None and call.active():
                call.cancel()
            self._flush(peer)

    # -- primary side ---------------------------------------------------------
    def replicate(self, aor: str, bindings: dict, removed: list[str]) -> defer.Deferred:
        """Ship the AOR's new state; fire when the mode allows the 200 to leave."""
        body = state_body(aor, bindings, removed)
        waits = []
        for peer in self.peers:
            if not self.link.connected(peer):
                self.stats["skipped_down"] += 1
                self.missed[peer].add(aor)
                continue
            waits.append(self._send(peer, aor, body))
        if self.mode != "sync" or not waits:
            return defer.succeed(None)
        return defer.DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    def _send(self, peer: str, aor: str, body: dict) -> defer.Deferred:
        """Queue ``body`` for ``peer``; every state queued in one reactor turn leaves as
        one peer-link message (one backup commit and one ack for all of them)."""
        done = defer.Deferred()
        timer = self.reactor.callLater(self.timeout_s, self._timed_out, done, peer, aor)
        self._queue.setdefault(peer, []).append((aor, body, done, timer))
        if peer not in self._flush_calls:
            self._flush_calls[peer] = self.reactor.callLater(0, self._flush, peer)
        return done

    def _flush(self, peer: str) -> None:
        self._flush_calls.pop(peer, None)
        queue = self._queue.pop(peer, [])
        while queue:
            items, queue = queue[:self.MESSAGE_STATES], queue[self.MESSAGE_STATES:]
            self._send_batch(peer, items)

    def _send_batch(self, peer: str, items: list) -> None:
        self.stats["sent"] += len(items)
        self.stats["messages"] += 1
        try:
            d = self.link.send(peer, CHANNEL, {"states": [body for _, body, _, _ in items]},
                               limit=self.max_unacked)
        except Exception:
            d = defer.fail()

        def acked(_):
            self.stats["acked"] += len(items)
            for _aor, _body, done, timer in items:
                if timer.active():
                    timer.cancel()
                    done.callback(True)

        def failed(f):
            self.stats["failed"] += len(items)
            _log.warn("sip: replication of {n} AORs to {peer} failed: {why}", n=len(items),
                      peer=peer, why=f.getErrorMessage())
            for aor, _body, done, timer in items:
                self.missed[peer].add(aor)
                if timer.active():
                    timer.cancel()
                    done.callback(False)

        d.addCallbacks(acked, failed)
        d.addErrback(lambda f: _log.failure("sip: replication bookkeeping failed", failure=f))

    def _timed_out(self, done: defer.Deferred, peer: str, aor: str) -> None:
        # the backup is not live for this write: answer without it, resend on return
        self.stats["timeouts"] += 1
        self.missed[peer].add(aor)
        done.callback(False)

    def backlog(self, peer: str) -> int:
        unacked = self.link.backlog(peer, CHANNEL) if hasattr(self.link, "backlog") else 0
        return unacked + len(self.missed.get(peer, ()))

    # -- delta resync -----------------------------------------------------------
    def _connection(self, peer: str, up: bool) -> None:
        if up and peer in self.missed and self.missed[peer] and peer not in self._resyncing:
            _log.info("sip: {peer} is back: resending {n} AORs it missed", peer=peer,
                      n=len(self.missed[peer]))
            self._resyncing.add(peer)
            self._resync_next(peer)

    def _resync_next(self, peer: str) -> None:
        pending = self.missed[peer]
        if not pending or not self.link.connected(peer):
            self._resyncing.discard(peer)
            return
        aors = [pending.pop() for _ in range(min(self.batch, len(pending)))]
        reads = [self.location.read(aor) for aor in aors]
        d = defer.gatherResults(reads, consumeErrors=True)

        def send(results):
            sends = []
            for aor, (bindings, _known) in zip(aors, results):
                body = state_body(aor, bindings, [])
                body["replace"] = True        # whatever the backup holds beyond this goes
                self.stats["resent"] += 1
                sends.append(self._send(peer, aor, body))
            return defer.DeferredList(sends, consumeErrors=True)

        def failed(f):
            pending.update(aors)
            _log.warn("sip: resync read for {peer} failed: {why}", peer=peer,
                      why=f.getErrorMessage())
        d.addCallbacks(send, failed)
        d.addBoth(lambda _: self.reactor.callLater(0, self._resync_next, peer))
        d.addErrback(lambda f: _log.failure("sip: resync failed", failure=f))

    # -- backup side ------------------------------------------------------------
    def apply(self, peer: str, body: Any) -> defer.Deferred:
        """Store AOR states from ``peer`` (``{"states": [...]}`` or one state) in one
        commit; fire once it is durable (the link acknowledges then)."""
        try:
            states = body["states"] if "states" in body else [body]
            merged: dict[str, dict] = {}
            for st in states:
                aor = st["aor"]
                new = dict(st.get("set") or {})
                for text in new.values():
                    json.loads(text)
                prev = merged.get(aor)
                gone = set(st.get("del") or ()) | (set(prev["set"]) | prev["del"] if prev else set())
                merged[aor] = {"set": new, "del": gone - set(new),
                               "replace": bool(st.get("replace")) or bool(prev and prev["replace"])}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            return defer.fail(ValueError(f"bad sip replication message: {e}"))
        store = self.location.store
        aors = list(merged)
        d = defer.gatherResults([store.hgetall(AOR_PREFIX + a) for a in aors], consumeErrors=True)

        def write(currents):
            ops = []
            delta = 0
            for aor, current in zip(aors, currents):
                st = merged[aor]
                key = AOR_PREFIX + aor
                new = st["set"]
                stale = [u for u in current if u not in new] if st["replace"] else []
                drop = sorted((st["del"] | set(stale)) - set(new))
                if drop:
                    ops.append(Op.hdel(key, drop))
                    ops.append(Op.zrem(EXPIRY, [f"{aor} {u}" for u in drop]))
                if new:
                    ops.append(Op.hset(key, new))
                    ops.append(Op.zadd(EXPIRY, {f"{aor} {u}": b.expires
                                                for u, b in _decode(aor, new).items()}))
                    ops.append(Op.set(USER_PREFIX + aor, "1"))
                after = (set(current) - set(drop)) | set(new)
                delta += len(after) - len(current)
            self.stats["applied"] += len(aors)
            self.location.count += delta
            return store.commit(ops) if ops else None
        return d.addCallback(write)
