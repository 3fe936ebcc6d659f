"""DN and EN logic together on a Clock: assignment, data path, failover with soft
handoff, takeover routes, duplicates, replays/forgeries, moving back home."""

import ipaddress

from twisted.internet import defer
from twisted.internet.task import Clock

from services.encap import wire as W
from services.encap.config import DNNode, EncapConfig
from services.encap.dn import DecapNode
from services.encap.en import DNEntry, ENClient, ENConfig

PSK = bytes(range(32))


class StubMapping:
    """The mapping.py contract, in memory (shared by both DNs: a shared store)."""

    def __init__(self):
        self.table, self.watchers = {}, []

    def claim(self, target, dn, reason):
        cur = self.table.get(target)
        epoch = (cur["epoch"] if cur else 0) + 1
        self.table[target] = {"dn": dn, "epoch": epoch, "since": 0, "reason": reason}
        for w in self.watchers:
            w(target, dict(self.table[target]))
        return defer.succeed(dict(self.table[target]))

    def release(self, target, dn):
        cur = self.table.get(target)
        if cur is None or cur["dn"] != dn:
            return defer.succeed(False)
        del self.table[target]
        for w in self.watchers:
            w(target, None)
        return defer.succeed(True)

    def lookup(self, target):
        e = self.table.get(target)
        return dict(e) if e else None

    def entries(self):
        return {k: dict(v) for k, v in self.table.items()}

    def watch(self, listener):
        self.watchers.append(listener)


class StubRoutes:
    def __init__(self):
        self.routes, self.log = {}, []

    def inject(self, prefix, dev=None, via=None):
        self.routes[prefix] = dev
        self.log.append(("inject", prefix))
        return defer.succeed(0.001)

    def withdraw(self, prefix):
        self.routes.pop(prefix, None)
        self.log.append(("withdraw", prefix))
        return defer.succeed(None)


def ip_packet(src, dst, payload=b"x" * 20):
    total = 20 + len(payload)
    return (bytes([0x45, 0, total >> 8, total & 255, 0, 0, 0, 0, 64, 17, 0, 0])
            + ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed + payload)


class Net:
    """EN <-> DNs; datagrams queued and delivered by pump(); links can be cut."""

    def __init__(self):
        self.clock = Clock()
        self.mapping = StubMapping()
        self.cfg = EncapConfig("0.0.0.0", 7400, "psk", "encap0", 1400,
                               (DNNode("dn1", ipaddress.ip_network("10.200.0.0/24"), ("dn2",)),
                                DNNode("dn2", ipaddress.ip_network("10.200.1.0/24"), ("dn1",))),
                               26)
        self.queue, self.cut = [], set()
        self.tun = {"dn1": [], "dn2": [], "en": []}
        self.routes = {"dn1": StubRoutes(), "dn2": StubRoutes()}
        self.dns = {d: self.make_dn(d) for d in ("dn1", "dn2")}
        self.en = ENClient(self.clock, ENConfig("en1", "psk", (DNEntry("dn1", "10.99.0.1"),
                                                             DNEntry("dn2", "10.99.0.2")),
                                                keepalive_ms=50, dead_after=4),
                           PSK, send=lambda dn, data: self.queue.append(("en", dn, data)),
                           tun_write=lambda ps: self.tun["en"].extend(ps) or len(ps))

    def make_dn(self, name, store=None):
        dn = DecapNode(self.clock, self.cfg, name, PSK,
                       send=lambda data, addr, name=name: self.queue.append((name, "en", data)),
                       tun_write=lambda ps, name=name: self.tun[name].extend(ps) or len(ps),
                       mapping=self.mapping, routes=self.routes[name], store=store)
        self.mapping.watch(dn.mapping_changed)
        return dn

    def pump(self, rounds=20):
        for _ in range(rounds):
            self.clock.advance(0)
            if not self.queue:
                return
            batch, self.queue = self.queue, []
            for src, dst, data in batch:
                dn = src if src != "en" else dst
                if dn in self.cut:
                    continue
                if dst == "en":
                    self.en.datagram(src, data)
                else:
                    self.dns[dst].datagram(data, ("10.99.0.100", 40000))

    def run(self, seconds, step=0.01):
        for _ in range(int(seconds / step)):
            self.clock.advance(step)
            self.pump()

def lose_first(dn, matches):
    """The first control message ``dn`` gets for which ``matches(msg)`` holds never
    arrives (a lossy underlay); returns the list it lands in."""
    swallowed = []
    real = dn._control

    def lossy(s, msg):
        if not swallowed and matches(msg):
            swallowed.append(msg)
            return
        real(s, msg)
    dn._control = lossy
    return swallowed


