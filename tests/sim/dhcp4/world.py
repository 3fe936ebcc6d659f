"""The DHCPv4 failover pair simulator: two real servers (``pair.Pair``: the real
handler, lease store, pools and merge code on one ``task.Clock``), a population of
RFC 2131 clients and a seeded random fault schedule.

Clients: INIT (DISCOVER to every server that hears it, take the first OFFER,
REQUEST with its server id), BOUND (RENEW unicast at T1, REBIND broadcast at T2,
give up at expiry), INIT-REBOOT after a client reboot, RELEASE, DECLINE, leave
without a word, new arrivals.  Faults: loss of single client packets, delay of the
update stream, the link between the servers down for up to several MCLTs (a
partition: heartbeats too) or only the update stream down (heartbeats up), a
server killed (kill -9) with or without its disk and restarted, clock skew of the
secondary within the limit, operator partner-down while the partner is really dead.

Partner states follow the cluster FSM's rules in miniature: NORMAL while the peer
is heard, COMMUNICATIONS-INTERRUPTED after ``DETECT_S`` of silence, PARTNER-DOWN
only by the operator (confirmed) once the peer is dead, RECOVER for a node that
comes back while its peer ran PARTNER-DOWN or without its data (it pulls the peer's
records, sends what it owes, and waits the MCLT when its data was lost), and the
peer back to NORMAL after.

Invariants, checked at every ACK and after every event:

* no address is ACKed to a client while another client holds an unexpired ACK for
  it (judged from the clients' own view);
* no ACKed lease is lost across a restart that kept the disk (the restarted server
  still has every unexpired binding it ACKed);
* a renewing client keeps its address across a failover: it is never NAKed while
  its lease runs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from services.dhcp.v4 import codec as C
from services.dhcp.v4 import pools as P
from tests.sim.dhcp4.pair import (SERVER_IDS, Pair, discover, lease_time, mac, release,
                                  request)
from tests.support.sync import ok

STEP_S = 0.5
DETECT_S = 0.5


class Violation(AssertionError):
    pass


@dataclass
class Client:
    i: int
    hw: bytes
    state: str = "off"            # off | init | bound
    address: str | None = None
    expires: float = 0.0
    t1: float = 0.0
    t2: float = 0.0
    server: str | None = None
    next_at: float = 0.0
    secs: int = 0
    server_expires: float = 0.0   # the expiry in the ACKing server's clock
    unknown: bool = False
    disk_lost: bool = False       # its last ACK's server lost its disk since         # its last ACK was lost with its server's disk
    history: list = field(default_factory=list)

    def holds(self, now: float) -> bool:
        return self.state == "bound" and self.expires > now


class World:
    def __init__(self, seed: int, *, duration: float = 240.0, verbose: bool = False):
        self.seed, self.duration, self.verbose = seed, duration, verbose
        r = self.r = random.Random(seed)
        self.r2 = random.Random(seed * 7919 + 1)   # newer draws: the old schedules stay
        self.mclt = r.choice((4, 8, 15))
        self.lease = max(10, r.choice((self.mclt, 2 * self.mclt, 6 * self.mclt, 20)))
        self.mode = r.choice(("split-scope", "load-balancing", "hot-standby"))
        split = 80 if self.mode == "hot-standby" else 50
        npool = r.choice((12, 16, 24))
        self.skew = r.uniform(-1.0, 1.0) if r.random() < 0.5 else 0.0
        self.pair = Pair(mclt_s=self.mclt, lease_time_s=self.lease, mode=self.mode, split=split,
                         delay_s=2, pool=("10.9.0.10", f"10.9.0.{9 + npool}"), skew_b=self.skew)
        self.clock = self.pair.clock
        self.t0 = self.clock.seconds()
        nclients = r.randint(npool // 2, npool + 6)
        self.clients = [Client(i, mac(1000 * seed % 65536 + i)) for i in range(nclients)]
        for c in self.clients:
            c.next_at = self.t0 + r.uniform(0, 20)
            c.state = "init"
        self.log: list[str] = []
        self.events = 0
        self.link_up = True        # the update stream (peer link)
        self.hb_up = True          # heartbeats (a partition cuts both)
        self.link_down_since: float | None = None
        self.silent_since: float | None = None
        self.update_delay_until = 0.0
        self.recovering: dict[str, float] = {}      # node -> serve again at (RECOVER-WAIT)
        self.lost_disk: set[str] = set()
        self.down_until: dict[str, float] = {}
        self.pd_after: dict[str, float] = {}
        self.stats = {"acks": 0, "naks": 0, "faults": 0, "partitions": 0, "crashes": 0,
                      "wipes": 0, "partner_down": 0,
                      "naks_unknown_binding": 0}
        self._schedule_faults()

    # -- helpers -----------------------------------------------------------------
    @property
    def now(self) -> float:
        return self.clock.seconds()

    def say(self, text: str):
        self.log.append(f"{self.now - self.t0:8.1f} {text}")

    def fail(self, text: str):
        tail = "\n".join(self.log[-40:])
        raise Violation(f"seed {self.seed}: {text}\n  replay: python -m tests.sim.dhcp4 "
                        f"--seed {self.seed} --duration {self.duration:g} -v\n{tail}")

    def node(self, name):
        return self.pair.a if name == "a" else self.pair.b

    def serving(self, name) -> bool:
        n = self.node(name)
        return n.alive and n.view.state in P.SERVING_STATES

    # -- faults --------------------------------------------------------------------
    def _schedule_faults(self):
        r, t = self.r, self.t0 + 10
        self.faults = []
        while t < self.t0 + self.duration - 30:
            t += r.expovariate(1 / 25.0)
            kind = r.choice(("partition", "partition", "link", "crash", "crash_wipe",
                             "crash_pd", "delay"))
            self.faults.append((t, kind))
        self.faults.sort()

    def _fault(self, kind: str):
        r = self.r
        self.stats["faults"] += 1
        self.events += 1
        if kind in ("partition", "link"):
            if not (self.link_up and self.hb_up):
                return
            length = r.uniform(0.2, 4.0) * self.mclt
            self.link_up = False
            self.link_down_since = self.now
            if kind == "partition":
                self.hb_up = False
                self.stats["partitions"] += 1
            self.heal_at = self.now + length
            self.say(f"{kind} for {length:.1f}s")
        elif kind == "delay":
            self.update_delay_until = self.now + r.uniform(0.5, 3.0)
            self.say("update stream delayed")
        else:
            name = r.choice("ab")
            other = "b" if name == "a" else "a"
            if not self.node(name).alive or not self.node(other).alive or self.recovering:
                return
            wipe = kind == "crash_wipe"
            if wipe and (other in self.lost_disk or self.node(other).cluster_state in (
                    P.STARTUP, P.RECOVER, "RECOVER-WAIT", P.RECOVER_DONE)):
                # both stores lost before one of them synced: nobody knows the
                # leases any more (outside the draft's model: one server keeps its
                # stable storage) -- a plain kill instead
                wipe = False
            self.crash(name, wipe)
            down = r.uniform(1, 3 * self.mclt)
            if kind == "crash_pd":
                # the operator sees the node dead and declares it (confirmed)
                self.pd_after[other] = self.now + r.uniform(1, 4)
                down = max(down, 8)
            self.down_until[name] = self.now + down

    def crash(self, name: str, wipe: bool):
        n = self.node(name)
        # what this server ACKed and has not seen expire: must survive (disk kept)
        self.stats["crashes"] += 1
        if wipe:
            self.stats["wipes"] += 1
            self.lost_disk.add(name)
            # its ACKs the partner never heard of are gone with the disk: those
            # clients may lose their address (never to another client, though)
            other = self.node("b" if name == "a" else "a")
            for c in self.clients:
                if c.server == name:
                    c.disk_lost = True        # its server's record of it is gone
                if c.server == name and c.state == "bound":
                    rec = ok(other.leases.get(c.address)) if other.alive else None
                    if rec is None or rec.client_key != "hw:" + c.hw.hex(":") \
                            or rec.expires < c.expires + other.skew_s - 1e-6:
                        c.unknown = True
        n.crash(wipe=wipe)
        self.say(f"kill -9 {name}{' and wipe its disk' if wipe else ''}")

    def restart(self, name: str):
        n = self.node(name)
        other = self.node("b" if name == "a" else "a")
        n.start(state=P.STARTUP)
        n.without_data = name in self.lost_disk
        self.say(f"restart {name} ({'no data' if name in self.lost_disk else 'disk kept'})")
        if name not in self.lost_disk:
            for c in self.clients:
                if c.server != name or not c.holds(self.now) or c.disk_lost:
                    continue
                ck, until = "hw:" + c.hw.hex(":"), c.server_expires
                rec = ok(n.leases.get(c.address))
                if rec is None or rec.client_key != ck or rec.expires < until - 1e-6 \
                        or rec.state not in ("bound", "expired"):
                    self.fail(f"{name} lost the ACKed lease {c.address} of client {c.i} across "
                              f"a restart (has {rec})")
        # STARTUP until the peer is heard (state machine above)

    # -- partner states ------------------------------------------------------------
    def heard(self) -> bool:
        return self.pair.a.alive and self.pair.b.alive and self.hb_up

    def step_states(self):
        """The cluster FSM (appliance/cluster/partner.py) in miniature."""
        a, b = self.pair.a, self.pair.b
        heard = self.heard()
        if heard:
            self.silent_since = None
        elif self.silent_since is None:
            self.silent_since = self.now
        silent = not heard and self.now - self.silent_since >= DETECT_S
        for me, peer in ((a, b), (b, a)):
            if not me.alive:
                continue
            s, ps = me.cluster_state, peer.cluster_state if heard else None
            # the cluster: a relationship replicating over the peer link is not
            # NORMAL while that link is down (heartbeats up): nothing enters
            # NORMAL, and after DETECT_S it is COMMUNICATIONS-INTERRUPTED
            link_ok = self.link_up
            link_down = (heard and not self.link_up and self.link_down_since is not None
                         and self.now - self.link_down_since >= DETECT_S)

            def go(state, why, confirmed=False):
                if state == P.NORMAL and not link_ok:
                    if not link_down or s not in (P.STARTUP, P.RECOVER_DONE):
                        return
                    state, why = P.COMM_INTERRUPTED, "peer link down"
                if state == s:
                    return
                me.set_state(state, confirmed=confirmed)
                self.say(f"{me.name} -> {state} ({why})"
                         + (" [catching up]" if me.catching_up else ""))

            if link_down and s in (P.NORMAL, P.RECOVER_DONE):
                go(P.COMM_INTERRUPTED, "peer link down")
                continue
            if s == P.STARTUP:
                if heard:
                    if me.name in self.lost_disk or ps == P.PARTNER_DOWN:
                        go(P.RECOVER, "no data" if me.name in self.lost_disk else "peer PD")
                    else:
                        go(P.NORMAL, "peer heard")
                elif silent:
                    go(P.RECOVER if me.name in self.lost_disk else P.COMM_INTERRUPTED, "silent")
            elif s == P.RECOVER:
                if heard and self.link_up:
                    self.recover(me, peer)
            elif s == "RECOVER-WAIT":
                if self.now >= self.recovering.get(me.name, 0):
                    self.recovering.pop(me.name, None)
                    go(P.RECOVER_DONE, "waited MCLT")
            elif s == P.RECOVER_DONE:
                if heard and ps in (P.NORMAL, P.RECOVER_DONE, P.COMM_INTERRUPTED, P.STARTUP):
                    go(P.NORMAL, f"peer {ps}")
                elif silent:
                    go(P.COMM_INTERRUPTED, "lost after recovery")
            elif s in (P.NORMAL, P.COMM_INTERRUPTED):
                if heard:
                    if ps == P.RECOVER:
                        go(P.PARTNER_DOWN, "peer recovering")
                    elif ps == P.PARTNER_DOWN:
                        go(P.RECOVER, "peer ran PARTNER-DOWN")
                    elif s == P.COMM_INTERRUPTED:
                        go(P.NORMAL, "peer heard")
                elif silent and s == P.NORMAL:
                    go(P.COMM_INTERRUPTED, "peer silent")
            elif s == P.PARTNER_DOWN:
                if heard and ps in (P.RECOVER_DONE, P.NORMAL):
                    go(P.NORMAL, f"peer {ps}")
            at = self.pd_after.get(me.name)
            if at is not None and self.now >= at and not peer.alive \
                    and me.cluster_state in (P.COMM_INTERRUPTED, P.NORMAL):
                del self.pd_after[me.name]
                self.stats["partner_down"] += 1
                go(P.PARTNER_DOWN, "operator partner-down", confirmed=True)

    def recover(self, me, peer):
        """RECOVER: pull the peer's records (two-way: what we owe goes by the outbox)."""
        without = me.name in self.lost_disk
        if without:                    # its "without_data" notice, before the first ack
            peer.partner_without_data = True
            peer.leases.trust_acks = False
        for lease in peer.export():
            back = me.apply([lease], without_data=without)
            stored = me.stored
            until = me.leases.held_until(lease.address)
            if until is not None:              # its "held" notice, before the page's ack
                peer.leases.hold(peer.leases.address_int(lease.address),
                                 until + peer.leases.skew_margin_s)
            for mine in back:
                peer.apply([mine])
                me.acked(peer.stored)
            peer.acked(stored)
        self.pair.sync()
        self.lost_disk.discard(me.name)
        if without:
            self.recovering[me.name] = self.now + self.mclt
            me.set_state("RECOVER-WAIT")
        else:
            me.set_state(P.RECOVER_DONE)
        self.say(f"{me.name} recovered from {peer.name} -> {me.cluster_state}")

    # -- clients -------------------------------------------------------------------
    def reachable(self) -> list:
        out = [n for n in self.pair.nodes if n.alive and self.r.random() > 0.05]
        self.r.shuffle(out)
        return out

    def got_ack(self, c: Client, node, reply):
        address = str(reply.yiaddr)
        now = self.now
        for d in self.clients:
            if d is not c and d.address == address and d.holds(now):
                self.fail(f"DUPLICATE: {address} ACKed by {node.name} to client {c.i} while "
                          f"client {d.i} holds it until +{d.expires - self.t0:.1f} "
                          f"(from {d.server})")
        t = lease_time(reply)
        c.state, c.address, c.server = "bound", address, node.name
        c.expires, c.t1, c.t2 = now + t, now + t * 0.5, now + t * 0.875
        c.secs = 0
        c.unknown = False
        c.disk_lost = False
        self.stats["acks"] += 1
        # in the server's own (possibly skewed) clock, as its record says
        c.server_expires = node.now() + t
        c.history.append((now, node.name, address, c.expires))
        if self.verbose:
            self.say(f"ACK {address} to client {c.i} by {node.name} for {t}s")

    def nak(self, c: Client, node, why: str):
        self.stats["naks"] += 1
        known = None
        if c.address is not None:
            known = ok(node.leases.get(c.address))
        knew = known is not None and known.client_key == "hw:" + c.hw.hex(":") \
            and known.state == "bound"
        if c.holds(self.now) and why in ("renew", "rebind") and not knew:
            # the server never heard of this binding (the update was still on its
            # way when its server died): stability lost to the lazy update
            self.stats["naks_unknown_binding"] += 1
        elif c.holds(self.now) and why in ("renew", "rebind") and not c.unknown:
            self.fail(f"client {c.i} NAKed by {node.name} on {why} of {c.address} while its "
                      f"lease runs until +{c.expires - self.t0:.1f}")
        self.say(f"NAK {why} {c.address} client {c.i} by {node.name}")
        c.state, c.address = "init", None
        c.next_at = self.now + 1

    def step_client(self, c: Client):
        r, now = self.r, self.now
        if c.state == "bound" and c.expires <= now:
            self.say(f"client {c.i} lease on {c.address} ran out")
            c.state, c.address, c.next_at = "init", None, now + r.uniform(0, 2)
        if now < c.next_at:
            return
        if c.state == "off":
            c.state, c.next_at = "init", now
            return
        if c.state == "init":
            offers = []
            for n in self.reachable():
                reply = n.handle(discover(c.hw, c.secs))
                if reply is not None and reply.message_type == C.OFFER:
                    offers.append((n, reply))
            if not offers:
                c.secs += 4
                c.next_at = now + 2
                return
            n, offer = offers[0]
            for m in self.reachable():
                reply = m.handle(request(c.hw, requested=offer.yiaddr, server=SERVER_IDS[n.name],
                                         secs=c.secs))
                if m is n and reply is not None:
                    if reply.message_type == C.ACK:
                        self.got_ack(c, m, reply)
                        self.after_bind(c)
                        return
                    self.nak(c, m, "select")
                    return
            c.secs += 4
            c.next_at = now + 2
            return
        # bound
        if r.random() < 0.01:
            self.client_release(c)
            return
        if r.random() < 0.005:
            self.client_reboot(c)
            return
        if now >= c.t2:
            for n in self.reachable():
                reply = n.handle(request(c.hw, ciaddr=c.address, secs=30))
                if reply is None:
                    continue
                if reply.message_type == C.ACK:
                    self.got_ack(c, n, reply)
                else:
                    self.nak(c, n, "rebind")
                return
            c.next_at = now + 1
        elif now >= c.t1:
            n = self.node(c.server)
            if n.alive and r.random() > 0.05:
                reply = n.handle(request(c.hw, ciaddr=c.address))
                if reply is not None:
                    if reply.message_type == C.ACK:
                        self.got_ack(c, n, reply)
                    else:
                        self.nak(c, n, "renew")
                    return
            c.next_at = now + 1
        else:
            c.next_at = min(c.t1, c.expires)

    def after_bind(self, c: Client):
        r = self.r
        if r.random() < 0.01:            # DECLINE: the address is in use on the wire
            n = self.node(c.server)
            pkt = C.DHCPPacket(op=1, chaddr=c.hw, options={
                C.OPT_MESSAGE_TYPE: bytes([C.DECLINE]), C.OPT_REQUESTED_IP: C.IPv4Address(
                    c.address).packed if hasattr(C, "IPv4Address") else _packed(c.address),
                C.OPT_SERVER_ID: SERVER_IDS[n.name].packed})
            n.handle(pkt)
            self.say(f"client {c.i} declined {c.address}")
            c.state, c.address, c.next_at = "init", None, self.now + 5
            return
        c.next_at = c.t1

    def client_release(self, c: Client):
        n = self.node(c.server)
        if n.alive:
            n.handle(release(c.hw, c.address, SERVER_IDS[n.name]))
        self.say(f"client {c.i} released {c.address} (to {c.server})")
        c.state, c.address = ("off", None)
        c.next_at = self.now + self.r.uniform(1, 30)

    def client_reboot(self, c: Client):
        """INIT-REBOOT: REQUEST with the old address, no server id, broadcast."""
        for n in self.reachable():
            reply = n.handle(request(c.hw, requested=c.address))
            if reply is None:
                continue
            if reply.message_type == C.ACK:
                self.got_ack(c, n, reply)
            else:
                self.nak(c, n, "init-reboot")
            return
        c.next_at = self.now + 1

    # -- the loop --------------------------------------------------------------------
    def run(self) -> "World":
        try:
            end = self.t0 + self.duration
            fi = 0
            self.heal_at = None
            while self.now < end:
                while fi < len(self.faults) and self.faults[fi][0] <= self.now:
                    self._fault(self.faults[fi][1])
                    fi += 1
                if self.heal_at is not None and self.now >= self.heal_at:
                    self.link_up = self.hb_up = True
                    self.link_down_since = None
                    self.heal_at = None
                    # the peer link reconnects; its backlog may arrive after the
                    # heartbeats already say NORMAL (the caught-up barrier's case)
                    self.update_delay_until = max(self.update_delay_until,
                                                  self.now + self.r2.uniform(0, 2))
                    self.say("healed")
                for name, until in list(self.down_until.items()):
                    if self.now >= until:
                        del self.down_until[name]
                        self.restart(name)
                self.step_states()
                if self.now >= self.update_delay_until:
                    self.pair.link_up = self.link_up
                    self.pair.sync()
                for c in self.clients:
                    self.step_client(c)
                    self.events += 1
                if self.r.random() < 0.1:
                    for n in self.pair.nodes:
                        if n.alive:
                            ok(n.leases.reclaim())
                            n.leases.unlock_pending()
                self.clock.advance(STEP_S)
            return self
        finally:
            self.pair.close()


def _packed(address: str) -> bytes:
    import ipaddress
    return ipaddress.IPv4Address(address).packed
