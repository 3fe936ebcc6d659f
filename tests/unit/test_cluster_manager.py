"""Two cluster managers on a Clock and a simulated network: takeover, preempt, partition heal."""

from __future__ import annotations

import ipaddress

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from appliance.cluster import partner as P
from appliance.cluster.manager import ClusterManager
from appliance.config import ClusterSection, Peer, VIPSection

KEY = b"s" * 32
ADDR = {"a": "10.0.0.1", "b": "10.0.0.2"}


class Net:
    """Delivers datagrams between fake ports unless the link is cut."""

    def __init__(self, clock):
        self.clock = clock
        self.ports = {}          # address -> protocol
        self.cut = set()         # addresses whose traffic is dropped (both ways)

    def send(self, src, data, dst):
        if src in self.cut or dst in self.cut:
            return
        proto = self.ports.get(dst)
        if proto is not None:
            self.clock.callLater(0.001, proto.datagramReceived, data, (src, 8741))


class FakePort:
    def __init__(self, net, address):
        self.net, self.address = net, address

    def write(self, data, addr):
        self.net.send(self.address, data, addr[0])

    def stopListening(self):
        self.net.ports.pop(self.address, None)


class NodeReactor:
    """One node's view of the shared Clock, with its own UDP address."""

    def __init__(self, clock, net, address):
        self._clock, self._net, self._address = clock, net, address

    def __getattr__(self, name):
        return getattr(self._clock, name)

    def listenUDP(self, port, proto, interface=""):
        self._net.ports[self._address] = proto
        return FakePort(self._net, self._address)


class MemStore:
    """The few store calls the manager makes, synchronously."""

    def __init__(self):
        self.data = {}
        self.healthy = True

    def get(self, key):
        return defer.succeed(self.data.get(key))

    def set(self, key, value):
        self.data[key] = value
        return defer.succeed(None)

    def cas(self, key, expected, new):
        if self.data.get(key) != expected:
            return defer.succeed(False)
        self.data[key] = new
        return defer.succeed(True)


def make_pair(preempt=True, auto_pd=0.0, shared_store=None):
    clock = Clock()
    net = Net(clock)
    nodes = {}
    for me, other in (("a", "b"), ("b", "a")):
        cluster = ClusterSection(peers=(Peer(other, ipaddress.ip_address(ADDR[other])),),
                                 heartbeat_interval_ms=100, dead_after=3,
                                 auto_partner_down_s=auto_pd, bind_address=None)
        vip = VIPSection("vip1", ipaddress.ip_interface("10.0.0.100/24"), "eth0",
                         {"a": 200, "b": 100}, preempt)
        m = ClusterManager(NodeReactor(clock, net, ADDR[me]), node_id=me, cluster=cluster, vips=[vip],
                           store=shared_store or MemStore(), state_dir=f"/tmp/apl-test-{me}",
                           key=KEY)
        m.roles = []
        m.add_resource(m.resources["vip1"].spec, listener=lambda r, role, e, m=m: m.roles.append((role, e)))
        nodes[me] = m
    return clock, net, nodes


def start(clock, nodes, *which):
    for name in which or nodes:
        nodes[name].startService()


def owners(nodes):
    return sorted(n for n, m in nodes.items() if m.role("vip1") == "owner" and m.running)


def run(clock, seconds, step=0.01):
    for _ in range(int(seconds / step)):
        clock.advance(step)


@pytest.fixture(autouse=True)
def tmp_state(tmp_path, monkeypatch):
    monkeypatch.setattr("appliance.cluster.manager.next_incarnation",
                        lambda d, c=iter(range(1, 10**6)): next(c))


def test_higher_priority_owns_after_startup_hold():
    """Both start; after the hold the priority-200 node owns the VIP, exactly one owner."""
    clock, net, nodes = make_pair()
    start(clock, nodes)
    run(clock, 0.2)
    assert owners(nodes) == [], "nobody claims before hearing the peers"
    run(clock, 0.5)
    assert owners(nodes) == ["a"]
    st = nodes["b"].status()
    assert st["peers"]["a"]["alive"] is True
    assert st["resources"]["vip1"]["owner"] == "a"


def test_dead_owner_replaced_within_dead_after():
    """Owner goes silent: the peer takes over about dead_after intervals later."""
    clock, net, nodes = make_pair()
    start(clock, nodes)
    run(clock, 1.0)
    assert owners(nodes) == ["a"]
    net.cut.add(ADDR["a"])
    t0 = clock.seconds()
    while nodes["b"].role("vip1") != "owner":
        clock.advance(0.01)
        assert clock.seconds() - t0 < 1.0
    took = clock.seconds() - t0
    # Suspected exactly dead_after (300 ms) after the LAST beat heard, which
    # came at most one interval before the cut.
    assert 0.2 <= took <= 0.31, took
    assert nodes["b"].roles[-1][0] == "owner"