def started():
    net = Net()
    net.en.start()
    net.pump()
    net.run(0.2)
    return net


def test_first_dn_to_answer_assigns_from_the_slice_of_the_secondary():
    """dn1 answers first: primary, address from dn1's slice backed by dn2; dn2 is secondary."""
    net = started()
    assert net.en.primary == "dn1" and net.en.home == "dn1"
    assert ipaddress.ip_address(net.en.address) in ipaddress.ip_network("10.200.0.0/26")
    s2 = net.dns["dn2"].sessions[net.dns["dn2"].by_en["en1"]]
    assert s2.role == "secondary" and s2.address == net.en.address and s2.primary == "dn1"


def test_data_both_ways_and_spoofed_source_dropped():
    """EN -> dn1 -> TUN, TUN -> dn1 -> EN; a packet not from the EN's address is dropped."""
    net = started()
    a = net.en.address
    net.en.tun_packets([ip_packet(a, "10.210.0.10")])
    net.pump()
    assert net.tun["dn1"] == [ip_packet(a, "10.210.0.10")]
    net.dns["dn1"].tun_packets([ip_packet("10.210.0.10", a)])
    net.pump()
    assert net.tun["en"] == [ip_packet("10.210.0.10", a)]
    # a forged inner source, sealed correctly by the EN's session
    link = net.en.links["dn1"]
    spoofed = ip_packet("10.200.0.99", "1.2.3.4")
    net.queue.append(("en", "dn1", link.keys.seal(W.data_plain(10 ** 18, spoofed))))
    net.pump()
    assert net.dns["dn1"].drops.get("spoofed_source") == 1


def test_failover_on_silence_soft_handoff_and_takeover_route():
    """dn1 goes silent: the EN promotes dn2, sends on both meanwhile; dn2 claims the
    address, injects a /32 to its TUN and confirms; traffic then flows via dn2."""
    net = started()
    a = net.en.address
    net.cut.add("dn1")
    net.en.tun_packets([ip_packet(a, "10.210.0.10")])
    net.run(0.3)
    assert net.en.primary == "dn2"
    assert net.en.confirmed and net.en.handoff_from is None
    assert net.mapping.lookup(a)["dn"] == "dn2"
    assert net.routes["dn2"].routes == {a + "/32": "encap0"}
    assert net.dns["dn2"].stats["handoffs"] == 1
    net.en.tun_packets([ip_packet(a, "10.210.0.10", b"after" * 4)])
    net.pump()
    assert net.tun["dn2"][-1] == ip_packet(a, "10.210.0.10", b"after" * 4)
    net.dns["dn2"].tun_packets([ip_packet("10.210.0.10", a)])
    net.pump()
    assert net.tun["en"][-1] == ip_packet("10.210.0.10", a)


def test_soft_handoff_sends_on_both_and_dn_drops_duplicate_flows():
    """During the switch each packet goes to old and new DN with one flow number;
    a DN that gets the same flow twice forwards it once."""
    net = started()
    a = net.en.address
    net.en.failover("test")                   # dn1 still alive: handoff in progress
    net.en.tun_packets([ip_packet(a, "10.210.0.10")])
    assert net.en.stats["dual_sent"] == 1
    # same flow replayed into dn2 on the same session: it is a duplicate there
    flow = net.en.flow
    dup = net.en.links["dn2"].keys.seal(W.data_plain(flow, ip_packet(a, "10.210.0.10")))
    net.pump()
    net.queue.append(("en", "dn2", dup))
    net.pump()
    assert net.tun["dn2"].count(ip_packet(a, "10.210.0.10")) == 1
    assert net.dns["dn2"].drops.get("duplicate") == 1


def test_replayed_and_forged_records_dropped_and_counted():
    """A captured record sent again is a replay; a flipped byte is a forgery; both counted."""
    net = started()
    a = net.en.address
    captured = []
    real_send = net.en.send
    net.en.send = lambda dn, data: (captured.append(data), real_send(dn, data))
    net.en.tun_packets([ip_packet(a, "10.210.0.10")])
    net.pump()
    net.dns["dn1"].datagram(captured[-1], ("10.99.0.100", 40000))
    forged = bytearray(captured[-1])
    forged[12] ^= 0x40                 # a fresh sequence number: passes the window, fails the tag
    forged[20] ^= 0xFF
    net.dns["dn1"].datagram(bytes(forged), ("10.99.0.100", 40000))
    assert net.dns["dn1"].drops.get("replay") == 1
    assert net.dns["dn1"].drops.get("forged") == 1
    assert len(net.tun["dn1"]) == 1


