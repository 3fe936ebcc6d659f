"""Who may overwrite a guard (review H3, M1): identity, resource, (epoch, priority, node)."""

from __future__ import annotations

import dns.name

from services.dns.guard import Guard, cluster_identity, parse_guard, verdict
from services.dns.records import guard_rdata
from services.dns.updater import Updater


def test_equal_epochs_are_broken_like_the_election():
    """Two nodes at one epoch: exactly one may write -- the higher priority, then the
    higher node id (ownership.elect's order); the other is refused."""
    a, b = Guard("a", 5, "vip1", "c"), Guard("b", 5, "vip1", "c")
    assert verdict(a, b).write and not verdict(b, a).write
    prio = {"a": 200, "b": 100}.get
    assert verdict(b, a, prio).write and not verdict(a, b, prio).write
    assert not verdict(Guard("b", 6, "vip1", "c"), a).write      # a strictly newer epoch wins
    assert verdict(Guard("b", 4, "vip1", "c"), a) == (True, None)
    assert verdict(Guard("a", 9, "vip1", "c"), a).write             # our own (lost counter)


def test_unrelated_guards_are_taken_over_with_a_reason():
    """Another cluster's guard, another resource's, or the old identity-less format
    carries an epoch of an unrelated counter: taken over, with the reason."""
    me = Guard("b", 1, "vip1", "c")
    for other, word in ((Guard("a", 57), "old guard format"),
                        (Guard("a", 57, "vip1", "other"), "cluster"),
                        (Guard("a", 57, "vip-old", "c"), "resource")):
        v = verdict(other, me)
        assert v.write and word in v.takeover, (other, v)
    assert verdict(None, me) == (True, None)


def test_cluster_identity():
    """Explicit wins; otherwise members and the heartbeat key (order-free)."""
    assert cluster_identity("lab-1", ["a"], None) == "lab-1"
    assert cluster_identity(None, ["a", "b"], None) == cluster_identity(None, ["b", "a"], None)
    assert cluster_identity(None, ["a", "b"], None) != cluster_identity(None, ["a", "c"], None)


def test_expectation_from_claims():
    """Review M2: gaining at epoch 7 with one other node and a cached guard from epoch 4:
    the server holds the other node's epoch-6 guard; the cache says so without a read."""
    up = Updater(None, None, "a", None, cluster="c")
    name = dns.name.from_text("www.example.test.")
    up.remember(name, frozenset([guard_rdata("a", 4, "vip1", "c")]))
    up.expect(name, "vip1", 7, ["a", "b"])
    assert parse_guard(up.guards[name]) == ("b", 6, "vip1", "c")
    up.expect(name, "vip1", 8, ["a", "b"])        # "b 6" is one behind 8 - 1: predicted again
    assert parse_guard(up.guards[name]) == ("b", 7, "vip1", "c")
    gen = up.generation[name]
    up.remember(name, frozenset(), gen - 1)       # a read older than the last write: dropped
    assert parse_guard(up.guards[name]) == ("b", 7, "vip1", "c")


def test_cluster_id_comes_from_the_cluster_manager(tmp_path):
    """Issue 13: the cluster manager exposes a stable cluster_id (sorted member ids + the
    HMAC key's fingerprint, the same digest dns derived before, so guards written before
    the upgrade keep their identity); the dns service writes it into its guards unless
    [services.dns] cluster_id says otherwise."""
    import ipaddress
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry
    from twisted.internet.task import Clock

    from appliance.admin.rpc import MethodRegistry
    from appliance.cluster.manager import ClusterManager
    from appliance.config import ClusterSection, Peer
    from appliance.plugin import NodeContext
    from services.dns.service import DNSService
    from tests.unit.test_dns_service import EX, FakeClient, FakeCluster, rec
    from services.dns.config import DNSConfig

    key_file = tmp_path / "cluster.key"
    key_file.write_text("00112233445566778899aabbccddeeff\n")
    section = ClusterSection(peers=(Peer("b", ipaddress.ip_address("10.0.0.2")),),
                             heartbeat_interval_ms=100, dead_after=3, bind_address=None,
                             auth_key_file=str(key_file))
    managers = [ClusterManager(Clock(), node_id=me, cluster=section.__class__(
        **{**section.__dict__, "peers": (Peer(other, ipaddress.ip_address("10.0.0.9")),)}),
        state_dir=tmp_path) for me, other in (("a", "b"), ("b", "a"))]
    ids = {m.cluster_id for m in managers}
    assert len(ids) == 1, "the same on every member"
    cid = ids.pop()
    assert cid == cluster_identity(None, ["b", "a"], str(key_file))
    key_file.write_text("ffeeddccbbaa99887766554433221100\n")
    assert managers[0].cluster_id != cid, "a new key: a new cluster"

    class Cluster(FakeCluster):
        cluster_id = "from-the-manager"

    def service(explicit):
        config = DNSConfig(servers=(("127.0.0.1", 53),), key=None, key_file=None, zones=(EX,),
                           default_ttl=5, records=(rec("a.example.test.", "A", "10.0.0.1"),),
                           cluster_id=explicit)
        context = NodeContext(reactor=Clock(), config=SimpleNamespace(
            node=SimpleNamespace(id="a"), cluster=section), store=None, rpc=MethodRegistry(),
            metrics=CollectorRegistry(), cluster=Cluster(), state_dir=tmp_path)
        return DNSService(config, context, client=FakeClient())
    assert service(None).cluster_id == "from-the-manager"
    assert service("lab-1").cluster_id == "lab-1"
    assert service(None).updater.cluster == "from-the-manager"
