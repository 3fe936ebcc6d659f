"""Who serves which AOR (services/sip/roles.py) with a fake cluster on a Clock: the owner
answers, a backup redirects REGISTER and INVITE to the owner (302) and never writes a
binding, a promoted backup serves at once from what was replicated, nobody-owns gives
503 (or the backup serves with not_owner = "serve-if-owner-down"), shards hash stably and
spread over the nodes, sip.shards and the role in sip.stats."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace

from prometheus_client import CollectorRegistry

from appliance.admin.rpc import MethodRegistry
from appliance.plugin import NodeContext
from services.sip.config import ClusterRoles, SIPConfig
from services.sip.registrar import Limits
from services.sip.roles import Roles, shard_of, shard_priorities
from services.sip.service import SIPService
from tests.unit.test_sip_service import Peer, req, settle, started_store


@dataclass
class FakePeer:
    alive: bool = True


@dataclass
class FakeResource:
    spec: object
    owner: str | None = None
    listeners: list = field(default_factory=list)


class FakeCluster:
    """The façade's surface the sip service uses: resources with owners and listeners."""

    def __init__(self, node_id, peers):
        self.node_id = node_id
        self.peers = {p: FakePeer() for p in peers}
        self.resources: dict[str, FakeResource] = {}
        self.witness_id = None
        self.registered = {}

    def register_resource(self, name, listener, *, priority=None, preempt=True, kind="service",
                          settings=None):
        self.registered[name] = (dict(priority), preempt)
        self.resources.setdefault(name, FakeResource(spec=name)).listeners.append(listener)

    def add_resource(self, spec, settings=None, listener=None):
        self.resources[spec].listeners.append(listener)

    def set_owner(self, name, owner, epoch=1):
        res = self.resources[name]
        was_mine = res.owner == self.node_id
        res.owner = owner
        if owner == self.node_id or was_mine:
            for listener in res.listeners:
                listener(name, "owner" if owner == self.node_id else "standby", epoch)


def make(tmp_path, node="b", peers=("a",), **roles):
    clock, thread, store = started_store(tmp_path)
    cfg = SIPConfig(ipaddress.ip_address("127.0.0.1"), 5060, None, None, ("example.test",),
                    Limits(3600, 60, 7200, 5),
                    roles=ClusterRoles(**{"addresses": (("a", "10.0.0.1:5060"),
                                                        ("b", "10.0.0.2:5060"),
                                                        ("c", "10.0.0.3:5060")), **roles}))
    cluster = FakeCluster(node, peers) if peers is not None else None
    ctx = NodeContext(reactor=clock, config=None, store=store, rpc=MethodRegistry(),
                      metrics=CollectorRegistry(), cluster=cluster, state_dir=tmp_path)
    svc = SIPService(cfg, ctx)
    svc._register_rpc()
    svc.running = True
    return svc, clock, thread, store, cluster


def register(svc, clock, thread, user="alice", branch="z9hG4bK1", host="10.1.1.1"):
    peer = Peer()
    svc.received(req("REGISTER", "sip:example.test", to=f"sip:{user}@example.test",
                     branch=branch, contacts=[f"<sip:{user}@{host}>"]), peer.src, False)
    settle(clock, thread)
    return peer.responses()[-1]


def invite(svc, clock, thread, user="alice", branch="z9hG4bKi"):
    peer = Peer(7000)
    svc.received(req("INVITE", f"sip:{user}@example.test", to=f"sip:{user}@example.test",
                     branch=branch), peer.src, False)
    settle(clock, thread)
    return peer.responses()[-1]