def test_primary_down_notice_from_secondary_switches_at_once():
    """A secondary's primary_down (cluster declared the primary dead) moves the EN now."""
    net = started()
    dn2 = net.dns["dn2"]
    dn2.slice_role("dn1", ipaddress.ip_network("10.200.0.0/26"), "owner")
    net.pump()
    assert net.en.primary == "dn2"
    assert "10.200.0.0/26" in net.routes["dn2"].routes
    assert net.mapping.lookup("10.200.0.0/26")["dn"] == "dn2"
    dn2.slice_role("dn1", ipaddress.ip_network("10.200.0.0/26"), "standby")
    assert "10.200.0.0/26" in net.routes["dn2"].routes       # make-before-break: 1 s
    net.clock.advance(1.0)
    assert "10.200.0.0/26" not in net.routes["dn2"].routes


def test_home_dn_returns_and_the_en_moves_back():
    """dn1 restarts (leases from the store): the EN moves home, dn2 withdraws its route."""
    class Store:
        def __init__(self):
            self.h = {}

        def hset(self, key, mapping):
            self.h.setdefault(key, {}).update(mapping)
            return defer.succeed(None)

        def hgetall(self, key):
            return defer.succeed(dict(self.h.get(key, {})))
    store = Store()
    net = Net()
    net.dns["dn1"] = net.make_dn("dn1", store)
    net.en.start()
    net.pump()
    net.run(0.2)
    a = net.en.address
    net.cut.add("dn1")
    net.run(0.4)
    assert net.en.primary == "dn2" and net.routes["dn2"].routes
    # dn1 comes back as a fresh process
    net.dns["dn1"] = net.make_dn("dn1", store)
    net.dns["dn1"].load_leases()
    net.cut.discard("dn1")
    net.run(0.6)
    assert net.en.primary == "dn1" and net.en.address == a and net.en.confirmed
    net.run(1.0)                  # dn2 keeps its route ROUTE_HANDBACK_GRACE_S (1 s)
    assert net.routes["dn2"].routes == {}
    assert net.mapping.lookup(a) is None          # the table shrank again: dn1's slice covers it
    assert ("withdraw", a + "/32") in net.routes["dn2"].log
    net.en.tun_packets([ip_packet(a, "10.210.0.10", b"home" * 5)])
    net.pump()
    assert net.tun["dn1"][-1] == ip_packet(a, "10.210.0.10", b"home" * 5)


def test_addresses_held_by_other_dns_are_never_handed_out():
    """The allocator skips host targets another DN holds in the mapping table."""
    net = Net()
    net.mapping.table["10.200.0.2"] = {"dn": "dn2", "epoch": 1, "since": 0, "reason": "x"}
    assert net.dns["dn1"].allocate("enX", "dn2") == "10.200.0.3"


def test_a_lost_claim_is_not_retried_on_every_packet():
    """Another DN wins the address in the table: data packets do not hammer the table."""
    net = started()
    a = net.en.address
    claims = []
    real = net.mapping.claim

    def rival_wins(target, dn, reason):
        claims.append(target)
        net.mapping.table[target] = {"dn": "dn3", "epoch": 99, "since": 0, "reason": "x"}
        return real(target, "dn3", "rival")
    net.mapping.claim = rival_wins
    link = net.en.links["dn2"]
    for i in range(50):
        net.queue.append(("en", "dn2", link.keys.seal(W.data_plain(10 ** 17 + i,
                                                                    ip_packet(a, "10.210.0.10")))))
    net.pump()
    assert claims == [a]
    assert net.dns["dn2"].stats["claims_lost"] == 1 and net.routes["dn2"].routes == {}


