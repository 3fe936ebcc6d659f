"""The IStateStore contract, run against every backend on the real reactor.

``memory``: the embedded SQLite store in a temp dir (fsync=always).
``redis``: RedisStore against a real redis-server on loopback, one namespace
per test.  Anything asserted here must hold for both; backend-specific
behaviour is marked as such.
"""

from __future__ import annotations

import json
import uuid

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from zope.interface.verify import verifyObject

from appliance.store.interface import (RESYNC, IImmediateStore, IStateStore, ISubscription, Op,
                                       StoreError, StoreUnavailable)

pytestmark = pytest.mark.integration


# ----------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------
def sleep(seconds: float):
    return deferLater(reactor, seconds, lambda: None)


async def fails(d, exc=StoreError):
    """Await ``d`` and return the exception it failed with (must be ``exc``)."""
    try:
        result = await d
    except exc as e:
        return e
    pytest.fail(f"expected {exc.__name__}, got result {result!r}")


def errback_not_raise(fn, *args, **kw):
    """Call a store method that must not raise synchronously; return its Deferred."""
    try:
        d = fn(*args, **kw)
    except Exception as e:  # pragma: no cover - the failure we look for
        pytest.fail(f"{fn.__name__} raised synchronously: {e!r}")
    assert isinstance(d, defer.Deferred)
    return d


