"""EmbeddedStore on a Clock: group commit, acks after the commit and in order,
failure as a state (not a hang), recovery, notifications after durability,
type changes and expiry across restarts, rows proportional to the change.

The writer thread is replaced by ``run_in_thread`` hooks: ``inline`` (work at
once) or held jobs the test releases one by one, so every interleaving of the
reactor and the disk is explicit.  The SQLite file is real.
"""

from __future__ import annotations

import sqlite3

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from appliance.store.embedded import EmbeddedStore
from appliance.store.interface import (
    RESYNC,
    IImmediateStore,
    IStateStore,
    Op,
    StoreDown,
    StoreError,
)
from appliance.store.sqlite_file import SQLiteFile
from tests.support.sync import ManualThread, inline, ok

T0 = 1_700_000_000.0


def started(tmp_path, clock=None, held=False, **kw):
    clock = clock or Clock()
    if clock.seconds() == 0:
        clock.advance(T0)
    thread = ManualThread() if held else inline
    kw.setdefault("turn_batching", held)     # inline: each write commits at once
    store = EmbeddedStore(clock, state_dir=tmp_path, run_in_thread=thread, **kw)
    d = store.startService()
    if held:
        thread.run()                # the load
    ok(d)
    return store, clock, thread


def reopened(tmp_path, clock):
    store = EmbeddedStore(clock, state_dir=tmp_path, run_in_thread=inline, turn_batching=False)
    ok(store.startService())
    return store


def stop(store, clock):
    d = store.stopService()
    clock.advance(0)
    ok(d)


def dump(store) -> dict:
    out = {}
    for key in list(store._data):
        v = store._data[key]
        out[key] = v if isinstance(v, str) else dict(v) if isinstance(v, dict) else dict(v.scores)
    return out


def test_provides_the_interfaces(tmp_path):
    """EmbeddedStore provides IStateStore and IImmediateStore; describe() names
    the file, the fsync policy and what it survives."""
    store, clock, _ = started(tmp_path)
    assert verifyObject(IStateStore, store) and verifyObject(IImmediateStore, store)
    info = store.describe()
    assert info["backend"] == "memory" and info["healthy"] is True
    assert info["file"].endswith("store.sqlite3")
    assert info["durability"]["synchronous"] == "FULL"
    assert "power loss" in info["durability"]["survives"]


def test_writes_of_a_turn_share_one_commit_and_ack_after_it(tmp_path):
    """The writes of one reactor turn are one transaction; their Deferreds fire
    after it commits, in issue order; a later turn's writes wait for their own."""
    store, clock, held = started(tmp_path, held=True)
    acked = []
    store.set("a", "1").addCallback(lambda _: acked.append("a"))
    store.hset("h", {"f": "v"}).addCallback(lambda _: acked.append("h"))
    assert held.jobs == [], "the commit starts at the end of the turn"
    clock.advance(0)
    assert len(held.jobs) == 1
    store.set("c", "3").addCallback(lambda _: acked.append("c"))
    clock.advance(0)
    assert acked == [] and len(held.jobs) == 1, "c waits behind the commit in flight"
    held.run()
    assert acked == ["a", "h"]
    assert len(held.jobs) == 1, "c's commit starts once the first is done"
    held.run()
    assert acked == ["a", "h", "c"]
    assert store.stats["commits"] == 2


def test_a_no_op_write_is_acknowledged_after_the_writes_before_it(tmp_path):
    """Acks fire in issue order even for writes that change nothing."""
    store, clock, held = started(tmp_path, held=True)
    acked = []
    store.set("a", "1").addCallback(lambda _: acked.append("set"))
    store.delete("missing").addCallback(lambda n: acked.append(("delete", n)))
    clock.advance(0)
    assert acked == []
    held.run()
    assert acked == ["set", ("delete", 0)]


def test_commit_now_then_durable(tmp_path):
    """commit_now applies at once (guards answered at once); durable() fires
    only after the commit that holds the change."""
    store, clock, held = started(tmp_path, held=True)
    assert store.commit_now([Op.set("k", "1")], {"k": None}) is True
    assert store.commit_now([Op.set("k", "2")], {"k": None}) is False
    assert store.get_now("k") == "1"
    done = []
    store.durable().addCallback(done.append)
    clock.advance(0)
    assert done == []
    held.run()
    assert done == [None]
    assert store.durable().called, "nothing pending: durable at once"


