"""VIPManager and Netlink for real, in network namespaces built per test.

Topology (tests.support.netns): nodes ``a`` 10.77.0.1/24 and ``b``
10.77.0.2/24 and a ``client`` 10.77.0.10/24, each on ``eth0``, joined by a
bridge in a switch namespace.  The VIPManager runs in this pytest process
(pytest-twisted reactor) with ``netns=<node namespace>``, so its netlink
thread and raw sockets work inside that namespace.

Needs root, ``ip`` (iproute2), ``ping`` (iputils-ping), ``nft`` (nftables)
and ``sysctl`` (procps); skips without them on a laptop, fails under CI.
"""

from __future__ import annotations

import ipaddress
import os
import re
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from appliance.cluster.vip import VIPManager
from appliance.config import VIPSection
from appliance.net.netlink import Netlink, NetlinkError
from tests.support.netns import Lab
from tests.support.require import require_binary

pytestmark = pytest.mark.integration

VIP = "10.77.0.100/24"
VIP2 = "10.77.0.101/24"
VIP6 = "fd77::100/64"


def vip(name: str = "vip-dhcp", address: str = VIP) -> VIPSection:
    return VIPSection(name=name, address=ipaddress.ip_interface(address), interface="eth0",
                      priority={"a": 200, "b": 100})


def manager(lab: Lab, role: str, vips: list[VIPSection], **kw) -> VIPManager:
    kw.setdefault("announce_count", 3)
    kw.setdefault("announce_interval_s", 0.02)
    return VIPManager(reactor, vips, netns=lab.nodes[role].ns, **kw)


def on(lab: Lab, role: str) -> set[str]:
    return {str(a) for a in lab.addresses(role)}


