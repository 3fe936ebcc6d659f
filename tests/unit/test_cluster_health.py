"""Per-service health (review M6): a node whose service failed advertises
``service_failed:<name>`` and gives up only the resources that follow that service
(VIPs with ``service = name``, resources the service registered); node.py tells the
cluster."""

from __future__ import annotations

import ipaddress

from appliance.config import VIPSection
from appliance.cluster.ownership import ResourceSpec
from tests.unit.test_cluster_manager import make_pair, run, start, tmp_state  # noqa: F401
from tests.unit.test_node import make_node, result_of, world  # noqa: F401


def _pair_with_dhcp_vip():
    clock, net, nodes = make_pair()
    for m in nodes.values():
        # a second VIP following the dhcp4 service, as [[vip]] service = "dhcp4" makes it
        m.add_resource(ResourceSpec("vip-dhcp", {"a": 200, "b": 100}, True, kind="vip"),
                       settings={"priority": {"a": 200, "b": 100}})
        m.health.colocated["vip-dhcp"] = "dhcp4"
        m.register_resource("dns:www", lambda r, role, e: None, priority={"a": 200, "b": 100},
                            kind="dns")
    return clock, net, nodes


def _owner(nodes, res):
    return sorted(n for n, m in nodes.items() if m.role(res) == "owner")


def test_failed_service_moves_only_the_resources_that_follow_it():
    clock, net, nodes = _pair_with_dhcp_vip()
    start(clock, nodes)
    run(clock, 1.5)
    assert [_owner(nodes, r) for r in ("vip1", "vip-dhcp", "dns:www")] == [["a"]] * 3
    nodes["a"].service_failed("dhcp4", "RuntimeError: no such interface eth9")
    run(clock, 0.5)
    assert _owner(nodes, "vip-dhcp") == ["b"], "the VIP follows the running dhcp4"
    assert _owner(nodes, "vip1") == ["a"] and _owner(nodes, "dns:www") == ["a"]
    health = nodes["b"].status()["peers"]["a"]["health"]
    assert "service_failed:dhcp4" in health and "unable:vip-dhcp" in health
    assert nodes["b"].peers["a"].able, "not unable for everything (no node-wide flag)"
    nodes["a"].service_failed("dns", "boom")
    run(clock, 0.5)
    assert _owner(nodes, "dns:www") == ["b"], "a resource registered by the failed service"
    nodes["a"].service_failed("dhcp4", None)
    nodes["a"].service_failed("dns", None)
    run(clock, 1.0)
    assert [_owner(nodes, r) for r in ("vip1", "vip-dhcp", "dns:www")] == [["a"]] * 3
    assert not any(f.startswith("service_failed") for f in nodes["a"].health_flags())


def test_both_services_failed_keeps_a_degraded_owner():
    """If the peer's service failed too, nobody better can take it: it stays."""
    clock, net, nodes = _pair_with_dhcp_vip()
    start(clock, nodes)
    run(clock, 1.5)
    for m in nodes.values():
        m.service_failed("dhcp4", "boom")
    run(clock, 1.0)
    assert len(_owner(nodes, "vip-dhcp")) == 1


def test_vip_service_key_wires_the_colocation():
    from appliance.cluster.manager import ClusterManager
    from twisted.internet.task import Clock
    vip = VIPSection("vip-dhcp", ipaddress.ip_interface("10.0.0.100/24"), "eth0", {"n": 100},
                     service="dhcp4")
    m = ClusterManager(Clock(), node_id="n", cluster=None, vips=[vip])
    assert m.health.colocated == {"vip-dhcp": "dhcp4"}
    from appliance.config import config_from_string
    cfg = config_from_string('[node]\nid = "a"\nstate_dir = "/tmp/x"\n[[vip]]\nname = "v"\n'
                             'address = "10.0.0.1/24"\ninterface = "eth0"\nservice = "dhcp4"\n'
                             'priority = { a = 100 }\n', "t.toml", {})
    assert cfg.vips[0].service == "dhcp4"


def test_node_tells_the_cluster_about_a_failed_start(world):  # noqa: F811
    node, _ = make_node(world, '[services.a]\nmode = "fail"\n[services.b]\n')
    result_of(node.startService())
    assert node.slots["a"].state == "failed"
    assert "service_failed:a" in node.cluster.health_flags()
    assert "service_failed:b" not in node.cluster.health_flags()
    assert "no such interface" in node.cluster.health.failed_services["a"]


class _SelfReportingPlugin:
    """A service that says itself it cannot serve yet ("syncing"), as the sip
    service does until its bindings are synced, and registers its own resource."""

    description = "test"

    def __init__(self):
        self.services = []

    def parse_config(self, table, context):
        return {}

    def make_service(self, config, context):
        from twisted.application.service import Service

        plugin = self

        class Syncing(Service):
            def startService(self):
                super().startService()
                context.cluster.register_resource("sip:shard0", lambda *a: None, kind="sip")
                context.cluster.service_failed("sip", "syncing")
                plugin.services.append(self)

        return Syncing()


def test_a_service_report_survives_its_successful_start(world):  # noqa: F811
    """The node's "started" must not clear what the service said about itself
    (the old node cleared service_failed:sip as soon as startService returned)."""
    tmp_path, log, pending, plugins = world
    plugins["sip"] = _SelfReportingPlugin()
    node, _ = make_node(world, '[services.sip]\n')
    result_of(node.startService())
    assert node.slots["sip"].state == "running"
    flags = node.cluster.health_flags()
    assert "service_failed:sip" in flags and "unable:sip:shard0" in flags
    node.cluster.service_failed("sip", None)            # synced
    assert not any("sip" in f for f in node.cluster.health_flags())


def test_report_sources_are_separate():
    """A start failure and the service's own report are set and cleared apart."""
    from appliance.cluster.manager import ClusterManager
    from twisted.internet.task import Clock
    m = ClusterManager(Clock(), node_id="n", cluster=None)
    m.register_resource("sip:shard0", lambda *a: None, kind="sip")
    m.service_failed("sip", "syncing")
    m.service_failed("sip", "RuntimeError: bind", source="start")
    m.service_failed("sip", None, source="start")       # the node: it started
    assert "unable:sip:shard0" in m.health_flags()
    assert m.health.failed_services["sip"] == "syncing"
    m.service_failed("sip", None)
    assert m.health_flags() == ()
    m.service_failed("sip", "syncing")
    m.service_failed("sip", None, source=None)          # disabled: every source
    assert m.health_flags() == ()


def test_unable_resource_registered_by_the_service_moves_and_comes_back():
    """service_failed("sip", "syncing") on the owner moves a resource the sip
    service registered itself (kind="sip") to the peer; None brings it back."""
    clock, net, nodes = make_pair()
    for m in nodes.values():
        m.register_resource("sip:shard0", lambda *a: None, priority={"a": 200, "b": 100},
                            kind="sip")
    start(clock, nodes)
    run(clock, 1.5)
    assert _owner(nodes, "sip:shard0") == ["a"]
    nodes["a"].service_failed("sip", "syncing")
    run(clock, 0.5)
    assert _owner(nodes, "sip:shard0") == ["b"] and _owner(nodes, "vip1") == ["a"]
    nodes["a"].service_failed("sip", None)
    run(clock, 1.0)
    assert _owner(nodes, "sip:shard0") == ["a"]