def test_a_failed_commit_fails_everything_queued_and_refuses_the_rest(tmp_path):
    """Review H3: after a failed commit, writes queued behind it fail too (no
    hang), later writes and reads are refused with StoreDown, and nothing is
    acknowledged; the node sees healthy False and the reason."""
    store, clock, held = started(tmp_path, held=True)
    first, second, third = [], [], []
    store.set("a", "1").addBoth(first.append)
    clock.advance(0)
    store.set("b", "2").addBoth(second.append)          # queued behind the failing commit
    store.commit_now([Op.set("c", "3")])
    durable = []
    store.durable().addBoth(durable.append)
    held.fail(sqlite3.OperationalError("database or disk is full"))
    assert isinstance(first[0].value, StoreDown)
    assert isinstance(second[0].value, StoreDown), "queued write failed, not left hanging"
    assert isinstance(durable[0].value, StoreDown)
    assert store.healthy is False
    assert "disk is full" in store.describe()["error"]
    store.set("d", "4").addBoth(third.append)
    assert isinstance(third[0].value, StoreDown)
    with pytest.raises(StoreDown):
        store.get_now("a")
    with pytest.raises(StoreDown):
        store.commit_now([Op.set("e", "5")])
    clock.advance(0)
    assert held.jobs == [], "no commit is attempted while failed"


def test_recovery_reloads_what_is_on_disk_and_resyncs_subscribers(tmp_path):
    """A failed store retries with backoff: it reopens the file, proves a write
    goes through and reloads; the writes that failed are gone (never acked),
    what was acked is there, subscribers get RESYNC."""
    store, clock, held = started(tmp_path, held=True)
    seen = []
    store.subscribe("", lambda k, op: seen.append((k, op)))
    store.set("kept", "1")
    clock.advance(0)
    held.run()
    store.set("lost", "2")
    clock.advance(0)
    held.fail(sqlite3.OperationalError("disk I/O error"))
    assert store.get_now.__self__.healthy is False
    clock.advance(0.5)
    assert held.jobs == [], "first retry after 1 s"
    clock.advance(0.5)
    assert len(held.jobs) == 1
    held.run()                                          # reopen + probe + reload
    assert store.healthy is True
    assert store.get_now("kept") == "1"
    assert store.get_now("lost") is None, "the failed write was never acknowledged"
    clock.advance(0)
    assert (("", RESYNC)) in seen
    assert store.stats["recoveries"] == 1


def test_recheck_while_the_disk_still_fails_backs_off(tmp_path):
    """recheck() never errbacks; a store still failing stays unhealthy and
    doubles its retry interval."""
    store, clock, held = started(tmp_path, held=True)
    store.set("a", "1")
    clock.advance(0)
    held.fail(OSError(28, "No space left on device"))
    d = store.recheck()
    held.fail(sqlite3.OperationalError("database or disk is full"))
    info = ok(d)
    assert info["healthy"] is False and "disk is full" in info["error"] or "space" in info["error"]
    assert store._retry_call is not None and store._retry_call.getTime() > clock.seconds() + 1.5


def test_notifications_arrive_after_the_commit(tmp_path):
    """A subscriber never hears of a write a crash could still undo."""
    store, clock, held = started(tmp_path, held=True)
    seen = []
    store.subscribe("k:", lambda k, op: seen.append((k, op)))
    store.set("k:1", "v")
    store.hset("other", {"f": "v"})
    clock.advance(0)
    clock.advance(0)
    assert seen == [], "not before the commit"
    held.run()
    clock.advance(0)
    assert seen == [("k:1", "set")]


def test_type_changes_survive_a_restart(tmp_path):
    """Review H1: set over a hash, delete + zadd over a hash in one commit,
    hset over a string, and a hash emptied and re-created: the restarted
    store holds exactly the live state."""
    store, clock, _ = started(tmp_path)
    ok(store.hset("a", {"f": "1", "g": "2"}))
    ok(store.zadd("b", {"m": 1.0}))
    ok(store.set("c", "plain"))
    ok(store.hset("d", {"f": "1"}))
    ok(store.set("a", "now a string"))
    ok(store.commit([Op.delete("b"), Op.hset("b", {"x": "y"})]))
    ok(store.commit([Op.delete("c"), Op.zadd("c", {"n": 2.0})]))
    ok(store.hdel("d", "f"))
    ok(store.hset("d", {"g": "2"}))
    ok(store.hset("e", {"old": "1"}))
    ok(store.set("e", "string"))                   # a later commit: e's field rows must go
    ok(store.commit([Op.delete("e"), Op.hset("e", {"new": "2"})]))
    before = dump(store)
    stop(store, clock)
    again = reopened(tmp_path, clock)
    assert dump(again) == before == {"a": "now a string", "b": {"x": "y"}, "c": {"n": 2.0},
                                     "d": {"g": "2"}, "e": {"new": "2"}}


