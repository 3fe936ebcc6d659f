"""RedisStore and what Redis does with a write: persistence settings shown in
describe(), WAIT for replicas (min_replicas_acked), AUTH failures retried,
scripts flushed behind the store's back.  Real redis-servers on loopback.
"""

from __future__ import annotations

import time
import uuid

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher

from appliance.store.interface import Op, StoreUnavailable
from tests.support.require import require_binary

pytestmark = pytest.mark.integration


def sleep(seconds: float):
    return deferLater(reactor, seconds, lambda: None)


async def eventually(predicate, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout} s")
        await sleep(step)


def make_store(url, **kw):
    from appliance.store.redis import RedisStore

    kw.setdefault("op_timeout_s", 2.0)
    kw.setdefault("connect_timeout_s", 2.0)
    return RedisStore(reactor, url=url, namespace=f"d{uuid.uuid4().hex[:10]}", **kw)


@pytest.fixture
def server_factory(request):
    """Start RedisServer(**kw) and stop it at the end of the test."""
    require_binary("redis-server")
    from tests.support.redis_server import RedisServer

    def start(**kw):
        server = RedisServer(**kw)
        request.addfinalizer(server.stop)
        return server.start()
    return start


@pytest.fixture
def log_events():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def texts(events, namespace="appliance.store.redis"):
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events
            if str(e.get("log_namespace", "")).startswith(namespace)]


@pytest_twisted.ensureDeferred
async def test_describe_shows_durability_and_warns_without_aof(server_factory, log_events):
    """describe()["durability"] reports appendonly/appendfsync/replicas as read at connect;
    a Redis without AOF gets a warning in the log, one with AOF does not."""
    aof = server_factory()                       # appendonly yes, appendfsync everysec
    store = make_store(aof.url)
    await store.startService()
    try:
        d = store.describe()["durability"]
        assert d == {"appendonly": True, "appendfsync": "everysec", "rdb_save": "",
                     "replicas": 0, "min_replicas_acked": 0}, d
    finally:
        await store.stopService()
    assert not [t for t in texts(log_events) if "appendonly no" in t]

    bare = server_factory(persistence="none")
    store = make_store(bare.url)
    await store.startService()
    try:
        d = store.describe()["durability"]
        assert d["appendonly"] is False and d["appendfsync"] == "everysec"
        warnings = [t for t in texts(log_events) if "appendonly no" in t]
        assert len(warnings) == 1 and "loses acknowledged writes" in warnings[0], warnings
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_min_replicas_acked_without_a_replica_fails_the_write(server_factory):
    """min_replicas_acked=1 and no replica: each write fails with StoreUnavailable after
    about replicas_timeout_ms, saying it was applied on the master (it was); writes
    still fail in order, reads work."""
    server = server_factory()
    store = make_store(server.url, min_replicas_acked=1, replicas_timeout_ms=200)
    await store.startService()
    try:
        assert store.describe()["durability"]["min_replicas_acked"] == 1
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match="applied on the master"):
            await store.set("k", "v")
        assert 0.15 < time.monotonic() - start < 1.5
        assert await store.get("k") == "v"          # may have been applied: it was
        order = []
        ds = [store.set("k", "1"), store.commit([Op.set("k", "2")]), store.get("k")]
        for n, d in enumerate(ds):
            d.addBoth(lambda r, n=n: order.append(n) or r)
        results = await defer.DeferredList(ds, consumeErrors=True)
        assert order == [0, 1, 2]
        assert [ok for ok, _ in results] == [False, False, True]
        assert results[2][1] == "2"
        assert store.stats["replica_wait_failures"] == 3
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_min_replicas_acked_with_a_replica(server_factory):
    """With a replica attached, writes succeed only once it has them: right after the ack
    the replica answers the new value; notifications still come after the ack."""
    from tests.support.redis_server import redis_command

    master = server_factory()
    replica = server_factory(extra_config=f"replicaof 127.0.0.1 {master.port}")
    deadline = time.monotonic() + 10
    while b"master_link_status:up" not in redis_command(replica.port, "INFO", "replication"):
        assert time.monotonic() < deadline, "replica did not sync"
        await sleep(0.05)
    store = make_store(master.url, min_replicas_acked=1, replicas_timeout_ms=2000)
    await store.startService()
    try:
        assert store.describe()["durability"]["replicas"] == 1
        events = []
        sub = store.subscribe("r:", lambda k, op: events.append(("note", k)))
        await defer.Deferred.addTimeout(sub.ready, 5, reactor)
        for i in range(20):
            await store.set(f"r:{i}", f"v{i}")
            reply = redis_command(replica.port, "GET", f"{store.namespace}:r:{i}")
            assert f"v{i}".encode() in reply, (i, reply)
        ds = []
        for i in range(50):
            d = store.set(f"r:p{i}", "x")
            d.addCallback(lambda _, i=i: events.append(("ack", f"r:p{i}")))
            ds.append(d)
        await defer.gatherResults(ds)
        await eventually(lambda: sum(1 for e in events if e[0] == "note") >= 70, 3,
                         "notifications")
        acked = set()
        for kind, key in events:
            if kind == "ack":
                acked.add(key)
            elif key.startswith("r:p"):
                assert key in acked, f"{key} notified before its ack"
        # a frozen replica: the write is applied and published at once, but its answer
        # (a failure after replicas_timeout_ms) comes later -- and so does the notification
        events.clear()
        replica.freeze()
        try:
            d = store.set("r:frozen", "x")
            d.addErrback(lambda f: events.append(("failed", f.value)))
            await sleep(0.5)
            assert events == [], "notified before the write's Deferred fired"
            await eventually(lambda: len(events) == 2, 4, "failure, then notification")
            assert events[0][0] == "failed" and isinstance(events[0][1], StoreUnavailable)
            assert events[1] == ("note", "r:frozen")
        finally:
            replica.thaw()
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_auth_failure_is_retried(server_factory, log_events):
    """A store started with a password the server refuses is unhealthy (logged once);
    once the server accepts that password the store connects by itself."""
    from tests.support.redis_server import redis_command

    server = server_factory(password="old-pw")
    store = make_store(f"redis://:new-pw@127.0.0.1:{server.port}/0", connect_timeout_s=1.0)
    await store.startService()
    try:
        assert not store.healthy
        await sleep(2.5)                          # several refused attempts
        assert not store.healthy
        refused = [t for t in texts(log_events) if "could not auth" in t and "retrying every" in t]
        assert len(refused) == 1, refused
        assert b"+OK" in redis_command(server.port, "CONFIG", "SET", "requirepass", "new-pw",
                                       password="old-pw")
        await eventually(lambda: store.healthy, 5, "healthy after the password was fixed")
        await store.set("k", "v")
        assert await store.get("k") == "v"
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_script_flush_fails_one_write_without_reordering(server_factory):
    """SCRIPT FLUSH behind the store's back: the next write fails with StoreUnavailable
    and is not applied (no EVAL retry that would run after later commands); the store
    loads its scripts again and later writes work."""
    from tests.support.redis_server import redis_command

    server = server_factory()
    store = make_store(server.url)
    await store.startService()
    try:
        await store.set("k", "1")
        assert b"+OK" in redis_command(server.port, "SCRIPT", "FLUSH")
        first = store.set("k", "2")
        read = store.get("k")
        with pytest.raises(StoreUnavailable, match="NOSCRIPT"):
            await first
        assert await read == "1"
        await eventually(lambda: b":1" in redis_command(server.port, "SCRIPT", "EXISTS",
                                                        store_script_sha()), 3, "reload")
        await store.set("k", "3")
        assert await store.commit([Op.set("k", "4")]) is True
        assert await store.get("k") == "4"
        assert store.healthy
    finally:
        await store.stopService()


