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