def test_a_change_writes_rows_proportional_to_it(tmp_path):
    """One field of a 1,000-field hash, one member of a 1,000-member set: one
    row each, not the value."""
    store, clock, _ = started(tmp_path)
    ok(store.hset("h", {f"f{i}": "v" for i in range(1000)}))
    ok(store.zadd("z", {f"m{i}": float(i) for i in range(1000)}))
    rows = store.stats["rows"]
    ok(store.hset("h", {"f5": "changed"}))
    assert store.stats["rows"] - rows == 1
    ok(store.zadd("z", {"m7": 99.0}))
    ok(store.zrem("z", "m8"))
    ok(store.hdel("h", "f9"))
    assert store.stats["rows"] - rows == 4
    stop(store, clock)
    again = reopened(tmp_path, clock)
    assert ok(again.hget("h", "f5")) == "changed" and ok(again.hget("h", "f9")) is None
    assert ok(again.zscore("z", "m7")) == 99.0 and ok(again.zscore("z", "m8")) is None
    assert ok(again.zcard("z")) == 999


def test_expiry_notifies_and_persists(tmp_path):
    """Keys expire on the clock (notified as 'expired', deleted on disk); a TTL
    survives a restart, set clears it, expire sets it; hset keeps it."""
    store, clock, _ = started(tmp_path)
    seen = []
    store.subscribe("", lambda k, op: seen.append((k, op)))
    ok(store.set("short", "x", ttl_s=5))
    ok(store.set("long", "y", ttl_s=100))
    ok(store.hset("h", {"f": "1"}))
    ok(store.expire("h", 50))
    ok(store.hset("h", {"g": "2"}))
    ok(store.set("cleared", "z", ttl_s=5))
    ok(store.set("cleared", "z2"))
    clock.advance(6)
    clock.advance(0)
    assert ("short", "expired") in seen
    assert ok(store.get("cleared")) == "z2"
    stop(store, clock)
    again = reopened(tmp_path, clock)
    assert ok(again.get("short")) is None
    assert 90 < ok(again.ttl("long")) <= 94
    assert 40 < ok(again.ttl("h")) <= 44
    assert ok(again.ttl("cleared")) is None
    clock.advance(100)
    assert ok(again.get("long")) is None and ok(again.hgetall("h")) == {}
    stop(again, clock)
    rows = sqlite3.connect(tmp_path / "store.sqlite3").execute("SELECT key FROM keys").fetchall()
    assert sorted(r[0] for r in rows) == ["cleared"], "expired keys are deleted on disk"


def test_unencodable_input_is_refused_and_nothing_changes(tmp_path):
    """Review M9: a lone surrogate is refused with StoreError (an errback, or a
    raise from commit_now) and the mirror is not changed."""
    store, clock, _ = started(tmp_path)
    bad = "bad\ud800"
    for d in (store.set("k", bad), store.set(bad, "v"), store.hset("h", {bad: "v"}),
              store.zadd("z", {bad: 1.0}), store.commit([Op.set("a", "1"), Op.set("b", bad)]),
              store.commit([Op.set("a", "1")], expect={"x": bad}), store.scan(bad),
              store.cas("k", None, bad)):
        f = []
        d.addErrback(f.append)
        assert f and f[0].check(StoreError), d
    with pytest.raises(StoreError):
        store.commit_now([Op.hset("h", {"f": bad})])
    assert dump(store) == {}


def test_scan_pages_in_key_order_without_expired_keys(tmp_path):
    """scan: pages from a sorted key index, prefix-bounded, expired keys
    skipped, every key once."""
    store, clock, _ = started(tmp_path)
    for i in range(250):
        ok(store.set(f"p:{i:03d}", "v"))
    ok(store.set("q:1", "v"))
    ok(store.set("p:dead", "v", ttl_s=1))
    clock.advance(2)
    keys, cursor = [], None
    while True:
        cursor, page = ok(store.scan("p:", cursor, 100))
        keys.extend(page)
        if cursor is None:
            break
    assert keys == [f"p:{i:03d}" for i in range(250)]


