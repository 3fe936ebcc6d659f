"""The embedded store: dicts in memory, an append-only journal on disk.

Layout under ``<state_dir>/store/``::

    snapshot          JSON {"format": 1, "gen": G, "data": ..., "expiry": ...}
    journal.<gen>     framed records written after the snapshot of gen <= gen

A journal record is ``!II`` (payload length, CRC-32 of payload) followed by
a JSON payload: one write, or ``["tx", [...]]`` for an atomic commit, so a
commit is replayed all or nothing.  On start the snapshot is loaded and
every journal of its generation or later is replayed in order; a torn or
corrupt tail (a crash mid-write) is detected by length/CRC, logged, and cut
off.  Each start writes to a new generation.

Durability (``fsync``):

* ``always`` -- a write's Deferred fires only after its record is fsynced.
  Writes are grouped: while one batch is being written and fsynced in a
  thread, later records queue up and go together in the next batch (group
  commit), so the reactor never blocks on the disk.
* ``batch`` -- the Deferred fires at once; records are written and fsynced
  in the background within ``batch_interval_s``.
* ``never`` -- records are written in the background, never fsynced.

When the journals pass ``compact_after_bytes`` the store snapshots itself
(encoded in the reactor ``snapshot_chunk`` keys per turn, so serving goes
on between chunks, then written and fsynced in a thread; the snapshot is
fuzzy and the journal from the seal on makes it exact on replay), then
deletes the journals the snapshot covers; memory and disk stay bounded by
the live data.  The threshold grows with the data (at least the last
snapshot's size), so a large store does not snapshot itself over and over:
compaction costs stay proportional to the writes.
"""

from __future__ import annotations

import heapq
import json
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Callable

from sortedcontainers import SortedList
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from appliance.store.interface import IStateStore, ISubscription, Op, StoreError

_HEADER = struct.Struct("!II")
_FORMAT = 1
_WRONGTYPE = "WRONGTYPE operation against a key holding the wrong kind of value"


class ZSet:
    """A sorted set: member -> score, plus the (score, member) pairs in a
    ``SortedList`` (O(log n) updates: no list shifting with 1M members)."""

    __slots__ = ("scores", "order")

    def __init__(self, items: dict[str, float] | None = None):
        self.scores: dict[str, float] = {}
        if items:
            self.scores = {m: float(s) for m, s in items.items()}
        self.order = SortedList((s, m) for m, s in self.scores.items())

    def add(self, member: str, score: float) -> bool:
        old = self.scores.get(member)
        if old is not None:
            if old == score:
                return False
            self.order.remove((old, member))
        self.scores[member] = score
        self.order.add((score, member))
        return old is None

    def remove(self, member: str) -> bool:
        old = self.scores.pop(member, None)
        if old is None:
            return False
        self.order.remove((old, member))
        return True

    def range(self, lo: float, hi: float, limit: int | None) -> list[tuple[str, float]]:
        out = []
        for score, member in self.order.irange((lo, ""), None):
            if score > hi or (limit is not None and len(out) >= limit):
                break
            out.append((member, score))
        return out

    def __len__(self) -> int:
        return len(self.scores)


@implementer(ISubscription)
class _Subscription:
    def __init__(self, store: "MemoryStore", prefix: str, callback):
        self.store, self.prefix, self.callback = store, prefix, callback
        self.ready = defer.succeed(None)   # live at once (redis: after PSUBSCRIBE)

    def cancel(self) -> None:
        try:
            self.store._subscriptions.remove(self)
        except ValueError:
            pass


class _Job:
    """One batch of journal frames for one file, and who waits for it."""

    __slots__ = ("fh", "frames", "waiters", "close", "started", "disk_s")

    def __init__(self, fh, frames, waiters, close=False):
        self.fh, self.frames, self.waiters, self.close = fh, frames, waiters, close
        self.started = self.disk_s = 0.0


_NONE = type(None)


_WANT = {"set": str, "hset": dict, "hdel": dict, "zadd": ZSet, "zrem": ZSet}


def _encode_value(value: Any) -> list:
    """A stored value as a snapshot entry ``[kind, value]``."""
    if isinstance(value, str):
        return ["s", value]
    if isinstance(value, dict):
        return ["h", value]
    return ["z", value.scores]


