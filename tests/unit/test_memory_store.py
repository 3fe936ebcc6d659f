"""The memory store's own logic on a Clock: expiry, journal replay, torn tails, compaction."""

from __future__ import annotations

import struct
import zlib

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from appliance.store.interface import IStateStore, Op, StoreError
from appliance.store.memory import MemoryStore, ZSet, read_journal
from tests.support.sync import memory_store, ok


def make(tmp_path, clock=None, **kw) -> tuple[MemoryStore, Clock]:
    return memory_store(tmp_path, clock, **kw)


def test_provides_interface(tmp_path):
    """MemoryStore provides IStateStore."""
    store, _ = make(tmp_path)
    assert verifyObject(IStateStore, store)
    assert store.describe()["backend"] == "memory"
    assert store.healthy


def test_expiry_on_clock_notifies(tmp_path):
    """A key with a TTL disappears when the clock passes it and subscribers hear 'expired'."""
    store, clock = make(tmp_path)
    seen = []
    store.subscribe("lease:", lambda k, op: seen.append((k, op)))
    ok(store.set("lease:1", "x", ttl_s=10))
    ok(store.set("lease:2", "y"))
    clock.advance(0)
    assert seen == [("lease:1", "set"), ("lease:2", "set")]
    assert ok(store.ttl("lease:1")) == 10
    clock.advance(9.5)
    assert ok(store.get("lease:1")) == "x"
    clock.advance(0.5)
    assert ok(store.get("lease:1")) is None
    assert ("lease:1", "expired") in seen
    assert ok(store.get("lease:2")) == "y"
    assert ok(store.ttl("lease:2")) is None


def test_set_clears_ttl_and_expire_sets_it(tmp_path):
    """SET without a TTL clears an old one; expire() works on hashes too."""
    store, clock = make(tmp_path)
    ok(store.set("k", "1", ttl_s=5))
    ok(store.set("k", "2"))
    clock.advance(6)
    assert ok(store.get("k")) == "2"
    ok(store.hset("h", {"a": "1"}))
    assert ok(store.expire("h", 3)) is True
    assert ok(store.expire("missing", 3)) is False
    clock.advance(3)
    assert ok(store.hgetall("h")) == {}


def test_replay_restores_every_type(tmp_path):
    """What was written comes back after a restart from the journal alone."""
    store, clock = make(tmp_path)
    ok(store.set("s", "v"))
    ok(store.hset("h", {"a": "1", "b": "2"}))
    ok(store.hdel("h", "a"))
    ok(store.zadd("z", {"m1": 2, "m2": 1}))
    ok(store.zrem("z", "m1"))
    ok(store.commit([Op.set("t1", "x"), Op.zadd("idx", {"t1": 5})], expect={"s": "v"}))
    ok(store.set("gone", "1"))
    ok(store.delete("gone"))
    ok(store.set("short", "1", ttl_s=1))
    ok(store.stopService())

    clock.advance(2)
    again, _ = make(tmp_path, clock)
    assert ok(again.get("s")) == "v"
    assert ok(again.hgetall("h")) == {"b": "2"}
    assert ok(again.zrangebyscore("z", 0, 10)) == [("m2", 1.0)]
    assert ok(again.get("t1")) == "x"
    assert ok(again.zscore("idx", "t1")) == 5.0
    assert ok(again.get("gone")) is None
    assert ok(again.get("short")) is None, "expired while the node was down"


def test_torn_tail_is_dropped_and_logged(tmp_path):
    """A half-written last record (crash mid-write) is cut off; earlier records survive."""
    store, _ = make(tmp_path)
    for i in range(10):
        ok(store.set(f"k{i}", str(i)))
    ok(store.stopService())
    journal = sorted((tmp_path / "store").glob("journal.*"))[-1]
    good_size = journal.stat().st_size
    payload = b'["set","torn","x",null]'
    with open(journal, "ab") as fh:   # header promises more bytes than follow
        fh.write(struct.pack("!II", len(payload) + 50, zlib.crc32(payload)) + payload)

    again, _ = make(tmp_path)
    assert again.stats["torn_records_dropped"] == 1
    assert ok(again.get("torn")) is None
    assert [ok(again.get(f"k{i}")) for i in range(10)] == [str(i) for i in range(10)]
    assert journal.stat().st_size == good_size, "torn bytes truncated away"


