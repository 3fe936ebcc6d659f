"""Two DHCPv4 failover servers on one ``task.Clock``: the real ``Dhcp4Handler``,
``LeaseStore`` (on an ``EmbeddedStore`` in a temporary directory) and merge code,
with the update stream between them modelled like the peer link: ordered,
acknowledged after the receiver applied a batch, held while the link is down and
resent after it is up, lost only with the sender's memory (the store keeps what
the partner has not acknowledged, ``LeaseStore.unsynced``, and a restart queues it
again).  Used by the unit tests of the failover rules and by the pair simulator.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import deque
from ipaddress import IPv4Address

from twisted.internet.task import Clock

from appliance.config import ParseContext, Problems, Table
from appliance.store.embedded import EmbeddedStore
from services.dhcp.v4 import codec as C
from services.dhcp.v4 import pools as P
from services.dhcp.v4.config import parse_dhcp4
from services.dhcp.v4.handler import Dhcp4Handler, FailoverView
from services.dhcp.v4.leases import CONFLICT_LOCAL_WON, LOCAL_WON, Lease, LeaseStore
from tests.support.sync import inline, ok

T0 = 1_700_000_000.0
SERVER_IDS = {"a": IPv4Address("10.9.0.1"), "b": IPv4Address("10.9.0.2")}


def pair_config(node: str, *, pool=("10.9.0.10", "10.9.0.19"), mclt_s=30, lease_time_s=600,
                mode="split-scope", split=50, delay_s=2, failover=True, **subnet):
    role = "primary" if node == "a" else "secondary"
    sub = {"id": 1, "subnet": "10.9.0.0/24", "pool": list(pool), "lease_time_s": lease_time_s}
    sub.update(subnet)
    data = {"listen_address": str(SERVER_IDS[node]), "subnets": [sub]}
    if failover:
        data["failover"] = {"peer": "b" if node == "a" else "a", "role": role, "mode": mode,
                            "split": split, "delay_s": delay_s, "mclt_s": mclt_s}
    problems = Problems("t.toml")
    cfg = parse_dhcp4(Table(data, "services.dhcp4", problems),
                      ParseContext("t.toml", node, ("b" if node == "a" else "a",), ()))
    errors = [p for p in problems.items if getattr(p, "level", "error") == "error"]
    assert not errors, problems.items
    return cfg


class Node:
    """One server: store, lease store, handler and failover view on ``clock``
    (``skew_s`` is added to its wall clock)."""

    def __init__(self, name: str, clock: Clock, cfg, *, state_dir: str | None = None,
                 skew_s: float = 0.0):
        self.name, self.clock, self.cfg, self.skew_s = name, clock, cfg, skew_s
        self.state_dir = state_dir or tempfile.mkdtemp(prefix=f"dhcp4pair-{name}-",
                                                       dir=_tmp_root())
        self.alive = False
        self.start()

    def now(self) -> float:
        return self.clock.seconds() + self.skew_s

    def start(self, state: str = P.NORMAL):
        self.store = EmbeddedStore(self.clock, state_dir=self.state_dir, fsync="never",
                                   run_in_thread=inline, turn_batching=False)
        self.store.startService()
        self.leases = LeaseStore(self.store, self.cfg, self.name, self.now, immediate_writes=True)
        ok(self.leases.load())
        f = self.cfg.failover
        self.view = FailoverView(mode=f.mode, role=f.role, split=f.split, delay_s=f.delay_s,
                                 mclt_s=f.mclt_s, state=state,
                                 hold=state not in (P.NORMAL, P.PARTNER_DOWN)) if f else FailoverView()
        self.handler = Dhcp4Handler(self.cfg, self.leases, SERVER_IDS[self.name], now=self.now,
                                    failover=self.view)
        # the outbox: addresses owed to the partner, newest record each (memory)
        self.outbox: dict[str, Lease] = {}
        for address in self.leases.unsynced:
            self.outbox[address] = ok(self.leases.get(address))
        self.leases.on_unsynced = lambda lease: self.outbox.__setitem__(lease.address, lease)
        self.alive = True
        self.cluster_state = state
        self.catching_up = False             # NORMAL waits for the partner's update-done
        self.catching_from = state
        self.without_data = False            # recovering after losing the store
        self.partner_without_data = False
        self.with_data_notice = False        # "with_data" owed to the partner
        self.stored: list[Lease] = []        # of the last apply (see apply)

    def crash(self, wipe: bool = False):
        """kill -9: memory gone (the store commits each write at once here, so
        what was acknowledged to anybody is on disk); ``wipe``: the disk too."""
        self.alive = False
        self.outbox = {}
        self.with_data_notice = False         # queued in memory: gone with it
        try:
            ok(self.store.stopService())
        except Exception:
            pass
        if wipe:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    #: the caught-up barrier (update-request / update-done): NORMAL serves only
    #: after the partner's owed records arrived (False: the old behaviour)
    barrier = True

    def set_state(self, state: str, *, confirmed: bool = False):
        """The cluster's partner state ``state``, as the service's ``_partner_state``
        takes it: NORMAL entered from another state waits behind the caught-up
        barrier (COMMUNICATIONS-INTERRUPTED rules meanwhile, or still on hold when
        we did not serve) until :meth:`caught_up`."""
        prev, self.cluster_state = self.cluster_state, state
        if state == P.NORMAL and prev != P.NORMAL and self.barrier:
            if not self.catching_up:
                self.catching_from = self.view.state
            self.catching_up = True
            self._set_view(P.COMM_INTERRUPTED, confirmed=False)
            return
        self.catching_up = False
        self._set_view(state, confirmed=confirmed)

    def caught_up(self):
        """The partner's update-done: everything it owed us is applied."""
        if not self.catching_up:
            return
        self.catching_up = False
        if self.catching_from == P.PARTNER_DOWN:
            self.partner_without_data = False
        self._set_view(P.NORMAL)

    def _set_view(self, state: str, *, confirmed: bool = False):
        v = self.view
        if state == P.NORMAL and v.state == P.PARTNER_DOWN:
            self.partner_without_data = False
        if state in (P.NORMAL, P.PARTNER_DOWN) and self.without_data:
            self.without_data = False
            self.with_data_notice = True       # to the partner, after what is queued
        if state == P.PARTNER_DOWN and v.state != P.PARTNER_DOWN:   # as the service does
            v.stale_partner_down = v.hold
        elif state != P.PARTNER_DOWN:
            v.stale_partner_down = False
        self.leases.own_is_foreign = v.stale_partner_down
        if state in (P.NORMAL, P.PARTNER_DOWN):
            v.hold = False
        elif state in (P.RECOVER, P.RECOVER_DONE, "RECOVER-WAIT", P.STARTUP):
            v.hold = True
        if state == P.PARTNER_DOWN and v.state != P.PARTNER_DOWN:
            v.partner_down_since = self.now()
            v.partner_down_confirmed = confirmed
        elif state != P.PARTNER_DOWN:
            v.partner_down_since, v.partner_down_confirmed = None, False
        v.state = state
        self.leases.partner_down_since = v.partner_down_since if v.partner_down_confirmed else None
        was_down = not self.leases.trust_acks
        self.leases.trust_acks = state != P.PARTNER_DOWN and not self.partner_without_data
        if was_down and self.leases.trust_acks:        # as the service: ask again
            for address in self.leases.unsynced:
                self.outbox[address] = ok(self.leases.get(address))

    def handle(self, pkt: C.DHCPPacket):
        """The reply (``C.DHCPPacket``) or None."""
        if not self.alive:
            return None
        result = ok(self.handler.handle(C.parse(C.encode(pkt))))
        return None if result is None else result[0]

    def with_data(self):
        """The partner's "with_data" notice: its acks count again."""
        self.partner_without_data = False
        was_down = not self.leases.trust_acks
        self.leases.trust_acks = self.view.state != P.PARTNER_DOWN
        if was_down and self.leases.trust_acks:
            for address in self.leases.unsynced:
                self.outbox[address] = ok(self.leases.get(address))

    def take_outbox(self, n: int = 32) -> list[Lease]:
        out = []
        for address in list(self.outbox)[:n]:
            out.append(self.outbox.pop(address))
        return out

    def apply(self, leases: list[Lease], without_data: bool = False) -> list[Lease]:
        """Apply a partner batch; returns our records that must go back at once
        (before the ack), as the service's ``_send_back`` does.  ``self.stored``:
        the partner's records taken (the service's ``{"stored"}`` report, sent
        after the winners): only those are marked synced at the sender."""
        back, self.stored = [], []
        for lease in leases:
            result = ok(self.leases.apply_remote(Lease.from_wire(lease.to_wire()),
                                                 without_data=without_data))
            if result in (LOCAL_WON, CONFLICT_LOCAL_WON):
                back.append(ok(self.leases.get(lease.address)))
            else:
                self.stored.append(lease)
        return back

    def acked(self, leases: list[Lease]):
        for lease in leases:
            ok(self.leases.mark_synced(lease))

    def export(self) -> list[Lease]:
        cursor, out = None, []
        while True:
            page, cursor = ok(self.leases.export(cursor))
            out += [Lease.from_wire(w) for w in page]
            if cursor is None:
                return out