def sleep(seconds: float):
    return deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def wait_for(predicate, timeout: float = 2.0, step: float = 0.02):
    """Poll ``predicate`` (cheap, blocking is fine) with the reactor running."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        yield sleep(step)


def ping(lab: Lab, role: str, address: str):
    """Deferred exit status of one ping from ``role`` (run in a thread so
    the reactor keeps serving the netlink callbacks meanwhile)."""
    require_binary("ping")
    return deferToThread(lambda: lab.run(role, "ping", "-c1", "-W1", "-n", address,
                                         check=False).returncode)


def arp_counter(lab: Lab, role: str) -> None:
    """Count ARP packets ``role`` sends (an nft arp-family output chain)."""
    require_binary("nft")
    lab.run(role, "nft", "-f", "-", input=(
        "add table arp apl_arp\n"
        "add chain arp apl_arp out { type filter hook output priority 0; }\n"
        "add rule arp apl_arp out counter\n"))


def arp_sent(lab: Lab, role: str) -> int:
    out = lab.run(role, "nft", "list", "chain", "arp", "apl_arp", "out").stdout
    return int(re.search(r"counter packets (\d+)", out).group(1))


@pytest_twisted.inlineCallbacks
def test_acquire_adds_vip_client_can_ping_release_removes(two_nodes_lab):
    """acquire puts 10.77.0.100/24 on a's eth0 and the client reaches it;
    release takes it off again and the client no longer reaches it."""
    lab = two_nodes_lab
    mgr = manager(lab, "a", [vip()])
    yield mgr.startService()
    try:
        ok = yield mgr.acquire("vip-dhcp", "promoted (test)")
        assert ok is True
        assert VIP in on(lab, "a")
        assert mgr.held() == {"vip-dhcp"}
        assert (yield ping(lab, "client", "10.77.0.100")) == 0
        ok = yield mgr.release("vip-dhcp", "demoted (test)")
        assert ok is True
        assert VIP not in on(lab, "a")
        assert "10.77.0.1/24" in on(lab, "a")
        assert mgr.held() == set()
        assert mgr.stats["errors"] == 0
        assert mgr.stats["announcements"] >= 1
    finally:
        yield mgr.stopService()


@pytest_twisted.inlineCallbacks
def test_garp_moves_client_neighbour_entry_without_client_arp(two_nodes_lab):
    """The client's (pre-populated, wrong) neighbour entry for the VIP points
    at a's MAC after a acquires, then at b's MAC after the VIP moves to b --
    updated by the gratuitous ARPs alone: the client sends no ARP at all."""
    lab = two_nodes_lab
    mac_a, mac_b = lab.mac("a"), lab.mac("b")
    arp_counter(lab, "client")
    lab.set_neighbour("client", "10.77.0.100", "02:00:00:00:00:99")
    mgr_a = manager(lab, "a", [vip()])
    mgr_b = manager(lab, "b", [vip()])
    yield mgr_a.startService()
    yield mgr_b.startService()
    try:
        yield mgr_a.acquire("vip-dhcp", "promoted (peer b dead)")
        got = yield wait_for(lambda: lab.neighbour("client", "10.77.0.100")[0] == mac_a)
        assert got, lab.neighbour("client", "10.77.0.100")
        # move: release on a, acquire on b
        yield mgr_a.release("vip-dhcp", "demoted (peer b took over)")
        yield mgr_b.acquire("vip-dhcp", "promoted (peer a dead)")
        got = yield wait_for(lambda: lab.neighbour("client", "10.77.0.100")[0] == mac_b)
        assert got, lab.neighbour("client", "10.77.0.100")
        assert arp_sent(lab, "client") == 0
        assert VIP in on(lab, "b") and VIP not in on(lab, "a")
        # and traffic now goes to b
        assert (yield ping(lab, "client", "10.77.0.100")) == 0
        # the count goes up when the netlink worker's result reaches the
        # reactor, which can be after the client already saw the frames
        counted = yield wait_for(lambda: mgr_b.stats["announcements"] >= 1)
        assert counted, mgr_b.stats
    finally:
        yield mgr_a.stopService()
        yield mgr_b.stopService()


@pytest_twisted.inlineCallbacks
def test_ipv6_vip_unsolicited_na_updates_client(two_nodes_lab):
    """An IPv6 VIP is added without DAD and its unsolicited NA moves the
    client's neighbour entry from a bogus MAC to a's MAC; the client then
    reaches it over IPv6."""
    lab = two_nodes_lab
    lab.host("ip", "-n", lab.nodes["client"].ns, "addr", "add", "fd77::10/64",
             "dev", "eth0", "nodad")
    mac_a = lab.mac("a")
    lab.set_neighbour("client", "fd77::100", "02:00:00:00:00:98")
    mgr = manager(lab, "a", [vip("vip-v6", VIP6)])
    yield mgr.startService()
    try:
        assert (yield mgr.acquire("vip-v6", "promoted (test)")) is True
        assert VIP6 in on(lab, "a")
        got = yield wait_for(lambda: lab.neighbour("client", "fd77::100")[0] == mac_a)
        assert got, lab.neighbour("client", "fd77::100")
        assert (yield ping(lab, "client", "fd77::100")) == 0
    finally:
        yield mgr.stopService()
    assert VIP6 not in on(lab, "a")


@pytest_twisted.inlineCallbacks
def test_start_removes_stale_and_stop_removes_all(two_nodes_lab):
    """An address left by a crashed run is removed by startService (a's own
    address stays); stopService removes every VIP it acquired."""
    lab = two_nodes_lab
    lab.host("ip", "-n", lab.nodes["a"].ns, "addr", "add", VIP, "dev", "eth0")
    assert VIP in on(lab, "a")
    mgr = manager(lab, "a", [vip(), vip("vip-sip", VIP2)])
    yield mgr.startService()
    assert VIP not in on(lab, "a")
    assert "10.77.0.1/24" in on(lab, "a")
    yield mgr.acquire("vip-dhcp", "promoted")
    yield mgr.acquire("vip-sip", "promoted")
    assert {VIP, VIP2} <= on(lab, "a")
    yield mgr.stopService()
    assert on(lab, "a") & {VIP, VIP2} == set()
    assert mgr.held() == set()
    assert mgr.stats == {"acquired": 2, "released": 2, "errors": 0,
                         "announcements": mgr.stats["announcements"], "readded": 0}
    assert not mgr._netlink.running


@pytest_twisted.inlineCallbacks
def test_netlink_operations_and_clear_errors(two_nodes_lab):
    """Netlink in a namespace: idempotent add/remove, addresses, link state,
    and errors that say what failed where (``... on nope0: No such device``)."""
    lab = two_nodes_lab
    nl = Netlink(reactor, netns=lab.nodes["a"].ns)
    nl.start()
    try:
        iface = ipaddress.ip_interface(VIP)
        assert (yield nl.add_address("eth0", iface)) is True
        assert (yield nl.add_address("eth0", iface)) is False
        addrs = yield nl.addresses("eth0")
        assert iface in addrs and ipaddress.ip_interface("10.77.0.1/24") in addrs
        assert (yield nl.remove_address("eth0", iface)) is True
        assert (yield nl.remove_address("eth0", iface)) is False
        assert isinstance((yield nl.link_index("eth0")), int)
        assert (yield nl.link_up("eth0")) is True
        assert len((yield nl.mac_address("eth0"))) == 6
        lab.link_down("a")
        assert (yield nl.link_up("eth0")) is False
        lab.link_up("a")
        with pytest.raises(NetlinkError, match=r"^add 10\.77\.0\.100/24 on nope0: No such device$"):
            yield nl.add_address("nope0", iface)
        with pytest.raises(NetlinkError, match="announce 10.77.0.100 on nope0: No such device"):
            yield nl.announce("nope0", iface)
    finally:
        yield nl.close()
    assert not nl.running


@pytest_twisted.inlineCallbacks
def test_netlink_mistyped_netns_fails_and_creates_nothing():
    """A namespace name that does not exist gives a clear NetlinkError and
    is NOT created (pyroute2 would create it by default)."""
    name = f"apl-{os.urandom(2).hex()}-missing"
    nl = Netlink(reactor, netns=name)
    nl.start()
    try:
        with pytest.raises(NetlinkError, match=f"network namespace '{name}' does not exist"):
            yield nl.addresses("eth0")
        with pytest.raises(NetlinkError, match="does not exist"):
            yield nl.announce("eth0", "10.77.0.100")
    finally:
        yield nl.close()
    assert not os.path.exists(f"/run/netns/{name}")


@pytest_twisted.inlineCallbacks
def test_lab_drop_between_and_undrop(two_nodes_lab):
    """Lab self-check: drop_between blocks IP traffic client<->a, undrop
    restores it, and ARP (not IP) is unaffected."""
    lab = two_nodes_lab
    assert (yield ping(lab, "client", "10.77.0.1")) == 0
    lab.drop_between("client", "10.77.0.1")
    assert (yield ping(lab, "client", "10.77.0.1")) != 0
    assert (yield ping(lab, "client", "10.77.0.2")) == 0
    lab.undrop("client", "10.77.0.1")
    assert (yield ping(lab, "client", "10.77.0.1")) == 0


@pytest_twisted.inlineCallbacks
def test_takeover_fast_path_adds_and_announces_from_the_reactor_thread(two_nodes_lab):
    """After start the VIP's interface is prepared (appliance.net.takeover):
    the takeover's add and first gratuitous ARP / NA leave from the reactor
    thread, the client's neighbour entry moves and it reaches the VIP (IPv4
    and IPv6); an address already there (EEXIST) is no error."""
    lab = two_nodes_lab
    lab.host("ip", "-n", lab.nodes["client"].ns, "addr", "add", "fd77::10/64",
             "dev", "eth0", "nodad")
    mac_a = lab.mac("a")
    lab.set_neighbour("client", "10.77.0.100", "02:00:00:00:00:99")
    lab.set_neighbour("client", "fd77::100", "02:00:00:00:00:98")
    mgr = manager(lab, "a", [vip(), vip("vip-v6", VIP6)])
    yield mgr.startService()
    nl = mgr._netlink
    try:
        assert set(nl._prepared) == {"eth0"}
        assert (yield mgr.acquire("vip-dhcp", "promoted (test)")) is True
        assert (yield mgr.acquire("vip-v6", "promoted (test)")) is True
        assert nl.fast_adds == 2 and nl.fast_fallbacks == 0
        assert VIP in on(lab, "a") and VIP6 in on(lab, "a")
        got = yield wait_for(lambda: lab.neighbour("client", "10.77.0.100")[0] == mac_a)
        assert got, lab.neighbour("client", "10.77.0.100")
        got = yield wait_for(lambda: lab.neighbour("client", "fd77::100")[0] == mac_a)
        assert got, lab.neighbour("client", "fd77::100")
        assert (yield ping(lab, "client", "10.77.0.100")) == 0
        assert (yield ping(lab, "client", "fd77::100")) == 0
        assert (yield mgr.acquire("vip-dhcp", "again (test)")) is True    # EEXIST
        assert nl.fast_adds == 3 and mgr.stats["errors"] == 0
    finally:
        yield mgr.stopService()
    assert VIP not in on(lab, "a") and VIP6 not in on(lab, "a")
    assert nl._prepared == {}


@pytest_twisted.inlineCallbacks
def test_takeover_fast_path_falls_back_to_the_worker_and_prepares_again(two_nodes_lab):
    """A prepared interface gone stale (here: a wrong index, as after the
    interface was re-created) fails the fast add; the worker thread adds the
    VIP instead, and the interface is prepared again for the next takeover."""
    lab = two_nodes_lab
    mgr = manager(lab, "a", [vip()])
    yield mgr.startService()
    nl = mgr._netlink
    try:
        nl._prepared["eth0"].index = 999_999
        assert (yield mgr.acquire("vip-dhcp", "promoted (test)")) is True
        assert VIP in on(lab, "a")
        assert nl.fast_adds == 0 and nl.fast_fallbacks == 1
        assert (yield wait_for(lambda: "eth0" in nl._prepared))
        assert (yield ping(lab, "client", "10.77.0.100")) == 0
        yield mgr.release("vip-dhcp", "demoted (test)")
        assert (yield mgr.acquire("vip-dhcp", "promoted again (test)")) is True
        assert nl.fast_adds == 1 and VIP in on(lab, "a")
    finally:
        yield mgr.stopService()
