"""The handler's answers and the store's durability: a DISCOVER is answered at once
from memory (no write), a REQUEST's ACK exists only after the journal write for its
lease is done (fsync = "always"), and a failed journal write gives no ACK."""

from __future__ import annotations

from ipaddress import IPv4Address

from twisted.internet import defer
from twisted.internet.task import Clock

from appliance.store.embedded import EmbeddedStore
from services.dhcp.v4 import codec as C
from services.dhcp.v4.handler import Dhcp4Handler
from services.dhcp.v4.leases import LeaseStore
from services.dhcp.v4.probe import packet
from tests.unit.test_dhcp4_leases import T0, config


class ManualThread:
    """An EmbeddedStore ``run_in_thread`` whose journal jobs wait until released."""

    def __init__(self):
        self.jobs = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.jobs.append((f, args, d))
        return d

    def run_all(self, fail: bool = False):
        while self.jobs:
            f, args, d = self.jobs.pop(0)
            if fail:
                d.errback(OSError("disk on fire"))
            else:
                d.callback(f(*args))


def started_store(tmp_path):
    """A loaded fsync=always EmbeddedStore on a Clock whose journal jobs wait
    for ``thread.run_all()``: ``(clock, thread, store)``."""
    clock = Clock()
    clock.advance(T0)
    thread = ManualThread()
    store = EmbeddedStore(clock, state_dir=tmp_path, fsync="always", run_in_thread=thread)
    store.startService()
    thread.run_all()                                   # the load
    return clock, thread, store


def setup(tmp_path):
    clock, thread, store = started_store(tmp_path)
    leases = LeaseStore(store, config(), "a", clock.seconds)
    leases.load()
    handler = Dhcp4Handler(leases.config, leases, IPv4Address("10.9.0.1"), now=clock.seconds)
    return handler, thread, clock


def test_ack_only_after_the_lease_is_on_disk(tmp_path):
    handler, thread, clock = setup(tmp_path)
    mac = bytes([2, 0, 0, 0, 0, 1])
    offer = handler.handle(C.parse(packet(C.DISCOVER, mac, "10.9.0.1", 1)))
    assert not isinstance(offer, defer.Deferred), "a DISCOVER is answered from memory"
    assert thread.jobs == [], "an OFFER writes nothing"
    yiaddr = offer[0].yiaddr
    ack = handler.handle(C.parse(packet(C.REQUEST, mac, "10.9.0.1", 2, o50=yiaddr.packed,
                                        o54=IPv4Address("10.9.0.1").packed)))
    assert isinstance(ack, defer.Deferred) and not ack.called, "no ACK before the journal write"
    clock.advance(0)                                   # the journal job starts at the turn's end
    assert len(thread.jobs) == 1
    thread.run_all()
    results = []
    ack.addCallback(results.append)
    assert results and results[0][0].message_type == C.ACK and results[0][0].yiaddr == yiaddr


def test_failed_journal_write_gives_no_ack(tmp_path):
    handler, thread, clock = setup(tmp_path)
    mac = bytes([2, 0, 0, 0, 0, 2])
    offer = handler.handle(C.parse(packet(C.DISCOVER, mac, "10.9.0.1", 1)))
    ack = handler.handle(C.parse(packet(C.REQUEST, mac, "10.9.0.1", 2,
                                        o50=offer[0].yiaddr.packed,
                                        o54=IPv4Address("10.9.0.1").packed)))
    clock.advance(0)
    thread.run_all(fail=True)
    failures = []
    ack.addErrback(failures.append)
    assert failures, "the REQUEST fails (the service counts it as store_error), no ACK"


# -- the service: writes applied at once, replies wait for the disk ------------------

SERVICE_CONFIG = """
[node]
id = "a"
state_dir = "s"

[services.dhcp4]
listen_address = "10.9.0.1"

[[services.dhcp4.subnets]]
id = 1
subnet = "10.9.0.0/24"
pool = ["10.9.0.10", "10.9.0.20"]
"""


class CapturePort:
    def __init__(self):
        self.sent = []

    def write(self, data, addr):
        self.sent.append((C.parse(data), addr))


def service(tmp_path):
    from types import SimpleNamespace

    from appliance.config import config_from_string
    from services.dhcp.plugin import dhcp4_plugin
    from services.dhcp.v4.service import Dhcp4Service
    clock, thread, store = started_store(tmp_path)
    cfg = config_from_string(SERVICE_CONFIG, "t.toml", {"dhcp4": dhcp4_plugin})
    ctx = SimpleNamespace(reactor=clock, store=store, node_id="a", providers={},
                          cluster=None, rpc=None, metrics=None)
    svc = Dhcp4Service(cfg.services["dhcp4"].config, ctx)
    svc.leases.load()
    svc.handler = Dhcp4Handler(svc.leases.config, svc.leases, IPv4Address("10.9.0.1"),
                               now=clock.seconds, on_lease=svc._lease_changed)
    svc.port = CapturePort()
    return svc, thread, clock