class Link:
    """One direction of the update stream: batches in order, acked after apply."""

    def __init__(self, src: Node, dst: Node):
        self.src, self.dst = src, dst
        self.inflight: deque[list[Lease]] = deque()

    def pump(self, up: bool, batch: int = 32) -> int:
        """Move everything the sender owes while the link is up; returns leases delivered."""
        if not (self.src.alive and self.dst.alive):
            if not self.src.alive:
                self.inflight.clear()         # the sender's memory died with it
            return 0
        if not up:
            return 0
        n = 0
        while True:
            leases = self.src.take_outbox(batch)
            if leases:
                self.inflight.append(leases)
            if not self.inflight:
                if self.src.with_data_notice:  # after everything it sent before
                    self.src.with_data_notice = False
                    self.dst.with_data()
                return n
            sent = self.inflight.popleft()
            if self.dst.without_data:          # its notice goes before the ack
                self.src.partner_without_data = True
                self.src.leases.trust_acks = False
            back = self.dst.apply(sent, without_data=self.dst.without_data)
            for lease in sent:                 # its "held" notices, before the ack
                until = self.dst.leases.held_until(lease.address)
                if until is not None:
                    self.src.leases.hold(self.src.leases.address_int(lease.address),
                                         until + self.src.leases.skew_margin_s)
            stored = self.dst.stored
            for lease in back:                 # the receiver's winners, before its report
                self.src.apply([lease])
                self.dst.outbox.pop(lease.address, None)
                self.dst.acked(self.src.stored)
            self.src.acked(stored)             # what the receiver stored, nothing else
            n += len(sent)