async def eventually(predicate, timeout: float = 3.0, step: float = 0.02):
    """Poll ``predicate`` on the reactor until true (or fail after ``timeout``)."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        await sleep(step)


async def subscribed(store, prefix, callback):
    """Subscribe and wait until the subscription is live (redis: PSUBSCRIBE acked)."""
    sub = store.subscribe(prefix, callback)
    ready = getattr(sub, "ready", None)
    if ready is not None:
        await defer.Deferred.addTimeout(ready, 5, reactor)
    return sub


async def scan_all(store, prefix, count):
    keys, cursor, pages = [], None, 0
    while True:
        cursor, page = await store.scan(prefix, cursor, count)
        keys.extend(page)
        pages += 1
        assert pages < 10_000, "scan does not terminate"
        if cursor is None:
            return keys, pages


# ----------------------------------------------------------------------
# the store fixture: one per backend
# ----------------------------------------------------------------------
@pytest_twisted.async_yield_fixture(params=["memory", "redis"])
async def store(request, tmp_path):
    if request.param == "memory":
        mod = pytest.importorskip("appliance.store.embedded",
                                  reason="appliance.store.embedded not written yet")

        def make():
            return mod.EmbeddedStore(reactor, state_dir=tmp_path, fsync="always")
    else:
        server = request.getfixturevalue("redis_server_module")
        from appliance.store.redis import RedisStore
        namespace = f"t{uuid.uuid4().hex[:12]}"

        def make():
            return RedisStore(reactor, url=server.url, namespace=namespace,
                              op_timeout_s=2.0, connect_timeout_s=3.0)
    opened = []

    def open_store():
        s = make()
        opened.append(s)
        return s

    request.node.open_store = open_store
    s = open_store()
    await defer.maybeDeferred(s.startService)
    try:
        yield s
    finally:
        for s in opened:
            if s.running:
                await defer.maybeDeferred(s.stopService)


async def reopen(request, store):
    """Stop ``store`` and open the same data again (embedded: same state_dir; redis:
    same url and namespace); the fixture stops the new store at the end."""
    await defer.maybeDeferred(store.stopService)
    new = request.node.open_store()
    await defer.maybeDeferred(new.startService)
    assert new.healthy
    return new


# ----------------------------------------------------------------------
# basics
# ----------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_provides_interface(store):
    """The store provides IStateStore, is healthy once started, answers ping, describes itself."""
    assert verifyObject(IStateStore, store)
    if store.backend == "memory":
        assert verifyObject(IImmediateStore, store)
    else:
        assert not IImmediateStore.providedBy(store)
    assert store.backend in ("memory", "redis")
    assert store.healthy is True
    assert await store.ping() is True
    info = store.describe()
    assert info["backend"] == store.backend
    assert info["healthy"] is True
    json.dumps(info)


@pytest_twisted.ensureDeferred
async def test_get_set_overwrite_and_missing(store):
    """get of a missing key is None; set fires None; set overwrites (any value type)."""
    assert await store.get("k:missing") is None
    assert await store.set("k:1", "v1") is None
    assert await store.get("k:1") == "v1"
    await store.set("k:1", "v2")
    assert await store.get("k:1") == "v2"
    await store.set("k:empty", "")
    assert await store.get("k:empty") == ""
    text = "ünïcødé ☃ \x00 with nul and\r\nnewline"
    await store.set("k:ü", text)
    assert await store.get("k:ü") == text
    # a plain set replaces a hash
    await store.hset("k:h", {"f": "v"})
    await store.set("k:h", "plain")
    assert await store.get("k:h") == "plain"


@pytest_twisted.ensureDeferred
async def test_delete_counts_existing(store):
    """delete removes keys of any type and fires with how many existed."""
    await store.set("d:s", "x")
    await store.hset("d:h", {"f": "v"})
    await store.zadd("d:z", {"m": 1.0})
    assert await store.delete("d:s", "d:h", "d:z", "d:none") == 3
    assert await store.get("d:s") is None
    assert await store.hgetall("d:h") == {}
    assert await store.zcard("d:z") == 0
    assert await store.delete("d:s") == 0
    assert await store.delete() == 0


@pytest_twisted.ensureDeferred
async def test_ttl_expiry(store):
    """A key set with a TTL reports it, then disappears; set without TTL clears it."""
    await store.set("t:short", "x", ttl_s=0.3)
    await store.set("t:plain", "y")
    remaining = await store.ttl("t:short")
    assert remaining is not None and 0 < remaining <= 0.3
    assert await store.ttl("t:plain") is None
    assert await store.ttl("t:missing") is None
    assert await store.get("t:short") == "x"
    await sleep(0.5)
    assert await store.get("t:short") is None
    assert await store.ttl("t:short") is None
    assert await store.delete("t:short") == 0
    # overwriting without a TTL makes the key persistent again
    await store.set("t:re", "a", ttl_s=0.2)
    await store.set("t:re", "b")
    assert await store.ttl("t:re") is None
    await sleep(0.3)
    assert await store.get("t:re") == "b"


@pytest_twisted.ensureDeferred
async def test_expire(store):
    """expire sets a TTL on an existing key of any type; False for a missing key."""
    assert await store.expire("e:missing", 5) is False
    await store.set("e:s", "x")
    assert await store.expire("e:s", 10) is True
    remaining = await store.ttl("e:s")
    assert 9 < remaining <= 10
    await store.hset("e:h", {"f": "v"})
    await store.zadd("e:z", {"m": 1})
    assert await store.expire("e:h", 0.2) is True
    assert await store.expire("e:z", 0.2) is True
    await sleep(0.4)
    assert await store.hgetall("e:h") == {}
    assert await store.zcard("e:z") == 0
    assert await store.hget("e:h", "f") is None
    await fails(store.expire("e:s", 0))
    await fails(store.expire("e:s", -1))


@pytest_twisted.ensureDeferred
async def test_wrong_type_is_store_error(store):
    """Operations on a key of another type errback with StoreError (not StoreUnavailable)."""
    await store.set("w:s", "x")
    await store.hset("w:h", {"f": "v"})
    await store.zadd("w:z", {"m": 1})
    attempts = [
        lambda: store.get("w:h"),
        lambda: store.get("w:z"),
        lambda: store.hget("w:s", "f"),
        lambda: store.hgetall("w:z"),
        lambda: store.hset("w:s", {"f": "v"}),
        lambda: store.hset("w:z", {"f": "v"}),
        lambda: store.hdel("w:s", "f"),
        lambda: store.zadd("w:s", {"m": 1}),
        lambda: store.zadd("w:h", {"m": 1}),
        lambda: store.zrem("w:h", "m"),
        lambda: store.zscore("w:s", "m"),
        lambda: store.zcard("w:h"),
        lambda: store.zrangebyscore("w:s", 0, 10),
        lambda: store.cas("w:h", None, "x"),
    ]
    for attempt in attempts:
        e = await fails(attempt())
        assert not isinstance(e, StoreUnavailable), e
    # nothing was changed by the refused calls
    assert await store.get("w:s") == "x"
    assert await store.hgetall("w:h") == {"f": "v"}
    assert await store.zrangebyscore("w:z", "-inf", "inf") == [("m", 1.0)]


@pytest_twisted.ensureDeferred
async def test_bad_arguments_errback(store):
    """Bad arguments errback with StoreError; nothing raises synchronously."""
    cases = [
        (store.get, (1,), {}),
        (store.set, ("b:k", 1), {}),
        (store.set, (b"b:k", "v"), {}),
        (store.set, ("b:k", "v"), {"ttl_s": 0}),
        (store.set, ("b:k", "v"), {"ttl_s": -2}),
        (store.hset, ("b:h", {}), {}),
        (store.hset, ("b:h", {"f": 1}), {}),
        (store.zadd, ("b:z", {}), {}),
        (store.zadd, ("b:z", {"m": "not a number"}), {}),
        (store.scan, ("b:",), {"count": 0}),
        (store.commit, (["not an op"],), {}),
    ]
    for fn, args, kw in cases:
        d = errback_not_raise(fn, *args, **kw)
        await fails(d)
    assert await store.get("b:k") is None
    assert await store.hgetall("b:h") == {}
    assert await store.zcard("b:z") == 0


# ----------------------------------------------------------------------
# hashes and sorted sets
# ----------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_hash_operations(store):
    """hset counts new fields; hget/hgetall read; hdel counts; an empty hash disappears."""
    assert await store.hgetall("h:1") == {}
    assert await store.hget("h:1", "a") is None
    assert await store.hset("h:1", {"a": "1", "b": "2"}) == 2
    assert await store.hset("h:1", {"b": "3", "c": "4"}) == 1
    assert await store.hget("h:1", "b") == "3"
    assert await store.hget("h:1", "zz") is None
    assert await store.hgetall("h:1") == {"a": "1", "b": "3", "c": "4"}
    assert await store.hdel("h:1", "a", "nope") == 1
    assert await store.hdel("h:missing", "a") == 0
    assert await store.hdel("h:1") == 0
    assert await store.hdel("h:1", "b", "c") == 2
    # the empty hash is gone: the key is free for any type and invisible to scan
    assert await store.hgetall("h:1") == {}
    keys, _ = await scan_all(store, "h:", 100)
    assert keys == []
    assert await store.zadd("h:1", {"m": 1}) == 1


@pytest_twisted.ensureDeferred
async def test_zset_operations(store):
    """zadd counts new members (re-scoring is not new); zscore/zcard; an empty set disappears."""
    assert await store.zcard("z:1") == 0
    assert await store.zscore("z:1", "a") is None
    assert await store.zadd("z:1", {"a": 1, "b": 2.5}) == 2
    assert await store.zadd("z:1", {"a": 3, "c": -1}) == 1
    score = await store.zscore("z:1", "a")
    assert score == 3.0 and isinstance(score, float)
    assert await store.zscore("z:1", "b") == 2.5
    assert await store.zscore("z:1", "nope") is None
    assert await store.zcard("z:1") == 3
    assert await store.zrem("z:1", "a", "nope") == 1
    assert await store.zrem("z:missing", "a") == 0
    assert await store.zrem("z:1") == 0
    assert await store.zrem("z:1", "b", "c") == 2
    assert await store.zcard("z:1") == 0
    keys, _ = await scan_all(store, "z:", 100)
    assert keys == []
    assert await store.hset("z:1", {"f": "v"}) == 1
    # scores keep full double precision
    await store.zadd("z:p", {"x": 0.1, "y": 1e-300, "z": 12345678.123456789})
    assert await store.zscore("z:p", "x") == 0.1
    assert await store.zscore("z:p", "y") == 1e-300
    assert await store.zscore("z:p", "z") == 12345678.123456789


@pytest_twisted.ensureDeferred
async def test_large_hash_and_zset(store):
    """Thousands of fields/members in one call (and in one commit) are handled whole."""
    fields = {f"f{i}": str(i) for i in range(2500)}
    assert await store.hset("big:h", fields) == 2500
    assert await store.hgetall("big:h") == fields
    members = {f"m{i}": float(i) for i in range(2500)}
    assert await store.commit([Op.zadd("big:z", members), Op.hdel("big:h", list(fields)[:1200])])
    assert await store.zcard("big:z") == 2500
    assert len(await store.hgetall("big:h")) == 1300
    assert await store.zrangebyscore("big:z", 10, 12) == [("m10", 10.0), ("m11", 11.0),
                                                          ("m12", 12.0)]
    assert await store.hdel("big:h", *list(fields)) == 1300
    assert await store.zrem("big:z", *list(members)) == 2500
    keys, _ = await scan_all(store, "big:", 100)
    assert keys == []


@pytest_twisted.ensureDeferred
async def test_zrangebyscore_order_bounds_limit(store):
    """zrangebyscore: ascending score, ties by member, inclusive bounds, limit."""
    await store.zadd("r:z", {"c": 2, "a": 2, "b": 2, "low": -5.5, "high": 10, "mid": 3})
    full = await store.zrangebyscore("r:z", float("-inf"), float("inf"))
    assert full == [("low", -5.5), ("a", 2.0), ("b", 2.0), ("c", 2.0), ("mid", 3.0),
                    ("high", 10.0)]
    assert all(isinstance(s, float) for _, s in full)
    assert await store.zrangebyscore("r:z", 2, 3) == [("a", 2.0), ("b", 2.0), ("c", 2.0),
                                                      ("mid", 3.0)]
    assert await store.zrangebyscore("r:z", 2, 3, limit=2) == [("a", 2.0), ("b", 2.0)]
    assert await store.zrangebyscore("r:z", 2.0001, 2.9) == []
    assert await store.zrangebyscore("r:z", 10, 10) == [("high", 10.0)]
    assert await store.zrangebyscore("r:z", -100, 0, limit=10) == [("low", -5.5)]
    assert await store.zrangebyscore("r:z", 5, 1) == []
    assert await store.zrangebyscore("r:missing", 0, 100) == []


# ----------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_cas(store):
    """cas swaps only when the current value matches; None means absent / delete."""
    assert await store.cas("c:k", None, "one") is True
    assert await store.get("c:k") == "one"
    assert await store.cas("c:k", None, "two") is False
    assert await store.cas("c:k", "wrong", "two") is False
    assert await store.get("c:k") == "one"
    assert await store.cas("c:k", "one", "two") is True
    assert await store.get("c:k") == "two"
    assert await store.cas("c:k", "two", None) is True
    assert await store.get("c:k") is None
    assert await store.cas("c:k", "two", None) is False
    assert await store.cas("c:k", None, None) is True
    assert await store.get("c:k") is None
    assert await store.cas("c:t", None, "x", ttl_s=0.2) is True
    remaining = await store.ttl("c:t")
    assert remaining is not None and 0 < remaining <= 0.2
    await sleep(0.35)
    assert await store.cas("c:t", None, "y") is True


@pytest_twisted.ensureDeferred
async def test_commit_applies_all_in_order(store):
    """commit applies every op (all kinds, in order) and fires True when guards hold."""
    await store.set("x:guard", "g")
    await store.set("x:old", "o")
    await store.hset("x:h", {"gone": "1"})
    await store.zadd("x:z", {"gone": 1})
    ops = [
        Op.set("x:a", "1"),
        Op.set("x:ttl", "t", ttl_s=30),
        Op.delete("x:old"),
        Op.hset("x:h", {"f": "v", "g": "w"}),
        Op.hdel("x:h", ["gone"]),
        Op.zadd("x:z", {"m": 2.0, "n": 1.0}),
        Op.zrem("x:z", ["gone"]),
        Op.set("x:b", "first"),
        Op.set("x:b", "second"),
        Op.delete("x:c"),
        Op.set("x:c", "after-delete"),
    ]
    assert await store.commit(ops, expect={"x:guard": "g", "x:absent": None}) is True
    assert await store.get("x:a") == "1"
    assert 29 < await store.ttl("x:ttl") <= 30
    assert await store.get("x:old") is None
    assert await store.hgetall("x:h") == {"f": "v", "g": "w"}
    assert await store.zrangebyscore("x:z", "-inf", "+inf") == [("n", 1.0), ("m", 2.0)]
    assert await store.get("x:b") == "second"
    assert await store.get("x:c") == "after-delete"
    assert await store.commit([]) is True
    assert await store.commit([], expect={"x:a": "1"}) is True
    assert await store.commit([], expect={"x:a": "2"}) is False
    # a string key may be deleted and then reused as a hash in the same commit
    assert await store.commit([Op.delete("x:a"), Op.hset("x:a", {"f": "v"})]) is True
    assert await store.hgetall("x:a") == {"f": "v"}


@pytest_twisted.ensureDeferred
async def test_commit_failing_guard_writes_nothing(store):
    """A guard that does not hold makes commit fire False and write nothing."""
    await store.set("g:lock", "node-a")
    ops = [Op.set("g:x", "1"), Op.hset("g:h", {"f": "v"}), Op.delete("g:lock")]
    assert await store.commit(ops, expect={"g:lock": "node-b"}) is False
    assert await store.commit(ops, expect={"g:lock": None}) is False
    assert await store.commit(ops, expect={"g:lock": "node-a", "g:other": "x"}) is False
    assert await store.get("g:x") is None
    assert await store.hgetall("g:h") == {}
    assert await store.get("g:lock") == "node-a"
    assert await store.commit(ops, expect={"g:lock": "node-a"}) is True
    assert await store.get("g:lock") is None
    assert await store.get("g:x") == "1"


@pytest_twisted.ensureDeferred
async def test_commit_wrong_type_is_all_or_nothing(store):
    """A commit with an op on a key of the wrong type errbacks StoreError and writes nothing."""
    await store.set("a:str", "s")
    await store.hset("a:hash", {"f": "v"})
    bad = [
        [Op.set("a:x", "1"), Op.hset("a:str", {"f": "v"})],
        [Op.set("a:x", "1"), Op.zadd("a:hash", {"m": 1})],
        [Op.hset("a:new", {"f": "v"}), Op.zadd("a:new", {"m": 1})],
        [Op.set("a:x", "1"), Op.set("a:str2", "v"), Op.hdel("a:str2", ["f"])],
    ]
    for ops in bad:
        await fails(store.commit(ops))
    await fails(store.commit([Op.set("a:x", "1")], expect={"a:hash": "v"}))
    assert await store.get("a:x") is None
    assert await store.get("a:str2") is None
    assert await store.hgetall("a:new") == {}
    assert await store.get("a:str") == "s"
    assert await store.hgetall("a:hash") == {"f": "v"}


# ----------------------------------------------------------------------
# scan
# ----------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_scan_pages_through_prefix(store):
    """scan pages over ~250 keys with a small count, returns every key, only under the prefix."""
    wanted = {f"s:item:{i:03d}" for i in range(250)}
    ops = [Op.set(k, "v") for k in sorted(wanted)]
    ops += [Op.hset("s:item:hash", {"f": "v"}), Op.zadd("s:item:zset", {"m": 1})]
    ops += [Op.set(f"s:other:{i}", "v") for i in range(30)]
    ops += [Op.set("s:ite", "v"), Op.set("s:itemx", "v")]
    await store.commit(ops)
    wanted |= {"s:item:hash", "s:item:zset"}
    keys, pages = await scan_all(store, "s:item:", 17)
    assert set(keys) == wanted
    assert pages > 1
    cursor, page = await store.scan("s:nothing-here:", None, 10)
    assert page == []
    # the empty prefix is every key of the store (and nothing of the store's own)
    keys, _ = await scan_all(store, "", 1000)
    assert set(keys) == wanted | {f"s:other:{i}" for i in range(30)} | {"s:ite", "s:itemx"}
    everything, _ = await scan_all(store, "s:", 50)
    assert set(everything) == wanted | {f"s:other:{i}" for i in range(30)} | {"s:ite",
                                                                                 "s:itemx"}


@pytest_twisted.ensureDeferred
async def test_scan_prefix_with_glob_characters(store):
    """Glob characters in a scan prefix match literally."""
    names = ["a*b:1", "a*b:2", "a*bc", "axb:1", "a?b:1", "a[b]:1", "ab:1", "a\\b:1", "a*"]
    for n in names:
        await store.set("gl:" + n, "v")
    assert set((await scan_all(store, "gl:a*b", 3))[0]) == {"gl:a*b:1", "gl:a*b:2", "gl:a*bc"}
    assert set((await scan_all(store, "gl:a?b", 3))[0]) == {"gl:a?b:1"}
    assert set((await scan_all(store, "gl:a[b]", 3))[0]) == {"gl:a[b]:1"}
    assert set((await scan_all(store, "gl:a\\b", 3))[0]) == {"gl:a\\b:1"}
    assert set((await scan_all(store, "gl:a*", 3))[0]) == {"gl:a*b:1", "gl:a*b:2", "gl:a*bc",
                                                          "gl:a*"}


@pytest_twisted.ensureDeferred
async def test_scan_skips_expired(store):
    """Expired keys are not returned by scan."""
    await store.set("se:gone", "x", ttl_s=0.15)
    await store.set("se:kept", "y")
    await sleep(0.3)
    assert set((await scan_all(store, "se:", 10))[0]) == {"se:kept"}


# ----------------------------------------------------------------------
# change feed
# ----------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_subscribe_delivers_own_writes(store):
    """Every write under the prefix is delivered asynchronously as (key, op), in order."""
    seen = []
    sub = await subscribed(store, "n:", lambda k, op: seen.append((k, op)))
    assert ISubscription.providedBy(sub)
    d = store.set("n:a", "1")
    assert seen == [], "notification delivered inside the writing call"
    await d
    await store.hset("n:h", {"f": "v"})
    await store.hdel("n:h", "f")
    await store.hdel("n:h", "f")              # no change: no notification
    await store.zadd("n:z", {"m": 1})
    await store.zrem("n:z", "m")
    await store.expire("n:a", 60)
    await store.delete("n:a", "n:never")
    await store.set("other:x", "1")           # not under the prefix
    await store.set("n", "1")                 # not under the prefix either
    await store.cas("n:c", None, "1")
    await store.cas("n:c", "1", None)
    await store.commit([Op.set("n:t1", "1"), Op.zadd("n:t2", {"m": 1}), Op.delete("n:t1")])
    expected = [("n:a", "set"), ("n:h", "hset"), ("n:h", "hdel"), ("n:z", "zadd"),
                ("n:z", "zrem"), ("n:a", "expire"), ("n:a", "delete"), ("n:c", "set"),
                ("n:c", "delete"), ("n:t1", "set"), ("n:t2", "zadd"), ("n:t1", "delete")]
    await eventually(lambda: len(seen) >= len(expected))
    await sleep(0.05)
    assert seen == expected
    sub.cancel()


@pytest_twisted.ensureDeferred
async def test_subscribe_prefix_with_glob_characters(store):
    """A subscription prefix with glob characters matches literally."""
    seen = []
    await subscribed(store, "q*[x]:", lambda k, op: seen.append(k))
    await store.set("qa[x]:1", "no")
    await store.set("q*x:1", "no")
    await store.set("q*[x]:1", "yes")
    await eventually(lambda: seen)
    await sleep(0.05)
    assert seen == ["q*[x]:1"]


@pytest_twisted.ensureDeferred
async def test_cancel_stops_delivery(store):
    """After cancel() a subscription hears nothing more; cancel is idempotent."""
    first, second = [], []
    sub1 = await subscribed(store, "cx:", lambda k, op: first.append(k))
    sub2 = await subscribed(store, "cx:", lambda k, op: second.append(k))
    await store.set("cx:1", "v")
    await eventually(lambda: first and second)
    sub1.cancel()
    sub1.cancel()
    await store.set("cx:2", "v")
    await eventually(lambda: len(second) == 2)
    await sleep(0.05)
    assert first == ["cx:1"]
    sub2.cancel()
    marker = []
    await subscribed(store, "cx-marker", lambda k, op: marker.append(k))
    await store.set("cx:3", "v")
    await store.set("cx-marker", "v")
    await eventually(lambda: marker)
    assert second == ["cx:1", "cx:2"]


@pytest_twisted.ensureDeferred
async def test_raising_callback_does_not_break_feed(store):
    """A callback that raises is logged; it and other subscribers keep receiving."""
    calls, others = [], []

    def bad(key, op):
        calls.append(key)
        raise RuntimeError("subscriber bug (expected in this test)")

    await subscribed(store, "rb:", bad)
    await subscribed(store, "rb:", lambda k, op: others.append(k))
    for i in range(3):
        await store.set(f"rb:{i}", "v")
    await eventually(lambda: len(calls) == 3 and len(others) == 3)
    assert calls == others == ["rb:0", "rb:1", "rb:2"]
    assert store.healthy


@pytest_twisted.ensureDeferred
async def test_expiry_and_the_feed(store):
    """A key expires while subscribed; memory notifies 'expired' (redis documents that it
    cannot); either way the feed keeps working afterwards."""
    seen = []
    await subscribed(store, "ex:", lambda k, op: seen.append((k, op)))
    await store.set("ex:1", "v", ttl_s=0.1)
    await sleep(0.3)
    assert await store.get("ex:1") is None
    if store.backend == "memory":
        await eventually(lambda: ("ex:1", "expired") in seen)
    await store.set("ex:2", "v")
    await eventually(lambda: ("ex:2", "set") in seen)
    assert seen[0] == ("ex:1", "set")


# ----------------------------------------------------------------------
# redis-only details of the same contract
# ----------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_redis_describe_masks_password_and_uses_namespace(request):
    """RedisStore with a password: describe() masks it; keys carry the namespace prefix."""
    from tests.support.require import require_binary

    require_binary("redis-server")
    from appliance.store.redis import RedisStore
    from tests.support.redis_server import RedisServer

    server = RedisServer(password="s3cr3t-pw").start()
    request.addfinalizer(server.stop)
    s = RedisStore(reactor, url=server.url, namespace="nsx")
    await s.startService()
    try:
        assert s.healthy
        info = s.describe()
        assert "s3cr3t-pw" not in json.dumps(info)
        assert "***" in info["url"] and info["backend"] == "redis"
        await s.set("k", "v")
        await s.hset("h", {"f": "v"})
        assert set((await scan_all(s, "", 100))[0]) == {"h", "k"}
    finally:
        await s.stopService()
    # a wrong password: the store starts (unhealthy) and operations fail with StoreUnavailable
    bad = RedisStore(reactor, url=f"redis://:wrong@127.0.0.1:{server.port}/0", namespace="nsx",
                     connect_timeout_s=1.0)
    await bad.startService()
    try:
        assert not bad.healthy
        await fails(bad.get("k"), StoreUnavailable)
    finally:
        await bad.stopService()


@pytest_twisted.ensureDeferred
async def test_redis_namespaces_are_isolated(redis_server_module):
    """Two RedisStores with different namespaces on one server see only their own keys/events."""
    from appliance.store.redis import RedisStore

    a = RedisStore(reactor, url=redis_server_module.url, namespace=f"iso-a-{uuid.uuid4().hex}")
    b = RedisStore(reactor, url=redis_server_module.url, namespace=f"iso-b-{uuid.uuid4().hex}")
    await a.startService()
    await b.startService()
    try:
        seen_b = []
        await subscribed(b, "", lambda k, op: seen_b.append(k))
        await a.set("k", "from-a")
        await b.set("mine", "from-b")
        assert await b.get("k") is None
        assert set((await scan_all(b, "", 100))[0]) == {"mine"}
        await eventually(lambda: seen_b)
        await sleep(0.05)
        assert seen_b == ["mine"]
    finally:
        await a.stopService()
        await b.stopService()


@pytest_twisted.ensureDeferred
async def test_redis_over_unix_socket(request):
    """RedisStore accepts a unix:///path?db=N url."""
    from tests.support.require import require_binary

    require_binary("redis-server")
    from appliance.store.redis import RedisStore
    from tests.support.redis_server import RedisServer

    server = RedisServer()
    sock = server.dir / "redis.sock"
    server.extra_config = f"unixsocket {sock}\nunixsocketperm 700"
    server.start()
    request.addfinalizer(server.stop)
    s = RedisStore(reactor, url=f"unix://{sock}?db=3", namespace="ux")
    await s.startService()
    try:
        assert s.healthy
        assert s.describe()["url"] == f"unix://{sock}?db=3"
        await s.set("k", "v")
        assert await s.get("k") == "v"
    finally:
        await s.stopService()


