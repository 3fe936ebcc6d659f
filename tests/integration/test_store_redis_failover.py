"""RedisStore through a Sentinel failover: master + 2 replicas + 1 sentinel on
loopback, a write load running, kill -9 of the master.

What must hold: writes fail fast during the switch (StoreUnavailable, no hang),
resume on the promoted replica by themselves, the subscriber follows the new
master and gets a RESYNC, and -- with ``min_replicas_acked = 1`` -- no write
that was acknowledged is missing afterwards.
"""

from __future__ import annotations

import time
import uuid

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from appliance.store.interface import RESYNC, StoreUnavailable
from tests.support.require import require_binary

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def sleep(seconds: float):
    return deferLater(reactor, seconds, lambda: None)


@pytest.fixture
def sentinel_with_replicas():
    require_binary("redis-server")
    require_binary("redis-sentinel")
    from tests.support.redis_server import SentinelSetup

    setup = SentinelSetup(replicas=2, down_after_ms=1000)
    setup.start()
    try:
        yield setup
    finally:
        setup.stop()


@pytest_twisted.ensureDeferred
async def test_failover_under_write_load_loses_no_acknowledged_write(sentinel_with_replicas):
    """kill -9 of the master under a write load: every failure is a fast
    StoreUnavailable, writes resume on the new master within seconds, the subscription
    follows it (RESYNC, then notifications), and every acknowledged write is there."""
    from appliance.store.redis import RedisStore

    setup = sentinel_with_replicas
    old_port = setup.master.port
    store = RedisStore(reactor, sentinels=setup.sentinels, master_name=setup.master_name,
                       namespace=f"f{uuid.uuid4().hex[:8]}", op_timeout_s=1.0,
                       connect_timeout_s=5.0, min_replicas_acked=1, replicas_timeout_ms=500)
    await store.startService()
    try:
        assert store.healthy, store.describe()
        assert store.describe()["durability"]["replicas"] == 2
        seen = []
        sub = store.subscribe("w:", lambda k, op: seen.append((k, op)))
        await defer.Deferred.addTimeout(sub.ready, 5, reactor)

        acked, failures = [], []
        state = {"stop": False, "killed_at": None, "first_ok_after_kill": None}

        async def writer():
            i = 0
            while not state["stop"]:
                key = f"w:{i}"
                start = time.monotonic()
                try:
                    await store.set(key, str(i))
                except StoreUnavailable as e:
                    failures.append((time.monotonic() - start, str(e)))
                    await sleep(0.05)
                else:
                    acked.append(key)
                    if state["killed_at"] is not None and state["first_ok_after_kill"] is None:
                        state["first_ok_after_kill"] = time.monotonic()
                    await sleep(0.002)
                i += 1

        load = defer.ensureDeferred(writer())
        await sleep(0.5)
        before_kill = len(acked)
        assert before_kill > 20 and not failures, (before_kill, failures[:3])
        setup.master.kill()
        state["killed_at"] = time.monotonic()
        deadline = time.monotonic() + 15
        while state["first_ok_after_kill"] is None or \
                len(acked) < before_kill + 50 and time.monotonic() < deadline:
            assert time.monotonic() < deadline, (
                f"writes did not resume within 15 s: {len(failures)} failures, last "
                f"{failures[-1:]}, {store.describe()}")
            await sleep(0.1)
        state["stop"] = True
        await defer.Deferred.addTimeout(load, 5, reactor)

        switch = state["first_ok_after_kill"] - state["killed_at"]
        print(f"\nfailover: first acknowledged write {switch:.2f} s after kill -9; "
              f"{len(failures)} failed writes, slowest failure "
              f"{max(f for f, _ in failures):.2f} s; {len(acked)} acknowledged")
        assert failures, "no write failed during the switch?"
        assert max(f for f, _ in failures) < 2.5, "a write hung during the switch"
        assert switch < 12
        info = store.describe()
        assert info["healthy"] is True
        assert not info["master"].endswith(f":{old_port}")
        assert setup.master_port() != old_port
        # every acknowledged write survived the failover
        values = await defer.gatherResults([store.get(k) for k in acked])
        missing = [k for k, v in zip(acked, values) if v != k.split(":")[1]]
        assert not missing, f"{len(missing)} acknowledged writes lost: {missing[:5]}"
        # the subscription follows the new master: a RESYNC, then live notifications
        deadline = time.monotonic() + 8
        while ("w:", RESYNC) not in seen:
            assert time.monotonic() < deadline, "no RESYNC after the failover"
            await sleep(0.05)
        await store.set("w:after", "x")
        deadline = time.monotonic() + 5
        while ("w:after", "set") not in seen:
            assert time.monotonic() < deadline, "no notification from the new master"
            await sleep(0.05)
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_manual_failover_demoted_master_is_left(sentinel_with_replicas):
    """SENTINEL FAILOVER: the old master stays up (and takes writes until Sentinel
    demotes it, ~10 s later -- writes that are then thrown away).  The store asks
    Sentinel every master_check_s and leaves it within about that, with at most a
    StoreUnavailable on the way; writes then land on the new master."""
    from appliance.store.redis import RedisStore
    from tests.support.redis_server import redis_command

    setup = sentinel_with_replicas
    old_port = setup.master.port
    store = RedisStore(reactor, sentinels=setup.sentinels, master_name=setup.master_name,
                       namespace=f"m{uuid.uuid4().hex[:8]}", op_timeout_s=1.0,
                       connect_timeout_s=5.0, master_check_s=0.5)
    await store.startService()
    try:
        await store.set("k", "0")
        deadline = time.monotonic() + 10
        while True:     # the sentinel needs fresh INFO from a replica before it promotes one
            reply = redis_command(setup.sentinel.port, "SENTINEL", "FAILOVER",
                                  setup.master_name)
            if b"+OK" in reply:
                break
            assert time.monotonic() < deadline, reply
            await sleep(0.2)
        named_at = None
        failures, i = [], 0
        deadline = time.monotonic() + 15
        while True:
            i += 1
            try:
                await store.set("k", str(i))
            except StoreUnavailable as e:
                failures.append(str(e))
            new_port = setup.master_port()
            if new_port not in (None, old_port):
                named_at = named_at or time.monotonic()
                if store.describe().get("master", "").endswith(f":{new_port}"):
                    break
            assert time.monotonic() < deadline, (
                f"store did not follow the failover: {store.describe()} {failures[-3:]}")
            await sleep(0.02)
        followed = time.monotonic() - named_at
        print(f"\nmanual failover: store on the new master {followed:.2f} s after Sentinel "
              f"named it; {len(failures)} failed writes {failures[:1]}")
        assert followed < 2.0
        await store.set("k", "last")
        reply = redis_command(new_port, "GET", f"{store.namespace}:k")
        assert b"last" in reply, reply
        assert store.healthy
    finally:
        await store.stopService()
