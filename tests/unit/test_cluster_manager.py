"""Two cluster managers on a Clock and a simulated network: takeover, preempt, partition heal."""

from __future__ import annotations

import ipaddress

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from appliance.cluster import partner as P
from appliance.cluster.manager import ClusterManager
from appliance.config import ClusterSection, Peer, VIPSection
from tests.support.sync import MemStore

KEY = b"s" * 32
ADDR = {"a": "10.0.0.1", "b": "10.0.0.2"}


class Net:
    """Delivers datagrams between fake ports unless the link is cut.

    ``loss`` drops each datagram with that probability (seeded), ``drop_next``
    drops the next n datagrams from one address to another, ``tap`` records
    every datagram sent (for replays)."""

    def __init__(self, clock, *, loss=0.0, seed=1):
        import random
        self.clock = clock
        self.ports = {}          # address -> protocol
        self.cut = set()         # addresses whose traffic is dropped (both ways)
        self.loss = loss
        self.rng = random.Random(seed)
        self.drop_next = {}      # (src, dst) -> datagrams still to drop
        self.tap = []

    def send(self, src, data, dst):
        self.tap.append((src, dst, data))
        if src in self.cut or dst in self.cut:
            return
        if self.drop_next.get((src, dst), 0) > 0:
            self.drop_next[(src, dst)] -= 1
            return
        if self.loss and self.rng.random() < self.loss:
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
    """One node's view of the shared Clock, with its own UDP address.

    ``overhead`` is added to every callLater delay: the cost of a tick plus
    epoll's round-up, which a re-armed (not drift-free) schedule accumulates."""

    def __init__(self, clock, net, address, overhead=0.0):
        self._clock, self._net, self._address = clock, net, address
        self._overhead = overhead

    def __getattr__(self, name):
        return getattr(self._clock, name)

    def callLater(self, delay, f, *args, **kw):
        return self._clock.callLater(delay + self._overhead, f, *args, **kw)

    def listenUDP(self, port, proto, interface=""):
        self._net.ports[self._address] = proto
        return FakePort(self._net, self._address)


class WallReactor(NodeReactor):
    """A reactor whose timers follow a steppable wall clock, as Twisted's do
    (``runtime.seconds is time.time``): after ``step(-3600)`` a pending call
    fires an hour late, after ``step(+3600)`` at once."""

    def __init__(self, clock, net, address):
        super().__init__(clock, net, address)
        self.offset = 0.0
        self._calls = []

    def seconds(self):
        return self._clock.seconds() + self.offset

    def callLater(self, delay, f, *args, **kw):
        dc = self._clock.callLater(delay, f, *args, **kw)
        self._calls.append((dc, self.seconds() + delay))
        return dc

    def step(self, delta):
        self.offset += delta
        self._calls = [(dc, due) for dc, due in self._calls if dc.active()]
        for dc, due in self._calls:
            dc.reset(max(0.0, due - self.seconds()))


def cluster_section(me, other, auto_pd=0.0, beats=None):
    import dataclasses
    cluster = ClusterSection(peers=(Peer(other, ipaddress.ip_address(ADDR[other])),),
                             heartbeat_interval_ms=100, dead_after=3,
                             auto_partner_down_s=auto_pd, bind_address=None)
    if beats is not None and "beats_per_interval" in {f.name for f in dataclasses.fields(cluster)}:
        cluster = dataclasses.replace(cluster, beats_per_interval=beats)
    return cluster


def make_node(clock, net, me, *, preempt=True, auto_pd=0.0, store=None, beats=None,
              overhead=0.0, wall_reactor=False):
    """One manager on the shared network.  ``wall_reactor``: its reactor's timers
    follow a steppable wall clock and the monotonic ``clock`` is passed apart."""
    other = "b" if me == "a" else "a"
    cluster = cluster_section(me, other, auto_pd, beats)
    vip = VIPSection("vip1", ipaddress.ip_interface("10.0.0.100/24"), "eth0",
                     {"a": 200, "b": 100}, preempt)
    kw = {}
    if wall_reactor:
        import inspect
        reactor = WallReactor(clock, net, ADDR[me])
        if "clock" in inspect.signature(ClusterManager).parameters:
            kw = {"clock": clock, "wall": reactor.seconds}
    else:
        reactor = NodeReactor(clock, net, ADDR[me], overhead)
    m = ClusterManager(reactor, node_id=me, cluster=cluster, vips=[vip],
                       store=store if store is not None else MemStore(),
                       state_dir=f"/tmp/apl-test-{me}", key=KEY, **kw)
    m.roles = []
    m.add_resource(m.resources["vip1"].spec, listener=lambda r, role, e, m=m: m.roles.append((role, e)))
    return m


