"""DNSService decisions with a fake DNS client and a Clock (no sockets, no real time)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import dns.message
import dns.name
import dns.opcode
import dns.rcode
from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.internet.task import Clock

from appliance.admin.rpc import MethodRegistry
from appliance.plugin import NodeContext
from services.dns.config import DNSConfig
from services.dns.message import TransportError
from services.dns.records import RecordSpec, parse_rdata
from services.dns.service import DNSService

EX = dns.name.from_text("example.test.")
OT = dns.name.from_text("other.test.")


class FakeClient:
    """Answers queries with empty NOERROR; UPDATEs as the test says (default NOERROR)."""

    def __init__(self):
        self.updates: list[dns.message.Message] = []
        self.fail_next = 0

    def exchange(self, request, zone, key, what="update"):
        if request.opcode() == dns.opcode.UPDATE:
            self.updates.append(request)
            if self.fail_next:
                self.fail_next -= 1
                return defer.fail(TransportError(f"update of zone {zone}: no server answered",
                                                 "timeout"))
        return defer.succeed((dns.message.make_response(request), "127.0.0.1:53"))

    def close(self):
        return None


class FakeCluster:
    single = False

    def __init__(self):
        self.listeners = {}

    @property
    def resources(self):
        return {}

    def register_resource(self, name, listener, **kw):
        self.listeners[name] = listener

    def status(self):
        return {"resources": {}}

    def role(self, name):
        return "standby"


def make(records, tmp_path=Path(".")):
    clock = Clock()
    config = DNSConfig(servers=(("127.0.0.1", 53),), key=None, key_file=None, zones=(EX, OT),
                       default_ttl=5, records=tuple(records), reconcile_interval_s=30,
                       timeout_s=0.5, retry_initial_s=0.1, retry_max_s=1.0)
    cluster = FakeCluster()
    context = NodeContext(reactor=clock, config=SimpleNamespace(node=SimpleNamespace(id="a")),
                          store=None, rpc=MethodRegistry(), metrics=CollectorRegistry(),
                          cluster=cluster, state_dir=tmp_path)
    client = FakeClient()
    service = DNSService(config, context, rng=lambda: 0.5, client=client)
    service.startService()
    clock.advance(0)      # the start-up reconcile
    return service, clock, cluster, client


def rec(name, rdtype, value, resource="vip1", zone=EX):
    return RecordSpec(dns.name.from_text(name), dns.rdatatype.from_text(rdtype), 5, resource,
                      {"a": parse_rdata(rdtype, value)}, zone)


def test_gaining_a_resource_sends_one_update_per_zone_at_once():
    """Three records of vip1 in two zones: gaining vip1 sends exactly two UPDATEs
    (one per zone) at the end of the reactor turn, and dns.records shows them in sync."""
    service, clock, cluster, client = make([rec("a.example.test.", "A", "10.0.0.1"),
                                            rec("b.example.test.", "AAAA", "fd00::1"),
                                            rec("c.other.test.", "A", "10.0.0.3", zone=OT)])
    assert service.role == "standby" and client.updates == []
    cluster.listeners["vip1"]("vip1", "owner", 4)
    clock.advance(0)          # the end-of-turn flush
    assert sorted(u.zone[0].name.to_text() for u in client.updates) == ["example.test.", "other.test."]
    ex = next(u for u in client.updates if u.zone[0].name == EX)
    assert {r.name.to_text() for r in ex.update if r.deleting is None} == {
        "a.example.test.", "b.example.test.", "_appliance-owner.a.example.test.",
        "_appliance-owner.b.example.test."}
    assert service.role == "owner"
    rows = service.records()["records"]
    assert all(r["in_sync"] for r in rows) and clock.getDelayedCalls()
    service.stopService()
    assert not [c for c in clock.getDelayedCalls() if c.active()]


def test_failed_update_is_retried_with_backoff_until_it_succeeds():
    """A failing server: retries after 0.1 s, 0.2 s, 0.4 s (backoff, jitter centred),
    then success clears the error; nothing blocks in between."""
    service, clock, cluster, client = make([rec("a.example.test.", "A", "10.0.0.1")])
    client.fail_next = 3
    cluster.listeners["vip1"]("vip1", "owner", 1)
    clock.advance(0)          # the end-of-turn flush
    assert len(client.updates) == 1 and "example.test." in service.errors
    for delay, sent in ((0.1, 2), (0.2, 3), (0.4, 4)):
        clock.advance(delay - 0.001)
        assert len(client.updates) == sent - 1
        clock.advance(0.001)
        assert len(client.updates) == sent
    assert service.errors == {} and service.records()["records"][0]["in_sync"]
    assert service.metrics.failures.labels("timeout")._value.get() == 3
    service.stopService()


def test_losing_the_resource_stops_retries_and_publishing():
    """After the node loses vip1, a pending retry sends nothing; regaining publishes again."""
    service, clock, cluster, client = make([rec("a.example.test.", "A", "10.0.0.1")])
    client.fail_next = 1
    cluster.listeners["vip1"]("vip1", "owner", 1)
    clock.advance(0)          # the end-of-turn flush
    cluster.listeners["vip1"]("vip1", "standby", 1)
    clock.advance(1)
    assert len(client.updates) == 1 and service.role == "standby"
    cluster.listeners["vip1"]("vip1", "owner", 3)
    clock.advance(0)          # the end-of-turn flush
    assert len(client.updates) == 2
    guard = [r for r in client.updates[-1].update if r.deleting is None
             and r.name.to_text().startswith("_appliance-owner")][0]
    assert b"".join(next(iter(guard)).strings).split()[2:] == [b"vip1", b"a", b"3"]
    service.stopService()


def test_rpc_methods_registered_and_removed():
    """dns.records and dns.sync exist while the service runs."""
    service, clock, cluster, client = make([rec("a.example.test.", "A", "10.0.0.1")])
    assert "dns.records" in service.context.rpc and "dns.sync" in service.context.rpc
    d = service.sync()
    clock.advance(0)
    assert d.result == {"changed": [], "errors": {}}
    service.stopService()
    assert "dns.records" not in service.context.rpc


def test_restart_on_the_same_registry_and_gauges():
    """Review H1: a second service on the node registry (what config.reload builds)
    starts without DuplicateTimeseries; the gauges are exported while it runs and
    disappear with it."""
    service, clock, cluster, client = make([rec("a.example.test.", "A", "10.0.0.1")])
    registry = service.context.metrics
    cluster.listeners["vip1"]("vip1", "owner", 1)
    clock.advance(0)          # the end-of-turn flush
    assert registry.get_sample_value("appliance_dns_records_out_of_sync") == 0
    assert registry.get_sample_value("appliance_dns_zone_error", {"zone": "example.test."}) == 0
    assert registry.get_sample_value("appliance_dns_zone_last_success_timestamp_seconds",
                                      {"zone": "example.test."}) > 0
    assert registry.get_sample_value("appliance_dns_updates_total", {"rcode": "NOERROR"}) == 1
    service.stopService()
    assert registry.get_sample_value("appliance_dns_records_out_of_sync") is None
    again = DNSService(service.config, service.context, rng=lambda: 0.5, client=FakeClient())
    again.startService()
    assert registry.get_sample_value("appliance_dns_guard_blocked_records") == 0
    again.stopService()


def test_one_update_per_zone_for_a_decision_moving_several_resources():
    """Review M3: the cluster calls the listener once per resource; gaining vip1 and
    vip2 in one reactor turn sends one UPDATE for the zone holding both."""
    service, clock, cluster, client = make([rec("a.example.test.", "A", "10.0.0.1"),
                                            rec("b.example.test.", "A", "10.0.0.2", "vip2")])
    cluster.listeners["vip1"]("vip1", "owner", 2)
    cluster.listeners["vip2"]("vip2", "owner", 2)
    assert client.updates == []
    clock.advance(0)
    assert len(client.updates) == 1
    names = {r.name.to_text() for r in client.updates[0].update if r.deleting is None}
    assert {"a.example.test.", "b.example.test."} <= names
    service.stopService()


def test_regain_expects_the_previous_epochs_owner():
    """Review M2: a owns vip1 at epoch 1, loses it, and gains it back at epoch 3 before
    its 50 ms guard refresh: b held epoch 2, so the UPDATE's guard prerequisite expects
    "b 2" (derived from the claims), not the stale cached "a 1"."""
    service, clock, cluster, client = make([rec("a.example.test.", "A", "10.0.0.1")])
    service.stopService()
    peers = SimpleNamespace(peers=[SimpleNamespace(id="b")], auth_key_file=None)
    service.context.config = SimpleNamespace(node=SimpleNamespace(id="a"), cluster=peers)
    service = DNSService(service.config, service.context, rng=lambda: 0.5, client=client)
    service.startService()
    clock.advance(0)
    cluster.listeners["vip1"]("vip1", "owner", 1)
    clock.advance(0)
    cluster.listeners["vip1"]("vip1", "standby", 1)
    cluster.listeners["vip1"]("vip1", "owner", 3)
    clock.advance(0)
    prereq = [r for r in client.updates[-1].prerequisite
              if r.name.to_text() == "_appliance-owner.a.example.test."][0]
    text = b"".join(next(iter(prereq)).strings).split()
    assert text[3:] == [b"b", b"2"] and text[2] == b"vip1"
    assert service.context.metrics.get_sample_value("appliance_dns_cas_misses_total") == 0
    service.stopService()


def test_gain_expects_the_previous_claim_the_cluster_heard():
    """Issue 13: the cluster tells a node gaining a resource the claim before its own
    (ClusterManager.previous_claim, from the peers' heartbeats); with three nodes the
    guard prerequisite expects exactly that claim ("c 6"), no guess, no read."""
    service, clock, cluster, client = make([rec("a.example.test.", "A", "10.0.0.1")])
    service.stopService()
    peers = SimpleNamespace(peers=[SimpleNamespace(id="b"), SimpleNamespace(id="c")],
                            auth_key_file=None)
    service.context.config = SimpleNamespace(node=SimpleNamespace(id="a"), cluster=peers)
    cluster.previous_claim = lambda resource, epoch: ("c", 6) if resource == "vip1" else None
    service = DNSService(service.config, service.context, rng=lambda: 0.5, client=client)
    service.startService()
    clock.advance(0)
    cluster.listeners["vip1"]("vip1", "owner", 7)
    clock.advance(0)
    prereq = [r for r in client.updates[-1].prerequisite
              if r.name.to_text() == "_appliance-owner.a.example.test."][0]
    text = b"".join(next(iter(prereq)).strings).split()
    assert text[2:] == [b"vip1", b"c", b"6"]
    service.stopService()


def test_cluster_manager_previous_claim_from_heartbeats(tmp_path):
    """ResourceTable.learn keeps the highest-epoch claim a peer announced; previous_claim
    returns it to a node gaining the resource at a higher epoch (and nothing at or
    below it)."""
    import ipaddress
    from appliance.cluster.heartbeat import Heartbeat
    from appliance.cluster.manager import ClusterManager
    from appliance.cluster.ownership import ResourceSpec
    from appliance.config import ClusterSection, Peer
    section = ClusterSection(peers=(Peer("b", ipaddress.ip_address("10.0.0.2")),
                                    Peer("c", ipaddress.ip_address("10.0.0.3"))),
                             heartbeat_interval_ms=100, dead_after=3, bind_address=None)
    m = ClusterManager(Clock(), node_id="a", cluster=section, state_dir=tmp_path)
    m.add_resource(ResourceSpec("vip1", {"a": 1, "b": 1, "c": 1}, True))
    assert m.previous_claim("vip1", 3) is None
    m.table.learn(Heartbeat("b", 1, 1, 0.0, resources={"vip1": ("b", 4, False)}))
    m.table.learn(Heartbeat("c", 1, 1, 0.0, resources={"vip1": ("c", 6, False)}))
    m.table.learn(Heartbeat("b", 1, 2, 0.0, max_epochs={"vip1": 6}))   # b let go
    assert m.previous_claim("vip1", 7) == ("c", 6)
    assert m.previous_claim("vip1", 6) is None
    assert m.previous_claim("nope", 7) is None


def test_records_say_when_the_cluster_status_fails():
    """Review L8: dns.records swallowed a failing cluster.status(); now it still answers
    and logs why the owners are unknown."""
    from twisted.logger import globalLogPublisher
    service, clock, cluster, client = make([rec("a.example.test.", "A", "10.0.0.1")])

    def broken():
        raise RuntimeError("status exploded")
    cluster.status = broken
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        rows = service.records()["records"]
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert rows and rows[0]["owner"] is None
    assert any("status exploded" in str(e.get("why", "")) for e in events), events
    service.stopService()


def test_defining_a_resource_nobody_defined_is_said():
    """Review M9: records following a resource no [[vip]] or service defined make dns
    define it with default priorities -- now with a warning naming it."""
    from twisted.logger import globalLogPublisher
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        service, clock, cluster, client = make([rec("a.example.test.", "A", "10.0.0.1")])
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert "vip1" in cluster.listeners
    assert any(e.get("res") == "vip1" and "no vip or service defines" in e.get("log_format", "")
               for e in events)
    service.stopService()


class DefiningCluster(FakeCluster):
    """A cluster that keeps definitions (spec + listeners), like ResourceTable.add:
    the first definition of a name wins."""

    def __init__(self):
        super().__init__()
        self.table = {}

    @property
    def resources(self):
        return self.table

    def add_resource(self, spec, settings=None, listener=None):
        res = self.table.setdefault(spec.name, SimpleNamespace(spec=spec, listeners=[]))
        if listener is not None:
            res.listeners.append(listener)
            self.listeners[spec.name] = listener

    def register_resource(self, name, listener, *, priority=None, preempt=True, kind="service",
                          settings=None):
        self.add_resource(SimpleNamespace(name=name, priority=priority or {"a": 100},
                                          preempt=preempt, kind=kind), listener=listener)


def test_a_service_resource_defined_after_dns_starts_keeps_its_services_spec():
    """Review M9: dns starting before the service that owns "sip:registrar" only
    listens: the service's definition (its priorities) is the one the cluster keeps,
    and dns hears its role changes; a service resource nobody defines is defined by
    dns (warned) after DEFINE_GRACE_S.  (Old code: dns defined it at once with
    priority 100, and the service's spec was ignored.)"""
    clock = Clock()
    config = DNSConfig(servers=(("127.0.0.1", 53),), key=None, key_file=None, zones=(EX,),
                       default_ttl=5, records=(rec("a.example.test.", "A", "10.0.0.1",
                                                   resource="sip:registrar"),
                                               rec("b.example.test.", "A", "10.0.0.2",
                                                   resource="nobody:else")),
                       reconcile_interval_s=30, timeout_s=0.5, retry_initial_s=0.1,
                       retry_max_s=1.0)
    cluster = DefiningCluster()
    context = NodeContext(reactor=clock, config=SimpleNamespace(node=SimpleNamespace(id="a")),
                          store=None, rpc=MethodRegistry(), metrics=CollectorRegistry(),
                          cluster=cluster, state_dir=Path("."))
    client = FakeClient()
    service = DNSService(config, context, rng=lambda: 0.5, client=client)
    service.startService()
    clock.advance(0)
    assert "sip:registrar" not in cluster.table, "dns does not define a service's resource"
    # the sip service starts next and defines its resource
    sip_listener = lambda *a: None                       # noqa: E731
    cluster.register_resource("sip:registrar", sip_listener, priority={"a": 200, "b": 50},
                              kind="sip")
    clock.advance(DNSService.DEFINE_POLL_S)
    res = cluster.table["sip:registrar"]
    assert res.spec.priority == {"a": 200, "b": 50} and res.spec.kind == "sip"
    assert service._role_changed in res.listeners
    assert "nobody:else" not in cluster.table
    clock.advance(DNSService.DEFINE_GRACE_S)
    assert cluster.table["nobody:else"].spec.kind == "dns"
    res.listeners[-1]("sip:registrar", "owner", 3)
    clock.advance(0)
    assert len(client.updates) == 1 and service.role == "owner"
    service.stopService()
    assert not [c for c in clock.getDelayedCalls() if c.active()]


def test_failed_reads_are_counted_and_a_failed_guard_refresh_is_warned():
    """Review L8: reads of the primary that fail (reconcile, the guard refresh after a
    loss) are counted in appliance_dns_read_failures_total{rcode} and the refresh
    failure is a warning naming the resource, not a debug line.  (Old code: neither.)"""
    from twisted.logger import globalLogPublisher
    from services.dns.service import GUARD_REFRESH_S
    service, clock, cluster, client = make([rec("a.example.test.", "A", "10.0.0.1")])

    def failing(request, zone, key, what="update"):
        return defer.fail(TransportError(f"{what} of zone {zone}: no server answered",
                                         "timeout"))
    client.exchange = failing
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        d = service.reconcile("test")
        clock.advance(0)
        result = []
        d.addBoth(result.append)
        assert result and result[0]["errors"]
        registry = service.context.metrics
        reads = registry.get_sample_value("appliance_dns_read_failures_total",
                                          {"rcode": "timeout"})
        assert reads == 2, reads          # the record and its guard
        cluster.listeners["vip1"]("vip1", "owner", 2)
        cluster.listeners["vip1"]("vip1", "standby", 2)
        clock.advance(GUARD_REFRESH_S)
        assert registry.get_sample_value("appliance_dns_read_failures_total",
                                         {"rcode": "timeout"}) == 3
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert any(e.get("log_level").name == "warn" and e.get("res") == "vip1"
               and "guards" in e.get("log_format", "") for e in events)
    service.stopService()


def test_operator_view_in_records_and_metrics():
    """Issue 13 deliver 5: dns.records (appliancectl records) and /metrics show the
    records out of sync, each zone's last success and error, guard-blocked records, and
    DDNS results and latency.  A failing server first: out of sync, zone error; then
    success: in sync, last success; a DDNS bind: counted, its latency in the histogram
    and in the summary.  (Old code: dns.records had no summary, no last success per
    zone and no DDNS part.)"""
    from appliance.admin.ctl import render
    from services.dns.config import DDNSConfig
    clock = Clock()
    config = DNSConfig(servers=(("127.0.0.1", 53),), key=None, key_file=None, zones=(EX, OT),
                       default_ttl=5, records=(rec("a.example.test.", "A", "10.0.0.1"),),
                       reconcile_interval_s=30, timeout_s=0.5, retry_initial_s=0.1,
                       retry_max_s=1.0, ddns=DDNSConfig(forward_zone=OT, reverse_zone=None))
    cluster = FakeCluster()
    registry = CollectorRegistry()
    wall = [1000.0]
    context = NodeContext(reactor=clock, config=SimpleNamespace(node=SimpleNamespace(id="a")),
                          store=None, rpc=MethodRegistry(), metrics=registry,
                          cluster=cluster, state_dir=Path("."))
    context.wall = lambda: wall[0]
    client = FakeClient()
    service = DNSService(config, context, rng=lambda: 0.5, client=client)
    service.startService()
    clock.advance(0)
    client.fail_next = 1
    cluster.listeners["vip1"]("vip1", "owner", 1)
    clock.advance(0)
    view = service.records()
    assert view["out_of_sync"] == 1 and view["guard_blocked"] == 0
    assert view["zones"]["example.test."]["error"] and \
        view["zones"]["example.test."]["last_success_s_ago"] is None
    assert registry.get_sample_value("appliance_dns_records_out_of_sync") == 1
    assert registry.get_sample_value("appliance_dns_zone_error", {"zone": "example.test."}) == 1
    clock.advance(0.1)                  # the retry succeeds
    wall[0] += 2.5
    view = service.records()
    assert view["out_of_sync"] == 0 and view["zones"]["example.test."]["error"] is None
    assert view["zones"]["example.test."]["last_success_s_ago"] == 2.5
    assert registry.get_sample_value("appliance_dns_zone_error", {"zone": "example.test."}) == 0
    assert registry.get_sample_value("appliance_dns_zone_last_success_timestamp_seconds",
                                     {"zone": "example.test."}) == 1000.0
    done = []
    d = service.ddns.lease_bound("pc1.other.test.", "10.0.0.9", b"\x01\x02\x03\x04\x05\x06\x07",
                                 60)
    d.addBoth(done.append)
    clock.advance(0)
    assert done and isinstance(done[0], dict), done
    ddns = service.records()["ddns"]
    assert ddns["results"] == {"bind ok": 1} and "bind" in ddns["latency_ms_mean"]
    assert registry.get_sample_value("appliance_dns_ddns_total",
                                     {"op": "bind", "result": "ok"}) == 1
    assert registry.get_sample_value("appliance_dns_ddns_latency_seconds_count",
                                     {"op": "bind"}) == 1
    text = render(service.records())
    for word in ("out_of_sync", "guard_blocked", "LAST_SUCCESS_S_AGO", "ddns.results"):
        assert word in text, text
    service.stopService()


def test_resource_scope_through_the_service():
    """Review L12: with guard_scope = "resource" the service expects, reads (reconcile)
    and shows the resource's guard, _appliance-guard.vip1.<zone>, not per-name guards."""
    clock = Clock()
    config = DNSConfig(servers=(("127.0.0.1", 53),), key=None, key_file=None, zones=(EX,),
                       default_ttl=5, records=(rec("a.example.test.", "A", "10.0.0.1"),
                                               rec("b.example.test.", "A", "10.0.0.2")),
                       reconcile_interval_s=30, timeout_s=0.5, retry_initial_s=0.1,
                       retry_max_s=1.0, guard_scope="resource")
    cluster = FakeCluster()
    context = NodeContext(reactor=clock, config=SimpleNamespace(node=SimpleNamespace(id="a")),
                          store=None, rpc=MethodRegistry(), metrics=CollectorRegistry(),
                          cluster=cluster, state_dir=Path("."))
    client = FakeClient()
    queried = []
    real = client.exchange

    def exchange(request, zone, key, what="update"):
        if what == "query":
            queried.append(request.question[0].name.to_text())
        return real(request, zone, key, what)
    client.exchange = exchange
    service = DNSService(config, context, rng=lambda: 0.5, client=client)
    service.startService()
    clock.advance(0)
    assert "_appliance-guard.vip1.example.test." in queried
    assert not any(q.startswith("_appliance-owner.") for q in queried)
    cluster.listeners["vip1"]("vip1", "owner", 4)
    clock.advance(0)
    upd, = client.updates
    assert [r.name.to_text() for r in upd.prerequisite] == ["_appliance-guard.vip1.example.test."]
    rows = service.records()["records"]
    assert all(r["guard"].startswith("a at epoch 4 for vip1") for r in rows), rows
    service.stopService()


def test_a_flush_plans_only_the_marked_records(monkeypatch):
    """The move's critical path: gaining one resource computes the desired rrsets of
    that resource's records only, not of every owned record of every zone (old code:
    every flush planned all of them)."""
    import services.dns.records as R
    specs = [rec(f"r{i}.example.test.", "A", f"10.0.0.{i}", resource=f"vip{i}")
             for i in range(1, 21)]
    service, clock, cluster, client = make(specs)
    for i in range(1, 20):
        cluster.listeners[f"vip{i}"](f"vip{i}", "owner", 1)
    clock.advance(0)
    calls = []
    real = R.desired_rdatas
    monkeypatch.setattr(R, "desired_rdatas", lambda spec, owner: (calls.append(spec.name),
                                                                   real(spec, owner))[1])
    cluster.listeners["vip20"]("vip20", "owner", 1)
    clock.advance(0)
    assert calls == [specs[-1].name], len(calls)
    assert len(client.updates) == 2
    service.stopService()


def test_a_service_resource_defined_later_with_a_real_cluster_manager(tmp_path):
    """Review M9 with the real ClusterManager (not started: no sockets): dns starts
    first and only listens; sip registers "sip:registrar" with its priorities a moment
    later; the manager keeps sip's spec and both listeners."""
    import ipaddress
    from appliance.cluster.manager import ClusterManager
    from appliance.config import ClusterSection, Peer
    clock = Clock()
    section = ClusterSection(peers=(Peer("b", ipaddress.ip_address("10.0.0.2")),),
                             heartbeat_interval_ms=100, dead_after=3, bind_address=None)
    m = ClusterManager(clock, node_id="a", cluster=section, state_dir=tmp_path)
    config = DNSConfig(servers=(("127.0.0.1", 53),), key=None, key_file=None, zones=(EX,),
                       default_ttl=5, records=(rec("reg.example.test.", "A", "10.0.0.1",
                                                   resource="sip:registrar"),),
                       reconcile_interval_s=30, timeout_s=0.5, retry_initial_s=0.1,
                       retry_max_s=1.0)
    context = NodeContext(reactor=clock, config=SimpleNamespace(node=SimpleNamespace(id="a")),
                          store=None, rpc=MethodRegistry(), metrics=CollectorRegistry(),
                          cluster=m, state_dir=tmp_path)
    service = DNSService(config, context, rng=lambda: 0.5, client=FakeClient())
    service.startService()
    clock.advance(0.5)
    assert "sip:registrar" not in m.resources
    sip = []
    m.register_resource("sip:registrar", lambda *a: sip.append(a), priority={"a": 50, "b": 200},
                        preempt=False, kind="sip")
    clock.advance(DNSService.DEFINE_POLL_S)
    res = m.resources["sip:registrar"]
    assert res.spec.priority == {"a": 50, "b": 200} and res.spec.kind == "sip"
    assert not res.spec.preempt and len(res.listeners) == 2
    clock.advance(DNSService.DEFINE_GRACE_S)
    assert len(res.listeners) == 2, "defined once, listened to once"
    service.stopService()
    assert len(res.listeners) == 1


def test_verify_secondaries_waits_until_the_primary_serves_the_write():
    """Review M11 (inline signing): named answers the UPDATE before the zone it serves
    has the change; the serial to expect from secondaries is the primary's once it
    serves our write, not the one read at once.  A primary that shows the write (and
    serial 2) 0.1 s after its NOERROR, and a secondary stuck at serial 1: reported
    behind.  (Old code: want = 1 read at once, the stale secondary "in sync".)"""
    import dns.rrset
    clock = Clock()

    class LaggingPrimary(FakeClient):
        visible_at = None

        def exchange(self, request, zone, key, what="update"):
            if request.opcode() == dns.opcode.UPDATE:
                self.visible_at = clock.seconds() + 0.1
                return super().exchange(request, zone, key, what)
            q = request.question[0]
            r = dns.message.make_response(request)
            shown = self.visible_at is not None and clock.seconds() >= self.visible_at
            if q.rdtype == dns.rdatatype.SOA:
                r.answer.append(dns.rrset.from_text(q.name, 5, "IN", "SOA",
                                                    f"ns. h. {2 if shown else 1} 1 1 1 1"))
            elif q.rdtype == dns.rdatatype.A and shown:
                r.answer.append(dns.rrset.from_text(q.name, 5, "IN", "A", "10.0.0.1"))
            return defer.succeed((r, "127.0.0.1:53"))

    stale = LaggingPrimary()                 # never updated: serves serial 1 for good
    config = DNSConfig(servers=(("127.0.0.1", 53),), key=None, key_file=None, zones=(EX,),
                       default_ttl=5, records=(rec("a.example.test.", "A", "10.0.0.1"),),
                       reconcile_interval_s=30, timeout_s=0.5, retry_initial_s=0.1,
                       retry_max_s=1.0, verify_secondaries=(("127.0.0.9", 53),),
                       verify_timeout_s=1.0)
    cluster = FakeCluster()
    context = NodeContext(reactor=clock, config=SimpleNamespace(node=SimpleNamespace(id="a")),
                          store=None, rpc=MethodRegistry(), metrics=CollectorRegistry(),
                          cluster=cluster, state_dir=Path("."))
    service = DNSService(config, context, rng=lambda: 0.5, client=LaggingPrimary())
    service._secondary_client = lambda server: stale
    service.startService()
    clock.advance(0)
    cluster.listeners["vip1"]("vip1", "owner", 1)
    clock.advance(0)
    for _ in range(80):
        clock.advance(0.02)
    state = service.records()["secondaries"]["example.test."]["127.0.0.9:53"]
    assert state["want"] == 2 and state["serial"] == 1 and not state["in_sync"], state
    service.stopService()
