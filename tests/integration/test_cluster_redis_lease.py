"""The Redis owner-lease witness against a real redis-server: two real
ClusterManagers in this process (heartbeats over loopback 127.0.0.1 /
127.0.0.2, RedisStore each; node a reaches Redis through a TCP relay the test
can freeze; a 3 s lease TTL, so a's own deadline comes 2 % + one beat (93 ms)
before Redis's: room for a loaded box).  Exactly one owner at every 10 ms poll; with a's path to Redis
frozen, a lets go while the key in Redis still holds its value (before the
TTL ran out there), and b takes over only after that."""

from __future__ import annotations

import ipaddress
import time
import uuid

import pytest
import pytest_twisted
from twisted.internet import protocol, reactor
from twisted.internet.task import deferLater
from twisted.protocols import portforward

from appliance.cluster.manager import ClusterManager
from appliance.config import ClusterSection, Peer, VIPSection
from tests.support.redis_server import free_port

pytestmark = pytest.mark.integration

KEY = b"k" * 32
ADDR = {"a": "127.0.0.1", "b": "127.0.0.2"}
LEASE_KEY = "cluster:lease:vip1"


def sleep(s):
    return deferLater(reactor, s, lambda: None)


class _Relay(portforward.ProxyFactory):
    """TCP relay to Redis; ``freeze()`` stops it forwarding anything (the
    connections stay open: commands hang, as on a broken path)."""

    def __init__(self, host, port):
        super().__init__(host, port)
        self.conns = []
        self.frozen = False

    def buildProtocol(self, addr):
        p = super().buildProtocol(addr)
        self.conns.append(p)
        if self.frozen:
            reactor.callLater(0, p.transport.pauseProducing)
        return p

    def freeze(self):
        self.frozen = True
        for p in self.conns:
            for side in (p, getattr(p, "peer", None)):
                if side is not None and side.transport is not None:
                    side.transport.pauseProducing()


async def _store(url, ns):
    from appliance.store.redis import RedisStore

    store = RedisStore(reactor, url=url, namespace=ns, op_timeout_s=2.0, connect_timeout_s=2.0)
    await store.startService()
    return store


def _manager(nid, store, tmp_path, port):
    other = "b" if nid == "a" else "a"
    cluster = ClusterSection(peers=(Peer(other, ipaddress.ip_address(ADDR[other])),),
                             heartbeat_port=port, heartbeat_interval_ms=100, dead_after=3,
                             bind_address=ipaddress.ip_address(ADDR[nid]),
                             redis_lease=True, lease_ttl_ms=3000)
    vip = VIPSection("vip1", ipaddress.ip_interface("10.0.0.100/24"), "eth0",
                     {"a": 200, "b": 100}, True)
    return ClusterManager(reactor, node_id=nid, cluster=cluster, vips=[vip], store=store,
                          state_dir=tmp_path / nid, key=KEY)


@pytest_twisted.ensureDeferred
async def test_two_managers_one_owner_and_owner_cut_from_redis_lets_go_first(
        redis_server, tmp_path):
    ns = f"l{uuid.uuid4().hex[:10]}"
    relay = _Relay("127.0.0.1", redis_server.port)
    relay_port = reactor.listenTCP(0, relay, interface="127.0.0.1")
    via = f"redis://127.0.0.1:{relay_port.getHost().port}/0"
    stores = {"a": await _store(via, ns), "b": await _store(redis_server.url, ns),
              "watch": await _store(redis_server.url, ns)}
    hb = free_port()
    managers = {n: _manager(n, stores[n], tmp_path, hb) for n in ("a", "b")}
    drop = {}

    def on_role(nid):
        def listener(name, role, epoch):
            if nid == "a" and role == "standby" and "t" not in drop:
                drop["t"] = time.monotonic()
                # Sent at once, before anything else: what does Redis hold now?
                drop["redis"] = stores["watch"].get(LEASE_KEY)
        return listener

    try:
        for n, m in managers.items():
            m.add_resource(m.resources["vip1"].spec, listener=on_role(n))
            await m.startService()
        owners_seen = []

        def owners():
            return tuple(n for n, m in managers.items() if m.role("vip1") == "owner")
        deadline = time.monotonic() + 10
        while owners() != ("a",):
            assert len(owners()) <= 1
            assert time.monotonic() < deadline, "a never became the owner"
            await sleep(0.01)
        held = await stores["watch"].get(LEASE_KEY)
        assert held.startswith("a/"), held
        for _ in range(100):             # 1 s steady: one owner, the lease renewed
            owners_seen.append(owners())
            await sleep(0.01)
        assert set(owners_seen) == {("a",)}
        assert await stores["watch"].get(LEASE_KEY) == held

        relay.freeze()                   # a's path to Redis breaks
        cut_at = time.monotonic()
        deadline = cut_at + 10
        while owners() != ("b",):
            o = owners()
            assert len(o) <= 1, f"two owners {o}"
            assert time.monotonic() < deadline, f"no takeover by b: owners {o}"
            await sleep(0.01)
        assert "t" in drop, "a never let go"
        in_redis = await drop["redis"]
        assert in_redis == held, (f"a let go {drop['t'] - cut_at:.3f} s after the cut, when "
                                  f"Redis held {in_redis!r} (its lease had expired)")
        # let go at its own deadline (lease timer, or the election once Redis
        # stopped answering: the same deadline), not because Redis said so
        assert managers["a"].lease.stats["lost"] == 0
        assert "store_down" in managers["a"].health_flags()
        assert (await stores["watch"].get(LEASE_KEY)).startswith("b/")
        for _ in range(50):
            assert len(owners()) <= 1
            await sleep(0.01)
    finally:
        for m in managers.values():
            if m.running:
                await m.stopService()
        for s in stores.values():
            await s.stopService()
        await relay_port.stopListening()
        for p in relay.conns:
            for side in (p, getattr(p, "peer", None)):
                if side is not None and side.transport is not None:
                    side.transport.abortConnection()
