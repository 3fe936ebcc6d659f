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

Missed AORs.  Per backup, the AORs it has not acknowledged (its link was
down, a send failed or timed out) are kept in memory *and in the store*
(hash ``sip:backlog:<peer>``, written before a sync-mode 200 leaves), so they
survive a restart of this node.  When the backup's link comes back the two
sides exchange ``{"hello": {"bindings": n, "caps": ["synced"]}}``; then:

- a backup that reports no bindings (it lost its data), or whose backlog
  overflowed ``backlog_limit`` (flag ``sip:backlog-full:<peer>`` in the store),
  gets a **paged full resync**: ``{"full_begin"}``, pages of ``page`` AOR
  states read from the store as the window opens (``window`` pages in flight,
  ``pause_s`` between pages so live REGISTERs keep their latency), then
  ``{"full_end"}``: the backup drops the AORs of the covered shards that the
  resync did not mention (they went while it was away);
- otherwise a **delta resync**: the current state of each missed AOR,
  ``batch`` AORs at a time, one batch in flight.

Versions.  Every AOR state carries the AOR's version (``mtime``: the store
clock at its last change on the node that made it, strictly growing per AOR,
see :mod:`services.sip.location`); a node applies a state only if it is not
older than the version it holds (last writer wins).  So a resend, a late
duplicate, or the backlog of a node that was behind (e.g. one that owned the
shard for a moment at its restart) can never overwrite a newer state, and
every node may push what it holds: whoever has the newest state wins on both
sides, whatever the ownership did meanwhile.  The full resync's end marker
removes only AORs older than its start.

