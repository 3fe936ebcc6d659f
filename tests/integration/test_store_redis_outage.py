"""RedisStore when Redis goes away: fail fast, recover by itself, resubscribe
(with a RESYNC to every subscriber), notice a Redis that came back empty.

Each test gets its own redis-server (function scope) that it kills with
SIGKILL, freezes with SIGSTOP or starts late.  Plus one Sentinel test: a
store configured with ``sentinels`` + ``master_name`` finds the master.
"""

from __future__ import annotations

import time
import uuid

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from appliance.store.interface import RESYNC, StoreDown, StoreUnavailable
from tests.support.require import require_binary

pytestmark = pytest.mark.integration

OP_TIMEOUT = 1.0


def sleep(seconds: float):
    return deferLater(reactor, seconds, lambda: None)


async def eventually(predicate, timeout: float, step: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not met within {timeout} s")
        await sleep(step)


async def works_again(store, timeout: float = 8.0) -> float:
    """Poll a write+read until it succeeds; return how long it took."""
    start = time.monotonic()
    while True:
        try:
            await store.set("probe", "ok")
            if await store.get("probe") == "ok":
                return time.monotonic() - start
        except StoreUnavailable:
            pass
        if time.monotonic() - start > timeout:
            pytest.fail(f"store did not recover within {timeout} s")
        await sleep(0.1)


async def timed_failure(d):
    """Await ``d``; it must fail with StoreUnavailable.  Return the seconds it took."""
    start = time.monotonic()
    try:
        result = await d
    except StoreUnavailable as e:
        assert "redis" in str(e), str(e)
        return time.monotonic() - start
    pytest.fail(f"expected StoreUnavailable, got {result!r}")


def make_store(url, **kw):
    from appliance.store.redis import RedisStore

    kw.setdefault("op_timeout_s", OP_TIMEOUT)
    kw.setdefault("connect_timeout_s", 2.0)
    return RedisStore(reactor, url=url, namespace=f"o{uuid.uuid4().hex[:10]}", **kw)


@pytest_twisted.ensureDeferred
async def test_kill_fails_fast_then_recovers_with_subscriptions(redis_server):
    """kill -9 of redis (with AOF): ops errback StoreUnavailable fast, healthy goes False;
    after a restart on the same port ops work again, the data is there, the subscriber
    gets RESYNC (it may have missed changes) and the subscription delivers again."""
    store = make_store(redis_server.url)
    await store.startService()
    try:
        assert store.healthy
        seen = []
        sub = store.subscribe("w:", lambda k, op: seen.append((k, op)))
        await defer.Deferred.addTimeout(sub.ready, 5, reactor)
        await store.set("w:before", "1")
        await eventually(lambda: ("w:before", "set") in seen, 3, what="first notification")

        redis_server.kill()
        # the very next operations fail fast, never hang
        for op in (lambda: store.set("w:during", "x"), lambda: store.get("w:before"),
                   lambda: store.commit([]), lambda: store.hgetall("h"),
                   lambda: store.scan("w:"), lambda: store.ping()):
            elapsed = await timed_failure(op())
            assert elapsed < 3.0, f"took {elapsed:.2f} s"
        await eventually(lambda: not store.healthy, 3, what="healthy False")
        assert store.describe()["healthy"] is False
        # while down, failures are immediate (nothing is waited for)
        elapsed = await timed_failure(store.get("w:before"))
        assert elapsed < 0.5

        redis_server.restart()
        took = await works_again(store)
        assert took < 8
        assert store.healthy
        # AOF kept the data: no data loss
        assert await store.get("w:before") == "1"
        assert "error" not in store.describe()
        # the subscription is re-established after the reconnect, with a resync first
        await eventually(lambda: ("w:", RESYNC) in seen, 8, what="resync after re-subscribe")
        assert seen.count(("w:", RESYNC)) == 1, seen
        seen.clear()

        async def delivered():
            await store.set("w:after", "2")
            return ("w:after", "set") in seen

        deadline = time.monotonic() + 8
        while True:
            try:
                if await delivered():
                    break
            except StoreUnavailable:
                pass
            await sleep(0.1)
            if ("w:after", "set") in seen:
                break
            assert time.monotonic() < deadline, "subscription did not resume"
        sub.cancel()
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_restart_without_data_is_detected_until_recheck():
    """A redis without persistence killed and restarted empty: the store notices (the
    instance key is gone), turns unhealthy with a data-loss error, refuses writes with
    StoreDown (reads still work), tells subscribers RESYNC; recheck() accepts the new
    state: instance key re-created, healthy, writes work again."""
    require_binary("redis-server")
    from tests.support.redis_server import RedisServer

    server = RedisServer(persistence="none").start()
    try:
        store = make_store(server.url)
        await store.startService()
        try:
            seen = []
            sub = store.subscribe("d:", lambda k, op: seen.append((k, op)))
            await defer.Deferred.addTimeout(sub.ready, 5, reactor)
            await store.set("d:epoch", "7")
            assert "durability" in store.describe()
            server.kill()
            await eventually(lambda: not store.healthy, 3, what="healthy False")
            server.restart()
            await eventually(lambda: "data loss" in store.describe().get("error", ""), 8,
                             what="data loss reported")
            assert store.healthy is False
            assert store.describe()["healthy"] is False
            e = None
            try:
                await store.set("d:epoch", "8")
            except StoreDown as exc:
                e = exc
            assert e is not None and "data loss" in str(e)
            await timed_failure(store.commit([]))
            assert await store.get("d:epoch") is None     # reads work: the data is gone
            await eventually(lambda: ("d:", RESYNC) in seen, 8, what="resync")
            info = await store.recheck()
            assert info["healthy"] is True and "error" not in info, info
            assert store.healthy
            await store.set("d:epoch", "1")
            assert await store.get("d:epoch") == "1"
            from tests.support.redis_server import redis_command
            assert redis_command(server.port, "EXISTS",
                                 f"__store_instance__:{store.namespace}").startswith(b":1")
            # a recheck of a healthy store changes nothing
            info = await store.recheck()
            assert info["healthy"] is True
        finally:
            await store.stopService()
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_frozen_server_times_out_in_flight_ops(redis_server):
    """A server that stops answering (SIGSTOP): an in-flight op errbacks StoreUnavailable
    within about op_timeout_s; once it answers again the store recovers."""
    store = make_store(redis_server.url)
    await store.startService()
    try:
        await store.set("k", "v")
        redis_server.freeze()
        try:
            elapsed = await timed_failure(store.get("k"))
            assert OP_TIMEOUT * 0.5 <= elapsed < 3.0, f"took {elapsed:.2f} s"
        finally:
            redis_server.thaw()
        await works_again(store)
        assert await store.get("k") == "v"
        assert store.healthy
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_start_while_redis_is_down(redis_server):
    """A store started while redis is down starts within connect_timeout (unhealthy),
    fails fast, and becomes healthy by itself when redis appears."""
    redis_server.kill()
    store = make_store(redis_server.url, connect_timeout_s=1.0)
    start = time.monotonic()
    await defer.Deferred.addTimeout(store.startService(), 5, reactor)
    assert time.monotonic() - start < 2.5
    try:
        assert not store.healthy
        info = store.describe()
        assert info["healthy"] is False and "error" in info
        elapsed = await timed_failure(store.set("k", "v"))
        assert elapsed < 0.5
        seen = []
        sub = store.subscribe("", lambda k, op: seen.append(k))   # subscribing while down is fine
        redis_server.restart()
        await eventually(lambda: store.healthy, 8, what="healthy after redis appeared")
        await works_again(store)
        await defer.Deferred.addTimeout(sub.ready, 8, reactor)
        await store.set("late", "1")
        await eventually(lambda: "late" in seen, 3, what="notification")
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_stop_service_while_down_does_not_hang(redis_server):
    """stopService fires promptly even when redis is unreachable."""
    store = make_store(redis_server.url)
    await store.startService()
    store.subscribe("x", lambda k, op: None)
    redis_server.kill()
    await sleep(0.1)
    start = time.monotonic()
    await defer.Deferred.addTimeout(store.stopService(), 5, reactor)
    assert time.monotonic() - start < 3
    assert not store.healthy
    await timed_failure(store.get("k"))


@pytest_twisted.ensureDeferred
async def test_sentinel_finds_master(redis_sentinel):
    """A store given sentinels + master_name connects to the master Sentinel reports."""
    from appliance.store.redis import RedisStore

    store = RedisStore(reactor, sentinels=redis_sentinel.sentinels,
                       master_name=redis_sentinel.master_name,
                       namespace=f"s{uuid.uuid4().hex[:8]}", connect_timeout_s=5.0)
    await store.startService()
    try:
        assert store.healthy
        info = store.describe()
        assert info["sentinels"] == list(redis_sentinel.sentinels)
        assert info["master_name"] == redis_sentinel.master_name
        assert info["master"].endswith(f":{redis_sentinel.master.port}")
        seen = []
        sub = store.subscribe("", lambda k, op: seen.append((k, op)))
        await defer.Deferred.addTimeout(sub.ready, 5, reactor)
        assert await store.cas("leader", None, "node-a") is True
        assert await store.get("leader") == "node-a"
        await eventually(lambda: ("leader", "set") in seen, 3, what="notification")
    finally:
        await store.stopService()