_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False,
                                check_circular=False).encode


def _frame(record: Any) -> bytes:
    payload = _encode_json(record).encode()
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def read_journal(path: Path) -> tuple[list[Any], int, int]:
    """Parse one journal: ``(records, good_bytes, total_bytes)``.

    Reading stops at the first torn or corrupt record; ``good_bytes`` is
    where the valid prefix ends.
    """
    data = path.read_bytes()
    records, offset = [], 0
    while offset + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        payload = data[start:start + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            break
        try:
            records.append(json.loads(payload))
        except ValueError:
            break
        offset = start + length
    return records, offset, len(data)


@implementer(IStateStore)
class MemoryStore(Service):
    """The embedded, journaled store (see the module docstring)."""

    backend = "memory"
    name = "store"
    _log = Logger(namespace="appliance.store.memory")

    def __init__(self, reactor, *, state_dir: str | Path, fsync: str = "always",
                 compact_after_bytes: int = 8 * 1024 * 1024, batch_interval_s: float = 0.2,
                 threadpool=None, run_in_thread=None, snapshot_chunk: int = 500,
                 turn_batching: bool = True):
        if fsync not in ("always", "batch", "never"):
            raise ValueError(f"fsync must be always|batch|never, not {fsync!r}")
        self._reactor = reactor
        self.dir = Path(state_dir) / "store"
        self.fsync = fsync
        self.compact_after_bytes = compact_after_bytes
        self.batch_interval_s = batch_interval_s
        self._threadpool = threadpool
        self._run_in_thread = run_in_thread   # tests: run "thread" work inline
        self.snapshot_chunk = max(1, snapshot_chunk)   # keys encoded per reactor turn
        # journal jobs start at the end of the reactor turn (one job, one
        # fsync for the turn's writes); False: at the first write (tests
        # that drive a Clock by hand and expect the job at once)
        self.turn_batching = turn_batching
        self._compact_call = None
        self._data: dict[str, Any] = {}
        self._expiry: dict[str, float] = {}
        self._expiry_heap: list[tuple[float, str]] = []
        self._expiry_call = None
        self._subscriptions: list[_Subscription] = []
        self._notify_queue: list[tuple[str, str]] = []
        self._notify_call = None
        self._gen = 0
        self._fh = None
        self._pending: list[bytes] = []
        self._waiters: list[defer.Deferred] = []
        self._jobs: list[_Job] = []
        self._flushing = False
        self._sync_wanted = False
        self._batch_call = None
        self._kick_call = None
        self._journal_bytes = 0
        self._snapshot_bytes = 0      # size of the last snapshot: compaction is amortised
        self._compacting = False
        self._ready = False
        self._failed: str | None = None
        self.stats = {"writes": 0, "flushes": 0, "fsyncs": 0, "compactions": 0,
                      "torn_records_dropped": 0, "slow_journal_writes": 0}
        self.slow_job_s = 0.25     # a journal job slower than this is logged and counted

    # ------------------------------------------------------------------
    # service life cycle
    # ------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self._ready and self._failed is None

    def describe(self) -> dict[str, Any]:
        info = {"backend": "memory", "healthy": self.healthy, "keys": len(self._data),
                "fsync": self.fsync, "journal_bytes": self._journal_bytes,
                "state_dir": str(self.dir), "stats": dict(self.stats)}
        if self._failed:
            info["error"] = self._failed
        return info

    def startService(self):
        super().startService()
        d = self._in_thread(self._load_from_disk)
        d.addCallback(self._loaded)
        d.addErrback(self._load_failed)
        return d

    def _load_failed(self, failure):
        self._failed = f"cannot load state from {self.dir}: {failure.getErrorMessage()}"
        self._log.failure("store load failed", failure=failure)
        return failure

    def _load_from_disk(self):
        """Thread: read snapshot + journals, cut torn tails, open a new journal."""
        self.dir.mkdir(parents=True, exist_ok=True)
        data: dict[str, Any] = {}
        expiry: dict[str, float] = {}
        snap_gen = 0
        snap = self.dir / "snapshot"
        self._snapshot_bytes = snap.stat().st_size if snap.exists() else 0
        if snap.exists():
            doc = json.loads(snap.read_text(encoding="utf-8"))
            snap_gen = doc["gen"]
            for key, (kind, value) in doc["data"].items():
                data[key] = value if kind == "s" else dict(value) if kind == "h" else ZSet(value)
            expiry = {k: float(v) for k, v in doc["expiry"].items()}
        gens = sorted(int(p.name.split(".", 1)[1]) for p in self.dir.glob("journal.*")
                      if p.name.split(".", 1)[1].isdigit())
        replayed, torn, size = 0, [], 0
        for gen in gens:
            path = self._journal_path(gen)
            if gen < snap_gen:
                path.unlink(missing_ok=True)   # covered by the snapshot
                continue
            records, good, total = read_journal(path)
            for record in records:
                self._apply_record(record, data, expiry)
            replayed += len(records)
            if good < total:
                torn.append((path.name, good, total - good))
                with open(path, "r+b") as fh:
                    fh.truncate(good)
                    fh.flush()
                    os.fsync(fh.fileno())
            size += good
        self._gen = (max(gens) if gens else snap_gen) + 1
        self._fh = open(self._journal_path(self._gen), "ab")
        self._fsync_dir()
        return data, expiry, replayed, torn, size

    def _loaded(self, result):
        data, expiry, replayed, torn, size = result
        now = self._reactor.seconds()
        self._data, self._expiry = data, {}
        for key, when in expiry.items():
            if when <= now:
                self._data.pop(key, None)
            elif key in self._data:
                self._expiry[key] = when
                heapq.heappush(self._expiry_heap, (when, key))
        self._journal_bytes = size
        for name, offset, dropped in torn:
            self.stats["torn_records_dropped"] += 1
            self._log.warn(
                "journal {file}: torn or corrupt record at offset {offset} dropped "
                "({dropped} bytes); the write it held was never acknowledged",
                file=name, offset=offset, dropped=dropped)
        self._ready = True
        self._schedule_expiry()
        self._log.info("memory store ready: {keys} keys, {replayed} journal records replayed "
                       "from {dir} (fsync={fsync})", keys=len(self._data), replayed=replayed,
                       dir=str(self.dir), fsync=self.fsync)
        self._maybe_compact()

    def stopService(self):
        super().stopService()
        for call in (self._expiry_call, self._notify_call, self._batch_call, self._compact_call,
                     self._kick_call):
            if call is not None and call.active():
                call.cancel()
        if self._compact_call is not None:
            self._compacting = False       # abandoned: the journals it would replace stay
        self._expiry_call = self._notify_call = self._batch_call = self._compact_call = None
        self._kick_call = None
        if not self._ready:
            return defer.succeed(None)
        return self.flush().addCallback(self._close)

    def _close(self, _):
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._ready = False

    def flush(self) -> defer.Deferred:
        """Fire when everything written so far is on disk (and fsynced
        unless ``fsync = "never"``)."""
        if not self._ready:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append(d)
        self._kick(force_sync=self.fsync != "never")
        return d

    # ------------------------------------------------------------------
    # the journal writer
    # ------------------------------------------------------------------
    def _journal_path(self, gen: int) -> Path:
        return self.dir / f"journal.{gen:012d}"

    def _fsync_dir(self):
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _in_thread(self, f, *args):
        if self._run_in_thread is not None:
            return self._run_in_thread(f, *args)
        pool = self._threadpool or self._reactor.getThreadPool()
        return deferToThreadPool(self._reactor, pool, f, *args)

    def _log_record(self, record, wait: bool = True) -> defer.Deferred | None:
        frame = _frame(record)
        self._pending.append(frame)
        self._journal_bytes += len(frame)
        self.stats["writes"] += 1
        if self.fsync == "always":
            if not wait:                   # commit_now: the caller waits on durable()
                self._kick_soon()
                return None
            d = defer.Deferred()
            self._waiters.append(d)
            self._kick_soon()
            return d
        if self.fsync == "batch":
            if self._batch_call is None:
                self._batch_call = self._reactor.callLater(self.batch_interval_s, self._batch_due)
        else:
            self._kick_soon()
        return defer.succeed(None) if wait else None

    def _kick_soon(self):
        """Start a journal job at the end of this reactor turn: every record
        written in the turn (a whole read of packets) shares one job and one
        fsync, instead of the first going alone and the rest queueing."""
        if not self.turn_batching:
            self._kick()
            return
        if self._flushing or self._kick_call is not None:
            return
        self._kick_call = self._reactor.callLater(0, self._kick_due)

    def _kick_due(self):
        self._kick_call = None
        self._kick()

    def _batch_due(self):
        self._batch_call = None
        self._kick(force_sync=True)

    def _kick(self, force_sync: bool = False):
        if force_sync:
            self._sync_wanted = True
        if self._flushing:
            return
        if self._jobs:
            job = self._jobs.pop(0)
        elif self._pending or self._waiters:
            job = _Job(self._fh, self._pending, self._waiters)
            self._pending, self._waiters = [], []
        else:
            return
        do_sync = (self.fsync == "always" or self._sync_wanted
                   or (self.fsync != "never" and bool(job.waiters)))
        self._sync_wanted = False
        self._flushing = True
        job.started = time.monotonic()
        d = self._in_thread(self._write_job, job, do_sync)
        d.addCallbacks(self._job_done, self._job_failed, callbackArgs=(job,), errbackArgs=(job,))
        d.addErrback(lambda f: self._log.failure("journal writer bug", failure=f))

    def _write_job(self, job: _Job, do_sync: bool):
        """Thread: append frames, flush, fsync as the policy says."""
        t0 = time.monotonic()
        if job.frames:
            job.fh.write(b"".join(job.frames))
        job.fh.flush()
        if do_sync:
            os.fsync(job.fh.fileno())
        if job.close:
            job.fh.close()
        job.disk_s = time.monotonic() - t0
        return do_sync

    def _job_done(self, synced, job: _Job):
        self._flushing = False
        self.stats["flushes"] += 1
        took = time.monotonic() - job.started
        if took > self.slow_job_s:
            # acknowledgements waited this long: say whether the disk or the
            # process (CPU, GIL, thread pool) was slow
            self.stats["slow_journal_writes"] += 1
            self._log.warn("store: a journal write of {n} records took {ms:.0f} ms "
                           "({disk:.0f} ms in write+fsync); acknowledgements waited that long",
                           n=len(job.frames), ms=took * 1e3, disk=job.disk_s * 1e3)
        if synced:
            self.stats["fsyncs"] += 1
        for d in job.waiters:
            d.callback(None)
        self._kick()
        self._maybe_compact()

    def _job_failed(self, failure, job: _Job):
        self._flushing = False
        self._failed = f"journal write failed: {failure.getErrorMessage()}"
        self._log.failure("journal write failed; store is unhealthy", failure=failure)
        for d in job.waiters:
            d.errback(StoreError(self._failed))

    # ------------------------------------------------------------------
    # compaction
    # ------------------------------------------------------------------
    def _maybe_compact(self):
        if (self._compacting or not self._ready or self._failed
                or self._journal_bytes < max(self.compact_after_bytes, self._snapshot_bytes)):
            return
        self.compact().addErrback(
            lambda f: self._log.failure("compaction failed (will retry)", failure=f))

    def compact(self) -> defer.Deferred:
        """Snapshot the current state and drop the journals it covers."""
        if self._compacting:
            return defer.succeed(False)
        self._compacting = True
        # Seal the current journal: what is pending belongs to it and is in
        # the snapshot copy taken now; later writes go to the next generation.
        self._jobs.append(_Job(self._fh, self._pending, self._waiters, close=True))
        self._pending, self._waiters = [], []
        old_gen, self._gen = self._gen, self._gen + 1
        self._fh = open(self._journal_path(self._gen), "ab")
        self._journal_bytes = 0
        # The snapshot is encoded in the reactor a chunk of keys per turn (no
        # copy of the state, no long pause), written and fsynced in a thread.
        # It is fuzzy: a key encoded late may carry writes made after the
        # seal -- harmless, because every record from the seal on is in the
        # next journal and replaying them (overwrites of keys, fields and
        # members, deletes) over any such mix ends in the same state.
        gen = self._gen
        keys = list(self._data)
        parts: list[str] = []
        d = defer.Deferred()
        timing = {"busy": 0.0, "max": 0.0}

        def step(i: int):
            self._compact_call = None
            t0 = time.perf_counter()
            chunk = {}
            data = self._data
            for key in keys[i:i + self.snapshot_chunk]:
                value = data.get(key)
                if value is not None:
                    chunk[key] = _encode_value(value)
            if chunk:
                parts.append(json.dumps(chunk, separators=(",", ":"), ensure_ascii=False)[1:-1])
            spent = time.perf_counter() - t0
            timing["busy"] += spent
            timing["max"] = max(timing["max"], spent)
            if i + self.snapshot_chunk < len(keys):
                step_later(i + self.snapshot_chunk)
                return
            text = '{"format":%d,"gen":%d,"data":{%s},"expiry":%s}' % (
                _FORMAT, gen, ",".join(parts), json.dumps(self._expiry, separators=(",", ":")))
            self._in_thread(self._write_snapshot_text, text, old_gen).chainDeferred(d)

        def guarded(i: int):
            try:
                step(i)
            except Exception:
                d.errback()

        def step_later(i: int):
            self._compact_call = self._reactor.callLater(0, guarded, i)

        self._kick()
        guarded(0)

        def done(size):
            self._compacting = False
            self._snapshot_bytes = size or 0
            self.stats["compactions"] += 1
            self._log.info("store compacted: snapshot of {keys} keys ({size} bytes; encoding "
                           "took {busy:.0f} ms of the reactor, at most {most:.1f} ms at a "
                           "time), journals up to {gen} removed", keys=len(keys), size=size,
                           busy=timing["busy"] * 1000, most=timing["max"] * 1000, gen=old_gen)
            return True

        def failed(f):
            self._compacting = False
            return f

        return d.addCallbacks(done, failed)

    def _write_snapshot_text(self, text: str, old_gen: int) -> int:
        """Thread: write the snapshot atomically, then remove the journals it covers."""
        tmp = self.dir / "snapshot.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        size = tmp.stat().st_size
        os.replace(tmp, self.dir / "snapshot")
        self._fsync_dir()
        for path in self.dir.glob("journal.*"):
            suffix = path.name.split(".", 1)[1]
            if suffix.isdigit() and int(suffix) <= old_gen:
                path.unlink(missing_ok=True)
        return size

    # ------------------------------------------------------------------
    # applying records (used live and for replay)
    # ------------------------------------------------------------------
    @staticmethod
    def _apply_record(record, data: dict, expiry: dict):
        kind = record[0]
        if kind == "tx":
            for sub in record[1]:
                MemoryStore._apply_record(sub, data, expiry)
            return
        key = record[1]
        if kind == "set":
            data[key] = record[2]
            if record[3] is None:
                expiry.pop(key, None)
            else:
                expiry[key] = record[3]
        elif kind == "del":
            data.pop(key, None)
            expiry.pop(key, None)
        elif kind == "expire":
            if key in data:
                expiry[key] = record[2]
        elif kind == "hset":
            data.setdefault(key, {}).update(record[2])
        elif kind == "hdel":
            h = data.get(key)
            if isinstance(h, dict):
                for f in record[2]:
                    h.pop(f, None)
                if not h:
                    data.pop(key, None)
                    expiry.pop(key, None)
        elif kind == "zadd":
            z = data.setdefault(key, ZSet())
            for m, s in record[2].items():
                z.add(m, float(s))
        elif kind == "zrem":
            z = data.get(key)
            if isinstance(z, ZSet):
                for m in record[2]:
                    z.remove(m)
                if not len(z):
                    data.pop(key, None)
                    expiry.pop(key, None)

    # ------------------------------------------------------------------
    # helpers for the live data
    # ------------------------------------------------------------------
    def _live(self, key: str):
        """The value of ``key``, honouring expiry (lazily removes expired)."""
        when = self._expiry.get(key)
        if when is not None and when <= self._reactor.seconds():
            self._expire_now(key)
            return None
        return self._data.get(key)

    def _expire_now(self, key: str):
        self._data.pop(key, None)
        self._expiry.pop(key, None)
        self._notify(key, "expired")

    def _schedule_expiry(self):
        if not self._ready:
            return
        while self._expiry_heap:
            when, key = self._expiry_heap[0]
            if self._expiry.get(key) != when:
                heapq.heappop(self._expiry_heap)   # stale entry
                continue
            break
        if not self._expiry_heap:
            return
        delay = max(0.0, self._expiry_heap[0][0] - self._reactor.seconds())
        if self._expiry_call is not None and self._expiry_call.active():
            if self._expiry_call.getTime() <= self._expiry_heap[0][0]:
                return
            self._expiry_call.cancel()
        self._expiry_call = self._reactor.callLater(delay, self._sweep)

    def _sweep(self):
        self._expiry_call = None
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

    def _notify(self, key: str, op: str):
        if not self._subscriptions:
            return
        self._notify_queue.append((key, op))
        if self._notify_call is None:
            self._notify_call = self._reactor.callLater(0, self._deliver)

    def _deliver(self):
        self._notify_call = None
        queue, self._notify_queue = self._notify_queue, []
        for key, op in queue:
            for sub in list(self._subscriptions):
                if key.startswith(sub.prefix):
                    try:
                        sub.callback(key, op)
                    except Exception:
                        self._log.failure("store subscriber for {prefix!r} failed on {key}",
                                          prefix=sub.prefix, key=key)

    def _check_ready(self):
        if not self._ready:
            raise StoreError("memory store is not started")
        if self._failed:
            raise StoreError(self._failed)

    # ------------------------------------------------------------------
    # IStateStore: writes are applied in memory, journaled, then acked
    # ------------------------------------------------------------------
    def _write(self, fn: Callable[[], Any]):
        """Run ``fn`` (which returns (result, [records], [(key, op)])) and
        journal its records; the Deferred fires with result when durable."""
        try:
            self._check_ready()
            result, records, changes = fn()
        except StoreError:
            return defer.fail()
        except Exception as e:
            return defer.fail(StoreError(str(e)))
        if not records:
            return defer.succeed(result)
        record = records[0] if len(records) == 1 else ["tx", records]
        d = self._log_record(record)
        for key, op in changes:
            self._notify(key, op)
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
        if value is not None and not isinstance(value, kind):
            raise StoreError(_WRONGTYPE)
        return value

    @staticmethod
    def _check_str(*values):
        for v in values:
            if v.__class__ is not str and not isinstance(v, str):
                raise StoreError(f"keys, fields and values must be str, not {type(v).__name__}")

    def _ttl_at(self, ttl_s):
        if ttl_s is None:
            return None
        if ttl_s <= 0:
            raise StoreError("ttl_s must be positive")
        return self._reactor.seconds() + float(ttl_s)

    # -- synchronous reads: this process holds the data -------------------
    # Optional capability (not in IStateStore): callers look for these with
    # getattr and otherwise use the Deferred reads.  Same answers as
    # get/hgetall, returned at once; StoreError when the store is not usable.
    def get_now(self, key: str):
        self._check_ready()
        return self._typed(key, str)

    def hgetall_now(self, key: str) -> dict:
        self._check_ready()
        h = self._typed(key, dict)
        return {} if h is None else dict(h)

    # -- plain keys -----------------------------------------------------
    def get(self, key):
        def op():
            self._check_str(key)
            return self._typed(key, str)
        return self._read(op)

    def _do_set(self, key, value, ttl_s, checked=False):
        if not checked:
            self._check_str(key, value)
        when = self._ttl_at(ttl_s)
        self._data[key] = value
        self._set_expiry(key, when)
        return ["set", key, value, when]

    def set(self, key, value, ttl_s=None):
        return self._write(lambda: (None, [self._do_set(key, value, ttl_s)], [(key, "set")]))

    def delete(self, *keys):
        def op():
            self._check_str(*keys)
            existing = [k for k in dict.fromkeys(keys) if self._live(k) is not None]
            for k in existing:
                self._data.pop(k, None)
                self._expiry.pop(k, None)
            return len(existing), [["del", k] for k in existing], [(k, "delete") for k in existing]
        return self._write(op)

    def expire(self, key, ttl_s):
        def op():
            self._check_str(key)
            when = self._ttl_at(ttl_s)
            if self._live(key) is None:
                return False, [], []
            self._set_expiry(key, when)
            return True, [["expire", key, when]], [(key, "expire")]
        return self._write(op)

    def ttl(self, key):
        def op():
            self._check_str(key)
            if self._live(key) is None or key not in self._expiry:
                return None
            return max(0.0, self._expiry[key] - self._reactor.seconds())
        return self._read(op)

    # -- hashes -----------------------------------------------------------
    def _do_hset(self, key, mapping, checked=False):
        if not checked:
            self._check_str(key, *mapping.keys(), *mapping.values())
        h = self._typed(key, dict)
        if h is None:
            h = self._data[key] = {}
        new = sum(1 for f in mapping if f not in h)
        h.update(mapping)
        return new, ["hset", key, dict(mapping)]

    def hset(self, key, mapping):
        def op():
            if not mapping:
                raise StoreError("hset needs at least one field")
            new, record = self._do_hset(key, mapping)
            return new, [record], [(key, "hset")]
        return self._write(op)

    def hget(self, key, field):
        def op():
            self._check_str(key, field)
            h = self._typed(key, dict)
            return None if h is None else h.get(field)
        return self._read(op)

    def hgetall(self, key):
        def op():
            self._check_str(key)
            h = self._typed(key, dict)
            return {} if h is None else dict(h)
        return self._read(op)

    def _do_hdel(self, key, fields):
        self._check_str(key, *fields)
        h = self._typed(key, dict)
        if h is None:
            return 0, None
        gone = [f for f in fields if f in h]
        for f in gone:
            del h[f]
        if not h:
            self._data.pop(key, None)
            self._expiry.pop(key, None)
        return len(gone), (["hdel", key, gone] if gone else None)

    def hdel(self, key, *fields):
        def op():
            n, record = self._do_hdel(key, fields)
            return n, [record] if record else [], [(key, "hdel")] if record else []
        return self._write(op)

    # -- sorted sets ------------------------------------------------------
    def _do_zadd(self, key, mapping, checked=False):
        if not checked:
            self._check_str(key, *mapping.keys())
        scores = {m: float(s) for m, s in mapping.items()}
        if not checked and any(score != score for score in scores.values()):
            raise StoreError("score is not a number (NaN)")
        z = self._typed(key, ZSet)
        if z is None:
            z = self._data[key] = ZSet()
        new = sum(1 for m, s in scores.items() if z.add(m, s))
        return new, ["zadd", key, scores]

    def zadd(self, key, mapping):
        def op():
            if not mapping:
                raise StoreError("zadd needs at least one member")
            new, record = self._do_zadd(key, mapping)
            return new, [record], [(key, "zadd")]
        return self._write(op)

    def _do_zrem(self, key, members):
        self._check_str(key, *members)
        z = self._typed(key, ZSet)
        if z is None:
            return 0, None
        gone = [m for m in members if z.remove(m)]
        if not len(z):
            self._data.pop(key, None)
            self._expiry.pop(key, None)
        return len(gone), (["zrem", key, gone] if gone else None)

    def zrem(self, key, *members):
        def op():
            n, record = self._do_zrem(key, members)
            return n, [record] if record else [], [(key, "zrem")] if record else []
        return self._write(op)

    def zscore(self, key, member):
        def op():
            self._check_str(key, member)
            z = self._typed(key, ZSet)
            return None if z is None else z.scores.get(member)
        return self._read(op)

    def zcard(self, key):
        def op():
            self._check_str(key)
            z = self._typed(key, ZSet)
            return 0 if z is None else len(z)
        return self._read(op)

    def zrangebyscore(self, key, min_score, max_score, limit=None):
        def op():
            self._check_str(key)
            z = self._typed(key, ZSet)
            if z is None:
                return []
            return z.range(float(min_score), float(max_score), limit)
        return self._read(op)

    # -- atomic writes ----------------------------------------------------
    def cas(self, key, expected, new, ttl_s=None):
        def op():
            self._check_str(key)
            if self._typed(key, str) != expected:
                return False, [], []
            if new is None:
                if expected is None:
                    return True, [], []
                self._data.pop(key, None)
                self._expiry.pop(key, None)
                return True, [["del", key]], [(key, "delete")]
            return True, [self._do_set(key, new, ttl_s)], [(key, "set")]
        return self._write(op)

    def commit(self, ops, expect=None):
        return self._write(lambda: self._apply_commit(ops, expect))

    # -- optional capability (not in IStateStore): writes without a Deferred.
    # Callers look for ``commit_now`` with getattr, as for ``get_now``.
    def commit_now(self, ops, expect=None) -> bool:
        """``commit`` applied at once: returns True, or False when a guard
        did not match; raises StoreError.  The change is visible at once and
        journaled; it is on disk (per the fsync policy) when a
        :meth:`durable` asked for afterwards fires -- wait for that before
        telling anybody outside the process."""
        self._check_ready()
        try:
            ok, records, changes = self._apply_commit(ops, expect)
        except StoreError:
            raise
        except Exception as e:
            raise StoreError(str(e)) from e
        if records:
            self._log_record(records[0] if len(records) == 1 else ["tx", records], wait=False)
            for key, op in changes:
                self._notify(key, op)
        return ok

    def durable(self) -> defer.Deferred:
        """Fires when every write made so far is durable (fsynced with
        ``fsync = "always"``; as acknowledged by the other policies, i.e.
        at once); fails with StoreError if the journal write fails."""
        if self._failed:
            return defer.fail(StoreError(self._failed))
        if self.fsync != "always" or not self._ready:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append(d)
        self._kick_soon()
        return d

    def _apply_commit(self, ops, expect):
        for key, value in (expect or {}).items():
            self._check_str(key)
            if self._typed(key, str) != value:
                return False, [], []
        self._validate_ops(ops)          # checks every op: applying below skips the checks
        records, changes = [], []
        for o in ops:
            if o.kind == "set":
                records.append(self._do_set(o.key, o.args[0], o.args[1], checked=True))
            elif o.kind == "delete":
                if self._live(o.key) is None:
                    continue
                self._data.pop(o.key, None)
                self._expiry.pop(o.key, None)
                records.append(["del", o.key])
            elif o.kind in ("hset", "zadd") and not o.args[0]:
                continue                      # nothing to write (as on redis)
            elif o.kind == "hset":
                records.append(self._do_hset(o.key, dict(o.args[0]), checked=True)[1])
            elif o.kind == "zadd":
                records.append(self._do_zadd(o.key, dict(o.args[0]), checked=True)[1])
            else:                             # hdel, zrem: nothing recorded if nothing went
                remove = self._do_hdel if o.kind == "hdel" else self._do_zrem
                record = remove(o.key, o.args[0])[1]
                if record is None:
                    continue
                records.append(record)
            changes.append((o.key, o.kind))
        return True, records, changes

    def _validate_ops(self, ops):
        """Check every op before applying any (all or nothing).  The common
        case (str keys and values) is checked by class identity; anything
        else goes through ``_check_str`` for the error text."""
        kinds: dict[str, type] = {}
        check = self._check_str
        for o in ops:
            if o.__class__ is not Op and not isinstance(o, Op) or o.kind not in Op.KINDS:
                raise StoreError(f"not a store operation: {o!r}")
            kind, key, args = o.kind, o.key, o.args
            if key.__class__ is not str:
                check(key)
            if kind == "delete":
                kinds[key] = _NONE
                continue
            want = _WANT[kind]
            current = kinds.get(key)
            if current is None:
                value = self._live(key)
                current = _NONE if value is None else type(value)
            if current is not _NONE and current is not want and kind != "set":
                raise StoreError(_WRONGTYPE)
            if kind == "set":
                kinds[key] = want
                if args[0].__class__ is not str:
                    check(args[0])
                if args[1] is not None and args[1] <= 0:
                    raise StoreError("ttl_s must be positive")
            elif kind == "hset":
                kinds[key] = want
                for f, v in args[0]:
                    if f.__class__ is not str or v.__class__ is not str:
                        check(f, v)
            elif kind == "zadd":
                kinds[key] = want
                for m, score in args[0]:
                    if m.__class__ is not str:
                        check(m)
                    if score != score:
                        raise StoreError("score is not a number (NaN)")
            else:                                   # hdel, zrem
                for m in args[0]:
                    if m.__class__ is not str:
                        check(m)

    # -- iteration and change feed -----------------------------------------
    def scan(self, prefix, cursor=None, count=100):
        def op():
            self._check_str(prefix)
            if count < 1:
                raise StoreError("count must be at least 1")
            now = self._reactor.seconds()
            after = cursor or ""
            candidates = (k for k in self._data
                          if k.startswith(prefix) and k > after
                          and not (k in self._expiry and self._expiry[k] <= now))
            page = heapq.nsmallest(count + 1, candidates)
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