def test_metrics_and_rpc_views():
    """Prometheus families per EN and per drop reason; encap.stats/sessions shapes."""
    from types import SimpleNamespace

    from services.encap.service import EncapService
    net = started()
    a = net.en.address
    net.en.tun_packets([ip_packet(a, "10.210.0.10")])
    net.pump()
    net.dns["dn1"].datagram(b"\x04" + bytes(40), ("1.2.3.4", 5))
    svc = EncapService(net.cfg, SimpleNamespace(reactor=net.clock, rpc=None, metrics=None,
                                                cluster=None, store=None, node_id="dn1"))
    svc.dn = net.dns["dn1"]
    fams = {f.name: f for f in svc.collect()}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in fams.values() for s in f.samples}
    assert samples[("appliance_encap_packets_total", (("direction", "in"), ("en", "en1")))] == 1
    assert samples[("appliance_encap_dropped_total", (("reason", "unknown_session"),))] == 1
    assert svc.rpc_sessions()["sessions"][0]["address"] == a
    stats = svc.rpc_stats()
    assert stats["drops"]["unknown_session"] == 1 and "route_injection_ms" in stats
    assert "(no TUN" not in svc.role


def test_an_active_en_detects_a_dead_primary_sooner_than_an_idle_one():
    """Data flowing: the primary is probed every 20 ms and dead after 4 of them (~80 ms);
    idle: every 50 ms, dead after 200 ms."""
    def switch_after(active):
        net = started()
        a = net.en.address
        if active:
            for _ in range(30):               # 300 ms of traffic
                net.en.tun_packets([ip_packet(a, "10.210.0.10")])
                net.run(0.01)
        net.cut.add("dn1")
        t0 = net.clock.seconds()
        while net.en.primary == "dn1" and net.clock.seconds() - t0 < 2:
            if active:
                net.en.tun_packets([ip_packet(a, "10.210.0.10")])
            net.run(0.01)
        return net.clock.seconds() - t0
    fast, slow = switch_after(True), switch_after(False)
    assert fast <= 0.12 and 0.15 <= slow <= 0.3, (fast, slow)


from hypothesis import given, settings, strategies as st  # noqa: E402


@given(st.lists(st.binary(max_size=200), max_size=20))
@settings(max_examples=150, deadline=None)
def test_dn_and_en_never_crash_on_random_datagrams(datagrams):
    """Random datagrams into a DN and an EN with live sessions: dropped and counted (or a
    HELLO answered), never an exception; the EN's session keeps working."""
    net = started()
    dn = net.dns["dn1"]
    before = sum(dn.drops.values()) + dn.stats["tx_datagrams"]
    for d in datagrams:
        dn.datagram(d, ("10.99.0.66", 1234))
        net.en.datagram("dn1", d)
    assert sum(dn.drops.values()) + dn.stats["tx_datagrams"] >= before + sum(1 for d in datagrams)
    a = net.en.address
    net.en.tun_packets([ip_packet(a, "10.210.0.10")])
    net.pump()
    assert net.tun["dn1"][-1] == ip_packet(a, "10.210.0.10")


@given(st.one_of(st.binary(max_size=300),
                 st.dictionaries(st.text(max_size=8), st.one_of(st.none(), st.integers(),
                                                                st.text(max_size=20),
                                                                st.lists(st.text(max_size=5))),
                                 max_size=6)))
@settings(max_examples=150, deadline=None)
def test_sealed_garbage_inside_a_session_is_a_counted_drop(body):
    """Authenticated but nonsensical records (bad kinds, bad control JSON, wrong fields)."""
    import json
    net = started()
    dn = net.dns["dn1"]
    keys = net.en.links["dn1"].keys
    if isinstance(body, dict):
        body = dict(body, t=body.get("t", "info"))
        plain = bytes([W.K_CONTROL]) + json.dumps(body).encode()
    else:
        plain = body or b"\x07"
    dn.datagram(keys.seal(plain), ("10.99.0.100", 40000))
    net.pump()
    a = net.en.address
    net.en.tun_packets([ip_packet(a, "10.210.0.10")])
    net.pump()


def test_a_returning_dn_waits_before_winning_back_a_slice_another_dn_holds():
    """dn2 holds dn1's slice (it took it over): dn1 claims it back only after
    HOME_CLAIM_DELAY_S (its ENs reconnect meanwhile); free slices at once."""
    from types import SimpleNamespace

    from services.encap.service import EncapService
    net = Net()
    net.mapping.table["10.200.0.0/26"] = {"dn": "dn2", "epoch": 3, "since": 0, "reason": "x"}
    svc = EncapService(net.cfg, SimpleNamespace(reactor=net.clock, rpc=None, metrics=None,
                                                cluster=None, store=None, node_id="dn1"))
    svc.dn, svc.mapping = net.dns["dn1"], net.mapping
    d = defer.ensureDeferred(svc._claim_home(net.cfg.nodes[0]))
    net.clock.advance(0.5)
    assert net.mapping.lookup("10.200.0.0/26")["dn"] == "dn2"
    net.clock.advance(0.6)
    assert net.mapping.lookup("10.200.0.0/26")["dn"] == "dn1"
    assert net.mapping.lookup("10.200.0.64/26")["dn"] == "dn1"
    assert d.called