def test_batch_policy_checkpoints_within_the_interval(tmp_path):
    """fsync = "batch": acked after the commit (survives a process crash); a
    checkpoint (which fsyncs the WAL) runs within batch_interval_s."""
    store, clock, _ = started(tmp_path, fsync="batch", batch_interval_s=0.2)
    assert store.describe()["durability"]["synchronous"] == "NORMAL"
    ok(store.set("a", "1"))
    assert store.stats["checkpoints"] == 0
    clock.advance(0.2)
    assert store.stats["checkpoints"] == 1
    clock.advance(1)
    assert store.stats["checkpoints"] == 1, "nothing new: no checkpoint"


def test_writes_after_stop_fail_instead_of_hanging(tmp_path):
    """Review LOW 14: a write that arrives after the final flush fails."""
    store, clock, _ = started(tmp_path)
    stop(store, clock)
    f = []
    store.set("a", "1").addErrback(f.append)
    assert f and f[0].check(StoreError)


def test_old_journal_format_is_a_clear_start_error(tmp_path):
    """A state dir of the store before SQLite is not silently ignored."""
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "journal.000000000001").write_bytes(b"")
    store = EmbeddedStore(Clock(), state_dir=tmp_path, run_in_thread=inline)
    f = []
    store.startService().addErrback(f.append)
    assert f and "old memory store" in f[0].getErrorMessage()
    assert store.healthy is False


def test_sqlite_file_commits_a_batch_all_or_nothing(tmp_path):
    """SQLiteFile.apply rolls back a batch that fails half way."""
    from appliance.store.sqlite_file import Batch
    db = SQLiteFile(tmp_path, "always")
    db.open()
    db.apply(Batch(keys=[("a", "s", "1", None)]))
    with pytest.raises(sqlite3.Error):
        db.apply(Batch(keys=[("b", "s", "2", None), ("c", "BAD-KIND", None, None)]))
    strings, hashes, zsets, expiry = db.load()
    assert strings == {"a": "1"}
    db.close()


@pytest.mark.parametrize("fsync", ["batch", "never"])
def test_every_policy_acks_only_after_the_commit(tmp_path, fsync):
    """Review M1: "batch" (and "never") acknowledged before the data left the
    process, so a kill -9 lost acknowledged writes; now every policy acks after
    the commit (the data is in the OS), only the fsync differs."""
    store, clock, held = started(tmp_path, held=True, fsync=fsync)
    acked = []
    store.set("a", "1").addCallback(acked.append)
    clock.advance(0)
    assert acked == [] and len(held.jobs) == 1
    held.run()
    assert acked == [None]


def test_writes_behind_a_commit_are_sealed_into_bounded_commits(tmp_path):
    """Under load the writes gathered behind a commit in flight are sealed every
    max_commit_rows rows into their own transaction: commits stay bounded, the
    first writes are acknowledged after their own (small) commit, acks keep issue
    order, and what is on disk after each commit is a prefix of the writes."""
    store, clock, held = started(tmp_path, held=True, max_commit_rows=10)
    acked = []
    store.set("k0", "0").addCallback(lambda _: acked.append(0))
    clock.advance(0)
    assert len(held.jobs) == 1                       # k0 in flight
    for i in range(1, 31):                           # 30 writes of one row each
        store.set(f"k{i}", str(i)).addCallback(lambda _, i=i: acked.append(i))
        clock.advance(0)
    assert store.stats["sealed"] == 3, "sealed every 10 rows behind the commit in flight"
    held.run()                                       # k0
    assert acked == [0]
    assert len(held.jobs) == 1 and held.jobs[0][1][0].rows() == 10, "the next commit is bounded"
    held.run()
    assert acked == list(range(11))
    on_disk = SQLiteFile(tmp_path, "always")
    on_disk.open()
    strings = on_disk.load()[0]
    on_disk.close()
    assert sorted(strings, key=lambda k: int(k[1:])) == [f"k{i}" for i in range(11)], \
        "a prefix of the writes is durable"
    held.run_all()
    assert acked == list(range(31))
    assert store.stats["commits"] == 4
    assert store.stats["rows"] == 31


def test_a_failed_commit_fails_the_sealed_batches_behind_it(tmp_path):
    """Writes sealed behind a failing commit fail with StoreDown (no hang, no ack)."""
    store, clock, held = started(tmp_path, held=True, max_commit_rows=2)
    results = []
    store.set("a", "1").addBoth(results.append)
    clock.advance(0)
    for i in range(4):
        store.set(f"b{i}", "2").addBoth(results.append)
    assert store.stats["sealed"] == 2
    held.fail(sqlite3.OperationalError("disk I/O error"))
    assert len(results) == 5 and all(isinstance(r.value, StoreDown) for r in results)
    clock.advance(0)
    assert held.jobs == []


