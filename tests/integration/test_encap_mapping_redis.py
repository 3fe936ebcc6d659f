"""MappingTable on a real Redis shared by several tables (as DNs and the ESR
node share one Redis deployment): concurrent claims leave one winner with the
highest epoch, watchers on the other tables hear changes, and a change the
feed missed is found by the RESYNC after a Redis restart."""

from __future__ import annotations

import json
import uuid

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from services.encap.mapping import GUARD_PREFIX, MAP_KEY, MappingTable
from tests.support.require import require_binary

pytestmark = pytest.mark.integration


def sleep(s):
    return deferLater(reactor, s, lambda: None)


async def eventually(predicate, timeout=8.0, what="condition"):
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            pytest.fail(f"{what} not met within {timeout} s")
        await sleep(0.02)


@pytest.fixture
def redis_always():
    """A redis-server with AOF fsync at every write (a kill -9 keeps every write)."""
    require_binary("redis-server")
    from tests.support.redis_server import RedisServer
    server = RedisServer(extra_config="appendfsync always").start()
    try:
        yield server
    finally:
        server.stop()


async def open_tables(server, namespace, ids):
    from appliance.store.redis import RedisStore
    stores, tables = [], []
    for node in ids:
        s = RedisStore(reactor, url=server.url, namespace=namespace, op_timeout_s=2.0,
                       connect_timeout_s=3.0)
        await defer.maybeDeferred(s.startService)
        assert s.healthy
        t = MappingTable(reactor, s, node)
        assert not t.replicating           # a shared store: no peer-link copy
        await t.start()
        stores.append(s)
        tables.append(t)
    return stores, tables


async def close(stores, tables):
    for t in tables:
        t.stop()
    for s in stores:
        await defer.maybeDeferred(s.stopService)


@pytest_twisted.ensureDeferred
async def test_shared_redis_claims_race_watch_and_resync(redis_always):
    """Two DN tables and an ESR table on one Redis namespace."""
    from tests.support.redis_server import redis_command
    ns = f"t{uuid.uuid4().hex[:12]}"
    stores, (dn1, dn2, esr) = await open_tables(redis_always, ns, ["dn1", "dn2", "esr"])
    try:
        seen = []
        esr.watch(lambda t, e: seen.append((t, e and e["dn"], e and e["epoch"])))

        # 1. concurrent claims of fresh targets, both issued in the same turn: one winner each
        for i in range(20):
            target = f"10.200.1.{i}"
            r1, r2 = await defer.gatherResults(
                [dn1.claim(target, "dn1", "race"), dn2.claim(target, "dn2", "race")])
            assert r1 == r2, (target, r1, r2)          # both report the winner's entry
            assert r1["epoch"] == 1
            stored = json.loads(await stores[0].hget(MAP_KEY, target))
            assert stored["dn"] == r1["dn"]
        lost = dn1.stats["claims_lost"] + dn2.stats["claims_lost"]
        won = dn1.stats["claims"] + dn2.stats["claims"]
        assert won == 20 and lost == 20

        # 2. a takeover and a release are heard by the ESR's table
        await eventually(lambda: len(esr.entries()) == 20, what="esr saw 20 claims")
        seen.clear()
        t = "10.200.1.0"
        holder = esr.lookup(t)["dn"]
        other = "dn2" if holder == "dn1" else "dn1"
        table = {"dn1": dn1, "dn2": dn2}
        e = await table[other].claim(t, other, "takeover")
        assert (e["dn"], e["epoch"]) == (other, 2)
        await eventually(lambda: esr.lookup(t) == e, what="esr saw the takeover")
        assert await table[holder].release(t, holder) is False
        assert await table[other].release(t, other) is True
        await eventually(lambda: esr.lookup(t) is None, what="esr saw the release")
        assert seen == [(t, other, 2), (t, None, None)]

        # 3. a change the feed never carried (written behind the tables' back, no
        #    PUBLISH), then a Redis restart: the resubscribe RESYNC reloads the table
        seen.clear()
        moved = {"dn": "dn9", "epoch": 7, "since": 1.0, "reason": "by hand"}
        raw = json.dumps(moved, separators=(",", ":"), sort_keys=True)
        redis_command(redis_always.port, "HSET", f"{ns}:{MAP_KEY}", "10.200.1.5", raw)
        redis_command(redis_always.port, "SET", f"{ns}:{GUARD_PREFIX}10.200.1.5", raw)
        redis_command(redis_always.port, "HDEL", f"{ns}:{MAP_KEY}", "10.200.1.6")
        await sleep(0.3)
        assert esr.lookup("10.200.1.5")["dn"] != "dn9"     # nobody was told
        resyncs = esr.stats["resyncs"]
        redis_always.restart()
        await eventually(lambda: esr.stats["resyncs"] > resyncs, what="RESYNC after restart")
        await eventually(lambda: esr.lookup("10.200.1.5") is not None
                         and esr.lookup("10.200.1.5")["dn"] == "dn9", what="reload")
        await eventually(lambda: esr.lookup("10.200.1.6") is None, what="reload removed .6")
        assert ("10.200.1.5", "dn9", 7) in seen and ("10.200.1.6", None, None) in seen
        assert len(seen) == 2                               # only the differences

        # 4. claims work after the restart and carry on from the stored epoch
        async def claim_again():
            return await dn1.claim("10.200.1.5", "dn1", "after restart")
        deadline = reactor.seconds() + 10
        while True:
            try:
                e = await claim_again()
                break
            except Exception:
                if reactor.seconds() > deadline:
                    raise
                await sleep(0.1)
        assert (e["dn"], e["epoch"]) == ("dn1", 8)
        await eventually(lambda: esr.lookup("10.200.1.5") == e, what="esr saw epoch 8")
    finally:
        await close(stores, [dn1, dn2, esr])


@pytest_twisted.ensureDeferred
async def test_esr_with_its_own_redis_source(redis_always):
    """[services.esr] source = a Redis URL: the agent opens its own store connection
    (the node keeps another store), follows the DNs' table there, and closes it at stop."""
    from types import SimpleNamespace

    from appliance.config import config_from_string
    from appliance.store.redis import RedisStore
    from services.esr.plugin import esr_plugin
    from services.esr.service import ESRService
    from tests.unit.test_encap_routes import FakeNetlink
    ns = f"t{uuid.uuid4().hex[:12]}"
    cfg = config_from_string(f"""
[node]
id = "esr"
state_dir = "/tmp/esr-it"
[services.esr]
source = "{redis_always.url}"
namespace = "{ns}"
next_hops = {{ dn1 = "10.77.0.2" }}
""", "esr.toml", plugins={"esr": esr_plugin}).services["esr"].config
    nl = FakeNetlink()
    ctx = SimpleNamespace(reactor=reactor, store=None, rpc=None, metrics=None, cluster=None,
                          node_id="esr", providers={})
    svc = ESRService(cfg, ctx, netlink=nl, net_admin=True)
    store = RedisStore(reactor, url=redis_always.url, namespace=ns)
    await defer.maybeDeferred(store.startService)
    dn1 = MappingTable(reactor, store, "dn1")
    await dn1.start()
    try:
        await svc.startService()
        assert svc._own_store is not None and svc._own_store.healthy
        await dn1.claim("10.200.3.0/26", "dn1", "x")
        await eventually(lambda: (254, "10.200.3.0/26") in nl.kernel, what="route installed")
        assert nl.kernel[(254, "10.200.3.0/26")]["via"] == "10.77.0.2"
    finally:
        await svc.stopService()
        dn1.stop()
        await defer.maybeDeferred(store.stopService)
    assert not svc._own_store.running
