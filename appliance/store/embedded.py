"""The embedded store: the data in memory, every change committed to SQLite.

Reads are answered from an in-process mirror (``get_now``/``hgetall_now``
return at once).  Writes are applied to the mirror at once and remembered as
dirty keys, hash fields and sorted-set members; at the end of the reactor
turn the dirty set becomes one :class:`~appliance.store.sqlite_file.Batch`
that the store's one writer thread commits as one SQLite transaction (group
commit).  A write's Deferred, :meth:`EmbeddedStore.durable` and change
notifications fire after that commit.  Batches are committed one at a time
in the order they were built, so acknowledgements fire in issue order and a
crash leaves a prefix of what was issued (SQLite commits a batch entirely or
not at all).

Bounded commits.  While one commit is in the writer thread the writes of the
next turns gather; once they reach ``max_commit_rows`` rows they are sealed
(built into a batch with the waiters issued so far) and a new dirty set
starts.  Sealed batches commit in order after the one in flight.  So under
overload a commit never grows to thousands of rows that all wait for each
other, and the acknowledgements come back in bounded bursts (each burst is
one reactor turn of callbacks: 15,000 rows were ~4,000 REGISTER answers in one
turn, long enough to delay the node's own heartbeats).  A seal falls between
two writes, so every batch is still a contiguous run of writes: a crash keeps
a prefix, and one write (one ``commit``) is never split.  The acknowledgements
of one commit fire ``ACK_SLICE`` per reactor turn (in order; later commits'
after them), so the node's timers run between the slices.  What ``fsync`` means for a crash or a power loss:
:mod:`appliance.store.sqlite_file`.

A failed commit (I/O error, disk full) is a state, not a hang: every write
waiting for it or queued behind it fails with :class:`StoreDown`, the store
refuses reads and writes (the node advertises ``store_down`` and its partner
takes over), and nothing written after the error is acknowledged.  The store
retries with backoff (1 s doubling to 30 s) or when asked
(:meth:`recheck`, RPC ``store.recheck``): it opens the database afresh,
proves a write goes through, reloads the mirror from disk (the writes that
failed are gone: they were never acknowledged) and tells subscribers to
resync.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

from sortedcontainers import SortedList
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from appliance.store.interface import (
    RESYNC,
    IImmediateStore,
    ISubscription,
    Op,
    StoreDown,
    StoreError,
)
from appliance.store.sqlite_file import COMPACT_HASH_FIELDS, SYNCHRONOUS, Batch, SQLiteFile
from appliance.store.validate import check_str
from appliance.store.zset import ZSet

_chain = itertools.chain.from_iterable
_dumps = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode
_WRONGTYPE = "WRONGTYPE operation against a key holding the wrong kind of value"
_NONE = type(None)
_WANT = {"set": str, "hset": dict, "hdel": dict, "zadd": ZSet, "zrem": ZSet}
RETRY_MIN_S = 1.0
RETRY_MAX_S = 30.0
MIN_FREE_BYTES = 256 * 1024     # a failed store recovers only with this much disk free
STABLE_S = 60.0                 # healthy this long after a recovery: retries start at 1 s again
SLOW_LOG_S = 10.0               # slow commits: one log line at most this often


@implementer(ISubscription)
class _Subscription:
    def __init__(self, store: "EmbeddedStore", prefix: str, callback):
        self.store, self.prefix, self.callback = store, prefix, callback
        self.ready = defer.succeed(None)       # live at once (redis: after PSUBSCRIBE)

    def cancel(self) -> None:
        try:
            self.store._subscriptions.remove(self)
        except ValueError:
            pass


class _Job:
    """One transaction in flight and who waits for it."""

    __slots__ = ("batch", "waiters", "notes", "started", "disk_s", "sync")

    def __repr__(self) -> str:
        return f"<_Job {self.batch.rows()} rows, {len(self.waiters)} waiters>"

    def __init__(self, batch: Batch, waiters: list, notes: list, sync: bool = False):
        self.batch, self.waiters, self.notes, self.sync = batch, waiters, notes, sync
        self.started = self.disk_s = 0.0


@implementer(IImmediateStore)
class EmbeddedStore(Service):
    """The embedded store on SQLite (see the module docstring)."""

    backend = "memory"
    name = "store"
    _log = Logger(namespace="appliance.store.embedded")

    #: rows gathered behind a commit in flight before they are sealed into their own
    #: transaction (see "Bounded commits" in the module docstring)
    MAX_COMMIT_ROWS = 2000
    #: acknowledgements fired per reactor turn (the rest in the next turns, in order)
    ACK_SLICE = 64

    def __init__(self, reactor, *, state_dir: str | Path, fsync: str = "always",
                 batch_interval_s: float = 0.2, run_in_thread=None, turn_batching: bool = True,
                 max_commit_rows: int | None = None):
        if fsync not in SYNCHRONOUS:
            raise ValueError(f"fsync must be always|batch|never, not {fsync!r}")
        self._reactor = reactor
        self.fsync = fsync
        self.batch_interval_s = batch_interval_s
        self._file = SQLiteFile(state_dir, fsync)
        self.path = self._file.path
        self._run_in_thread = run_in_thread     # tests: run "thread" work inline or held
        self._pool: ThreadPool | None = None
        # writes of a turn share one transaction; False: a job at each write
        # (tests that drive a Clock by hand)
        self.turn_batching = turn_batching
        # the mirror
        self._data: dict[str, Any] = {}
        self._index: SortedList = SortedList()      # the keys, for scan pages
        #: keys added since the last scan, not in ``_index`` yet (a SortedList insert per
        #: new key cost ~2 us on the write path; a scan merges them in one update)
        self._index_new: set[str] = set()
        self._expiry: dict[str, float] = {}
        self._expiry_heap: list[tuple[float, str]] = []
        self._expiry_call = None
        # what the next transaction writes
        self._dirty_whole: set[str] = set()
        self._dirty_members: dict[str, set[str]] = {}
        self._dirty_expires: set[str] = set()
        self._clear: set[str] = set()             # whole keys that had rows in hfields/zmembers
        #: the hashes whose rows on disk (once the batches built so far commit) are field
        #: rows; every other hash is one row (sqlite_file: COMPACT_HASH_FIELDS)
        self._row_hashes: set[str] = set()
        self._dirty_rows = 0                      # rows (about) the dirty set will write
        self.max_commit_rows = max_commit_rows or self.MAX_COMMIT_ROWS
        self._waiters: list[defer.Deferred] = []
        self._notes: list[tuple[str, str]] = []
        self._job: _Job | None = None
        self._sealed: list[_Job] = []            # built, waiting for the job in flight
        self._acking: collections.deque = collections.deque()   # committed, not fired yet
        self._ack_call = None
        self._kick_call = None
        self._lazy_call = None
        self._sync_call = None
        self._unsynced = False                  # batch: commits since the last checkpoint
        self._subscriptions: list[_Subscription] = []
        # health
        self._ready = False
        self._stopping = False
        self._failed: str | None = None
        self._retry_s = RETRY_MIN_S
        self._retry_call = None
        self._rechecking: defer.Deferred | None = None
        self._first_error: str | None = None
        self._recovered_at: float | None = None
        self.stats = {"writes": 0, "commits": 0, "rows": 0, "checkpoints": 0,
                      "slow_commits": 0, "failures": 0, "recoveries": 0, "sealed": 0}
        self.slow_commit_s = 0.25     # a commit slower than this is logged and counted
        self._slow_logged_at: float | None = None   # logged at most every SLOW_LOG_S

    # ------------------------------------------------------------------
    # life cycle
    # ------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self._ready and self._failed is None

    def describe(self) -> dict[str, Any]:
        info = {"backend": "memory", "engine": f"sqlite {sqlite3.sqlite_version}",
                "healthy": self.healthy, "keys": len(self._data), "file": str(self.path),
                "fsync": self.fsync,
                "durability": {"fsync": self.fsync, "synchronous": SYNCHRONOUS[self.fsync],
                               "survives": _SURVIVES[self.fsync]},
                "stats": dict(self.stats)}
        if self._failed:
            info["error"] = self._failed
        return info

    def startService(self):
        super().startService()
        self._stopping = False
        if self._run_in_thread is None and self._pool is None:
            self._pool = ThreadPool(minthreads=1, maxthreads=1, name="store-writer")
            self._pool.start()
            # a reactor stopped without stopService must not wait on the thread
            trigger = getattr(self._reactor, "addSystemEventTrigger", None)
            if trigger is not None:
                trigger("during", "shutdown", self._stop_pool)
        d = self._in_thread(self._open_and_load)
        d.addCallback(self._loaded)
        d.addErrback(self._load_failed)
        return d

    def _open_and_load(self):
        """Writer thread: open the database and read everything."""
        self._file.close()
        self._file.open()
        return (*self._file.load(), self._file.row_hashes)

    def _load_failed(self, failure):
        self._failed = f"cannot load state from {self.path}: {failure.getErrorMessage()}"
        self._log.error("store load failed: {error}", error=self._failed)
        self._stop_pool()
        return failure

    def _loaded(self, result):
        strings, hashes, zsets, expiry, row_hashes = result
        self._row_hashes = set(row_hashes)
        now = self._reactor.seconds()
        data: dict[str, Any] = dict(strings)
        data.update(hashes)
        for key, members in zsets.items():
            data[key] = ZSet(members)
        self._data = data
        self._index = SortedList(data)
        self._index_new = set()
        self._expiry, self._expiry_heap = {}, []
        self._clear_dirty()
        for key, when in expiry.items():
            if key in data:
                self._expiry[key] = when
                self._expiry_heap.append((when, key))
        heapq.heapify(self._expiry_heap)
        self._ready = True
        self._failed = None
        for key in [k for k, when in self._expiry.items() if when <= now]:
            self._expire_now(key)           # deleted on disk with the next batch
        self._schedule_expiry()
        self._log.info("embedded store ready: {keys} keys from {path} (fsync={fsync}, "
                       "synchronous={sync})", keys=len(self._data), path=str(self.path),
                       fsync=self.fsync, sync=SYNCHRONOUS[self.fsync])
        if self._dirty_whole:
            self._kick_soon()

    def stopService(self):
        super().stopService()
        self._stopping = True
        for name in ("_expiry_call", "_kick_call", "_lazy_call", "_sync_call", "_retry_call"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        if not self._ready:
            self._stop_pool()
            return defer.succeed(None)
        d = self.durable() if not self._failed else defer.succeed(None)
        d.addErrback(lambda f: self._log.warn("store: last writes not committed at stop: "
                                              "{error}", error=f.getErrorMessage()))
        d.addBoth(lambda _: self._in_thread(self._file.close))
        d.addErrback(lambda f: self._log.failure("store close failed", failure=f))
        d.addBoth(self._closed)
        return d

    def _closed(self, _):
        self._ready = False
        self._stop_pool()
        if self._ack_call is not None and self._ack_call.active():
            self._ack_call.cancel()
        while self._acking:                  # committed: they succeed
            self._release_some(len(self._acking))
        for w in self._take_waiters():
            w.errback(StoreError("store stopped"))

    def _stop_pool(self):
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()

    def _in_thread(self, f, *args):
        if self._run_in_thread is not None:
            return self._run_in_thread(f, *args)
        if self._pool is None:
            return defer.fail(StoreError("store writer is not running"))
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    # ------------------------------------------------------------------
    # group commit
    # ------------------------------------------------------------------
    def _pending(self) -> bool:
        return bool(self._job is not None or self._dirty_whole or self._dirty_members
                    or self._dirty_expires or self._waiters or self._sealed or self._acking)

    def _release(self, waiters: list) -> None:
        """Fire ``waiters`` (committed) after those before them, ACK_SLICE per turn."""
        self._acking.extend(waiters)
        if self._ack_call is None:
            self._release_some()

    def _release_some(self, n: int | None = None) -> None:
        self._ack_call = None
        q = self._acking
        n = n or self.ACK_SLICE
        while q and n:
            n -= 1
            q.popleft().callback(None)
        if q:
            self._ack_call = self._reactor.callLater(0, self._release_some)

    def _kick_soon(self):
        """Commit at the end of this reactor turn: every write of the turn
        (a whole read of packets) shares one transaction."""
        if self._job is not None:
            if self._dirty_rows >= self.max_commit_rows:
                self._seal()
            return
        if not self.turn_batching:
            self._kick()
            return
        if self._kick_call is not None:
            return
        self._kick_call = self._reactor.callLater(0, self._kick_due)

    def _kick_due(self):
        self._kick_call = None
        self._kick()

    def _take_waiters(self) -> list:
        waiters, self._waiters = self._waiters, []
        return waiters

    def _build_batch(self) -> Batch:
        """The dirty keys, fields and members as rows (their values now)."""
        b = Batch()
        data, expiry = self._data, self._expiry
        clear, rows = self._clear, self._row_hashes
        dumps = _dumps
        for key in self._dirty_whole:
            v = data.get(key)
            if v is None:
                b.drop.append((key,))
                rows.discard(key)
                continue
            if key in clear:                       # it was a hash or sorted set: its rows go
                b.drop.append((key,))
            when = expiry.get(key)
            if v.__class__ is str:
                b.keys.append((key, "s", v, when))
                rows.discard(key)
            elif v.__class__ is dict:
                if len(v) <= COMPACT_HASH_FIELDS:  # one row (sqlite_file's module docstring)
                    if key in rows:
                        rows.discard(key)
                        if key not in clear:
                            b.drop.append((key,))
                    b.keys.append((key, "h", dumps(v), when))
                else:
                    rows.add(key)
                    b.keys.append((key, "h", None, when))
                    b.hset.extend((key, f, fv) for f, fv in v.items())
            else:
                b.keys.append((key, "z", None, when))
                b.zadd.extend((key, m, s) for m, s in v.scores.items())
                rows.discard(key)
        for key, members in self._dirty_members.items():
            v = data.get(key)
            if v.__class__ is dict:
                if len(v) <= COMPACT_HASH_FIELDS:  # the whole hash, one row
                    if key in rows:
                        rows.discard(key)
                        b.drop.append((key,))
                    b.keys.append((key, "h", dumps(v), expiry.get(key)))
                    continue
                if key not in rows:                # it was one row: now a row per field
                    rows.add(key)
                    b.keys.append((key, "h", None, expiry.get(key)))
                    b.hset.extend((key, f, fv) for f, fv in v.items())
                    continue
                for f in members:
                    fv = v.get(f)
                    if fv is None:
                        b.hdel.append((key, f))
                    else:
                        b.hset.append((key, f, fv))
            else:                                   # a ZSet (a type change marks whole)
                scores = v.scores
                for m in members:
                    s = scores.get(m)
                    if s is None:
                        b.zdel.append((key, m))
                    else:
                        b.zadd.append((key, m, s))
        for key in self._dirty_expires:
            if key in data:
                b.expires.append((expiry.get(key), key))
        self._clear_dirty()
        return b

    def _clear_dirty(self):
        self._dirty_whole, self._dirty_members, self._dirty_expires = set(), {}, set()
        self._clear = set()
        self._dirty_rows = 0

    def _seal(self):
        """The writes so far (behind the commit in flight) become their own batch."""
        batch = self._build_batch()
        waiters, notes = self._take_waiters(), self._notes
        self._notes = []
        self._sealed.append(_Job(batch, waiters, notes))
        self.stats["sealed"] += 1

    def _kick(self):
        if self._job is not None or self._failed or not self._ready:
            return
        if not self._pending():
            return
        if self._sealed:
            job = self._job = self._sealed.pop(0)
        else:
            batch = self._build_batch()
            waiters, notes = self._take_waiters(), self._notes
            self._notes = []
            if not batch:                 # only waiters: everything before them is durable
                self._release(waiters)
                self._deliver(notes)
                return
            job = self._job = _Job(batch, waiters, notes)
        job.started = time.monotonic()
        batch = job.batch
        d = self._in_thread(self._file.apply, batch)
        d.addCallbacks(self._job_done, self._job_failed, callbackArgs=(job,), errbackArgs=(job,))
        d.addErrback(lambda f: self._log.failure("store writer bug", failure=f))

    def _job_done(self, disk_s, job: _Job):
        self._job = None
        if (self._recovered_at is not None
                and self._reactor.seconds() - self._recovered_at >= STABLE_S):
            self._recovered_at, self._retry_s = None, RETRY_MIN_S
        self.stats["commits"] += 1
        self.stats["rows"] += job.batch.rows()
        took = time.monotonic() - job.started
        if took > self.slow_commit_s:
            self.stats["slow_commits"] += 1
            now = time.monotonic()
            # at most one line every SLOW_LOG_S: under overload a log write per commit
            # is reactor time (and, behind a busy disk's journal, can block it)
            if self._slow_logged_at is None or now - self._slow_logged_at >= SLOW_LOG_S:
                self._slow_logged_at = now
                self._log.warn("store: a commit of {rows} rows took {ms:.0f} ms ({disk:.0f} ms "
                               "in SQLite); acknowledgements waited that long ({n} slow "
                               "commits so far)", rows=job.batch.rows(), ms=took * 1e3,
                               disk=(disk_s or 0) * 1e3, n=self.stats["slow_commits"])
        if self.fsync == "batch":
            self._unsynced = True
            if self._sync_call is None:
                self._sync_call = self._reactor.callLater(self.batch_interval_s, self._sync_due)
        self._release(job.waiters)
        self._deliver(job.notes)
        self._kick()

    def _job_failed(self, failure, job: _Job):
        self._job = None
        reason = f"commit failed: {failure.getErrorMessage()}"
        self._failed = reason                 # refused from here on, also by waiters' callbacks
        for w in job.waiters:
            w.errback(StoreDown(reason))
        self._failed = None
        self._fail(reason)

    def _sync_due(self):
        """fsync = "batch": a checkpoint fsyncs the WAL at least this often."""
        self._sync_call = None
        if not self._unsynced or self._failed or not self._ready:
            return
        self._unsynced = False
        d = self._in_thread(self._file.checkpoint)

        def done(_):
            self.stats["checkpoints"] += 1

        d.addCallbacks(done, lambda f: self._fail(f"checkpoint failed: {f.getErrorMessage()}"))
        d.addErrback(lambda f: self._log.failure("store checkpoint bug", failure=f))

    # ------------------------------------------------------------------
    # failure and recovery
    # ------------------------------------------------------------------
    def _fail(self, reason: str):
        """The disk refused a write: fail everything queued, refuse the rest."""
        first = self._failed is None
        self._failed = reason
        if first:
            self._first_error = reason
        self.stats["failures"] += 1
        self._clear_dirty()
        self._notes = []
        sealed, self._sealed = self._sealed, []
        for w in [w for job in sealed for w in job.waiters] + self._take_waiters():
            w.errback(StoreDown(reason))
        if first:
            self._log.error("store failed: {reason}; writes are refused and the node reports "
                            "store_down until a write goes through again (retry in {retry:.0f} s, "
                            "or: appliancectl call store.recheck)",
                            reason=reason, retry=self._retry_s)
        self._schedule_retry()

    def _schedule_retry(self):
        if self._stopping or self._retry_call is not None:
            return
        self._retry_call = self._reactor.callLater(self._retry_s, self._retry_due)
        self._retry_s = min(RETRY_MAX_S, self._retry_s * 2)

    def _retry_due(self):
        self._retry_call = None
        d = self.recheck()
        d.addErrback(lambda f: self._log.failure("store recheck bug", failure=f))

    def recheck(self) -> defer.Deferred:
        """Check the disk now; a failed store that can write again reloads
        from disk and becomes healthy.  Fires with :meth:`describe`."""
        if not self._ready:
            return defer.succeed(self.describe())
        if self._failed is None:
            return self.durable().addBoth(lambda _: self.describe())
        if self._rechecking is not None:
            d = defer.Deferred()
            self._rechecking.addBoth(lambda r: (d.callback(self.describe()), r)[1])
            return d

        def attempt():
            self._file.close()              # never reuse a handle that saw an error
            self._file.open()
            self._file.probe(MIN_FREE_BYTES)
            return (*self._file.load(), self._file.row_hashes)

        def ok(result):
            old = self._failed
            self._loaded(result)
            self._recovered_at = self._reactor.seconds()   # the backoff resets once stable
            self.stats["recoveries"] += 1
            self._log.warn("store healthy again after: {reason} (reloaded {keys} keys from "
                           "{path}; the writes that failed were never acknowledged)",
                           reason=old, keys=len(self._data), path=str(self.path))
            self._resync_subscribers()

        def still_failed(f):
            now = f"recheck failed: {f.getErrorMessage()}"
            self._failed = now if now == self._first_error else f"{now} (first: {self._first_error})"
            self._log.warn("store recheck: still failing: {error}", error=f.getErrorMessage())
            self._schedule_retry()

        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        d = self._rechecking = self._in_thread(attempt)
        d.addCallbacks(ok, still_failed)

        def finished(_):
            self._rechecking = None
            return self.describe()

        return d.addBoth(finished)

    # ------------------------------------------------------------------
    # expiry
    # ------------------------------------------------------------------
    def _live(self, key: str):
        """The value of ``key``, honouring expiry (lazily removes expired)."""
        when = self._expiry.get(key)
        if when is not None and when <= self._reactor.seconds():
            self._expire_now(key)
            return None
        return self._data.get(key)

    def _expire_now(self, key: str):
        self._drop(key)
        self._note(key, "expired")
        self._kick_soon()

    def _schedule_expiry(self):
        if not self._ready:
            return
        heap = self._expiry_heap
        while heap and self._expiry.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)                      # stale entry
        if not heap:
            return
        if self._expiry_call is not None and self._expiry_call.active():
            if self._expiry_call.getTime() <= heap[0][0]:
                return
            self._expiry_call.cancel()
        delay = max(0.0, heap[0][0] - self._reactor.seconds())
        self._expiry_call = self._reactor.callLater(delay, self._sweep)

    def _sweep(self):
        self._expiry_call = None
        if self._failed:
            return
        now = self._reactor.seconds()
        while self._expiry_heap and self._expiry_heap[0][0] <= now:
            when, key = heapq.heappop(self._expiry_heap)
            if self._expiry.get(key) == when:
                self._expire_now(key)
        self._schedule_expiry()

    def _set_expiry(self, key: str, when: float | None):
        if when is None:
            self._expiry.pop(key, None)
            return
        self._expiry[key] = when
        heapq.heappush(self._expiry_heap, (when, key))
        self._schedule_expiry()

    # ------------------------------------------------------------------
    # the mirror: every change goes through these
    # ------------------------------------------------------------------
    def _put(self, key: str, value) -> None:
        """A new value for the whole key (a new key, or a type change)."""
        self._dirty_rows += 1 if value.__class__ is str else 1 + len(value)
        old = self._data.get(key)
        if old is None:
            self._index_new.add(key)
        elif old.__class__ is not str:
            self._clear.add(key)
        self._data[key] = value
        self._dirty_whole.add(key)
        self._dirty_members.pop(key, None)
        self._dirty_expires.discard(key)

    def _drop(self, key: str) -> None:
        self._dirty_rows += 1
        old = self._data.pop(key, None)
        if old is not None:
            if key in self._index_new:
                self._index_new.discard(key)
            else:
                self._index.remove(key)
            if old.__class__ is not str:
                self._clear.add(key)
        self._expiry.pop(key, None)
        self._dirty_whole.add(key)
        self._dirty_members.pop(key, None)
        self._dirty_expires.discard(key)

    def _member(self, key: str, member: str) -> None:
        if key in self._dirty_whole:
            return
        self._dirty_rows += 1
        members = self._dirty_members.get(key)
        if members is None:
            self._dirty_members[key] = {member}
        else:
            members.add(member)

    def _expires_changed(self, key: str) -> None:
        if key not in self._dirty_whole:
            self._dirty_rows += 1
            self._dirty_expires.add(key)

    def _note(self, key: str, op: str) -> None:
        if self._subscriptions:
            self._notes.append((key, op))

    def _deliver(self, notes: list):
        if notes and self._subscriptions:
            self._reactor.callLater(0, self._deliver_now, notes)

    def _deliver_now(self, notes):
        for key, op in notes:
            for sub in list(self._subscriptions):
                if key.startswith(sub.prefix):
                    self._call_subscriber(sub, key, op)

    def _call_subscriber(self, sub, key, op):
        try:
            sub.callback(key, op)
        except Exception:
            self._log.failure("store subscriber for {prefix!r} failed on {key}",
                              prefix=sub.prefix, key=key)

    def _resync_subscribers(self):
        subs = list(self._subscriptions)
        if subs:
            self._reactor.callLater(
                0, lambda: [self._call_subscriber(s, s.prefix, RESYNC) for s in subs])

    def _check_ready(self):
        if not self._ready:
            raise StoreError("embedded store is not started")
        if self._failed:
            raise StoreDown(self._failed)

    # ------------------------------------------------------------------
    # IStateStore: writes are applied to the mirror, committed, then acked
    # ------------------------------------------------------------------
    def _write(self, fn: Callable[[], Any]):
        """Run ``fn`` (which changes the mirror and returns its result); the
        Deferred fires with the result once everything written so far is
        committed."""
        try:
            self._check_ready()
            result = fn()
        except StoreError:
            return defer.fail()
        except Exception as e:
            return defer.fail(StoreError(str(e)))
        self.stats["writes"] += 1
        if not self._pending():
            return defer.succeed(result)          # nothing written, nothing before it
        d = defer.Deferred()
        self._waiters.append(d)
        self._kick_soon()
        return d.addCallback(lambda _: result)

    def _read(self, fn: Callable[[], Any]):
        try:
            self._check_ready()
            return defer.succeed(fn())
        except StoreError:
            return defer.fail()
        except Exception as e:
            return defer.fail(StoreError(str(e)))

    def _typed(self, key: str, kind: type):
        value = self._live(key)
        if value is not None and value.__class__ is not kind:
            raise StoreError(_WRONGTYPE)
        return value

    def _ttl_at(self, ttl_s):
        if ttl_s is None:
            return None
        if ttl_s <= 0:
            raise StoreError("ttl_s must be positive")
        return self._reactor.seconds() + float(ttl_s)

    # -- IImmediateStore: answers at once ----------------------------------
    def get_now(self, key: str):
        self._check_ready()
        return self._typed(key, str)

    def hgetall_now(self, key: str) -> dict:
        self._check_ready()
        h = self._typed(key, dict)
        return {} if h is None else dict(h)

    #: ``commit_now(lazy=True)``: committed at the latest this long after, when no other
    #: write or durable() brought a commit sooner
    LAZY_S = 0.5

    def commit_now(self, ops, expect=None, *, lazy: bool = False) -> bool:
        """``commit`` applied at once: True, or False when a guard did not
        match; raises StoreError.  Visible at once; durable when a
        :meth:`durable` asked for afterwards fires.

        ``lazy``: a change nobody waits for (a marker whose loss only costs work
        again, e.g. "the partner has this record"): no commit of its own at the end
        of the turn; it goes with the next transaction (any later write's, a
        :meth:`durable`'s) or at the latest ``LAZY_S`` later.  Still in issue order:
        whatever is acknowledged after it was committed with or after it."""
        self._check_ready()
        try:
            ok = self._apply_commit(ops, expect)
        except StoreError:
            raise
        except Exception as e:
            raise StoreError(str(e)) from e
        self.stats["writes"] += 1
        if ok:
            if lazy:
                self._lazy_soon()
            else:
                self._kick_soon()
        return ok

    def _lazy_soon(self):
        if self._kick_call is not None or self._job is not None or self._lazy_call is not None:
            return                  # a commit is coming (a job's end kicks the next one)
        self._lazy_call = self._reactor.callLater(self.LAZY_S, self._lazy_due)

    def _lazy_due(self):
        self._lazy_call = None
        self._kick()

    def durable(self) -> defer.Deferred:
        """Fires when every write made so far is committed (per the fsync
        policy); fails with StoreDown if the commit fails."""
        if self._failed:
            return defer.fail(StoreDown(self._failed))
        if not self._ready:
            return defer.fail(StoreError("embedded store is not started"))
        if not self._pending():
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append(d)
        self._kick_soon()
        return d

    flush = durable

    # -- plain keys -----------------------------------------------------
    def get(self, key):
        def op():
            check_str(key)
            return self._typed(key, str)
        return self._read(op)

    def _do_set(self, key, value, when):
        self._put(key, value)
        self._set_expiry(key, when)
        self._note(key, "set")

    def set(self, key, value, ttl_s=None):
        def op():
            check_str(key, value)
            self._do_set(key, value, self._ttl_at(ttl_s))
        return self._write(op)

    def delete(self, *keys):
        def op():
            check_str(*keys)
            existing = [k for k in dict.fromkeys(keys) if self._live(k) is not None]
            for k in existing:
                self._drop(k)
                self._note(k, "delete")
            return len(existing)
        return self._write(op)

    def expire(self, key, ttl_s):
        def op():
            check_str(key)
            when = self._ttl_at(ttl_s)
            if self._live(key) is None:
                return False
            self._set_expiry(key, when)
            self._expires_changed(key)
            self._note(key, "expire")
            return True
        return self._write(op)

    def ttl(self, key):
        def op():
            check_str(key)
            if self._live(key) is None or key not in self._expiry:
                return None
            return max(0.0, self._expiry[key] - self._reactor.seconds())
        return self._read(op)

    # -- hashes -----------------------------------------------------------
    def _do_hset(self, key, mapping) -> int:
        h = self._typed(key, dict)
        if h is None:
            self._expiry.pop(key, None)
            self._put(key, dict(mapping))
            return len(mapping)
        new = 0
        member = self._member
        for f, v in mapping.items():
            if f not in h:
                new += 1
            h[f] = v
            member(key, f)
        return new

    def hset(self, key, mapping):
        def op():
            if not mapping:
                raise StoreError("hset needs at least one field")
            check_str(key, *mapping.keys(), *mapping.values())
            new = self._do_hset(key, mapping)
            self._note(key, "hset")
            return new
        return self._write(op)

    def hget(self, key, field):
        def op():
            check_str(key, field)
            h = self._typed(key, dict)
            return None if h is None else h.get(field)
        return self._read(op)

    def hgetall(self, key):
        def op():
            check_str(key)
            h = self._typed(key, dict)
            return {} if h is None else dict(h)
        return self._read(op)

    def _do_hdel(self, key, fields) -> int:
        h = self._typed(key, dict)
        if h is None:
            return 0
        gone = [f for f in dict.fromkeys(fields) if f in h]
        for f in gone:
            del h[f]
            self._member(key, f)
        if not h:
            self._drop(key)
        return len(gone)

    def hdel(self, key, *fields):
        def op():
            check_str(key, *fields)
            n = self._do_hdel(key, fields)
            if n:
                self._note(key, "hdel")
            return n
        return self._write(op)

    # -- sorted sets ------------------------------------------------------
    def _do_zadd(self, key, scores: dict) -> int:
        z = self._typed(key, ZSet)
        if z is None:
            self._expiry.pop(key, None)
            self._put(key, ZSet(scores))
            return len(scores)
        new = 0
        for m, s in scores.items():
            old = z.scores.get(m)
            if old == s:
                continue
            z.add(m, s)
            self._member(key, m)
            if old is None:
                new += 1
        return new

    def zadd(self, key, mapping):
        def op():
            if not mapping:
                raise StoreError("zadd needs at least one member")
            check_str(key, *mapping.keys())
            scores = {m: float(s) for m, s in mapping.items()}
            if any(s != s for s in scores.values()):
                raise StoreError("score is not a number (NaN)")
            new = self._do_zadd(key, scores)
            self._note(key, "zadd")
            return new
        return self._write(op)

    def _do_zrem(self, key, members) -> int:
        z = self._typed(key, ZSet)
        if z is None:
            return 0
        gone = [m for m in dict.fromkeys(members) if z.remove(m)]
        for m in gone:
            self._member(key, m)
        if not len(z):
            self._drop(key)
        return len(gone)

    def zrem(self, key, *members):
        def op():
            check_str(key, *members)
            n = self._do_zrem(key, members)
            if n:
                self._note(key, "zrem")
            return n
        return self._write(op)

    def zscore(self, key, member):
        def op():
            check_str(key, member)
            z = self._typed(key, ZSet)
            return None if z is None else z.scores.get(member)
        return self._read(op)

    def zcard(self, key):
        def op():
            check_str(key)
            z = self._typed(key, ZSet)
            return 0 if z is None else len(z)
        return self._read(op)

    def zrangebyscore(self, key, min_score, max_score, limit=None):
        def op():
            check_str(key)
            z = self._typed(key, ZSet)
            if z is None:
                return []
            return z.range(float(min_score), float(max_score), limit)
        return self._read(op)

    # -- atomic writes ----------------------------------------------------
    def cas(self, key, expected, new, ttl_s=None):
        def op():
            check_str(key)
            if expected is not None:
                check_str(expected)
            if new is not None:
                check_str(new)
            when = self._ttl_at(ttl_s) if new is not None else None
            if self._typed(key, str) != expected:
                return False
            if new is None:
                if expected is not None:
                    self._drop(key)
                    self._note(key, "delete")
                return True
            self._do_set(key, new, when)
            return True
        return self._write(op)

    def commit(self, ops, expect=None):
        return self._write(lambda: self._apply_commit(ops, expect))

    def _apply_commit(self, ops, expect) -> bool:
        for key, value in (expect or {}).items():
            if key.__class__ is not str or not key.isascii():
                check_str(key)
            if value is not None and (value.__class__ is not str or not value.isascii()):
                check_str(value)
            if self._typed(key, str) != value:
                return False
        self._validate_ops(ops)          # every op checked before any is applied
        for o in ops:
            kind, key, args = o.kind, o.key, o.args
            if kind == "set":
                self._do_set(key, args[0], None if args[1] is None
                             else self._reactor.seconds() + float(args[1]))
                continue
            if kind == "delete":
                if self._live(key) is None:
                    continue
                self._drop(key)
            elif kind == "hset":
                if not args[0]:
                    continue                  # nothing to write (as on redis)
                self._do_hset(key, dict(args[0]))
            elif kind == "zadd":
                if not args[0]:
                    continue
                self._do_zadd(key, dict(args[0]))
            elif kind == "hdel":
                if not self._do_hdel(key, args[0]):
                    continue
            elif not self._do_zrem(key, args[0]):
                continue
            self._note(key, kind)
        return True

    def _validate_ops(self, ops):
        """Check every op before applying any (all or nothing).  The common
        case (ASCII str keys and values) is checked by class identity; the
        rest goes through :func:`check_str` for the error text."""
        kinds: dict[str, type] = {}
        for o in ops:
            if o.__class__ is not Op and not isinstance(o, Op) or o.kind not in Op.KINDS:
                raise StoreError(f"not a store operation: {o!r}")
            kind, key, args = o.kind, o.key, o.args
            if key.__class__ is not str or not key.isascii():
                check_str(key)
            if kind == "delete":
                kinds[key] = _NONE
                continue
            want = _WANT[kind]
            current = kinds.get(key)
            if current is None:
                value = self._live(key)
                current = _NONE if value is None else value.__class__
            if current is not _NONE and current is not want and kind != "set":
                raise StoreError(_WRONGTYPE)
            if kind == "set":
                kinds[key] = want
                if args[0].__class__ is not str or not args[0].isascii():
                    check_str(args[0])
                if args[1] is not None and args[1] <= 0:
                    raise StoreError("ttl_s must be positive")
            elif kind == "hset":
                pairs = args[0]
                if pairs:
                    kinds[key] = want
                try:                       # all str and ASCII (a lease record): one test
                    plain = "".join(_chain(pairs)).isascii()
                except TypeError:
                    plain = False
                if not plain:
                    for f, v in pairs:
                        if (f.__class__ is not str or v.__class__ is not str
                                or not f.isascii() or not v.isascii()):
                            check_str(f, v)
            elif kind == "zadd":
                if args[0]:
                    kinds[key] = want
                for m, score in args[0]:
                    if m.__class__ is not str or not m.isascii():
                        check_str(m)
                    if score != score:
                        raise StoreError("score is not a number (NaN)")
            else:                                   # hdel, zrem
                for m in args[0]:
                    if m.__class__ is not str or not m.isascii():
                        check_str(m)

    # -- iteration and change feed -----------------------------------------
    def scan(self, prefix, cursor=None, count=100):
        """A page of keys in key order: O(log n + count) (a sorted key index)."""
        def op():
            check_str(prefix)
            if cursor is not None:
                check_str(cursor)
            if count < 1:
                raise StoreError("count must be at least 1")
            now = self._reactor.seconds()
            start = max(prefix, cursor or "")
            if self._index_new:
                self._index.update(self._index_new)
                self._index_new.clear()
            page = []
            for k in self._index.irange(start, None):
                if not k.startswith(prefix):
                    break
                if k == cursor:
                    continue
                when = self._expiry.get(k)
                if when is not None and when <= now:
                    continue
                page.append(k)
                if len(page) > count:
                    return page[count - 1], page[:count]
            return None, page
        return self._read(op)

    def subscribe(self, prefix, callback):
        sub = _Subscription(self, prefix, callback)
        self._subscriptions.append(sub)
        return sub

    def ping(self):
        return self._read(lambda: True)


_SURVIVES = {
    "always": "process crash and power loss (every commit fsynced)",
    "batch": "process crash; a power loss can lose the last batch_interval_s of commits",
    "never": "process crash; a power loss can lose recent commits or corrupt the file",
}