def make_pair(preempt=True, auto_pd=0.0, shared_store=None, *, loss=0.0, seed=1, beats=None,
              overhead=0.0, wall_reactor=False):
    clock = Clock()
    net = Net(clock, loss=loss, seed=seed)
    nodes = {me: make_node(clock, net, me, preempt=preempt, auto_pd=auto_pd, store=shared_store,
                           beats=beats, overhead=overhead, wall_reactor=wall_reactor)
             for me in ("a", "b")}
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
    # Suspected dead_after (300 ms) + half a beat period (3 beats per interval:
    # 17 ms) after the LAST beat heard, which came at most one beat period
    # before the cut (and up to one 10 ms step after it here).
    assert 0.27 <= took <= 0.335, took
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
    store = MemStore(backend="redis")
    clock, net, nodes = make_pair(shared_store=store)
    start(clock, nodes)
    run(clock, 1.0)
    assert store.data["cluster:epoch:vip1"] == "1"
    store.data["cluster:epoch:vip1"] = "50"        # another writer got ahead
    net.cut.add(ADDR["a"])
    run(clock, 1.0)
    # b tried epoch 2, lost the CAS, learned 50, and claims 51 on a later tick
    assert nodes["b"].resources["vip1"].mine.epoch == 51


def test_maintenance_hands_over_and_partner_down_refused_while_alive(tmp_path):
    """maintenance on moves resources to the peer; partner-down of a live peer is refused."""
    from appliance.cluster.transport import MaintenanceMark
    clock, net, nodes = make_pair()
    for m in nodes.values():     # (the mark in this test's own dir, not a shared /tmp one)
        m.maintenance_mark = MaintenanceMark(tmp_path / m.node_id)
    for m in nodes.values():
        m.register_partner("b" if m.node_id == "a" else "a", primary=m.node_id == "a")
    start(clock, nodes)
    run(clock, 1.0)
    assert nodes["a"].partners["b"].fsm.state == P.NORMAL
    nodes["a"].set_maintenance(True)
    run(clock, 0.1)
    assert owners(nodes) == ["b"]
    assert nodes["b"].partners["a"].fsm.state == P.PARTNER_DOWN
    from appliance.cluster.errors import ClusterError
    with pytest.raises(ClusterError) as refused:
        nodes["b"].partner_down("a")
    assert refused.value.code == -32023
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


def _owner_changes(m):
    return sum(1 for role, _ in m.roles if role == "owner")


@pytest.mark.parametrize("beats", [1, 3])
def test_dead_after_minus_one_intervals_lost_never_take_over(beats):
    """H6: with a tick that costs 0.5 ms, (dead_after - 1) intervals of lost beats (one
    short of the deadline) cause no takeover; dead_after intervals do."""
    per = beats if beats else 1
    for lost_intervals, expect_takeover in ((2, False), (3, True)):
        clock, net, nodes = make_pair(beats=beats, overhead=0.0005)
        start(clock, nodes)
        run(clock, 2.0, step=0.001)
        assert owners(nodes) == ["a"]
        k = nodes["a"].beats if hasattr(nodes["a"], "beats") else 1
        net.drop_next[(ADDR["a"], ADDR["b"])] = lost_intervals * k
        run(clock, 1.0, step=0.001)
        took_over = _owner_changes(nodes["b"]) > 0
        assert took_over == expect_takeover, (beats, per, lost_intervals)


def test_ten_percent_loss_no_spurious_takeover():
    """Loss tolerance: 10 % independent loss both ways for 10 simulated minutes at
    100 ms x dead_after 3 gives no takeover (one beat per interval gives dozens)."""
    clock, net, nodes = make_pair(loss=0.10, seed=7)
    start(clock, nodes)
    run(clock, 2.0, step=0.005)
    assert owners(nodes) == ["a"]
    run(clock, 600.0, step=0.05)
    assert _owner_changes(nodes["b"]) == 0
    assert owners(nodes) == ["a"]
    peer = nodes["b"].status()["peers"]["a"]
    assert 0.03 < peer["loss"] < 0.25, peer
    assert 0.08 < peer["lost"] / (peer["lost"] + peer["received"]) < 0.12, peer
    assert peer["lost"] > 1000