def test_a_new_session_of_the_same_en_keeps_its_address_and_data_flows_at_once():
    """The EN re-handshakes (restart of its link, rekey): the DN's new session carries
    the EN's address, so data right after the CONFIRM is not a spoofed source."""
    net = started()
    a = net.en.address
    dn = net.dns["dn1"]
    link = net.en.links["dn1"]
    link.state = "down"
    net.en._hello(link)
    # deliver the HELLO/CHALLENGE/CONFIRM, but hold anything sealed after it
    for _ in range(3):
        batch, net.queue = net.queue, []
        for src, dst, data in batch:
            if data[:1] == b"\x04":
                continue
            if dst == "en":
                net.en.datagram(src, data)
            else:
                dn.datagram(data, ("10.99.0.100", 40000))
    assert len([s for s in dn.sessions.values() if s.en == "en1"]) == 1
    dn.datagram(net.en.links["dn1"].keys.seal(W.data_plain(10 ** 18, ip_packet(a, "10.210.0.9"))),
                ("10.99.0.100", 40000))
    net.clock.advance(0)
    assert net.tun["dn1"][-1] == ip_packet(a, "10.210.0.9") and "spoofed_source" not in dn.drops


def test_first_data_packet_at_a_secondary_makes_it_claim_and_route():
    """No promote: the EN's first data record at its secondary is enough to move it."""
    net = started()
    a = net.en.address
    keys = net.en.links["dn2"].keys
    net.dns["dn2"].datagram(keys.seal(W.data_plain(10 ** 18, ip_packet(a, "10.210.0.10"))),
                            ("10.99.0.100", 40000))
    net.clock.advance(0)
    assert net.tun["dn2"] == [ip_packet(a, "10.210.0.10")]       # forwarded at once
    assert net.mapping.lookup(a)["dn"] == "dn2" and net.mapping.lookup(a)["reason"] == "first_data"
    assert net.routes["dn2"].routes == {a + "/32": "encap0"}


def test_moving_home_without_soft_handoff_demotes_the_dn_that_took_over():
    """Each DN with its own table (embedded stores, no peer link: nothing tells dn2 that
    dn1 is back) and soft handoff off: once home confirms, the EN still tells dn2
    ``demote``, so dn2 withdraws its /32 (a routing daemon carrying it to the ESR would
    otherwise keep the EN's traffic on dn2 for good)."""
    net = Net()
    net.en = ENClient(net.clock, ENConfig("en1", "psk", (DNEntry("dn1", "10.99.0.1"),
                                                         DNEntry("dn2", "10.99.0.2")),
                                          keepalive_ms=50, dead_after=4, soft_handoff=False),
                      PSK, send=lambda dn, data: net.queue.append(("en", dn, data)),
                      tun_write=lambda ps: net.tun["en"].extend(ps) or len(ps))
    for name in ("dn1", "dn2"):
        net.mapping = StubMapping()                 # a table of its own
        net.dns[name] = net.make_dn(name)
    net.en.start()
    net.pump()
    net.run(0.2)
    a = net.en.address
    net.cut.add("dn1")
    net.run(0.4)
    assert net.en.primary == "dn2" and (a + "/32") in net.routes["dn2"].routes
    net.cut.discard("dn1")
    net.run(1.0)
    assert net.en.primary == "dn1" and net.en.confirmed
    net.run(1.0)                  # dn2 keeps its route ROUTE_HANDBACK_GRACE_S (1 s)
    assert (a + "/32") not in net.routes["dn2"].routes
    assert ("withdraw", a + "/32") in net.routes["dn2"].log