Synced marker.  When a peer that says it understands it (``caps`` in its hello)
has received everything this node had for it -- the delta or full resync after
its hello is done, or there was nothing to send -- it gets ``{"synced": {...}}``
on the same ordered channel, so it arrives after every state before it was
stored.  A returning node uses it to stay unable for its shards until then
(``on_synced``; see :class:`services.sip.syncgate.SyncGate`).
"""

from __future__ import annotations

import collections
import gc
import json
import secrets
import time
from typing import Any, Callable

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.store.interface import Op
from services.sip.location import AOR_PREFIX, EXPIRY, MTIME_PREFIX, USER_PREFIX

_log = Logger(namespace="services.sip.replication")

CHANNEL = "sip"
BACKLOG_PREFIX = "sip:backlog:"          # hash per backup: missed AOR -> "1"
FULL_PREFIX = "sip:backlog-full:"        # string per backup: "1" = needs a full resync


def state_body(aor: str, bindings: dict, removed: list[str], mtime: float | None = None,
               encoded: dict | None = None) -> dict:
    """``encoded``: JSON texts of some of ``bindings`` already made (by the store write)."""
    if encoded:
        texts = {u: encoded.get(u) or b.to_json() for u, b in bindings.items()}
    else:
        texts = {u: b.to_json() for u, b in bindings.items()}
    body = {"aor": aor,
            "set": texts,
            "del": sorted(set(removed) - set(bindings)) if removed else []}
    if mtime is not None:
        body["mtime"] = mtime
    return body


class Replicator:
    #: AOR states per peer-link message (~300 bytes each; the frame limit is 4 MiB)
    MESSAGE_STATES = 512
    #: live-state messages unacknowledged per peer (one being stored, one on its way)
    WINDOW = 2
    #: sync waits released per reactor turn when an ack covers many states: the 200s
    #: of a 512-state ack leave over several turns, so the node's own timers (its
    #: heartbeats) run in between even on a starved CPU
    RELEASE_SLICE = 32
    #: full resync: AORs in the first page (then sized by what pages cost), the fewest
    #: in a page, and AORs read and encoded between two checks of the turn budget
    #: a backup freezes the heap (gc.freeze) every so many full-resync pages it stored
    FREEZE_PAGES = 16
    PAGE_START = 25
    PAGE_MIN = 25
    SLICE = 5

    def __init__(self, reactor, link, peers: tuple[str, ...], mode: str, location, *,
                 timeout_s: float = 2.0, batch: int = 100, max_unacked: int = 10_000,
                 backlog_limit: int = 10_000, page: int = 100, window: int = 1,
                 pause_s: float = 0.002, page_s: float = 0.008, turn_s: float = 0.002,
                 min_rate: float = 2500.0,
                 shard_of: Callable[[str], int] | None = None,
                 on_synced: Callable[[str], None] | None = None,
                 timer: Callable[[], float] = time.perf_counter):
        self.reactor = reactor
        self.link = link
        self.peers = tuple(peers)
        self.mode = mode
        self.location = location
        self.store = location.store
        self.timeout_s = timeout_s
        self.batch = batch
        self.max_unacked = max_unacked
        self.backlog_limit = backlog_limit
        self.page = page
        self.window = window
        self.pause_s = pause_s
        #: full resync pacing: a page's round trip (the backup storing it) aims at page_s;
        #: building a page takes at most turn_s of this node's reactor per turn
        self.page_s = page_s
        self.turn_s = turn_s
        #: ... but no slower than min_rate AORs/s: pages grow when a whole cycle (page
        #: built, sent, stored, acked, pause) is slow, e.g. on a busy box
        self.min_rate = min_rate
        self.timer = timer
        self.shard_of = shard_of or (lambda aor: 0)
        self.on_synced = on_synced
        #: peers whose hello said they read the synced marker
        self.peer_caps: dict[str, frozenset] = {p: frozenset() for p in self.peers}
        #: peers that sent this node everything it missed (their synced marker)
        self.synced_from: set[str] = set()
        self.missed: dict[str, set[str]] = {p: set() for p in self.peers}
        #: backups that need a paged full resync (persisted); and those running now
        self.full_needed: dict[str, bool] = {p: False for p in self.peers}
        self.full_running: set[str] = set()
        self.peer_bindings: dict[str, int | None] = {p: None for p in self.peers}
        self._resyncing: set[str] = set()
        self._again: set[str] = set()
        self.stats = {"sent": 0, "acked": 0, "timeouts": 0, "failed": 0, "applied": 0,
                      "resent": 0, "skipped_down": 0, "messages": 0, "overflows": 0,
                      "full_resyncs": 0, "full_sent": 0, "full_pages": 0,
                      "full_page_size": None, "full_page_ms_max": None, "full_reread": 0,
                      "full_removed": 0, "gc_freezes": 0,
                      "last_full_resync_s": None, "delta_resyncs": 0, "stale_ignored": 0,
                      "synced_sent": 0, "synced_received": 0}
        self._queue: dict[str, list] = {}
        self._flush_calls: dict[str, object] = {}
        self._queue_timers: dict[str, object] = {}
        self._inflight: dict[str, int] = {}
        self._ops: list = []
        self._persist_call = None
        self._persisted: defer.Deferred | None = None
        self._full_in: dict[str, dict] = {}     # backup side: peer -> running full resync
        #: primary side: AORs changed (replicated) while a full-resync page to the peer
        #: is being built across reactor turns; their states are read again before it goes
        self._building: dict[str, set[str]] = {}
        self._pages_in = 0
        self._release_q: collections.deque = collections.deque()
        self._release_call = None

    def load(self) -> defer.Deferred:
        """Read the persisted backlogs (what each backup missed before this start)."""
        @defer.inlineCallbacks
        def go():
            for peer in self.peers:
                raw = yield self.store.hgetall(BACKLOG_PREFIX + peer)
                self.missed[peer].update(raw or ())
                flag = yield self.store.get(FULL_PREFIX + peer)
                self.full_needed[peer] = flag is not None
                if raw or flag is not None:
                    _log.info("sip: {peer} still owes {what} from before this start", peer=peer,
                              what="a full resync" if flag is not None else
                              f"{len(raw)} missed AORs")
        return go()

    def start(self) -> None:
        self.link.on(CHANNEL, self.apply)
        if hasattr(self.link, "on_connection"):
            self.link.on_connection(self._connection)
        for peer in self.peers:
            if self.link.connected(peer):
                self._connection(peer, True)

    def stop(self) -> None:
        """Send what is queued now (the link keeps it until acknowledged)."""
        for peer in list(self._queue):
            call = self._flush_calls.get(peer)
            if call is not None and call.active():
                call.cancel()
            self._flush(peer, force=True)
        if self._persist_call is not None and self._persist_call.active():
            self._persist_call.cancel()
            self._persist()
        if self._release_call is not None and self._release_call.active():
            self._release_call.cancel()
        self._release_call = None
        while self._release_q:
            self._release_some(len(self._release_q))

    def _release(self, waits) -> None:
        """Fire the sync waits ``waits`` (True: acked) in order, at most
        :attr:`RELEASE_SLICE` per reactor turn."""
        self._release_q.extend(waits)
        if self._release_call is None:
            self._release_some()

    def _release_some(self, n: int | None = None) -> None:
        self._release_call = None
        q = self._release_q
        n = n or self.RELEASE_SLICE
        while q and n:
            done = q.popleft()
            n -= 1
            if not done.called:
                done.callback(True)
        if q:
            self._release_call = self.reactor.callLater(0, self._release_some)

    # -- the persistent backlog ---------------------------------------------------
    def _write(self, *ops) -> defer.Deferred:
        """Queue store ops; all queued in one reactor turn go in one commit."""
        self._ops.extend(ops)
        if self._persisted is None:
            self._persisted = defer.Deferred()
            self._persist_call = self.reactor.callLater(0, self._persist)
        d = defer.Deferred()
        self._persisted.addBoth(lambda r: (d.callback(None), r)[1])
        return d

    def _persist(self) -> None:
        ops, self._ops = self._ops, []
        waiter, self._persisted = self._persisted, None
        self._persist_call = None
        d = self.store.commit(ops) if ops else defer.succeed(None)

        def failed(f):
            _log.error("sip: replication backlog not stored: {why}", why=f.getErrorMessage())
        d.addErrback(failed)
        d.addBoth(lambda _: waiter.callback(None))

    def miss(self, peer: str, aor: str) -> defer.Deferred:
        """Remember that ``peer`` lacks ``aor``'s current state; fire once it is durable."""
        if self.full_needed[peer] and peer not in self.full_running:
            return defer.succeed(None)          # the coming full resync covers it
        missed = self.missed[peer]
        if aor in missed:
            return defer.succeed(None)
        missed.add(aor)
        if len(missed) > self.backlog_limit:
            self.stats["overflows"] += 1
            _log.warn("sip: {peer} missed more than {n} AORs: it gets a paged full resync when "
                      "it returns", peer=peer, n=self.backlog_limit)
            missed.clear()
            self.full_needed[peer] = True
            return self._write(Op.set(FULL_PREFIX + peer, "1"), Op.delete(BACKLOG_PREFIX + peer))
        return self._write(Op.hset(BACKLOG_PREFIX + peer, {aor: "1"}))

    def _caught_up(self, peer: str, aors) -> None:
        done = [a for a in aors if a not in self.missed[peer]]
        if done:
            self._write(Op.hdel(BACKLOG_PREFIX + peer, done))

    # -- primary side ---------------------------------------------------------
    def replicate(self, aor: str, bindings: dict, removed: list[str],
                  mtime: float | None = None, encoded: dict | None = None) -> defer.Deferred:
        """Ship the AOR's new state; fire when the mode allows the 200 to leave."""
        body = state_body(aor, bindings, removed, mtime, encoded)
        waits = []
        for peer in self.peers:
            building = self._building.get(peer)
            if building is not None:
                building.add(aor)          # a full-resync page being built may hold it
            if not self.link.connected(peer):
                self.stats["skipped_down"] += 1
                waits.append(self.miss(peer, aor))
                continue
            waits.append(self._send(peer, aor, body))
        if self.mode != "sync" or not waits:
            return defer.succeed(None)
        if len(waits) == 1:
            return waits[0]           # fires (never fails) when acked, missed or timed out
        return defer.DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    def _send(self, peer: str, aor: str, body: dict) -> defer.Deferred:
        """Queue ``body`` for ``peer``; fire True once the peer stored it, False when it
        did not in time (not live: the AOR is then remembered as missed).

        States leave together as one peer-link message (one backup commit and one ack
        for all of them), at most :attr:`WINDOW` messages unacknowledged per peer: what
        is queued while the window is full leaves as one message when an ack opens it,
        so a busy backup gets fewer, bigger commits instead of a queue of small ones
        applied one after the other."""
        done = defer.Deferred()
        queue = self._queue.get(peer)
        if queue is None:
            queue = self._queue[peer] = []
        queue.append((aor, body, done))
        if peer not in self._flush_calls:
            self._flush_calls[peer] = self.reactor.callLater(0, self._flush, peer)
        if self._queue_timers.get(peer) is None:
            self._queue_timers[peer] = self.reactor.callLater(
                self.timeout_s, self._queue_timed_out, peer)
        return done

    def _flush(self, peer: str, force: bool = False) -> None:
        self._flush_calls.pop(peer, None)
        queue = self._queue.get(peer)
        while queue and (force or self._inflight.get(peer, 0) < self.WINDOW):
            items, queue = queue[:self.MESSAGE_STATES], queue[self.MESSAGE_STATES:]
            self._queue[peer] = queue
            self._send_batch(peer, items)
        if not queue:
            self._queue.pop(peer, None)
            timer = self._queue_timers.pop(peer, None)
            if timer is not None and timer.active():
                timer.cancel()

    def _queue_timed_out(self, peer: str) -> None:
        """No ack from ``peer`` for ``timeout_s`` while states waited for the window:
        it is not live for them (they still leave when the window opens)."""
        self._queue_timers[peer] = None
        for aor, _body, done in self._queue.get(peer) or ():
            if not done.called:
                self.stats["timeouts"] += 1
                self.miss(peer, aor).addBoth(lambda _, done=done: done.called or
                                             done.callback(False))

    def _window_opened(self, peer: str) -> None:
        self._inflight[peer] = max(0, self._inflight.get(peer, 0) - 1)
        if self._queue.get(peer):
            timer = self._queue_timers.get(peer)     # progress: the wait starts again
            if timer is not None and timer.active():
                timer.reset(self.timeout_s)
            self._flush(peer)

    def _send_batch(self, peer: str, items: list) -> None:
        """One message for ``items``; one timer for all of them (``timeout_s``: the
        backup is not live for these writes)."""
        self.stats["sent"] += len(items)
        self.stats["messages"] += 1
        self._inflight[peer] = self._inflight.get(peer, 0) + 1

        def timed_out():
            # the backup is not live for these writes: answer without it, resend on return
            for aor, _body, done in items:
                if not done.called:
                    self.stats["timeouts"] += 1
                    self.miss(peer, aor).addBoth(lambda _, done=done: done.called or
                                                 done.callback(False))

        timer = self.reactor.callLater(self.timeout_s, timed_out)
        try:
            d = self.link.send(peer, CHANNEL, {"states": [body for _, body, _ in items]},
                               limit=self.max_unacked)
        except Exception:
            d = defer.fail()

        def acked(_):
            self.stats["acked"] += len(items)
            if timer.active():
                timer.cancel()
            self._release([done for _aor, _body, done in items if not done.called])

        def failed(f):
            self.stats["failed"] += len(items)
            _log.warn("sip: replication of {n} AORs to {peer} failed: {why}", n=len(items),
                      peer=peer, why=f.getErrorMessage())
            if timer.active():
                timer.cancel()
            for aor, _body, done in items:
                persisted = self.miss(peer, aor)
                if not done.called:
                    persisted.addBoth(lambda _, done=done: done.called or done.callback(False))

        d.addCallbacks(acked, failed)
        d.addErrback(lambda f: _log.failure("sip: replication bookkeeping failed", failure=f))
        d.addBoth(lambda _: self._window_opened(peer))
        d.addErrback(lambda f: _log.failure("sip: replication window failed", failure=f))

    def backlog(self, peer: str) -> int:
        unacked = self.link.backlog(peer, CHANNEL) if hasattr(self.link, "backlog") else 0
        return unacked + len(self.missed.get(peer, ()))

    # -- resync of a returning backup ---------------------------------------------
    def _connection(self, peer: str, up: bool) -> None:
        if peer not in self.missed:
            return
        if not up:
            self.peer_bindings[peer] = None
            return
        # tell it what we hold; its hello tells us whether it lost its data
        d = self.link.send(peer, CHANNEL, {"hello": {"bindings": self.location.count,
                                                     "caps": ["synced"]}},
                           limit=1 << 30)
        d.addErrback(lambda f: _log.debug("sip: hello to {peer} not acked: {why}", peer=peer,
                                          why=f.getErrorMessage()))

    def _hello(self, peer: str, info: dict) -> None:
        n = int(info.get("bindings") or 0)
        self.peer_bindings[peer] = n
        caps = info.get("caps")
        self.peer_caps[peer] = frozenset(c for c in caps if isinstance(c, str)) \
            if isinstance(caps, list) else frozenset()
        if peer in self._resyncing:
            # it came back again during a resync: once that ends, look again
            self._again.add(peer)
            return
        if n == 0 and self.location.count > 0 and not self.full_needed[peer]:
            _log.info("sip: {peer} came back without bindings: full resync", peer=peer)
            self.full_needed[peer] = True
        self.reactor.callLater(0, self.resync, peer)

    def resync(self, peer: str) -> defer.Deferred | None:
        """Bring ``peer`` up to date: a full resync if it needs one, else the delta."""
        if peer in self._resyncing or not self.link.connected(peer):
            return None
        if self.full_needed[peer]:
            d = self.full_resync(peer)
        elif self.missed[peer]:
            d = self.delta_resync(peer)
        else:
            self._send_synced(peer)       # it has everything this node holds for it
            return None
        d.addErrback(lambda f: _log.warn("sip: resync of {peer} stopped: {why} (again when it "
                                         "returns)", peer=peer, why=f.getErrorMessage()))
        return d

    def _send_synced(self, peer: str) -> None:
        if "synced" not in self.peer_caps.get(peer, ()):
            return                        # an older peer: it would not read it
        self.stats["synced_sent"] += 1
        d = self.link.send(peer, CHANNEL, {"synced": {"bindings": self.location.count}},
                           limit=1 << 30)
        d.addErrback(lambda f: _log.debug("sip: synced marker to {peer} not acked: {why}",
                                          peer=peer, why=f.getErrorMessage()))

    def _rerun(self, peer: str) -> bool:
        """The peer said hello again during a resync: resync once more (in full if it
        came back without bindings)."""
        if peer not in self._again:
            return False
        self._again.discard(peer)
        if self.peer_bindings.get(peer) == 0 and self.location.count > 0:
            self.full_needed[peer] = True
        return True

    def _current(self, aors: list[str]) -> defer.Deferred:
        """Fire with ``[(bindings, mtime)]``: what this node holds now for ``aors``."""
        loc = self.location
        if loc.immediate:
            try:
                rows = []
                for a in aors:
                    held = loc.store.get_now(MTIME_PREFIX + a)
                    rows.append((loc._read_now(a)[0], None if held is None else float(held)))
                return defer.succeed(rows)
            except Exception:
                return defer.fail()
        d = defer.gatherResults([defer.gatherResults([self.location.read(a),
                                                      self.location.mtime(a)],
                                                     consumeErrors=True) for a in aors],
                                consumeErrors=True)
        return d.addCallback(lambda rows: [(r[0][0], r[1]) for r in rows])

    def delta_resync(self, peer: str) -> defer.Deferred:
        _log.info("sip: {peer} is back: resending {n} AORs it missed", peer=peer,
                  n=len(self.missed[peer]))
        self.stats["delta_resyncs"] += 1
        self._resyncing.add(peer)
        finished = defer.Deferred()
        self._resync_next(peer, finished)
        return finished

    def _resync_next(self, peer: str, finished: defer.Deferred) -> None:
        pending = list(self.missed[peer])[:self.batch]
        if not pending or not self.link.connected(peer):
            self._resyncing.discard(peer)
            again = self._rerun(peer)
            if again or self.link.connected(peer):
                # more (missed meanwhile, or it said hello again), else the synced marker
                self.reactor.callLater(0, self.resync, peer)
            finished.callback(None)
            return
        for aor in pending:
            self.missed[peer].discard(aor)
        d = self._current(pending)

        def send(results):
            sends = []
            for aor, (bindings, mtime) in zip(pending, results):
                body = state_body(aor, bindings, [], mtime)
                body["replace"] = True        # whatever the backup holds beyond this goes
                self.stats["resent"] += 1
                sends.append(self._send(peer, aor, body))
            return defer.DeferredList(sends, consumeErrors=True).addCallback(
                lambda _: self._caught_up(peer, pending))

        def failed(f):
            self.missed[peer].update(pending)
            _log.warn("sip: resync read for {peer} failed: {why}", peer=peer,
                      why=f.getErrorMessage())
        d.addCallbacks(send, failed)
        d.addErrback(lambda f: _log.failure("sip: resync failed", failure=f))
        d.addBoth(lambda _: self.reactor.callLater(0, self._resync_next, peer, finished))

    def full_resync(self, peer: str) -> defer.Deferred:
        """Paged, flow-controlled copy of every AOR held here."""
        self._resyncing.add(peer)
        self.full_running.add(peer)
        d = defer.ensureDeferred(self._full(peer))

        def done(r):
            self._resyncing.discard(peer)
            self.full_running.discard(peer)
            self._building.pop(peer, None)
            again = self._rerun(peer)
            if again or not isinstance(r, Failure):
                # what it missed meanwhile, else the synced marker
                self.reactor.callLater(0, self.resync, peer)
            return r
        return d.addBoth(done)

    async def _full(self, peer: str) -> None:
        started = self.reactor.seconds()
        token = secrets.token_hex(4)
        shards = None
        self.stats["full_resyncs"] += 1
        self.stats["full_page_ms_max"] = None
        # the bindings held here: no full GC walk during the copy.  No collection first:
        # on the live node gc.collect(1) walked the young generations (up to 10 x 20,000
        # objects after a burst of REGISTERs) for ~95 ms in one reactor turn at the start
        # of a 100k resync (py-spy), the worst live REGISTER of the run (139-180 ms)
        self._freeze_heap(collect=False)
        # the full copy covers every AOR missed so far; the flag stays until it ends
        self.missed[peer].clear()
        await self._write(Op.set(FULL_PREFIX + peer, "1"), Op.delete(BACKLOG_PREFIX + peer))
        _log.info("sip: full resync of {peer} starts ({n} bindings here, pages of {page}, "
                  "{window} in flight)", peer=peer, n=self.location.count, page=self.page,
                  window=self.window)
        big = 1 << 30
        await self.link.send(peer, CHANNEL, {"full_begin": {"id": token, "shards": shards,
                                                            "at": started}}, limit=big)
        cursor: str | None = None
        window: list[defer.Deferred] = []
        sent = 0
        n = min(self.page, self.PAGE_START)      # AORs in the next page (measured cost)
        last_send: float | None = None
        exhausted = False
        while not exhausted:
            # build one page in slices: no reactor turn spends more than turn_s on it
            states: list[dict] = []
            self._building[peer] = set()
            while len(states) < n and not exhausted:
                began = self.timer()
                while len(states) < n:
                    want = min(self.SLICE, n - len(states))
                    cursor, keys = await self.store.scan(AOR_PREFIX, cursor, want)
                    aors = [k[len(AOR_PREFIX):] for k in keys]
                    if aors:
                        results = await self._current(aors)
                        for aor, (bindings, mtime) in zip(aors, results):
                            body = state_body(aor, bindings, [], mtime)
                            body["replace"] = True
                            states.append(body)
                    if cursor is None:
                        exhausted = True
                        break
                    if self.timer() - began >= self.turn_s:
                        break
                if len(states) < n and not exhausted:
                    await self._next_turn()
            changed = self._building.pop(peer, None)
            if states and changed:
                # changed after they were read (their live state may already have left):
                # the page carries what is held now, as a page read in one turn would
                again = [i for i, st in enumerate(states) if st["aor"] in changed]
                if again:
                    results = await self._current([states[i]["aor"] for i in again])
                    for i, (bindings, mtime) in zip(again, results):
                        body = state_body(states[i]["aor"], bindings, [], mtime)
                        body["replace"] = True
                        states[i] = body
                    self.stats["full_reread"] += len(again)
            if states:
                if not self.link.connected(peer):
                    raise ConnectionError(f"{peer} left during the full resync "
                                          f"({sent} AORs sent)")
                d = self.link.send(peer, CHANNEL, {"states": states, "full": token}, limit=big)
                now = self.reactor.seconds()
                cycle = None if last_send is None else now - last_send
                last_send = now
                window.append((d, now, len(states)))
                sent += len(states)
                self.stats["full_sent"] += len(states)
                self.stats["full_pages"] += 1
                if len(window) >= self.window:
                    first, sent_at, size = window.pop(0)
                    await first
                    # the page's round trip is mostly the backup storing it, the time a
                    # live sync REGISTER may wait behind it: size the next one to page_s
                    n = self._next_page(n, size, self.reactor.seconds() - sent_at, cycle)
            if exhausted:
                break
            if not self.link.connected(peer):
                raise ConnectionError(f"{peer} left during the full resync ({sent} AORs sent)")
            # let the live REGISTERs through between two pages
            await task.deferLater(self.reactor, self.pause_s, lambda: None)
        for d, _at, _size in window:
            await d
        await self.link.send(peer, CHANNEL, {"full_end": {"id": token, "shards": shards,
                                                          "sent": sent}}, limit=big)
        self.full_needed[peer] = False
        await self._write(Op.delete(FULL_PREFIX + peer))
        took = self.reactor.seconds() - started
        self.stats["last_full_resync_s"] = round(took, 3)
        _log.info("sip: full resync of {peer} done: {n} AORs in {s:.1f}s", peer=peer, n=sent,
                  s=took)

    def _freeze_heap(self, collect: bool = True) -> None:
        """Move what the heap holds now out of the cyclic GC's reach (``gc.freeze``).

        A full resync adds some 100k long-lived objects to a backup (its store mirror);
        each time the heap grew by a quarter the GC walked all of it again: 30-50 ms
        stalls per full collection on the busy box (measured: 6 in a 100k resync), and a
        live sync REGISTER waits behind them.  Frozen objects are still freed by
        reference counting; only cyclic garbage alive at the freeze is never collected
        (on a backup the young generations are collected first, so there is little; the
        live node freezes without collecting: what young cyclic garbage it holds then,
        a few thousand objects at most, stays)."""
        if collect:
            gc.collect(1)
        gc.freeze()
        self.stats["gc_freezes"] += 1

    def _next_turn(self) -> defer.Deferred:
        """Fire in a later reactor turn (what is ready to run goes first)."""
        d = defer.Deferred()
        self.reactor.callLater(0, d.callback, None)
        return d

    def _next_page(self, n: int, sent: int, took: float, cycle: float | None = None) -> int:
        """AORs in the next full-resync page: the last page's per-AOR round trip scaled to
        ``page_s`` (at most doubling), but at least what keeps ``min_rate`` AORs/s at the
        last cycle's length (a busy box: fixed costs per page) and at least PAGE_MIN; at
        most ``page``."""
        if took <= 0:
            size = 2 * n
        else:
            size = int(self.page_s * sent / took)
        size = min(2 * n, size)
        if cycle is not None and cycle > 0:
            size = max(size, int(self.min_rate * cycle + 0.999))
        size = min(self.page, max(self.PAGE_MIN, size))
        self.stats["full_page_size"] = size
        ms = round(took * 1000.0, 1)
        if self.stats["full_page_ms_max"] is None or ms > self.stats["full_page_ms_max"]:
            self.stats["full_page_ms_max"] = ms       # this resync's slowest page round trip
        return size

    # -- backup side ------------------------------------------------------------
    def apply(self, peer: str, body: Any) -> defer.Deferred:
        """Store AOR states from ``peer`` (``{"states": [...]}`` or one state) in one
        commit; fire once it is durable (the link acknowledges then)."""
        try:
            if "hello" in body:
                self._hello(peer, body["hello"])
                return defer.succeed(None)
            if "synced" in body:
                self.stats["synced_received"] += 1
                if peer not in self.synced_from:
                    _log.info("sip: {peer} sent everything it had for this node", peer=peer)
                self.synced_from.add(peer)
                if self.on_synced is not None:
                    self.on_synced(peer)
                return defer.succeed(None)
            if "full_begin" in body:
                return self._full_begin(peer, body["full_begin"])
            if "full_end" in body:
                return self._full_end(peer, body["full_end"])
            states = body["states"] if "states" in body else [body]
            merged: dict[str, dict] = {}
            for st in states:
                aor = st["aor"]
                new = dict(st.get("set") or {})
                expires = {}
                for uri, text in new.items():
                    rec = json.loads(text)
                    try:
                        expires[uri] = float(rec["expires"])
                    except (KeyError, TypeError, ValueError):
                        _log.warn("sip: replicated binding {aor} {uri} without a usable expiry "
                                  "(not in the expiry index)", aor=aor, uri=uri)
                prev = merged.get(aor)
                gone = set(st.get("del") or ()) | (set(prev["set"]) | prev["del"] if prev else set())
                mtime = st.get("mtime")
                merged[aor] = {"set": new, "expires": expires, "del": gone - set(new),
                               "replace": bool(st.get("replace")) or bool(prev and prev["replace"]),
                               "mtime": None if mtime is None else float(mtime)}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            return defer.fail(ValueError(f"bad sip replication message: {e}"))
        if "full" in body:
            self._pages_in += 1
            if self._pages_in % self.FREEZE_PAGES == 0:
                self._freeze_heap()
        for running in self._full_in.values():
            running["untouched"].difference_update(merged)
        store = self.location.store
        aors = list(merged)
        if self.location.immediate:
            # the embedded store answers reads at once: no Deferred per AOR
            try:
                d = defer.succeed([(store.hgetall_now(AOR_PREFIX + a),
                                    store.get_now(MTIME_PREFIX + a)) for a in aors])
            except Exception:
                d = defer.fail()
        else:
            d = defer.gatherResults(
                [defer.gatherResults([store.hgetall(AOR_PREFIX + a), store.get(MTIME_PREFIX + a)],
                                     consumeErrors=True) for a in aors], consumeErrors=True)

        def write(rows):
            ops = []
            delta = 0
            for aor, (current, held) in zip(aors, rows):
                st = merged[aor]
                if st["mtime"] is not None and held is not None and st["mtime"] < float(held):
                    self.stats["stale_ignored"] += 1     # we hold a newer state
                    continue
                if st["mtime"] is not None:
                    ops.append(Op.set(MTIME_PREFIX + aor, repr(st["mtime"])))
                key = AOR_PREFIX + aor
                new = st["set"]
                stale = [u for u in current if u not in new] if st["replace"] else []
                drop = sorted((st["del"] | set(stale)) - set(new))
                if drop:
                    ops.append(Op.hdel(key, drop))
                    ops.append(Op.zrem(EXPIRY, [f"{aor} {u}" for u in drop]))
                if new:
                    ops.append(Op.hset(key, new))
                    ops.append(Op.zadd(EXPIRY, {f"{aor} {u}": e
                                                for u, e in st["expires"].items()}))
                    ops.append(Op.set(USER_PREFIX + aor, "1"))
                after = (set(current) - set(drop)) | set(new)
                delta += len(after) - len(current)
            self.stats["applied"] += len(aors)
            self.location.count += delta
            return store.commit(ops) if ops else None
        return d.addCallback(write)

    def _full_begin(self, peer: str, info: dict) -> defer.Deferred:
        shards = info.get("shards")
        covered = None if shards is None else {int(s) for s in shards}

        def got(aors):
            untouched = {a for a in aors if covered is None or self.shard_of(a) in covered}
            self._full_in[peer] = {"id": info.get("id"), "untouched": untouched,
                                   "at": info.get("at")}
            _log.info("sip: full resync from {peer} begins ({n} AORs here in its shards)",
                      peer=peer, n=len(untouched))
        return self.location.all_aors().addCallback(got)

    def _full_end(self, peer: str, info: dict) -> defer.Deferred:
        running = self._full_in.pop(peer, None)
        self._freeze_heap()                  # what the resync added: the GC leaves it alone
        if running is None or running["id"] != info.get("id"):
            return defer.succeed(None)
        gone = sorted(running["untouched"])
        if not gone:
            return defer.succeed(None)
        store = self.location.store
        at = running.get("at")
        d = defer.gatherResults(
            [defer.gatherResults([store.hgetall(AOR_PREFIX + a), store.get(MTIME_PREFIX + a)],
                                 consumeErrors=True) for a in gone], consumeErrors=True)

        def drop(rows):
            ops = []
            n = 0
            for aor, (current, held) in zip(gone, rows):
                if held is not None and at is not None and float(held) > float(at):
                    continue                 # changed here after the resync began: newer
                if current:
                    ops.append(Op.hdel(AOR_PREFIX + aor, sorted(current)))
                    ops.append(Op.zrem(EXPIRY, [f"{aor} {u}" for u in current]))
                    n += len(current)
            self.location.count -= n
            self.stats["full_removed"] += n
            _log.info("sip: full resync from {peer} done; {n} bindings it no longer has removed",
                      peer=peer, n=n)
            return store.commit(ops) if ops else None
        return d.addCallback(drop)