def test_one_large_write_is_never_split(tmp_path):
    """A commit of many rows issued behind a commit in flight stays one transaction
    (all or nothing), however large."""
    store, clock, held = started(tmp_path, held=True, max_commit_rows=5)
    store.set("a", "1")
    clock.advance(0)
    d = store.commit([Op.hset("h", {f"f{i}": "v" for i in range(50)}), Op.set("x", "y")])
    clock.advance(0)
    assert store.stats["sealed"] == 1
    held.run()
    assert held.jobs[0][1][0].rows() == 52          # key row + 50 fields + x
    held.run()
    assert ok(d) is True


def test_acks_of_a_large_commit_fire_a_slice_per_turn_in_order(tmp_path):
    """The acknowledgements of one commit fire ACK_SLICE per reactor turn, in issue
    order, and whatever is acknowledged later (durable(), the next commit) comes after
    them: the reactor's timers run between the slices."""
    store, clock, held = started(tmp_path, held=True)
    n = 2 * store.ACK_SLICE + 10
    acked = []
    for i in range(n):
        store.set(f"k{i}", "v").addCallback(lambda _, i=i: acked.append(i))
    clock.advance(0)
    held.run()
    assert acked == list(range(store.ACK_SLICE)), "one slice in the commit's turn"
    later = []
    store.durable().addCallback(lambda _: later.append("durable"))
    store.set("after", "v").addCallback(lambda _: later.append("after"))
    assert later == [] and clock.getDelayedCalls(), "the rest waits for the next turn"
    clock.advance(0)                  # (a Clock runs the following turns' slices too)
    assert acked == list(range(n))
    for _ in range(3):
        clock.advance(0)
        held.run_all()
    assert later == ["durable", "after"]


def _disk(tmp_path):
    """(keys rows, hfields rows, meta format) of the file as it is."""
    c = sqlite3.connect(str(tmp_path / "store.sqlite3"))
    try:
        keys = {k: (kind, v) for k, kind, v in c.execute("SELECT key, kind, value FROM keys")}
        fields = c.execute("SELECT key, field, value FROM hfields").fetchall()
        fmt = c.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()[0]
    finally:
        c.close()
    return keys, fields, fmt


def test_a_small_hash_is_one_row(tmp_path):
    """A lease-sized hash (16 fields) costs one row per write, not a row per field
    (17 rows before), a change of one field too; it reads back the same."""
    store, clock, _ = started(tmp_path)
    lease = {f"f{i:02}": f"v{i}" for i in range(16)}
    rows = store.stats["rows"]
    ok(store.commit([Op.hset("lease:1", lease), Op.set("ver:1", "1")]))
    assert store.stats["rows"] - rows == 2
    rows = store.stats["rows"]
    ok(store.hset("lease:1", {"f03": "x", "f04": "y"}))
    assert store.stats["rows"] - rows == 1
    keys, fields, fmt = _disk(tmp_path)
    assert keys["lease:1"][0] == "h" and keys["lease:1"][1] is not None and fields == []
    assert fmt == "2"
    stop(store, clock)
    again = reopened(tmp_path, clock)
    assert dump(again)["lease:1"] == {**lease, "f03": "x", "f04": "y"}


def test_a_hash_changes_shape_across_the_limit(tmp_path):
    """A hash that grows past COMPACT_HASH_FIELDS gets a row per field (a field's
    change rewrites that row), one that shrinks back is one row again (its field
    rows go in the same commit); the contents survive every reopen."""
    from appliance.store.sqlite_file import COMPACT_HASH_FIELDS as N
    store, clock, _ = started(tmp_path)
    ok(store.hset("h", {f"a{i}": "1" for i in range(N)}))
    assert _disk(tmp_path)[1] == []
    ok(store.hset("h", {"b0": "2", "b1": "2"}))                  # N + 2 fields: rows
    keys, fields, _ = _disk(tmp_path)
    assert keys["h"] == ("h", None) and len(fields) == N + 2
    rows = store.stats["rows"]
    ok(store.hset("h", {"b0": "3"}))
    assert store.stats["rows"] - rows == 1
    stop(store, clock)
    store = reopened(tmp_path, clock)
    assert dump(store)["h"] == {**{f"a{i}": "1" for i in range(N)}, "b0": "3", "b1": "2"}
    ok(store.hdel("h", *[f"a{i}" for i in range(N)]))            # 2 fields: one row
    keys, fields, _ = _disk(tmp_path)
    assert fields == [] and keys["h"][1] is not None
    stop(store, clock)
    assert dump(reopened(tmp_path, clock))["h"] == {"b0": "3", "b1": "2"}