def test_a_lost_demote_is_sent_again_until_the_dn_that_took_over_answers():
    """Each DN with its own table (the BIRD setup: nothing but the EN's ``demote``
    tells dn2 that dn1 is back) on a lossy underlay: the first demote to dn2 is lost;
    the EN sends it again until dn2 answers ``secondary``/``demoted``, so dn2 still
    withdraws its /32 (the bench's BIRD loss10 row: the ESR kept routing the EN via
    dn2 for good)."""
    net = Net()
    for name in ("dn1", "dn2"):
        net.mapping = StubMapping()                 # a table of its own
        net.dns[name] = net.make_dn(name)
    # the first demote never arrives
    swallowed = lose_first(net.dns["dn2"], lambda m: m.get("t") == "demote")
    net.en.start()
    net.pump()
    net.run(0.2)
    a = net.en.address
    net.cut.add("dn1")
    net.run(0.4)
    assert net.en.primary == "dn2" and (a + "/32") in net.routes["dn2"].routes
    net.cut.discard("dn1")
    net.run(1.0)
    assert net.en.primary == "dn1" and net.en.confirmed and swallowed
    net.run(1.5)                  # dn2 keeps its route ROUTE_HANDBACK_GRACE_S (1 s)
    assert (a + "/32") not in net.routes["dn2"].routes
    assert net.en.stats["demote_retries"] >= 1 and not net.en.demote_pending
    net.run(1.0)                  # acknowledged: not sent again
    assert net.en.stats["demote_retries"] == 1


def test_a_stall_of_the_en_itself_does_not_end_the_session_of_its_only_dn():
    """dn1 is dead and the EN is on dn2 alone; then the EN's own process is not
    scheduled for 300 ms (a busy host: the e2e test's move home lost 5 echoes when the
    revived DN's twistd start took the CPU) while dn2's answer waits unread in its
    socket.  The late tick must not declare dn2 dead on its silence before the
    reactor has read it (it did: keepalive_timeout, failover_no_dn, packets dropped
    for want of a primary until a new handshake)."""
    net = started()
    net.cut.add("dn1")
    net.run(1.0)
    assert net.en.primary == "dn2" and net.en.confirmed
    net.run(0.2)
    # the EN sends a keepalive; dn2 answers into the queue, which the EN will not read
    # before its next (late) tick
    net.en._probe(net.en.links["dn2"], net.clock.seconds(), False)
    batch, net.queue = net.queue, []
    for src, dst, data in batch:
        if src == "en" and dst == "dn2":
            net.dns["dn2"].datagram(data, ("10.99.0.100", 40000))
    assert any(dst == "en" for _, dst, _ in net.queue)
    net.clock.advance(0.3)                 # the stall: one late tick
    net.pump()                             # then the reactor reads the socket
    net.run(0.1)
    downs = [e for e in net.en.events if e["what"] in ("dn_down", "failover_no_dn")
             and e.get("dn", e.get("old")) == "dn2"]
    assert not downs and net.en.primary == "dn2"
    assert net.en.stats["late_ticks"] >= 1
    # a DN that really went silent is still declared dead (one tick later)
    net.cut.add("dn2")
    net.run(1.0)
    assert any(e["what"] == "dn_down" and e["dn"] == "dn2" for e in net.en.events)


def test_a_lost_request_to_the_home_dn_is_sent_again_until_the_en_is_home():
    """The home DN is back (its session up again) but the EN's info(primary) -- or the
    DN's assign -- is lost on a lossy underlay: the EN asks again until it is home (it
    stayed on dn2 for good: the bench's loss5/loss10 rows stopped, 'the EN back home
    not reached in 30 s', the EN's last event dn_up dn1 and no switch)."""
    net = started()
    # the first ask after the return never arrives
    swallowed = lose_first(net.dns["dn1"], lambda m: m.get("t") == "info"
                           and m.get("role") == "primary" and net.en.primary == "dn2")
    net.cut.add("dn1")
    net.run(0.5)
    assert net.en.primary == "dn2"
    net.cut.discard("dn1")
    net.run(1.5)
    assert swallowed, "the EN never asked its home DN"
    assert net.en.primary == "dn1" and net.en.confirmed
    assert net.en.stats["home_retries"] >= 1
    retries = net.en.stats["home_retries"]
    net.run(1.0)                          # home: no more asking
    assert net.en.stats["home_retries"] == retries


def test_a_lost_promote_is_sent_again_until_the_switch_is_confirmed():
    """On a lossy underlay the EN's promote (or the DN's promoted) can be lost: the EN
    keeps asking until it hears promoted, so the switch is confirmed (and the DN it
    left is demoted) without any data packet to trigger it."""
    net = started()
    # the first promote never arrives
    swallowed = lose_first(net.dns["dn2"], lambda m: m.get("t") == "promote")
    net.cut.add("dn1")
    net.run(1.0)
    assert swallowed and net.en.primary == "dn2"
    assert net.en.confirmed and net.en.stats["promote_retries"] >= 1
    assert net.mapping.lookup(net.en.address)["dn"] == "dn2"