def test_backup_redirects_to_owner_and_never_writes(tmp_path):
    """b is not the owner of sip:registrar (a is, alive): REGISTER -> 302 to a's address,
    INVITE -> 302 to the user at a; nothing stored on b."""
    svc, clock, thread, store, cluster = make(tmp_path)
    assert cluster.registered["sip:registrar"][1] is False          # no preemption
    cluster.set_owner("sip:registrar", "a")
    resp = register(svc, clock, thread)
    assert resp.code == 302 and resp.get("Contact") == "<sip:10.0.0.1:5060>"
    assert svc.location._read_now("sip:alice@example.test") == ({}, False)
    assert store.hgetall_now("sip:aor:sip:alice@example.test") == {}
    resp = invite(svc, clock, thread)
    assert resp.code == 302 and resp.get("Contact") == "<sip:alice@10.0.0.1:5060>"
    assert svc.role == "backup"
    assert svc.rpc_stats()["role"] == "backup"


def test_promoted_backup_serves_at_once(tmp_path):
    """A binding replicated to b while a owned it: once b owns the resource, b answers the
    INVITE with 302 to the contact and accepts REGISTERs, without any resync."""
    svc, clock, thread, store, cluster = make(tmp_path)
    cluster.set_owner("sip:registrar", "a")
    svc.replicator = None
    from services.sip.replication import Replicator
    r = Replicator(clock, None, (), "sync", svc.location)
    r.apply("a", {"states": [{"aor": "sip:alice@example.test", "set": {
        "sip:alice@10.9.9.9": '{"uri":"sip:alice@10.9.9.9","expires":%f,"q":null,'
                              '"call_id":"c","cseq":1,"path":[],"received":null,"params":""}'
                              % (clock.seconds() + 600)}, "del": []}]})
    settle(clock, thread)
    assert invite(svc, clock, thread).code == 302                    # to the owner a
    cluster.peers["a"].alive = False
    cluster.set_owner("sip:registrar", "b", epoch=2)
    resp = invite(svc, clock, thread, branch="z9hG4bKi2")
    assert resp.code == 302 and "sip:alice@10.9.9.9" in resp.get("Contact")
    assert register(svc, clock, thread, user="bob").code == 200
    assert svc.role == "owner"


def test_nobody_owns_503_or_backup_serves(tmp_path):
    """Owner dead, election not done: 503 Retry-After by default; with
    serve-if-owner-down the shard's backup (b, next by priority) serves, a third node
    does not."""
    svc, clock, thread, store, cluster = make(tmp_path)
    cluster.peers["a"].alive = False
    resp = register(svc, clock, thread)
    assert resp.code == 503 and resp.get("Retry-After") == "1"
    assert store.hgetall_now("sip:aor:sip:alice@example.test") == {}
    (tmp_path / "s").mkdir()
    svc2, clock2, thread2, store2, cluster2 = make(
        tmp_path / "s", not_owner="serve-if-owner-down",
        priority=(("a", 200), ("b", 150)))
    cluster2.peers["a"].alive = False
    assert register(svc2, clock2, thread2).code == 200
    assert svc2.drops["served_for_dead_owner"] == 1
    (tmp_path / "c").mkdir()
    svc3, clock3, thread3, _, cluster3 = make(
        tmp_path / "c", node="c", peers=("a", "b"), not_owner="serve-if-owner-down",
        priority=(("a", 200), ("b", 150), ("c", 100)))
    cluster3.peers["a"].alive = False
    assert register(svc3, clock3, thread3).code == 503               # b is the backup


def test_standalone_owns_everything(tmp_path):
    """No cluster (or no peers): every shard is served here, role standalone."""
    svc, clock, thread, _, _ = make(tmp_path, peers=None, shards=4)
    assert register(svc, clock, thread).code == 200
    assert svc.role == "standalone"
    (tmp_path / "x").mkdir()
    svc, clock, thread, _, _ = make(tmp_path / "x", peers=())
    assert register(svc, clock, thread).code == 200