def test_a_format_1_file_is_read_and_upgraded(tmp_path):
    """A file of the field-row format ("1") loads as it is; its hashes become one row
    when next written; the file is marked "2" (a build that reads only "1" refuses it
    instead of losing the one-row hashes)."""
    c = sqlite3.connect(str(tmp_path / "store.sqlite3"))
    c.executescript("""
        CREATE TABLE keys (key TEXT PRIMARY KEY NOT NULL, kind TEXT NOT NULL
            CHECK (kind IN ('s', 'h', 'z')), value TEXT, expires REAL) WITHOUT ROWID;
        CREATE TABLE hfields (key TEXT NOT NULL, field TEXT NOT NULL, value TEXT NOT NULL,
            PRIMARY KEY (key, field)) WITHOUT ROWID;
        CREATE TABLE zmembers (key TEXT NOT NULL, member TEXT NOT NULL, score REAL NOT NULL,
            PRIMARY KEY (key, member)) WITHOUT ROWID;
        CREATE TABLE meta (name TEXT PRIMARY KEY NOT NULL, value TEXT) WITHOUT ROWID;
        INSERT INTO meta VALUES ('format', '1');
        INSERT INTO keys VALUES ('old', 'h', NULL, NULL), ('other', 'h', NULL, NULL);
        INSERT INTO hfields VALUES ('old', 'a', '1'), ('old', 'b', '2'), ('other', 'c', '3');
    """)
    c.commit()
    c.close()
    store, clock, _ = started(tmp_path)
    assert dump(store) == {"old": {"a": "1", "b": "2"}, "other": {"c": "3"}}
    ok(store.hset("old", {"a": "9"}))
    keys, fields, fmt = _disk(tmp_path)
    assert fmt == "2" and keys["old"][1] is not None and fields == [("other", "c", "3")]
    stop(store, clock)
    assert dump(reopened(tmp_path, clock)) == {"old": {"a": "9", "b": "2"},
                                               "other": {"c": "3"}}


def test_scan_sees_keys_added_and_dropped_between_scans(tmp_path):
    """New keys join the scan index lazily (merged at the next scan): a key added, one
    deleted before any scan, one deleted after being scanned, and a type change all page
    as the mirror says."""
    store, clock, _ = started(tmp_path)
    for k in ("p:3", "p:1", "q:1"):
        ok(store.set(k, "v"))
    ok(store.hset("p:2", {"f": "v"}))
    ok(store.delete("p:1"))
    assert ok(store.scan("p:")) == (None, ["p:2", "p:3"])
    ok(store.delete("p:3"))
    ok(store.set("p:0", "v"))
    ok(store.set("p:1", "again"))
    ok(store.commit([Op.delete("p:2"), Op.zadd("p:2", {"m": 1.0})]))
    assert ok(store.scan("p:")) == (None, ["p:0", "p:1", "p:2"])
    assert ok(store.scan("p:", count=2)) == ("p:1", ["p:0", "p:1"])


def test_a_lazy_write_rides_with_the_next_commit(tmp_path):
    """commit_now(lazy=True) is visible at once but starts no transaction of its own: it
    is committed with the next write's transaction (in issue order), by a durable(), or
    LAZY_S later; stop commits it too."""
    store, clock, held = started(tmp_path, held=True)
    assert store.commit_now([Op.set("m", "1")], lazy=True) is True
    assert store.get_now("m") == "1"
    clock.advance(0)
    assert held.jobs == []
    store.set("w", "2")
    clock.advance(0)
    assert len(held.jobs) == 1 and held.jobs[0][1][0].rows() == 2      # m rides with w
    held.run()
    store.commit_now([Op.set("m", "3")], lazy=True)
    d = store.durable()
    clock.advance(0)
    assert len(held.jobs) == 1
    held.run()
    ok(d)
    store.commit_now([Op.set("m", "4")], lazy=True)
    clock.advance(store.LAZY_S - 0.01)
    assert held.jobs == []
    clock.advance(0.01)
    assert len(held.jobs) == 1
    held.run()
    store.commit_now([Op.set("m", "5")], lazy=True)
    d = store.stopService()
    clock.advance(0)
    held.run_all()
    ok(d)
    assert dump(reopened(tmp_path, clock))["m"] == "5"
