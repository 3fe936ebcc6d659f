"""Two real dhcp6 services (``Dhcp6Service`` with the failover core: handler, the core's NA
and PD lease stores, ``Dhcp6Partner``) on one ``task.Clock``, each with its own
EmbeddedStore, a fake cluster whose partner states the caller sets, and a peer link the
caller pumps (:class:`Wire`).  Used by the unit tests of the pair and by the simulator."""

from __future__ import annotations

from ipaddress import IPv6Address
from types import SimpleNamespace

from twisted.internet import defer

from appliance.config import config_from_string
from appliance.store.embedded import EmbeddedStore
from services.dhcp.plugin import dhcp6_plugin
from services.dhcp.v6 import codec as C
from services.dhcp.v6.service import Dhcp6Service
from tests.support.sync import inline, ok
from tests.unit.test_dhcp6_server import duid, msg  # noqa: F401  (the sim's clients)
from tests.unit.test_dhcp6_service import Port, Rpc

LINK = "2001:db8:1::1"


def config(node, peer, role, *, mclt_s=60, valid_s=4000, preferred_s=3000,
           pool=("2001:db8:1::100", "2001:db8:1::10f"), pd_prefix="2001:db8:100::/52",
           pd_len=56, mode="split-scope", split=50):
    return f"""
[node]
id = "{node}"
state_dir = "s"
[cluster]
peers = [{{ id = "{peer}", address = "10.0.0.2" }}]
auth_key_file = "k"
[services.dhcp6]
listen_address = "::1"
port = 5547
reclaim_interval_s = 1
failover = {{ peer = "{peer}", role = "{role}", mclt_s = {mclt_s}, mode = "{mode}", split = {split} }}
[[services.dhcp6.subnets]]
id = 1
subnet = "2001:db8:1::/64"
pool = ["{pool[0]}", "{pool[1]}"]
pd_pools = [{{ prefix = "{pd_prefix}", delegated_length = {pd_len} }}]
valid_lifetime_s = {valid_s}
preferred_lifetime_s = {preferred_s}
"""


class Wire:
    """Both ends of a peer link: a send waits in ``queue`` until :meth:`pump` hands it to
    the other node's channel handler; its Deferred fires when that handler is done.  While
    the link is down (or an end is dead) sends fail, as the peer link's do."""

    def __init__(self):
        self.queue = []           # (to, from, channel, body, deferred)
        self.handlers = {}        # (node, channel) -> handler(peer, body)
        self.up = True
        self.dead: set[str] = set()

    def end(self, node):
        wire = self

        class End:
            def on(self, channel, handler):
                wire.handlers[(node, channel)] = handler

            def send(self, peer, channel, body, limit=None):
                if not wire.up or node in wire.dead or peer in wire.dead:
                    return defer.fail(ConnectionError("peer link down"))
                d = defer.Deferred()
                wire.queue.append((peer, node, channel, body, d))
                return d
        return End()

    def pump(self, rounds=50):
        n = 0
        for _ in range(rounds):
            if not self.queue:
                break
            batch, self.queue = self.queue, []
            for to, frm, channel, body, d in batch:
                if not self.up or to in self.dead or frm in self.dead:
                    d.errback(ConnectionError("peer link down"))
                    continue
                result = defer.maybeDeferred(self.handlers[(to, channel)], frm, body)
                result.chainDeferred(d)
                n += 1
        return n

    def cut(self):
        """The link goes down: what is queued fails (the senders' outboxes and unsynced
        records keep it)."""
        self.up = False
        batch, self.queue = self.queue, []
        for *_, d in batch:
            d.errback(ConnectionError("peer link down"))


class Cluster:
    def __init__(self, link, state):
        self.peerlink = link
        self.state = state
        self.listener = None
        self.sync = None
        self.confirmed = False
        self.evidence = []           # (peer, unanswered clients) reports

    def register_partner(self, peer, listener, **kw):
        self.listener = listener
        self.sync = kw.get("sync")
        return self.state

    def partner_confirmed(self, peer):
        return self.confirmed

    def report_client_evidence(self, peer, n):
        self.evidence.append((peer, n))


def node(path, clock, wire, name, peer, role, state, *, store=None, **cfg):
    """A started Dhcp6Service ``name`` (its store under ``path/name`` unless given)."""
    parsed = config_from_string(config(name, peer, role, **cfg), "t.toml", {"dhcp6": dhcp6_plugin})
    (path / name).mkdir(parents=True, exist_ok=True)
    if store is None:
        store = EmbeddedStore(clock, state_dir=path / name, fsync="never", run_in_thread=inline,
                              turn_batching=False)
        store.startService()
    cluster = Cluster(wire.end(name), state)
    ctx = SimpleNamespace(reactor=clock, store=store, node_id=name, providers={},
                          cluster=cluster, rpc=Rpc(), state_dir=str(path / name),
                          metrics=SimpleNamespace(register=lambda c: None,
                                                  unregister=lambda c: None))
    svc = Dhcp6Service(parsed.services["dhcp6"].config, ctx)
    clock.listenUDP = lambda port, proto, interface="": Port()
    ok(svc.startService())
    svc.port = Port()
    return svc


def relayed(m, link=LINK):
    return C.encode(C.RelayMessage(C.RELAY_FORW, 0, IPv6Address(link).packed,
                                   IPv6Address("fe80::1").packed, m, b"ifx"))


def ask(svc, m):
    """Send ``m`` (relayed) to ``svc``; its reply (inner message) or None."""
    svc.port.sent.clear()
    svc.datagram(relayed(m), ("::1", 40000))
    return svc.port.sent[-1][0].inner if svc.port.sent else None