def test_shards_hash_stably_and_spread(tmp_path):
    """crc32 of the AOR mod N (fixed values); shard i prefers the i-th node; with three
    nodes each owns a third; a REGISTER for a foreign shard gets 302 to its owner."""
    import zlib
    assert shard_of("sip:alice@example.test", 0) == shard_of("sip:alice@example.test", 1) == 0
    assert shard_of("sip:u1@example.test", 6) == zlib.crc32(b"sip:u1@example.test") % 6
    assert shard_priorities(["c", "a", "b"], 0) == {"a": 200, "b": 190, "c": 180}
    assert shard_priorities(["c", "a", "b"], 1) == {"b": 200, "c": 190, "a": 180}
    svc, clock, thread, store, cluster = make(tmp_path, node="b", peers=("a", "c"), shards=6)
    assert sorted(cluster.registered) == [f"sip:shard{i}" for i in range(6)]
    firsts = [max(p, key=p.get) for p, _ in (cluster.registered[f"sip:shard{i}"]
                                             for i in range(6))]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    for i in range(6):
        cluster.set_owner(f"sip:shard{i}", firsts[i])
    codes = {}
    for i in range(30):
        user = f"u{i}"
        resp = register(svc, clock, thread, user=user, branch=f"z9hG4bKs{i}")
        shard = shard_of(f"sip:{user}@example.test", 6)
        codes[user] = (shard, resp.code, resp.get("Contact"))
        if firsts[shard] == "b":
            assert resp.code == 200
        else:
            owner_addr = {"a": "10.0.0.1:5060", "c": "10.0.0.3:5060"}[firsts[shard]]
            assert resp.code == 302 and resp.get("Contact") == f"<sip:{owner_addr}>"
            assert store.hgetall_now(f"sip:aor:sip:{user}@example.test") == {}
    assert svc.role == "owner of 2/6 shards"
    d = svc.rpc_shards()
    settle(clock, thread)
    rows = d.result["shards"]
    assert [r["owner"] for r in rows] == firsts
    assert [r["backup"] for r in rows] == ["b", "c", "a", "b", "c", "a"]
    served = sum(1 for s, code, _ in codes.values() if code == 200)
    assert sum(r["bindings"] for r in rows) == served


def test_owner_of_a_vip_resource(tmp_path):
    """resource = a [[vip]] name: the registrar follows that resource's owner."""
    clock, thread, store = started_store(tmp_path)
    cluster = FakeCluster("b", ("a",))
    cluster.resources["vip-sip"] = FakeResource(spec="vip-sip")
    roles = Roles(ClusterRoles(resource="vip-sip"), cluster, "b", 5060, {"a": "10.0.0.1"})
    roles.register()
    assert "vip-sip" not in cluster.registered and cluster.resources["vip-sip"].listeners
    cluster.set_owner("vip-sip", "a")
    assert roles.route("sip:x@example.test").address == "10.0.0.1:5060"
    cluster.set_owner("vip-sip", "b")
    assert roles.route("sip:x@example.test").action == "serve"
    assert replace(roles.settings).resource == "vip-sip"


def test_resource_registered_first_elsewhere_lends_its_priorities(tmp_path):
    """If another service (dns, configured first) registered sip:registrar before the sip
    service was built, the registrar follows that resource and computes its backup with
    that resource's priorities."""
    from appliance.cluster.ownership import ResourceSpec
    cluster = FakeCluster("b", ("a", "c"))
    cluster.resources["sip:registrar"] = FakeResource(
        spec=ResourceSpec("sip:registrar", {"a": 100, "b": 100, "c": 150}))
    cluster.add_resource = lambda spec, settings=None, listener=None: \
        cluster.resources[spec.name].listeners.append(listener)
    roles = Roles(ClusterRoles(priority=(("a", 200), ("b", 150), ("c", 100))), cluster, "b",
                  5060, {"a": "10.0.0.1", "c": "10.0.0.3"})
    roles.register()
    assert roles.priorities["sip:registrar"] == {"a": 100, "b": 100, "c": 150}
    cluster.set_owner("sip:registrar", "a")
    assert roles.backup("sip:registrar") == "c"
