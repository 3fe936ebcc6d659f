"""VMAC (keepalived's use_vmac) for real, in network namespaces.

A VIP with ``vmac = 51`` lives on a macvlan ``vrrp.51`` with the VRRP MAC
00:00:5e:00:01:33 on whichever node holds it.  The client resolves the VIP
to that MAC (never to the node's own eth0 MAC: the parent answers ARP only
for its own addresses), and after the VIP moves from a to b its neighbour
entry is still right: it reaches b without sending one ARP packet.

Topology and helpers as tests/integration/test_vip_netns.py.
"""

from __future__ import annotations

import ipaddress

import pytest
import pytest_twisted

from appliance.config import VIPSection
import re

from tests.integration.test_vip_netns import manager, on, ping, wait_for

pytestmark = pytest.mark.integration

VIP = "10.77.0.100/24"
VMAC = "00:00:5e:00:01:33"      # VRID 51


def vmac_vip(vrid: int | None = 51) -> VIPSection:
    return VIPSection(name="vip-vmac", address=ipaddress.ip_interface(VIP), interface="eth0",
                      priority={"a": 200, "b": 100}, vmac=vrid)


def deaf_to_vip_arp(lab, role: str) -> None:
    """``role`` drops every ARP packet about the VIP (sender 10.77.0.100): a
    client that misses the new owner's gratuitous ARPs (a lossy link, a
    host that ignores them)."""
    lab.run(role, "nft", "-f", "-", input=(
        "add table arp apl_deaf\n"
        "add chain arp apl_deaf in { type filter hook input priority 0; }\n"
        "add rule arp apl_deaf in arp saddr ip 10.77.0.100 drop\n"))


def vip_arp_counter(lab, role: str) -> None:
    """Count the ARP requests ``role`` sends for the VIP (its answers to the
    nodes' own requests are not an update of its entry for the VIP)."""
    lab.run(role, "nft", "-f", "-", input=(
        "add table arp apl_vmac\n"
        "add chain arp apl_vmac out { type filter hook output priority 0; }\n"
        "add rule arp apl_vmac out arp operation request arp daddr ip 10.77.0.100 counter\n"))


def vip_arp_requests(lab, role: str) -> int:
    out = lab.run(role, "nft", "list", "chain", "arp", "apl_vmac", "out").stdout
    return int(re.search(r"counter packets (\d+)", out).group(1))


def links(lab, role: str) -> str:
    return lab.host("ip", "-n", lab.nodes[role].ns, "-o", "link", "show").stdout


def on_dev(lab, role: str, dev: str) -> set[str]:
    out = lab.host("ip", "-n", lab.nodes[role].ns, "-o", "-4", "addr", "show", "dev", dev,
                   check=False).stdout
    return {line.split()[3] for line in out.splitlines()}


@pytest_twisted.inlineCallbacks
def test_vmac_vip_moves_without_any_client_arp(two_nodes_lab):
    lab = two_nodes_lab
    mac_a, mac_b = lab.mac("a"), lab.mac("b")
    mgr_a = manager(lab, "a", [vmac_vip()])
    mgr_b = manager(lab, "b", [vmac_vip()])
    yield mgr_a.startService()
    yield mgr_b.startService()
    try:
        assert (yield mgr_a.acquire("vip-vmac", "promoted (test)")) is True
        assert "vrrp.51@eth0" in links(lab, "a") and VMAC in links(lab, "a")
        assert on_dev(lab, "a", "vrrp.51") == {VIP}
        assert VIP not in on_dev(lab, "a", "eth0")
        assert "vrrp.51" not in links(lab, "b")
        # the client resolves the VIP afresh: the VRRP MAC answers, not a's eth0
        lab.host("ip", "-n", lab.nodes["client"].ns, "neigh", "flush", "dev", "eth0")
        assert (yield ping(lab, "client", "10.77.0.100")) == 0
        assert lab.neighbour("client", "10.77.0.100")[0] == VMAC
        assert lab.neighbour("client", "10.77.0.100")[0] not in (mac_a, mac_b)
        # move: from now on the client must send no ARP at all
        vip_arp_counter(lab, "client")
        yield mgr_a.release("vip-vmac", "demoted (test)")
        assert "vrrp.51" not in links(lab, "a"), "release deletes the macvlan"
        assert VIP not in on(lab, "a")
        yield mgr_b.acquire("vip-vmac", "promoted (peer a dead)")
        assert on_dev(lab, "b", "vrrp.51") == {VIP} and VMAC in links(lab, "b")
        assert (yield ping(lab, "client", "10.77.0.100")) == 0
        assert lab.neighbour("client", "10.77.0.100")[0] == VMAC
        assert vip_arp_requests(lab, "client") == 0
        counted = yield wait_for(lambda: mgr_b.stats["announcements"] >= 1)
        assert counted, mgr_b.stats
        assert mgr_a.stats["errors"] == 0 and mgr_b.stats["errors"] == 0
    finally:
        yield mgr_a.stopService()
        yield mgr_b.stopService()
    assert "vrrp.51" not in links(lab, "b"), "stop removes the macvlan"