def test_a_missed_probe_answer_starts_a_burst_and_a_dead_primary_is_noticed_sooner():
    """While data flows, the primary's echo probes are awaited one RTO (srtt + 4 rttvar,
    at least half the 20 ms active interval); a missed answer sends the next probe at
    once, and dead_after (4) misses in a row make it dead: ~30-60 ms after the cut on
    a near DN instead of 80-100 ms of silence."""
    times = []
    for trial in range(5):
        net = started()
        a = net.en.address
        for _ in range(30):                       # 300 ms of traffic: active, RTT samples
            net.en.tun_packets([ip_packet(a, "10.210.0.10")])
            net.run(0.01, step=0.002)
        net.run(0.003 * trial, step=0.001)        # cut at different phases of the probes
        net.cut.add("dn1")
        t0 = net.clock.seconds()
        while net.en.primary == "dn1" and net.clock.seconds() - t0 < 1:
            net.en.tun_packets([ip_packet(a, "10.210.0.10")])
            net.run(0.002, step=0.001)
        times.append(net.clock.seconds() - t0)
        assert net.en.primary == "dn2"
        assert net.en.stats["probe_failures"] == 1
        assert net.en.events[-2]["reason"] == "probe_timeout"
    assert max(times) <= 0.065, times


def test_probe_answers_that_are_late_by_less_than_the_rto_are_no_failure():
    """A DN 15 ms away (every datagram held 15 ms, longer than the 10 ms floor): the RTO
    follows the round trip, so the burst never declares it dead; one lost answer is no
    failure either."""
    net = Net()
    delayed = []
    real_pump = net.pump

    def pump(rounds=20):
        # hold every datagram from the EN 15 ms (the answers follow at once)
        now = net.clock.seconds()
        delayed.extend((now + 0.015, item) for item in net.queue)
        net.queue[:] = []
        due = [item for t, item in delayed if t <= now + 1e-9]
        delayed[:] = [(t, item) for t, item in delayed if t > now + 1e-9]
        net.queue.extend(due)
        real_pump(rounds)
        if net.queue:
            delayed.extend((now + 0.015, item) for item in net.queue)
            net.queue[:] = []
    net.pump = pump
    net.en.start()
    net.run(0.5, step=0.001)
    a = net.en.address
    assert a is not None and net.en.primary == "dn1"
    swallowed = []
    real_send = net.dns["dn1"].send

    def lose_one_answer(data, addr):
        if len(swallowed) == 0 and net.clock.seconds() > 1.0 and len(data) < 60:
            swallowed.append(data)                # one keepalive answer lost
            return
        real_send(data, addr)
    net.dns["dn1"].send = lose_one_answer
    for _ in range(150):                          # 1.5 s of traffic (active)
        net.en.tun_packets([ip_packet(a, "10.210.0.10")])
        net.run(0.01, step=0.001)
    assert swallowed
    assert net.en.primary == "dn1" and net.en.stats["failovers"] == 0, net.en.events
    assert net.en.links["dn1"].srtt >= 0.014


def test_moving_home_the_dn_left_keeps_its_route_and_forwards_until_the_grace_ends():
    """Make-before-break on the way back: when the EN moves home (soft handoff), dn2
    keeps its /32 for ROUTE_HANDBACK_GRACE_S after the table shows dn1 again and the EN
    demoted it, and still forwards the EN's downlink that reaches it meanwhile (an ESR
    that has not switched yet); taken over again within the grace, it keeps the route."""
    from services.encap import dn as D
    ROUTE_HANDBACK_GRACE_S = getattr(D, "ROUTE_HANDBACK_GRACE_S", 1.0)
    net = started()
    a = net.en.address
    net.cut.add("dn1")
    net.run(0.4)
    assert net.en.primary == "dn2" and (a + "/32") in net.routes["dn2"].routes
    net.cut.discard("dn1")
    net.run(0.5)
    assert net.en.primary == "dn1" and net.en.confirmed
    assert net.mapping.lookup(a) is None            # dn1 holds it (its slice)
    # the ESR has not switched yet: a reply reaches dn2, which still routes it to the EN
    assert (a + "/32") in net.routes["dn2"].routes
    before = len(net.tun["en"])
    net.dns["dn2"].tun_packets([ip_packet("10.210.0.10", a, b"late" * 5)])
    net.pump()
    assert net.tun["en"][before:] == [ip_packet("10.210.0.10", a, b"late" * 5)]
    net.run(ROUTE_HANDBACK_GRACE_S)
    assert (a + "/32") not in net.routes["dn2"].routes
    assert net.routes["dn2"].log.count(("withdraw", a + "/32")) == 1
    # taken over again within the grace: the route stays
    net.cut.add("dn1")
    net.run(0.4)
    assert net.en.primary == "dn2" and (a + "/32") in net.routes["dn2"].routes
    net.cut.discard("dn1")
    net.run(0.5)
    assert net.en.primary == "dn1"
    net.cut.add("dn1")
    net.run(0.4)
    assert net.en.primary == "dn2"
    net.run(ROUTE_HANDBACK_GRACE_S + 0.5)
    assert (a + "/32") in net.routes["dn2"].routes
    net.dns["dn2"].stop()