# ----------------------------------------------------------------------
# edge cases where the backends once differed (now aligned)
# ----------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_edge_cases_aligned(store):
    """Duplicate keys in delete count once; NaN scores and non-positive TTLs are refused
    (even for missing keys); empty hset/zadd ops in a commit write nothing."""
    await store.set("dup", "1")
    assert await store.delete("dup", "dup") == 1
    await fails(store.zadd("z", {"m": float("nan")}))
    await fails(store.commit([Op.zadd("z", {"m": float("nan")})]))
    assert await store.zcard("z") == 0
    await fails(store.expire("missing", 0))
    assert await store.commit([Op.hset("h", {}), Op.zadd("zz", {}), Op.set("k", "v")]) is True
    assert await store.hgetall("h") == {}
    keys, _ = await scan_all(store, "", 100)
    assert sorted(keys) == ["k"]


# ----------------------------------------------------------------------
# program order, restarts, input checks, feed guarantees (issue 10)
# ----------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_type_changes_survive_a_restart(store, request):
    """Keys that changed type (set over a hash; delete + zadd over a hash in one commit;
    hset over a string) have their last type and value after the store is reopened."""
    await store.hset("tc:a", {"f": "v"})
    await store.set("tc:a", "plain")
    await store.hset("tc:b", {"f": "v"})
    assert await store.commit([Op.delete("tc:b"), Op.zadd("tc:b", {"m": 2.0})]) is True
    await store.set("tc:c", "s")
    await store.delete("tc:c")
    await store.hset("tc:c", {"g": "w"})
    await store.zadd("tc:d", {"m": 1.0})
    assert await store.commit([Op.delete("tc:d"), Op.set("tc:d", "again")]) is True
    store = await reopen(request, store)
    assert await store.get("tc:a") == "plain"
    assert await store.zrangebyscore("tc:b", "-inf", "inf") == [("m", 2.0)]
    assert await store.hgetall("tc:c") == {"g": "w"}
    assert await store.get("tc:d") == "again"
    await fails(store.hgetall("tc:a"))
    await fails(store.get("tc:b"))