def test_corrupt_crc_stops_replay_at_that_record(tmp_path):
    """A record whose CRC does not match is treated as the end of the journal."""
    store, _ = make(tmp_path)
    ok(store.set("a", "1"))
    ok(store.set("b", "2"))
    ok(store.stopService())
    journal = sorted((tmp_path / "store").glob("journal.*"))[-1]
    data = bytearray(journal.read_bytes())
    data[-2] ^= 0xFF   # flip a byte in the last record's payload
    journal.write_bytes(bytes(data))
    records, good, total = read_journal(journal)
    assert len(records) == 1 and good < total
    again, _ = make(tmp_path)
    assert ok(again.get("a")) == "1"
    assert ok(again.get("b")) is None


def test_compaction_bounds_the_journal(tmp_path):
    """Past compact_after_bytes the store snapshots and removes old journals."""
    store, _ = make(tmp_path, compact_after_bytes=4096)
    for i in range(500):
        ok(store.set("counter", str(i)))   # one live key, many records
    assert store.stats["compactions"] >= 1
    files = sorted(p.name for p in (tmp_path / "store").iterdir())
    assert "snapshot" in files
    total = sum(p.stat().st_size for p in (tmp_path / "store").glob("journal.*"))
    assert total < 8192
    ok(store.stopService())
    again, _ = make(tmp_path)
    assert ok(again.get("counter")) == "499"


def test_fuzzy_snapshot_with_writes_between_chunks_reloads_exactly(tmp_path):
    """The snapshot is encoded a few keys per reactor turn while writes go on (to
    keys already encoded and not yet encoded: overwrite, new field, field removed,
    deleted, created, sorted-set changes); after a restart the state is exactly
    the live state before it."""
    store, clock = make(tmp_path, compact_after_bytes=1 << 30, snapshot_chunk=3)
    for i in range(20):
        ok(store.set(f"s{i:02d}", f"v{i}"))
        ok(store.hset(f"h{i:02d}", {"a": str(i), "b": "x"}))
    ok(store.zadd("z", {f"m{i}": float(i) for i in range(10)}))
    d = store.compact()
    turns = 0
    while not d.called:
        turns += 1
        n = turns % 20
        ok(store.set(f"s{n:02d}", f"new{turns}"))
        ok(store.hset(f"h{n:02d}", {"a": f"t{turns}", "c": "added"}))
        ok(store.hdel(f"h{(n + 7) % 20:02d}", "b"))
        ok(store.delete(f"s{(n + 3) % 20:02d}"))
        ok(store.set(f"new{turns}", "fresh"))
        ok(store.zadd("z", {f"m{turns % 10}": 100.0 + turns}))
        ok(store.zrem("z", f"m{(turns + 5) % 10}"))
        step = store._compact_call                  # run exactly one encoding turn
        func, args = step.func, step.args
        step.cancel()
        func(*args)
    assert turns > 5 and ok(d) is True
    ok(store.set("after", "1"))
    live = _dump(store)
    ok(store.stopService())
    again, _ = make(tmp_path)
    assert _dump(again) == live


def test_compaction_that_fails_while_encoding_leaves_the_store_working(tmp_path, monkeypatch):
    """An error while encoding the snapshot fails that compaction (logged by the
    caller); the store keeps serving, keeps its journals, and compacts later."""
    import appliance.store.memory as M
    store, clock = make(tmp_path, compact_after_bytes=1 << 30)
    ok(store.set("a", "1"))
    monkeypatch.setattr(M, "_encode_value", lambda v: (_ for _ in ()).throw(ValueError("bad")))
    failures = []
    store.compact().addErrback(failures.append)
    assert failures and failures[0].check(ValueError)
    monkeypatch.undo()
    ok(store.set("b", "2"))
    assert ok(store.compact()) is True
    ok(store.stopService())
    again, _ = make(tmp_path)
    assert (ok(again.get("a")), ok(again.get("b"))) == ("1", "2")


def _dump(store) -> dict:
    out = {}
    cursor = None
    while True:
        cursor, keys = ok(store.scan("", cursor, 1000))
        for k in keys:
            v = store._data[k]
            out[k] = v if isinstance(v, str) else dict(v) if isinstance(v, dict) else dict(v.scores)
        if cursor is None:
            return out


def test_wrong_type_and_bad_values_fail_cleanly(tmp_path):
    """Type misuse errbacks with StoreError; nothing is written."""
    store, _ = make(tmp_path)
    ok(store.set("s", "v"))
    for d in (store.hset("s", {"a": "1"}), store.zadd("s", {"m": 1}), store.set("x", 5),
              store.set("x", "v", ttl_s=-1), store.commit([Op.set("y", "1"), Op.hset("s", {"a": "b"})])):
        f = []
        d.addErrback(f.append)
        assert f and f[0].check(StoreError)
    assert ok(store.get("y")) is None, "commit is all or nothing"
    assert ok(store.get("s")) == "v"