def test_preempt_on_return_and_no_preempt_keeps():
    """When the high-priority node returns it takes back the VIP only with preempt."""
    for preempt, expected in ((True, ["a"]), (False, ["b"])):
        clock, net, nodes = make_pair(preempt=preempt)
        start(clock, nodes)
        run(clock, 1.0)
        net.cut.add(ADDR["a"])
        run(clock, 1.0)
        # a is cut off: both believe they own it (a partition)
        assert owners(nodes) == ["a", "b"]
        net.cut.clear()
        run(clock, 0.15)   # about one heartbeat after heal
        assert owners(nodes) == expected, (preempt, owners(nodes))
        run(clock, 1.0)
        assert owners(nodes) == expected


def test_heal_resolves_within_one_heartbeat_with_epochs():
    """After a partition the epochs differ and the lower one steps down at once."""
    clock, net, nodes = make_pair(preempt=False)
    start(clock, nodes)
    run(clock, 1.0)
    net.cut.add(ADDR["a"])
    run(clock, 1.0)
    ea = nodes["a"].resources["vip1"].mine.epoch
    eb = nodes["b"].resources["vip1"].mine.epoch
    assert eb > ea
    net.cut.clear()
    run(clock, 0.12)
    assert owners(nodes) == ["b"]
    assert nodes["a"].roles[-1] == ("standby", ea)


def test_shared_store_epochs_stop_a_stale_claim():
    """With one shared store, a claim whose epoch was overtaken is not taken."""
    store = MemStore()
    clock, net, nodes = make_pair(shared_store=store)
    start(clock, nodes)
    run(clock, 1.0)
    assert store.data["cluster:epoch:vip1"] == "1"
    store.data["cluster:epoch:vip1"] = "50"        # another writer got ahead
    net.cut.add(ADDR["a"])
    run(clock, 1.0)
    # b tried epoch 2, lost the CAS, learned 50, and claims 51 on a later tick
    assert nodes["b"].resources["vip1"].mine.epoch == 51


def test_maintenance_hands_over_and_partner_down_refused_while_alive():
    """maintenance on moves resources to the peer; partner-down of a live peer is refused."""
    clock, net, nodes = make_pair()
    for m in nodes.values():
        m.register_partner("b" if m.node_id == "a" else "a", primary=m.node_id == "a")
    start(clock, nodes)
    run(clock, 1.0)
    assert nodes["a"].partners["b"].fsm.state == P.NORMAL
    nodes["a"].set_maintenance(True)
    run(clock, 0.1)
    assert owners(nodes) == ["b"]
    assert nodes["b"].partners["a"].fsm.state == P.PARTNER_DOWN
    from appliance.admin.rpc import ApplicationError
    with pytest.raises(ApplicationError):
        nodes["b"].partner_down("a")
    nodes["a"].set_maintenance(False)
    run(clock, 0.5)
    assert nodes["a"].partners["b"].fsm.state == P.NORMAL
    assert nodes["b"].partners["a"].fsm.state == P.NORMAL
    assert owners(nodes) == ["a"]


def test_promote_and_demote():
    """Operator promote takes the VIP and keeps it; demote hands it back."""
    clock, net, nodes = make_pair()
    start(clock, nodes)
    run(clock, 1.0)
    nodes["b"].promote("vip1")
    run(clock, 0.2)
    assert owners(nodes) == ["b"]
    run(clock, 1.0)
    assert owners(nodes) == ["b"], "a manual claim is not preempted"
    nodes["b"].demote("vip1")
    run(clock, 0.3)
    assert owners(nodes) == ["a"]


def test_forged_heartbeats_change_nothing():
    """Beats signed with another key are dropped and counted; ownership unchanged."""
    from appliance.cluster.heartbeat import Heartbeat, encode
    clock, net, nodes = make_pair()
    start(clock, nodes)
    run(clock, 1.0)
    forged = encode(Heartbeat("a", 10**12, 1, 0.0, ("maintenance",), {"vip1": ("a", 999, True)}),
                    b"w" * 32)
    for _ in range(50):
        nodes["b"].datagram(forged, ("10.0.0.66", 8741))
    run(clock, 0.5)
    assert owners(nodes) == ["a"]
    assert nodes["b"].status()["drops"]["bad_mac"] == 50


