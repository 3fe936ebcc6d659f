"""RouteInjector on the real kernel, in a namespace this test creates (a veth
pair, no dummy device on this kernel): routes checked with pyroute2."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted

from appliance.net.netlink import Netlink, NetlinkError
from services.encap.routes import PROTO_ENCAP, PROTO_ESR, RouteInjector

pytestmark = pytest.mark.integration


def kernel_routes(ns: str, table: int) -> dict[str, dict]:
    """{prefix: {"via", "oif", "proto"}} of the unicast routes of ``table`` in ``ns``."""
    from pyroute2 import IPRoute
    with IPRoute(netns=ns, flags=0) as ipr:
        out = {}
        for m in ipr.get_routes(family=socket.AF_INET, table=table):
            if (m.get("RTA_TABLE") or m["table"]) != table or m["type"] != 1:
                continue
            dst = f"{m.get('RTA_DST') or '0.0.0.0'}/{m['dst_len']}"
            out[dst] = {"via": m.get("RTA_GATEWAY"), "oif": m.get("RTA_OIF"),
                        "proto": m["proto"]}
        return out


def veth_index(ns: str, name: str) -> int:
    from pyroute2 import IPRoute
    with IPRoute(netns=ns, flags=0) as ipr:
        return ipr.link_lookup(ifname=name)[0]


@pytest.fixture
def routed_ns(netns_lab):
    ns = netns_lab.add_namespace("rt")
    netns_lab.host("ip", "-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    netns_lab.host("ip", "-n", ns, "addr", "add", "10.9.0.1/24", "dev", "v0")
    netns_lab.host("ip", "-n", ns, "link", "set", "v0", "up")
    netns_lab.host("ip", "-n", ns, "link", "set", "v1", "up")
    return netns_lab, ns


@pytest_twisted.ensureDeferred
async def test_inject_replace_withdraw_and_rules_in_a_namespace(routed_ns):
    """Host route and slice route injected, a slice moved to another next hop in
    place, a foreign route left alone by withdraw, a source rule added once."""
    from twisted.internet import reactor
    lab, ns = routed_ns
    nl = Netlink(reactor, ns)
    r = RouteInjector(reactor, nl, table=254)
    r.start()
    try:
        latency = await r.inject("10.200.0.5", dev="v0")
        assert 0 <= latency < 5
        v0 = veth_index(ns, "v0")
        routes = kernel_routes(ns, 254)
        assert routes["10.200.0.5/32"] == {"via": None, "oif": v0, "proto": PROTO_ENCAP}

        await r.inject("10.200.0.64/26", via="10.9.0.2")
        assert kernel_routes(ns, 254)["10.200.0.64/26"]["via"] == "10.9.0.2"
        await r.inject("10.200.0.64/26", via="10.9.0.3")          # replace, not add
        routes = kernel_routes(ns, 254)
        assert routes["10.200.0.64/26"]["via"] == "10.9.0.3"
        assert sum(1 for p in routes if p == "10.200.0.64/26") == 1
        assert await r.owned() == {"10.200.0.5/32": {"dev": "v0", "via": None},
                                   "10.200.0.64/26": {"dev": "v0", "via": "10.9.0.3"}}

        # somebody else's route to a prefix: withdraw leaves it
        lab.host("ip", "-n", ns, "route", "add", "10.201.0.0/24", "dev", "v0", "proto", "static")
        assert await r.withdraw("10.201.0.0/24") is False
        assert "10.201.0.0/24" in kernel_routes(ns, 254)
        assert await r.withdraw("10.200.0.64/26") is True
        assert await r.withdraw("10.200.0.64/26") is False
        assert "10.200.0.64/26" not in kernel_routes(ns, 254)

        # a dedicated table and a source rule towards it
        t = RouteInjector(reactor, nl, table=1000, proto=PROTO_ESR)
        await t.inject("0.0.0.0/0", via="10.9.0.254")
        assert kernel_routes(ns, 1000)["0.0.0.0/0"]["proto"] == PROTO_ESR
        assert "0.0.0.0/0" not in kernel_routes(ns, 254)
        assert await t.rule_from("10.200.0.0/24", 1000) is True
        assert await t.rule_from("10.200.0.0/24", 1000) is False
        rules = lab.host("ip", "-n", ns, "rule", "show").stdout
        assert rules.count("from 10.200.0.0/24 lookup 1000") == 1
        assert await t.rule_remove("10.200.0.0/24", 1000) is True
        assert "10.200.0.0/24" not in lab.host("ip", "-n", ns, "rule", "show").stdout

        # an unreachable next hop is an errback naming the route
        with pytest.raises(NetlinkError, match="10.200.0.9/32"):
            await r.inject("10.200.0.9", via="10.99.0.1")
    finally:
        await nl.close()