@pytest_twisted.ensureDeferred
async def test_program_order_without_awaiting(store):
    """Calls issued without awaiting are applied in issue order and writes are
    acknowledged in issue order: 300 writes to one key leave the last value, their
    Deferreds fire in order, and a read issued between writes sees exactly the writes
    before it.  (A read may answer before an earlier write is durable: read-your-writes,
    see the interface docstring.)"""
    fired = []
    ds = []
    for i in range(300):
        d = store.set("po:k", str(i))
        d.addCallback(lambda _, i=i: fired.append(i))
        ds.append(d)
    await defer.gatherResults(ds)
    assert fired == list(range(300))
    assert await store.get("po:k") == "299"
    # set, get, set, get, hset, hgetall, commit, get -- none awaited
    order = []
    calls = [("set", store.set("po:x", "a")), ("get", store.get("po:x")),
             ("set", store.set("po:x", "b")), ("get", store.get("po:x")),
             ("hset", store.hset("po:h", {"f": "1"})), ("hgetall", store.hgetall("po:h")),
             ("commit", store.commit([Op.delete("po:h"), Op.set("po:x", "c")])),
             ("get", store.get("po:x")), ("hgetall", store.hgetall("po:h")),
             ("delete", store.delete("po:x")), ("get", store.get("po:x"))]
    for n, (name, d) in enumerate(calls):
        d.addCallback(lambda r, n=n: order.append(n) or r)
    results = await defer.gatherResults([d for _, d in calls])
    writes = [n for n, (name, _) in enumerate(calls) if name in ("set", "hset", "commit",
                                                                  "delete")]
    assert [n for n in order if n in writes] == writes
    assert results == [None, "a", None, "b", 1, {"f": "1"}, True, "c", {}, 1, None]