def test_config_mismatch_named():
    """A peer whose VIP settings differ is reported with the setting's name."""
    clock, net, nodes = make_pair()
    nodes["b"].resources["vip1"].settings["preempt"] = False
    start(clock, nodes)
    run(clock, 2.0)
    mismatch = nodes["a"].status()["peers"]["b"]["config_mismatch"]
    assert mismatch == {"vip1": ["preempt"]}


class FakeVIPs:
    """Stands in for VIPManager: records acquire/release, reports link state."""

    def __init__(self):
        self.down = []
        self.log = []

    def startService(self):
        return defer.succeed(None)

    def stopService(self):
        return defer.succeed(None)

    def acquire(self, name, reason=""):
        self.log.append(("acquire", name))
        return defer.succeed(True)

    def release(self, name, reason=""):
        self.log.append(("release", name))
        return defer.succeed(True)

    def interfaces_down(self):
        return defer.succeed(list(self.down))


def test_client_interface_down_hands_over_and_back():
    """A node whose VIP interface loses carrier flags interface_down; its peer takes
    over although heartbeats still flow; when it is back (preempt) it takes over again.
    If both are down, the higher-priority node keeps serving (degraded beats nobody)."""
    clock, net, nodes = make_pair()
    vips = {n: FakeVIPs() for n in nodes}
    for n, m in nodes.items():
        m.vip_manager = vips[n]
    start(clock, nodes)
    run(clock, 1.0)
    assert owners(nodes) == ["a"]
    assert vips["a"].log == [("acquire", "vip1")]
    vips["a"].down = ["eth0"]
    run(clock, 0.8)
    assert owners(nodes) == ["b"]
    assert "interface_down" in nodes["b"].status()["peers"]["a"]["health"]
    assert nodes["b"].peers["a"].alive
    vips["b"].down = ["eth0"]
    run(clock, 0.8)
    assert owners(nodes) == ["a"], "nobody healthy: the priority node serves degraded"
    vips["a"].down = vips["b"].down = []
    run(clock, 0.8)
    assert owners(nodes) == ["a"]
    assert vips["a"].log[-1] == ("acquire", "vip1")


def test_clock_skew_reported_and_listeners_told(monkeypatch):
    """A peer whose clock is 45 s ahead is flagged in status and skew listeners hear it."""
    import appliance.cluster.manager as mgr
    clock, net, nodes = make_pair()
    heard = []
    nodes["a"].on_skew(lambda peer, skew: heard.append((peer, round(skew))))
    real_time = mgr.time.time
    start(clock, nodes)
    run(clock, 0.5)
    # From now on b's heartbeats carry a clock 45 s ahead of a's.
    monkeypatch.setattr(nodes["b"], "build_heartbeat", _skewed(nodes["b"].build_heartbeat, 45))
    run(clock, 3.0)
    status = nodes["a"].status()["peers"]["b"]
    assert status["skew_s"] > 30 and "clock skew" in status["warning"]
    assert heard and heard[0][0] == "b"
    assert nodes["a"].skew("b") > 30
    assert mgr.time.time is real_time


def _skewed(build, offset):
    from dataclasses import replace

    def skewed():
        hb = build()
        return replace(hb, sent_at=hb.sent_at + offset)
    return skewed


def test_preempt_heal_winner_reclaims_above_the_loser_and_reannounces():
    """H1: after a partition under preempt the winner re-claims at an epoch above
    the loser's (listeners hear it, the VIP is acquired again so GARP goes out)."""
    clock, net, nodes = make_pair(preempt=True)
    vips = {n: FakeVIPs() for n in nodes}
    for n, m in nodes.items():
        m.vip_manager = vips[n]
    start(clock, nodes)
    run(clock, 1.0)
    assert owners(nodes) == ["a"]
    net.cut.add(ADDR["a"])
    run(clock, 1.0)
    assert owners(nodes) == ["a", "b"]
    eb = nodes["b"].resources["vip1"].mine.epoch
    assert eb > nodes["a"].resources["vip1"].mine.epoch
    net.cut.clear()
    run(clock, 0.3)
    assert owners(nodes) == ["a"]
    ea = nodes["a"].resources["vip1"].mine.epoch
    assert ea > eb, (ea, eb)
    assert nodes["a"].roles[-1] == ("owner", ea)
    assert vips["a"].log.count(("acquire", "vip1")) >= 2, vips["a"].log
    assert nodes["b"].status()["resources"]["vip1"]["epoch"] >= ea
    run(clock, 1.0)
    assert nodes["a"].resources["vip1"].mine.epoch == ea, "no epoch churn once settled"