def store_script_sha() -> str:
    from appliance.store import redis_lua

    return redis_lua.SET.sha


@pytest_twisted.ensureDeferred
async def test_psubscribe_raising_is_not_swallowed(server_factory, log_events):
    """If issuing a PSUBSCRIBE raises (the subscriber connection broke in that very
    turn), the failure is logged and the connection re-made: the new subscription's
    ready still fires, the old one gets RESYNC, both deliver."""
    server = server_factory()
    store = make_store(server.url)
    await store.startService()
    try:
        seen = []
        first = store.subscribe("a:", lambda k, op: seen.append((k, op)))
        await defer.Deferred.addTimeout(first.ready, 5, reactor)
        conn = store._subconn
        real = conn.psubscribe

        def broken(pattern):
            conn.psubscribe = real
            raise RuntimeError("simulated failure while issuing PSUBSCRIBE")
        conn.psubscribe = broken
        second = store.subscribe("b:", lambda k, op: seen.append((k, op)))
        await defer.Deferred.addTimeout(second.ready, 5, reactor)
        assert [t for t in texts(log_events) if "simulated failure" in t]
        await eventually(lambda: ("a:", "resync") in seen, 3, "resync of the first")
        await store.set("a:1", "v")
        await store.set("b:1", "v")
        await eventually(lambda: {("a:1", "set"), ("b:1", "set")} <= set(seen), 3,
                         "notifications on both")
    finally:
        await store.stopService()