def dora_request(svc, mac, xid):
    svc.datagram(packet(C.DISCOVER, mac, "10.9.0.1", xid), ("10.9.0.1", 67))
    offer = svc.port.sent.pop()[0]
    assert offer.message_type == C.OFFER
    svc.datagram(packet(C.REQUEST, mac, "10.9.0.1", xid + 1, o50=offer.yiaddr.packed,
                        o54=IPv4Address("10.9.0.1").packed), ("10.9.0.1", 67))
    return offer.yiaddr


def test_service_sends_the_ack_only_after_the_journal_job(tmp_path):
    """The service's lease store writes at once (immediate_writes): the lease is
    visible before the disk has it, but the ACK waits for the journal job."""
    svc, thread, clock = service(tmp_path)
    assert svc.leases._commit_now is not None
    yiaddr = dora_request(svc, bytes([2, 0, 0, 0, 0, 3]), 10)
    assert svc.port.sent == [], "no ACK before the journal write"
    assert svc.leases._meta, "the bind is applied in memory already"
    clock.advance(0)
    assert len(thread.jobs) == 1
    thread.run_all()
    assert [(p.message_type, p.yiaddr) for p, _ in svc.port.sent] == [(C.ACK, yiaddr)]


def test_service_sends_no_ack_when_the_journal_write_fails(tmp_path):
    svc, thread, clock = service(tmp_path)
    dora_request(svc, bytes([2, 0, 0, 0, 0, 4]), 20)
    clock.advance(0)
    thread.run_all(fail=True)
    assert svc.port.sent == [] and svc.drops["store_error"] == 1


def test_partner_batch_acked_only_once_on_disk(tmp_path):
    """A batch of the partner's leases is applied at once; the peer link's ack
    (the returned Deferred) waits for the journal job."""
    from services.dhcp.v4.leases import Lease
    svc, thread, clock = service(tmp_path)
    wires = [Lease(f"10.9.0.{11 + i}", 1, "bound", f"02:00:00:00:01:{i:02x}", "", "",
                   T0 + 3600, T0, "b", "b", 1).to_wire() for i in range(3)]
    d = svc._apply_updates("b", wires)
    acked = []
    d.addCallback(acked.append)
    assert acked == [], "not acked before the disk has the batch"
    clock.advance(0)
    thread.run_all()
    assert len(acked) == 1 and svc.stats["replication_applied"] == 3
    assert svc.leases.get("10.9.0.12").hwaddr == "02:00:00:00:01:01"


def test_outbox_sends_a_batch_only_once_its_leases_are_on_disk():
    from services.dhcp.v4.leases import Lease
    from services.dhcp.v4.replication import LeaseOutbox
    clock = Clock()
    gate = defer.Deferred()
    sent = []
    link = type("Link", (), {"send": lambda self, *a, **k: sent.append(a) or defer.succeed(None)})()
    box = LeaseOutbox(clock, link, "b", "dhcp4", 100, delay_s=0.01, durable=lambda: gate)
    box.add(Lease("10.9.0.11", 1, "bound", "02:00:00:00:00:01"))
    clock.advance(0.01)
    assert sent == [], "waits for durable()"
    gate.callback(None)
    assert len(sent) == 1 and box.backlog == 0


def test_service_reply_that_waited_first_still_waits_for_the_disk(tmp_path):
    """A handler result that is a Deferred (it waited for something) and wrote a
    lease after that wait: the reply still waits for the journal job."""
    svc, thread, clock = service(tmp_path)
    gate = defer.Deferred()
    real = svc.handler

    class Slow:
        leases = real.leases

        def handle(self, pkt):
            return gate.addCallback(lambda _: as_deferred(real.handle(pkt)))

    from appliance.eager import as_deferred
    yiaddr = dora_request(svc, bytes([2, 0, 0, 0, 0, 5]), 30)   # OFFER from the real handler
    clock.advance(0)
    thread.run_all()
    svc.port.sent.clear()
    svc.handler = Slow()
    svc.datagram(packet(C.REQUEST, bytes([2, 0, 0, 0, 0, 5]), "10.9.0.1", 32,
                        o50=yiaddr.packed, o54=IPv4Address("10.9.0.1").packed), ("10.9.0.1", 67))
    gate.callback(None)                                # the wait ends, the lease is rewritten
    assert svc.port.sent == [], "no ACK before the journal write"
    clock.advance(0)
    thread.run_all()
    assert [p.message_type for p, _ in svc.port.sent] == [C.ACK]