@pytest_twisted.ensureDeferred
async def test_unencodable_strings_are_refused(store):
    """Lone surrogates (as json.loads gives them) are refused with StoreError through an
    errback -- key, value, hash field, sorted-set member, commit op, guard, scan prefix --
    and nothing is written."""
    bad = json.loads('"bad\\ud800"')
    assert bad == "bad\ud800"
    cases = [
        (store.set, ("su:k", bad)), (store.set, (bad, "v")), (store.get, (bad,)),
        (store.hset, ("su:h", {bad: "v"})), (store.hset, ("su:h", {"f": bad})),
        (store.hget, ("su:h", bad)), (store.zadd, ("su:z", {bad: 1.0})),
        (store.zrem, ("su:z", bad)), (store.delete, (bad,)),
        (store.cas, ("su:k", None, bad)), (store.cas, ("su:k", bad, "v")),
        (store.commit, ([Op.set("su:k", "ok"), Op.set("su:k2", bad)],)),
        (store.commit, ([Op.hset("su:h", {bad: "v"})],)),
        (store.commit, ([Op.set("su:k", "ok")], {"su:g": bad})),
        (store.scan, (bad,)), (store.scan, ("su:" + bad, None, 10)),
    ]
    for fn, args in cases:
        try:
            result = await errback_not_raise(fn, *args)
        except StoreError as e:
            assert not isinstance(e, StoreUnavailable), e
        else:
            pytest.fail(f"{fn.__name__}{args!r} was not refused: {result!r}")
    assert await store.get("su:k") is None
    assert await store.get("su:k2") is None
    assert await store.hgetall("su:h") == {}
    assert await store.zcard("su:z") == 0
    assert store.healthy
    # non-BMP characters and NUL are fine
    await store.set("su:ok", "\U0001F600\x00")
    assert await store.get("su:ok") == "\U0001F600\x00"