def test_a_dn_declared_dead_that_is_alive_still_delivers_until_a_new_session():
    """The EN declares its primary dead (a stall, lost probes) but dn1 is alive and the
    ESR still routes the EN's replies to it: what dn1 forwards on its old session is
    delivered (late_rx), until the EN has a new session with dn1."""
    net = started()
    a = net.en.address
    net.en._link_dead(net.en.links["dn1"], "keepalive_timeout")
    net.pump()
    assert net.en.primary == "dn2"
    reply = ip_packet("10.210.0.10", a, b"late" * 5)
    net.dns["dn1"].tun_packets([reply])
    net.pump()
    assert net.tun["en"][-1] == reply and net.en.stats["late_rx"] == 1
    net.run(0.5)                                  # dn1 answers a new handshake
    assert net.en.links["dn1"].state == "up" and net.en.links["dn1"].rx_keys is None


def test_the_only_dn_left_is_not_declared_dead_by_the_fast_rules():
    """dn1 is dead and the EN is at dn2, which stalls 150 ms right after taking it over
    (a busy host): with no other DN to switch to, the fast rules (probe burst, 80 ms
    of silence) do not drop dn2's session -- that would only add a handshake to the
    outage; the idle threshold (200 ms) still would."""
    net = started()
    a = net.en.address
    net.cut.add("dn1")
    for _ in range(40):
        net.en.tun_packets([ip_packet(a, "10.210.0.10")])
        net.run(0.01, step=0.002)
    assert net.en.primary == "dn2" and net.en.confirmed
    net.cut.add("dn2")                   # dn2 stalls ...
    for _ in range(15):
        net.en.tun_packets([ip_packet(a, "10.210.0.10")])
        net.run(0.01, step=0.002)
    net.cut.discard("dn2")               # ... and answers again after 150 ms
    net.run(0.05, step=0.002)
    assert net.en.links["dn2"].state == "up" and net.en.primary == "dn2"
    assert not [e for e in net.en.events if e["what"] == "dn_down" and e["dn"] == "dn2"]


def test_a_far_dn_with_data_both_ways_is_never_declared_dead_by_the_probe_burst():
    """60 ms each way (a WAN-like path) with data flowing both ways: the DN echoes the
    EN's probe stamp, so the round trip is measured right (not from the last data
    packet) and the probe RTO covers it; no switch while the DN is alive."""
    net = Net()
    hold, delayed = 0.06, []

    def pump(rounds=20):
        net.clock.advance(0)
        now = net.clock.seconds()
        delayed.extend((now + hold, item) for item in net.queue)
        net.queue[:] = []
        due = [item for t, item in delayed if t <= now + 1e-9]
        delayed[:] = [(t, item) for t, item in delayed if t > now + 1e-9]
        for src, dst, data in due:
            if (src if src != "en" else dst) in net.cut:
                continue
            if dst == "en":
                net.en.datagram(src, data)
            else:
                net.dns[dst].datagram(data, ("10.99.0.100", 40000))
        net.clock.advance(0)
    net.pump = pump
    net.en.start()
    net.run(1.0, step=0.002)
    a = net.en.address
    assert a is not None and net.en.primary == "dn1"
    for _ in range(200):                          # 2 s of traffic both ways
        net.en.tun_packets([ip_packet(a, "10.210.0.10")])
        net.dns["dn1"].tun_packets([ip_packet("10.210.0.10", a)])
        net.run(0.01, step=0.002)
    assert net.en.primary == "dn1" and net.en.stats["failovers"] == 0, net.en.events
    assert 0.11 <= net.en.links["dn1"].srtt <= 0.14, net.en.links["dn1"].srtt
    # and when it dies, the EN still switches
    net.cut.add("dn1")
    for _ in range(100):
        net.en.tun_packets([ip_packet(a, "10.210.0.10")])
        net.run(0.01, step=0.002)
    assert net.en.primary == "dn2"