def test_commit_guard(tmp_path):
    """commit applies nothing when an expect guard fails."""
    store, _ = make(tmp_path)
    assert ok(store.commit([Op.set("a", "1")], expect={"lock": None})) is True
    assert ok(store.commit([Op.set("a", "2")], expect={"a": "0"})) is False
    assert ok(store.get("a")) == "1"
    assert ok(store.cas("a", "1", None)) is True
    assert ok(store.get("a")) is None


def store_with_held_jobs(tmp_path):
    """A started MemoryStore on a Clock whose journal jobs wait in ``pending``
    as ``(Deferred, f, args)`` until the test runs them (the load has run)."""
    clock = Clock()
    pending = []

    def deferred_thread(f, *args):
        d = defer.Deferred()
        pending.append((d, f, args))
        return d

    store = MemoryStore(clock, state_dir=tmp_path, run_in_thread=deferred_thread)
    store.startService()
    d0, f, args = pending.pop()
    d0.callback(f(*args))      # load finished
    return store, clock, pending


def test_fsync_always_acks_only_after_the_write(tmp_path):
    """With fsync=always the write's Deferred waits for the journal job; the
    writes of one reactor turn share one job (one fsync), later ones queue."""
    store, clock, pending = store_with_held_jobs(tmp_path)
    acked = []
    store.set("a", "1").addCallback(acked.append)
    store.set("b", "2").addCallback(acked.append)   # same turn: same job
    assert acked == [] and pending == [], "the job starts at the end of the turn"
    clock.advance(0)
    assert len(pending) == 1
    store.set("c", "3").addCallback(acked.append)   # a later turn: queued behind the job
    clock.advance(0)
    assert acked == [] and len(pending) == 1
    d, f, args = pending.pop(0)
    d.callback(f(*args))
    assert acked == [None, None], "a and b are acked together, c waits for its own fsync"
    d, f, args = pending.pop(0)
    d.callback(f(*args))
    assert acked == [None, None, None]
    assert store.stats["fsyncs"] == 2


def test_zset_order_and_rescore():
    """ZSet keeps (score, member) order through re-scoring and removal."""
    z = ZSet({"a": 3, "b": 1})
    assert z.add("c", 2) is True
    assert z.add("a", 0) is False
    assert z.range(-1, 10, None) == [("a", 0.0), ("b", 1.0), ("c", 2.0)]
    assert z.range(1, 2, 1) == [("b", 1.0)]
    assert z.remove("b") and not z.remove("b")
    assert len(z) == 2


def test_commit_now_applies_at_once_and_durable_waits_for_the_journal(tmp_path):
    """commit_now: the change (or a guard's refusal) is known at once and
    visible to reads; durable() fires only after the journal job that holds
    it, and fails when that job fails."""
    store, clock, pending = store_with_held_jobs(tmp_path)
    assert store.commit_now([Op.set("k", "1")], {"k": None}) is True
    assert store.commit_now([Op.set("k", "2")], {"k": None}) is False     # guard
    assert store.get_now("k") == "1"
    done = []
    store.durable().addCallback(done.append)
    clock.advance(0)
    assert done == [] and len(pending) == 1
    d, f, args = pending.pop()
    d.callback(f(*args))
    assert done == [None]
    store.commit_now([Op.set("k2", "x")])
    failed = []
    store.durable().addErrback(failed.append)
    clock.advance(0)
    d, f, args = pending.pop()
    d.errback(OSError("disk on fire"))
    assert failed and failed[0].check(StoreError)
    with pytest.raises(StoreError):
        store.commit_now([Op.set("k3", "y")])                             # store is failed now


def test_durable_is_immediate_when_writes_are_not_fsynced(tmp_path):
    store, clock = memory_store(tmp_path, fsync="never")
    store.commit_now([Op.set("a", "1")])
    done = []
    store.durable().addCallback(done.append)
    assert done == [None]


def test_slow_journal_jobs_are_counted_and_say_how_much_was_the_disk(tmp_path):
    from twisted.logger import globalLogPublisher
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        store, clock = memory_store(tmp_path)
        store.slow_job_s = -1                        # every job counts as slow
        store.set("a", "1")
        assert store.stats["slow_journal_writes"] >= 1
        assert store.describe()["stats"]["slow_journal_writes"] >= 1
    finally:
        globalLogPublisher.removeObserver(seen.append)
    texts = [e.get("log_format", "") for e in seen]
    assert any("in write+fsync" in t for t in texts)