@pytest_twisted.inlineCallbacks
def test_vmac_left_by_a_crashed_run_is_removed_at_start_and_readded_by_refresh(two_nodes_lab):
    lab = two_nodes_lab
    lab.host("ip", "-n", lab.nodes["a"].ns, "link", "add", "vrrp.51", "link", "eth0", "address",
             VMAC, "type", "macvlan", "mode", "private")
    lab.host("ip", "-n", lab.nodes["a"].ns, "addr", "add", VIP, "dev", "vrrp.51")
    mgr = manager(lab, "a", [vmac_vip()], refresh_interval_s=0.2)
    yield mgr.startService()
    try:
        assert "vrrp.51" not in links(lab, "a"), "a stale macvlan is removed at start"
        assert (yield mgr.acquire("vip-vmac", "promoted")) is True
        lab.host("ip", "-n", lab.nodes["a"].ns, "link", "del", "vrrp.51")
        back = yield wait_for(lambda: VIP in on_dev(lab, "a", "vrrp.51")
                              and mgr.stats["readded"] >= 1, timeout=3)
        assert back, (links(lab, "a"), mgr.stats)
    finally:
        yield mgr.stopService()


@pytest.mark.parametrize("vrid", [51, None], ids=["vmac", "control-no-vmac"])
@pytest_twisted.inlineCallbacks
def test_a_client_that_misses_every_garp_still_reaches_the_new_owner_only_with_vmac(
        two_nodes_lab, vrid):
    """The client hears no ARP at all after the move.  With vmac its entry
    (the VRRP MAC) is still right and it reaches b at once; the control
    without vmac keeps a's MAC and loses the VIP (what VMAC is for)."""
    lab = two_nodes_lab
    mgr_a = manager(lab, "a", [vmac_vip(vrid)])
    mgr_b = manager(lab, "b", [vmac_vip(vrid)])
    yield mgr_a.startService()
    yield mgr_b.startService()
    try:
        assert (yield mgr_a.acquire("vip-vmac", "promoted (test)")) is True
        assert (yield ping(lab, "client", "10.77.0.100")) == 0
        before = lab.neighbour("client", "10.77.0.100")[0]
        for node in ("a", "b"):       # the nodes need no ARP for the client either
            lab.set_neighbour(node, "10.77.0.10", lab.mac("client"), nud="permanent")
        deaf_to_vip_arp(lab, "client")
        yield mgr_a.release("vip-vmac", "demoted (test)")
        yield mgr_b.acquire("vip-vmac", "promoted (peer a dead)")
        yield wait_for(lambda: mgr_b.stats["announcements"] >= 1)
        reached = (yield ping(lab, "client", "10.77.0.100")) == 0
        assert lab.neighbour("client", "10.77.0.100")[0] == before
        if vrid is not None:
            assert before == VMAC and reached, "vmac: the client reaches b with its old entry"
        else:
            assert before == lab.mac("a") and not reached, "control: stuck on a's MAC"
    finally:
        yield mgr_a.stopService()
        yield mgr_b.stopService()


@pytest_twisted.inlineCallbacks
def test_add_after_the_interface_was_recreated_under_the_same_name(two_nodes_lab):
    """Netlink caches the index for the address add (one round trip less on
    a takeover); an interface deleted and created again gets a new index:
    the add looks it up again and lands on the new one."""
    from twisted.internet import reactor

    from appliance.net.netlink import Netlink
    lab = two_nodes_lab
    ns = lab.nodes["a"].ns
    nl = Netlink(reactor, netns=ns)
    nl.start()
    try:
        mk = ("ip", "-n", ns, "link", "add", "dum0", "link", "eth0", "type", "macvlan")
        lab.host(*mk)
        assert (yield nl.add_address("dum0", ipaddress.ip_interface("10.78.0.1/24"))) is True
        lab.host("ip", "-n", ns, "link", "del", "dum0")
        lab.host(*mk)
        assert (yield nl.add_address("dum0", ipaddress.ip_interface("10.78.0.1/24"))) is True
        assert on_dev(lab, "a", "dum0") == {"10.78.0.1/24"}
    finally:
        yield nl.close()