class Pair:
    """Servers ``a`` (primary) and ``b`` (secondary) on one clock."""

    def __init__(self, clock: Clock | None = None, *, skew_b: float = 0.0, **cfg):
        self.clock = clock or Clock()
        if self.clock.seconds() < T0:
            self.clock.advance(T0 - self.clock.seconds())
        self.a = Node("a", self.clock, pair_config("a", **cfg))
        self.b = Node("b", self.clock, pair_config("b", **cfg), skew_s=skew_b)
        self.ab, self.ba = Link(self.a, self.b), Link(self.b, self.a)
        self.link_up = True

    @property
    def nodes(self):
        return (self.a, self.b)

    def sync(self) -> int:
        """Deliver every owed update both ways (while the link is up), then
        answer the update-requests of nodes catching up (the partner sends
        every record it has not had acknowledged, then update-done)."""
        n = 0
        while True:
            m = self.ab.pump(self.link_up) + self.ba.pump(self.link_up)
            n += m
            if not m:
                break
        if not (self.link_up and self.a.alive and self.b.alive):
            return n
        for me, peer, link in ((self.a, self.b, self.ba), (self.b, self.a, self.ab)):
            if me.catching_up:
                for address in peer.leases.unsynced:      # the update-request
                    peer.outbox[address] = ok(peer.leases.get(address))
                n += link.pump(True)
                me.caught_up()                            # its update-done
        return n

    def close(self):
        for node in self.nodes:
            if node.alive:
                node.crash()
            shutil.rmtree(node.state_dir, ignore_errors=True)


def _tmp_root() -> str | None:
    import os
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


# -- client packets -------------------------------------------------------------------
def mac(i: int) -> bytes:
    return (0x525400000000 + i).to_bytes(6, "big")


def discover(hw: bytes, secs: int = 0) -> C.DHCPPacket:
    return C.DHCPPacket(op=1, chaddr=hw, secs=secs, options={C.OPT_MESSAGE_TYPE: bytes([C.DISCOVER])})


def request(hw: bytes, *, requested=None, server=None, ciaddr=None, secs: int = 0) -> C.DHCPPacket:
    opts = {C.OPT_MESSAGE_TYPE: bytes([C.REQUEST])}
    if requested is not None:
        opts[C.OPT_REQUESTED_IP] = IPv4Address(requested).packed
    if server is not None:
        opts[C.OPT_SERVER_ID] = IPv4Address(server).packed
    kw = {"ciaddr": IPv4Address(ciaddr)} if ciaddr is not None else {}
    return C.DHCPPacket(op=1, chaddr=hw, secs=secs, options=opts, **kw)


def release(hw: bytes, address, server) -> C.DHCPPacket:
    return C.DHCPPacket(op=1, chaddr=hw, ciaddr=IPv4Address(address),
                        options={C.OPT_MESSAGE_TYPE: bytes([C.RELEASE]),
                                 C.OPT_SERVER_ID: IPv4Address(server).packed})


def lease_time(reply: C.DHCPPacket) -> int:
    return int.from_bytes(reply.options[C.OPT_LEASE_TIME], "big")


def dora(node: Node, hw: bytes, secs: int = 0):
    """DISCOVER/OFFER/REQUEST/ACK with one server: ``(address, lease time)`` or None."""
    offer = node.handle(discover(hw, secs))
    if offer is None or offer.message_type != C.OFFER:
        return None
    ack = node.handle(request(hw, requested=offer.yiaddr, server=SERVER_IDS[node.name], secs=secs))
    if ack is None or ack.message_type != C.ACK:
        return None
    return str(ack.yiaddr), lease_time(ack)


def macs_of(role: str, n: int, split: int = 50, start: int = 1) -> list[bytes]:
    """``n`` hardware addresses whose RFC 3074 hash bucket belongs to ``role``."""
    out, i = [], start
    while len(out) < n:
        hw = mac(i)
        if P.hash_owner(hw, split) == role:
            out.append(hw)
        i += 1
    return out