@pytest.mark.parametrize("delta", [-3600.0, 3600.0])
def test_wall_clock_step_causes_no_takeover_and_no_silence(delta):
    """H7: a wall-clock step of +-1 h on either node changes no liveness decision:
    the owner keeps beating, the standby suspects nobody."""
    clock, net, nodes = make_pair(wall_reactor=True)
    start(clock, nodes)
    run(clock, 1.0)
    assert owners(nodes) == ["a"]
    sent_before = nodes["a"].stats["sent"]
    nodes["a"].reactor.step(delta)
    nodes["b"].reactor.step(-delta)
    run(clock, 2.0)
    assert owners(nodes) == ["a"]
    assert _owner_changes(nodes["b"]) == 0
    assert nodes["a"].stats["sent"] - sent_before >= 19, "the owner kept beating"
    assert nodes["b"].peers["a"].alive and nodes["a"].peers["b"].alive


def _restart(clock, net, nodes, name, incarnation, monkeypatch, **kw):
    old = nodes[name]
    old.stopService()
    monkeypatch.setattr("appliance.cluster.manager.next_incarnation", lambda d: incarnation)
    m = make_node(clock, net, name, store=kw.pop("store", None), **kw)
    nodes[name] = m
    m.startService()
    return m


def test_restart_with_lower_incarnation_is_readmitted_and_replays_refused(monkeypatch):
    """H3: the owner restarts with a LOWER incarnation (state dir lost, clock behind):
    its peer re-admits it (the beats echo the peer's incarnation) and one owner
    remains; the old run's recorded beats replayed afterwards are refused."""
    monkeypatch.setattr("appliance.cluster.manager.next_incarnation",
                        lambda d, c=iter([1000, 2000]): next(c))
    clock, net, nodes = make_pair()
    start(clock, nodes)
    run(clock, 1.0)
    assert owners(nodes) == ["a"]
    recorded = [d for src, dst, d in net.tap if src == ADDR["a"]][-20:]
    _restart(clock, net, nodes, "a", 5, monkeypatch)
    run(clock, 2.0)
    assert nodes["b"].peers["a"].alive, nodes["b"].status()["drops"]
    assert owners(nodes) == ["a"]
    assert nodes["b"].peers["a"].heartbeat.incarnation == 5
    for data in recorded:
        nodes["b"].datagram(data, (ADDR["a"], 8741))
    run(clock, 0.5)
    assert nodes["b"].peers["a"].heartbeat.incarnation == 5
    assert owners(nodes) == ["a"]


def test_recorded_beats_replayed_into_a_restarted_receiver_are_refused(monkeypatch):
    """M11: the owner dies; its recorded beats replayed to a restarted standby never
    make the standby believe it alive (they cannot echo the new incarnation)."""
    clock, net, nodes = make_pair()
    start(clock, nodes)
    run(clock, 1.0)
    recorded = [d for src, dst, d in net.tap if src == ADDR["a"]]
    nodes["a"].stopService()
    net.cut.add(ADDR["a"])
    b = _restart(clock, net, nodes, "b", 10**6, monkeypatch)
    for i, data in enumerate(recorded[-30:]):
        clock.callLater(0.03 * i, b.datagram, data, (ADDR["a"], 8741))
    believed = False
    for _ in range(150):
        clock.advance(0.01)
        believed = believed or b.peers["a"].alive
    assert not believed, "a replayed beat made the dead owner look alive"
    assert b.role("vip1") == "owner"


def test_persisted_partner_state_loaded_at_registration():
    """H4: with the real start order (cluster first, the service registers later)
    a node that was PARTNER-DOWN comes back PARTNER-DOWN while its peer is silent."""
    clock, net, nodes = make_pair()
    net.cut.add(ADDR["a"])
    b = nodes["b"]
    b.store.data["cluster:partner:b:a"] = P.PARTNER_DOWN
    b.startService()
    run(clock, 0.05)
    b.register_partner("a", primary=False)
    run(clock, 2.0)
    assert b.partners["a"].fsm.state == P.PARTNER_DOWN


