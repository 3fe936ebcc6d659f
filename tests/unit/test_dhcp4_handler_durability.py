"""The handler's answers and the store's durability: a DISCOVER is answered at once
from memory (no write), a REQUEST's ACK exists only after the journal write for its
lease is done (fsync = "always"), and a failed journal write gives no ACK."""

from __future__ import annotations

from ipaddress import IPv4Address

from twisted.internet import defer
from twisted.internet.task import Clock

from appliance.store.memory import MemoryStore
from services.dhcp.v4 import codec as C
from services.dhcp.v4.handler import Dhcp4Handler
from services.dhcp.v4.leases import LeaseStore
from services.dhcp.v4.probe import packet
from tests.unit.test_dhcp4_leases import T0, config


class ManualThread:
    """A MemoryStore ``run_in_thread`` whose journal jobs wait until released."""

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


def setup(tmp_path):
    clock = Clock()
    clock.advance(T0)
    thread = ManualThread()
    store = MemoryStore(clock, state_dir=tmp_path, fsync="always", run_in_thread=thread)
    store.startService()
    thread.run_all()                                   # the load
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