@pytest_twisted.ensureDeferred
async def test_notifications_come_after_the_write_is_acknowledged(store):
    """A change notification for a write of this store is delivered only after that
    write's Deferred fired (the write is durable before anyone hears of it)."""
    events = []
    await subscribed(store, "na:", lambda k, op: events.append(("note", k, op)))
    ds = []
    for i in range(100):
        if i % 3 == 0:
            d = store.commit([Op.set(f"na:{i}", "v"), Op.zadd("na:z", {str(i): i})])
        else:
            d = store.set(f"na:{i}", "v")
        d.addCallback(lambda _, i=i: events.append(("ack", f"na:{i}", None)))
        ds.append(d)
    await defer.gatherResults(ds)
    await eventually(lambda: sum(1 for e in events if e[0] == "note") >= 100 + 34)
    acked = set()
    for kind, key, op in events:
        if kind == "ack":
            acked.add(key)
        elif key != "na:z":
            assert key in acked, f"notification of {key} before its write was acknowledged"


@pytest_twisted.ensureDeferred
async def test_subscription_ready(store):
    """subscribe() returns an ISubscription whose ``ready`` Deferred fires; writes made
    after it are notified; cancel() before ready still fires it."""
    seen = []
    sub = store.subscribe("rd:", lambda k, op: seen.append((k, op)))
    assert verifyObject(ISubscription, sub)
    assert isinstance(sub.ready, defer.Deferred)
    await defer.Deferred.addTimeout(sub.ready, 5, reactor)
    await store.set("rd:1", "v")
    await eventually(lambda: ("rd:1", "set") in seen)
    assert all(op != RESYNC for _, op in seen)
    sub.cancel()
    other = store.subscribe("rd2:", lambda k, op: None)
    other.cancel()
    await defer.Deferred.addTimeout(other.ready, 5, reactor)


@pytest_twisted.ensureDeferred
async def test_recheck_fires_with_describe(store):
    """recheck() of a healthy store fires with describe() (healthy, same backend)."""
    d = errback_not_raise(store.recheck)
    info = await d
    assert info["healthy"] is True and info["backend"] == store.backend
    assert set(info) == set(store.describe())
    json.dumps(info)
    assert store.healthy