def test_failed_vip_add_hands_over_and_is_retried():
    """M2: the owner cannot add its VIP: it flags unable:vip1, the peer takes over, the
    status names the error, and the add is retried with backoff (preempt takes it
    back once it works)."""
    clock, net, nodes = make_pair()
    vips = {n: FakeVIPs() for n in nodes}
    broken = {"on": True}
    real = vips["a"].acquire
    vips["a"].acquire = lambda name, reason="": (real(name, reason), defer.succeed(
        not broken["on"]))[1]
    for n, m in nodes.items():
        m.vip_manager = vips[n]
    start(clock, nodes)
    run(clock, 1.0)
    assert "unable:vip1" in nodes["b"].status()["peers"]["a"]["health"]
    tries = vips["a"].log.count(("acquire", "vip1"))
    samples = []
    for _ in range(1000):
        clock.advance(0.01)
        samples.append(tuple(owners(nodes)))
    assert ("a",) not in samples, "a VIP that could not be added is never reported owned"
    assert samples.count(("b",)) > 900, "the peer serves it (short gaps at a's retries)"
    assert vips["a"].log.count(("acquire", "vip1")) > tries, "retried"
    broken["on"] = False
    run(clock, 70.0)
    assert owners(nodes) == ["a"]
    assert nodes["a"].status()["resources"]["vip1"]["vip_error"] is None


def test_resource_known_to_one_node_only_is_owned_by_it():
    """M3: a resource registered on node a only is owned by a, although the default
    priorities would give the tie to b (which does not have it)."""
    clock, net, nodes = make_pair()
    heard = []
    start(clock, nodes)
    nodes["a"].register_resource("dns:www", lambda r, role, e: heard.append(role))
    run(clock, 1.5)
    assert nodes["a"].role("dns:www") == "owner"
    assert heard == ["owner"]


def test_mismatched_priorities_elect_one_owner_and_warn():
    """M1: each node's config gives the VIP to the other (a: {a 100, b 200}, b: {a 200,
    b 100}): the old code left it ownerless for good; the peers detect the difference,
    elect by a config-independent rule (one owner) and warn."""
    from appliance.cluster.ownership import ResourceSpec as Spec
    clock, net, nodes = make_pair()
    maps = {"a": {"a": 100, "b": 200}, "b": {"a": 200, "b": 100}}
    for n, m in nodes.items():
        res = m.resources["vip1"]
        res.spec = Spec("vip1", maps[n], True, kind="vip")
        res.settings = dict(res.settings, priority=maps[n])
    start(clock, nodes)
    run(clock, 3.0)
    assert len(owners(nodes)) == 1, owners(nodes)
    first = owners(nodes)
    run(clock, 3.0)
    assert owners(nodes) == first, "stable"
    warnings = nodes["a"].status()["warnings"]
    assert any("vip1" in w and "priority" in w and "b" in w for w in warnings), warnings


def test_a_stall_of_the_whole_host_is_no_silence():
    """Both nodes on one host that is not scheduled for 450 ms (a VM pause, a starved
    box): on waking, each finds the other silent past the deadline, but it was not
    running either -- no suspicion, no takeover.  (The namespace loss test on the busy
    test machine: 'peer b suspected dead: no heartbeat for 317 ms' on a and 374 ms on
    b at the same instant.)  A real death after the stall is still detected."""
    clock, net, nodes = make_pair()
    start(clock, nodes)
    run(clock, 1.0)
    assert owners(nodes) == ["a"]
    before = {n: m.peers["b" if n == "a" else "a"].suspected for n, m in nodes.items()}
    clock.advance(0.002)                     # the beats in flight arrive
    clock.advance(0.45)                      # nothing ran for 450 ms, then everything due
    run(clock, 1.0)
    after = {n: m.peers["b" if n == "a" else "a"].suspected for n, m in nodes.items()}
    assert after == before
    assert owners(nodes) == ["a"] and nodes["b"].roles == []
    assert nodes["b"].status()["heartbeat"]["stall_deferred"] >= 1
    # the owner dies right after another stall: taken over within the deadline of
    # b's own running time after a's last beat (and the stall)
    clock.advance(0.002)
    clock.advance(0.45)
    net.cut.add(ADDR["a"])
    t0 = clock.seconds()
    while nodes["b"].role("vip1") != "owner":
        clock.advance(0.01)
        assert clock.seconds() - t0 < 1.0


def test_a_node_late_on_every_tick_still_suspects_a_dead_peer():
    """Starved, not paused: every tick of both nodes runs 25 ms late (over half a
    beat period, so each counts as a stall).  A dead owner is still replaced within
    deadline + the stall + one interval (the deferral is bounded)."""
    clock, net, nodes = make_pair(overhead=0.025)
    start(clock, nodes)
    run(clock, 1.5)
    assert owners(nodes) == ["a"]
    net.cut.add(ADDR["a"])
    t0 = clock.seconds()
    while nodes["b"].role("vip1") != "owner":
        clock.advance(0.005)
        assert clock.seconds() - t0 < 0.317 + 0.025 + 0.1 + 0.08, "deferred too long"
