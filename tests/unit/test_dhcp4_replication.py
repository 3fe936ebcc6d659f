"""Lazy updates to the partner: bounded by max_unacked, held updates drain on acks."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

from twisted.internet import defer
from twisted.internet.task import Clock

from appliance.cluster.peerlink import Backpressure
from appliance.config import config_from_string
from services.dhcp.plugin import dhcp4_plugin
from services.dhcp.v4.leases import Lease
from services.dhcp.v4.replication import LeaseOutbox
from services.dhcp.v4.service import Dhcp4Service

CONFIG = """
[node]
id = "a"
state_dir = "s"

[cluster]
peers = [{ id = "b", address = "10.0.0.2" }]
auth_key_file = "k"

[services.dhcp4]
listen_address = "10.0.0.1"
failover = { peer = "b", role = "primary", max_unacked = 2 }

[[services.dhcp4.subnets]]
id = 1
subnet = "10.0.0.0/24"
pool = ["10.0.0.10", "10.0.0.20"]
"""


class FakeLink:
    """A peer link whose sends are acked only when the test says so."""

    def __init__(self):
        self.pending = []

    def send(self, peer, channel, body, *, limit=None):
        if len(self.pending) >= limit:
            return defer.fail(Backpressure("full"))
        d = defer.Deferred()
        self.pending.append((body, d))
        return d

    def ack_one(self):
        body, d = self.pending.pop(0)
        d.callback(None)
        return body


def lease(i: int) -> Lease:
    return Lease(address=f"10.0.0.{10 + i}", hwaddr=f"02:00:00:00:00:{i:02x}", client_id="",
                 hostname="", state="bound", expires=2e9, cltt=1e9 + i, owner="a", subnet_id=1)


def test_backlog_bounded_and_drained_in_order_of_acks():
    """Updates gathered for delay_s leave as one batch; only max_unacked lease updates
    are in flight; the rest wait (newest state per address) and go out as acks
    free the window; nothing is dropped."""
    cfg = config_from_string(CONFIG, "t.toml", {"dhcp4": dhcp4_plugin})
    link = FakeLink()
    clock = Clock()
    ctx = SimpleNamespace(reactor=clock, store=None, node_id="a", providers={},
                          cluster=SimpleNamespace(peerlink=link), rpc=None, metrics=None)
    svc = Dhcp4Service(cfg.services["dhcp4"].config, ctx)
    svc.outbox = LeaseOutbox(clock, link, "b", "dhcp4", 2, stats=svc.stats)
    for i in range(5):
        svc._lease_changed("bound", lease(i))
    clock.advance(0)
    assert link.pending == []                       # gathering for delay_s
    clock.advance(svc.outbox.delay_s)
    assert len(link.pending) == 1 and len(link.pending[0][0]["leases"]) == 2
    assert svc.stats["replication_held"] == 3 and svc.outbox.backlog == 5
    newer = replace(lease(3), cltt=lease(3).cltt + 5)
    svc._lease_changed("bound", newer)             # newer state of a held address
    assert len(svc.outbox.pending) == 3
    sent = []
    while link.pending:
        sent += link.ack_one()["leases"]
    assert sorted(w["address"] for w in sent) == [f"10.0.0.{10 + i}" for i in range(5)]
    assert [w["cltt"] for w in sent if w["address"] == "10.0.0.13"] == [newer.cltt]
    assert svc.outbox.backlog == 0 and svc.stats["replication_sent"] == 5


def test_full_batch_leaves_at_once_and_backpressure_waits():
    """A full batch does not wait for delay_s; a batch the link refuses
    (Backpressure) is kept and retried after RETRY_S, not at the next add."""
    link = FakeLink()
    clock = Clock()
    box = LeaseOutbox(clock, link, "b", "dhcp4", 100, batch=3, delay_s=0.01)
    for i in range(3):
        box.add(lease(i))
    assert len(link.pending) == 1 and len(link.pending[0][0]["leases"]) == 3
    box.add(lease(3))
    assert len(link.pending) == 1                   # one lease: waits for the timer
    clock.advance(0.01)
    assert len(link.pending) == 2
    refusing = SimpleNamespace(send=lambda *a, **k: defer.fail(Backpressure("full")))
    box.link = refusing
    for i in range(4, 7):
        box.add(lease(i))                           # full batch, refused
    assert sorted(box.pending) == [f"10.0.0.{10 + i}" for i in range(4, 7)]
    box.link = link
    box.add(lease(7))                               # no retry before RETRY_S
    box.add(lease(8))
    assert len(link.pending) == 2
    clock.advance(box.RETRY_S)
    assert len(link.pending) == 4 and box.backlog == 3 + 1 + 5
    for _ in range(4):
        link.ack_one()
    assert box.backlog == 0 and box.stats["replication_sent"] == 9


def test_partner_batch_applied_and_malformed_entries_skipped(tmp_path):
    """A batch from the partner is stored lease by lease; a malformed entry is
    counted, the rest still applied (the batch is acked, not resent forever)."""
    from appliance.eager import as_deferred
    from tests.support.sync import memory_store, ok
    cfg = config_from_string(CONFIG, "t.toml", {"dhcp4": dhcp4_plugin})
    store, clock = memory_store(tmp_path)
    ctx = SimpleNamespace(reactor=clock, store=store, node_id="a", providers={},
                          cluster=None, rpc=None, metrics=None)
    svc = Dhcp4Service(cfg.services["dhcp4"].config, ctx)
    ok(svc.leases.load())
    body = {"leases": [lease(1).to_wire(), {"address": "nonsense"}, lease(2).to_wire()]}
    ok(as_deferred(svc._remote_update("b", body)))
    assert svc.stats["replication_applied"] == 2 and svc.stats["replication_rejected"] == 1
    assert ok(svc.leases.get("10.0.0.12")).hwaddr == lease(2).hwaddr


def test_overload_sheds_discovers_not_requests():
    """With MAX_INFLIGHT requests pending, a new DISCOVER is dropped ("overload")
    while a REQUEST is still handled."""
    from services.dhcp.v4 import codec as C
    from services.dhcp.v4.probe import packet
    cfg = config_from_string(CONFIG, "t.toml", {"dhcp4": dhcp4_plugin})
    ctx = SimpleNamespace(reactor=Clock(), store=None, node_id="a", providers={},
                          cluster=None, rpc=None, metrics=None)
    svc = Dhcp4Service(cfg.services["dhcp4"].config, ctx)
    handled = []
    svc.handler = SimpleNamespace(handle=lambda pkt: handled.append(pkt.message_type)
                                  or defer.Deferred())
    svc._inflight = svc.MAX_INFLIGHT
    mac = bytes([2, 0, 0, 0, 0, 1])
    svc.datagram(packet(C.DISCOVER, mac, "10.0.0.1", 1), ("10.0.0.1", 67))
    svc.datagram(packet(C.REQUEST, mac, "10.0.0.1", 2, o50=bytes([10, 0, 0, 11])),
                 ("10.0.0.1", 67))
    assert svc.drops["overload"] == 1
    assert handled == [C.REQUEST]


def test_kernel_receive_time_of_a_datagram():
    """SIOCGSTAMP gives when the kernel queued the datagram, not when it was read."""
    import socket
    import time

    from appliance.net.sockets import enable_receive_times, last_received_at
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        assert enable_receive_times(rx)
        tx.sendto(b"x", rx.getsockname())
        time.sleep(0.3)
        rx.recvfrom(16)
        at = last_received_at(rx)
        assert at is not None and 0.25 <= time.time() - at < 5
    finally:
        rx.close()
        tx.close()


def test_stale_discovers_are_shed_requests_are_not(monkeypatch):
    """A DISCOVER that waited in the socket queue longer than discover_max_age_ms
    is dropped ("stale"); a REQUEST of the same age is still answered; 0 turns
    the check off."""
    import time

    from services.dhcp.v4 import codec as C
    from services.dhcp.v4 import service as S
    from services.dhcp.v4.probe import packet
    cfg = config_from_string(CONFIG, "t.toml", {"dhcp4": dhcp4_plugin})
    ctx = SimpleNamespace(reactor=Clock(), store=None, node_id="a", providers={},
                          cluster=None, rpc=None, metrics=None)
    svc = Dhcp4Service(cfg.services["dhcp4"].config, ctx)
    handled = []
    svc.handler = SimpleNamespace(handle=lambda pkt: handled.append(pkt.message_type) or None)
    svc.port = SimpleNamespace(socket=None)
    monkeypatch.setattr(S, "last_received_at", lambda sock: time.time() - 2.5)
    mac = bytes([2, 0, 0, 0, 0, 1])
    svc.datagram(packet(C.DISCOVER, mac, "10.0.0.1", 1), ("10.0.0.1", 67))
    svc.datagram(packet(C.REQUEST, mac, "10.0.0.1", 2, o50=bytes([10, 0, 0, 11])),
                 ("10.0.0.1", 67))
    assert svc.drops["stale"] == 1 and handled == [C.REQUEST]
    monkeypatch.setattr(S, "last_received_at", lambda sock: time.time() - 1.5)
    svc.datagram(packet(C.DISCOVER, mac, "10.0.0.1", 3), ("10.0.0.1", 67))
    assert handled == [C.REQUEST, C.DISCOVER]
    svc._max_age_s = 0                                  # discover_max_age_ms = 0: off
    monkeypatch.setattr(S, "last_received_at", lambda sock: time.time() - 100)
    svc.datagram(packet(C.DISCOVER, mac, "10.0.0.1", 4), ("10.0.0.1", 67))
    assert svc.drops["stale"] == 1 and handled[-1] == C.DISCOVER
