"""The DHCPv6 failover pair simulator: two real dhcp6 services on the failover core
(``pair.node``: handler, the core's IA_NA and IA_PD lease stores, Dhcp6Partner on one
``task.Clock``), a population of RFC 8415 clients each with one IA_NA and one IA_PD, and
a seeded random fault schedule.

Clients: SOLICIT with Rapid Commit to the live servers in a random order until one
REPLYs; with the planned faults a SOLICIT reaches both servers as a real client's
multicast does, and both may commit (``SIM_DHCP6_BOTH_COMMIT=0`` turns that off; the core
keeps both bindings: test_rapid_commit.py), RENEW to its server at T1, REBIND to every
live server at T2, lose the lease at the end of its valid lifetime, RELEASE sometimes,
leave without a word sometimes, come back later.  Faults: the link between the servers
down (heartbeats too: a partition) for up to several MCLTs, a server killed with or
without its lease store (the disk; its state_dir marker stays) and restarted later, the
operator's partner-down while the partner is really dead.  With ``plan`` (the default;
``plan=False`` replays the schedules of the seeds found before it): each seed also gets a
planned partition, kill with the disk, kill without it and clock step (``_plan``), the
servers' wall clocks apart from true time and stepping within +-``MAX_OFFSET_S``
(``NodeClock``), and 5 % of the clients' messages or the servers' REPLYs lost.

Modes: split-scope (split 50) and, for 30 % of the seeds, hot-standby (split 75: the
standby answers nobody in NORMAL and serves from its quarter when the primary is not
heard).  Partner states follow the cluster's rules in miniature: NORMAL while the peer is heard,
COMMUNICATIONS-INTERRUPTED after ``DETECT_S`` of silence, PARTNER-DOWN only by the
operator once the peer is dead, RECOVER (sync from the peer) for a node that comes back
while its peer ran PARTNER-DOWN or without its data (then RECOVER-WAIT: the MCLT before
it serves), STARTUP (serving nobody) for one that comes back while the peer did not, then
NORMAL for both.

Invariant, checked at every REPLY a client takes: no address and no prefix is given to a
client while another client holds an unexpired one for it (the clients' own view).  The
stats count renewals that kept their address and prefix across a failover.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from twisted.internet.task import Clock

from services.dhcp.failover import pools as P
from services.dhcp.v6 import codec as C
from appliance.store.embedded import EmbeddedStore
from tests.sim.dhcp6.pair import Wire, ask, msg, node
from tests.support.sync import inline

T0 = 1_700_000_000.0
STEP_S = 0.5
DETECT_S = 0.5
PEER = {"a": "b", "b": "a"}
ROLE = {"a": "primary", "b": "secondary"}


class Violation(AssertionError):
    pass


@dataclass
class Client:
    i: int
    state: str = "off"                  # off | bound
    held: dict = field(default_factory=dict)    # "na"/"pd" -> (text, expires)
    t1: float = 0.0
    t2: float = 0.0
    server: str | None = None
    next_at: float = 0.0
    disk_lost: bool = False     # its server lost its disk since the client's last REPLY

    def holds(self, text: str, now: float) -> bool:
        return any(t == text and exp > now for t, exp in self.held.values())


class NodeClock:
    """A server's wall clock: the shared ``task.Clock`` plus ``offset`` (what
    ``reactor.seconds()`` returns there); a clock step changes the offset.  Timers are
    the shared clock's (their delays are relative, as on a real reactor)."""

    def __init__(self, base: Clock, offset: float = 0.0):
        self.base, self.offset = base, offset

    def seconds(self) -> float:
        return self.base.seconds() + self.offset

    def __getattr__(self, name):
        return getattr(self.base, name)


class World:
    #: SIM_DHCP6_LB=1: the seeds that are not hot-standby run failover mode load-balancing
    #: (only the DUID's hash owner answers a SOLICIT in NORMAL) instead of split-scope
    LB = os.environ.get("SIM_DHCP6_LB", "0") == "1"

    def __init__(self, seed: int, *, duration: float = 90.0, verbose: bool = False,
                 plan: bool = True):
        self.seed, self.duration, self.verbose = seed, duration, verbose
        r = self.r = random.Random(seed)
        self.mclt = r.choice((4, 8, 15))
        self.valid = r.choice((max(10, self.mclt), max(10, 2 * self.mclt), 20, 40))
        self.cfg = dict(mclt_s=self.mclt, valid_s=self.valid,
                        preferred_s=max(10, int(self.valid * 0.75)),
                        pool=("2001:db8:1::100", r.choice(("2001:db8:1::10b", "2001:db8:1::117"))),
                        pd_prefix=r.choice(("2001:db8:100::/52", "2001:db8:100::/53")), pd_len=56)
        r2 = random.Random(seed * 7919 + 1)        # newer draws: the other schedules stay
        if r2.random() < 0.3:
            self.cfg.update(mode="hot-standby", split=75)
        elif self.LB:
            self.cfg.update(mode="load-balancing")     # the DUID's hash owner answers
        self.clients = [Client(i, next_at=T0 + r.uniform(0, 10))
                        for i in range(1, r.randint(12, 30))]
        self.clock = Clock()
        self.clock.advance(T0)
        self.clocks = {"a": NodeClock(self.clock), "b": NodeClock(self.clock)}
        self.plan = plan
        self.planned: list[tuple[float, str]] = []
        if plan:
            self._plan(random.Random(seed * 104729 + 3))
        self.wire = Wire()
        self.path = Path(tempfile.mkdtemp(prefix="sim-dhcp6-"))
        self.nodes = {}
        self.stores = {}
        self.told: dict[str, str] = {}
        self.alive = {"a": True, "b": True}
        self.dead_until: dict[str, float] = {}
        self.silent_since: dict[str, float | None] = {"a": None, "b": None}
        self.link_until: float | None = None
        self.recovering: set[str] = set()
        self.wiped: set[str] = set()               # restarted without its disk, not in step yet
        self.recover_wait: dict[str, float] = {}   # recovered without data: serves after this
        self.incarnation = {"a": 0, "b": 0}
        self.log: list[str] = []
        self.events = 0
        self.stats = {"acquired": 0, "renewed": 0, "kept_across_failover": 0,
                      "moved_on_renewal": 0, "no_answer": 0, "partitions": 0, "kills": 0,
                      "partner_downs": 0, "recoveries": 0, "wipes": 0, "clock_steps": 0,
                      "partitions_over_mclt": 0, "lost": 0}
        for name in ("a", "b"):
            self._start(name, P.NORMAL)
        self.wire.pump()

    # -- plumbing ------------------------------------------------------------------------
    def note(self, text: str) -> None:
        self.events += 1
        if self.verbose:
            self.log.append(f"{self.clock.seconds() - T0:8.1f} {text}")

    def _start(self, name: str, state: str) -> None:
        store = self.stores.get(name)
        if store is None:                    # the lease store's disk (state_dir stays)
            store = EmbeddedStore(self.clocks[name], state_dir=self.path / name /
                                  f"store{self.incarnation[name]}", fsync="never",
                                  run_in_thread=inline, turn_batching=False)
            store.startService()
        svc = node(self.path, self.clocks[name], self.wire, name, PEER[name], ROLE[name], state,
                   store=store, **self.cfg)
        self.stores[name] = svc.context.store
        self.nodes[name] = svc
        self.told[name] = state

    def tell(self, name: str, state: str, reason: str) -> None:
        if self.told.get(name) == state or not self.alive[name]:
            return
        self.told[name] = state
        self.note(f"{name}: {state} ({reason})")
        svc = self.nodes[name]
        svc.context.cluster.confirmed = state == P.PARTNER_DOWN
        svc.context.cluster.listener(PEER[name], state, reason)

    def heard(self, name: str) -> bool:
        return self.wire.up and self.alive[PEER[name]]

    def replay(self) -> str:
        if self.plan:
            return f"python -m tests.sim.dhcp6 --seed {self.seed} --duration {self.duration:g} -v"
        return (f"python -c 'from tests.sim.dhcp6.world import World; w = World({self.seed}, "
                f"duration={self.duration:g}, plan=False, verbose=True); "
                f"print(*w.log, sep=chr(10)) if w.run() else 0'")

    def fail(self, text: str):
        tail = "".join(f"\n{line}" for line in self.log[-60:])     # -v: the events before
        raise Violation(f"seed {self.seed}: {text} (replay: {self.replay()}){tail}")

    # -- faults and the cluster ----------------------------------------------------------
    #: a clock step sets a server's offset from true time within this (so the two clocks
    #: stay within the core's MAX_SKEW_S of each other, and a step forward expires a
    #: lease no earlier than the reclaim's skew margin allows)
    MAX_OFFSET_S = 0.9

    def _plan(self, rp: random.Random) -> None:
        """The planned faults of a seed (``plan``): whatever the random schedule brings,
        each seed sees a partition, a kill -9 with its disk, one without it and a clock
        step, in a random order at random times in the first half of the run (each at the
        first step the world allows it: both servers up, in step, the link up; the random
        partitions and kills wait until the planned ones happened, and those are short
        enough to fit a short run: at most 2 MCLT and a quarter of the run); the servers'
        clocks start apart (or not) and step at random too."""
        kinds = ["partition", "kill", "kill_wipe", "step"]
        rp.shuffle(kinds)
        times = sorted(rp.uniform(3, max(4.0, 0.5 * self.duration)) for _ in kinds)
        self.planned = [(T0 + t, k) for t, k in zip(times, kinds)]
        for c in self.clocks.values():
            if rp.random() < 0.5:
                c.offset = rp.uniform(-self.MAX_OFFSET_S, self.MAX_OFFSET_S)
        self.rp = rp

    def _step_clock(self, name: str) -> None:
        c = self.clocks[name]
        old, c.offset = c.offset, self.rp.uniform(-self.MAX_OFFSET_S, self.MAX_OFFSET_S)
        self.stats["clock_steps"] += 1
        self.note(f"clock step {name} {c.offset - old:+.2f} s (offset {c.offset:+.2f})")

    def _planned(self, now: float) -> bool:
        """The next planned fault if due and the world allows it; True if one happened."""
        rp = self.rp
        for i, (at, kind) in enumerate(self.planned):
            if at > now:
                return False
            if kind == "step":
                self.planned.pop(i)
                self._step_clock(rp.choice(("a", "b")))
                return True
            if self.link_until is not None or not all(self.alive.values()) or self.recovering:
                continue
            self.planned.pop(i)
            longest = max(2.0, min(2 * self.mclt, self.duration / 4))
            if kind == "partition":
                self._partition(now, now + rp.uniform(1, longest))
            else:
                self._kill(rp.choice(("a", "b")), now + rp.uniform(2, longest),
                           wipe=kind == "kill_wipe")
            return True
        return False

    def _partition(self, now: float, until: float) -> None:
        self.link_until = until
        self.wire.cut()
        self.stats["partitions"] += 1
        if until - now > self.mclt:
            self.stats["partitions_over_mclt"] += 1
        self.note(f"partition until {self.link_until - T0:.1f}")

    def _faults(self, now: float) -> None:
        r = self.r
        if self.link_until is not None and now >= self.link_until:
            self.link_until = None
            self.wire.up = True
            self.note("link up")
        for name, until in list(self.dead_until.items()):
            if now >= until:
                del self.dead_until[name]
                self._restart(name)
        if self.plan:
            if self._planned(now):
                return
            if self.rp.random() < 0.003:
                self._step_clock(self.rp.choice(("a", "b")))
            if self.planned:
                return                        # the random faults after the planned ones
        if self.link_until is None and all(self.alive.values()) and not self.recovering \
                and r.random() < 0.02:
            self._partition(now, now + r.uniform(1, 4 * self.mclt))
        elif all(self.alive.values()) and not self.recovering and r.random() < 0.005:
            name = r.choice(("a", "b"))
            self._kill(name, now + r.uniform(2, 4 * self.mclt), wipe=r.random() < 0.3)

    def _kill(self, name: str, until: float, wipe: bool = False) -> None:
        self.stats["kills"] += 1
        self.note(f"kill {name} until {until - T0:.1f}{' and wipe its disk' if wipe else ''}")
        self.alive[name] = False
        self.dead_until[name] = until
        self.wire.dead.add(name)
        svc = self.nodes[name]
        svc.failover.outbox = None            # kill -9: nothing more leaves
        svc.stopService()
        if wipe:
            self.stats["wipes"] += 1
            self.stores.pop(name).stopService()
            self.incarnation[name] += 1
            self.wiped.add(name)
            for c in self.clients:          # what it gave them went with the disk
                if c.server == name:
                    c.disk_lost = True

    def _restart(self, name: str) -> None:
        peer = PEER[name]
        self.wire.dead.discard(name)
        self.alive[name] = True
        lost = name in self.wiped
        state = P.RECOVER if lost or self.told.get(peer) == P.PARTNER_DOWN else P.STARTUP
        self.note(f"restart {name} in {state}{' without its data' if lost else ''}")
        self._start(name, state)
        marker = self.path / name / "dhcp6.held-leases"
        if lost and marker.exists() and not self.nodes[name].failover._without_data:
            # it held leases before (its marker survives in state_dir): it must know
            self.fail(f"{name} restarted without its data but does not recover as such")
        if not lost:
            self._check_kept(name)
        if state == P.RECOVER:
            self.recovering.add(name)

    def _check_kept(self, name: str) -> None:
        """A restart that kept the disk loses no lease: every unexpired binding a client
        last got from this node is in its store, for that client."""
        now = self.clock.seconds()
        alloc = self.nodes[name].failover.allocator
        for c in self.clients:
            if c.server != name or c.state != "bound" or c.disk_lost:
                continue                    # (a binding lost with a wiped disk: the hold covers it)
            for kind, (text, exp) in c.held.items():
                if exp <= now + 1:
                    continue
                lease = alloc.get(kind, text)
                if lease is None or lease.duid != msg(C.SOLICIT, c.i).client_id.hex():
                    self.fail(f"{name} restarted with its disk without client {c.i}'s {text} "
                              f"(until {exp - T0:.1f}): {lease}")

    def _cluster(self, now: float) -> None:
        for name in ("a", "b"):
            if not self.alive[name]:
                continue
            peer = PEER[name]
            if self.heard(name):
                self.silent_since[name] = None
                if name in self.recover_wait:
                    if now >= self.recover_wait[name]:
                        del self.recover_wait[name]
                        self._recovered(name)
                elif name in self.recovering:
                    self._recover(name)
                elif self.told[name] != P.NORMAL and peer not in self.recovering:
                    self.tell(name, P.NORMAL, "peer heard")
                continue
            since = self.silent_since[name]
            if since is None:
                self.silent_since[name] = since = now
            if now - since >= DETECT_S and self.told[name] in (P.NORMAL, P.STARTUP):
                self.tell(name, P.COMM_INTERRUPTED, "peer not heard")
            if not self.alive[peer] and self.told[name] == P.COMM_INTERRUPTED \
                    and now - since >= 2 and self.r.random() < 0.05:
                self.stats["partner_downs"] += 1
                self.tell(name, P.PARTNER_DOWN, "operator partner-down")

    def _recover(self, name: str) -> None:
        """RECOVER: pull every record of the peer, then both NORMAL (the catch-up
        barrier of each does the rest)."""
        svc = self.nodes[name]
        done: list = []
        d = svc.context.cluster.sync(PEER[name])
        d.addBoth(done.append)
        for _ in range(200):
            if done:
                break
            self.wire.pump()
            self.clock.advance(0.01)
        if not done or not isinstance(done[0], int):
            return                                   # try again on the next step
        self.stats["recoveries"] += 1
        if name in self.wiped:
            # RECOVER-WAIT: what we gave before losing our data may run for the MCLT
            self.recover_wait[name] = self.clock.seconds() + self.mclt
            self.note(f"{name}: RECOVER-WAIT until {self.recover_wait[name] - T0:.1f}")
            return
        self._recovered(name)

    def _recovered(self, name: str) -> None:
        self.recovering.discard(name)
        self.wiped.discard(name)
        self.tell(name, P.RECOVER_DONE, "synced")
        self.tell(PEER[name], P.NORMAL, "peer recovered")
        self.tell(name, P.NORMAL, "peer heard")

    # -- clients ---------------------------------------------------------------------------
    #: with ``plan``: a client's message or the server's reply lost on the way (the
    #: client then holds what it has until its valid lifetime ends, unheard)
    LOSS = 0.05
    #: a rapid-commit SOLICIT reaches both partners (as a real client's multicast does) and
    #: a lost REPLY to one leaves a binding the client never heard of: both commit.  On by
    #: default (the core's merge keeps both bindings: tests/sim/dhcp6/test_rapid_commit.py);
    #: SIM_DHCP6_BOTH_COMMIT=0 turns it off
    BOTH_COMMIT = os.environ.get("SIM_DHCP6_BOTH_COMMIT", "1") == "1"

    def _ask(self, svc, m):
        if self.plan and self.rp.random() < self.LOSS:
            self.stats["lost"] += 1
            what = f"{C.MESSAGE_NAMES.get(m.msg_type, m.msg_type)} of {m.client_id.hex()[-4:]}"
            if self.rp.random() < 0.5 or (m.msg_type == C.SOLICIT and not self.BOTH_COMMIT):
                self.note(f"lost: {what} to {svc.context.node_id}")
                return None                   # the request lost
            rep = ask(svc, m)                 # the reply lost
            self.note(f"lost: {svc.context.node_id}'s reply to {what}: {rep}")
            return None
        return ask(svc, m)

    def _servers(self) -> list[str]:
        live = [n for n in ("a", "b") if self.alive[n]]
        self.r.shuffle(live)
        return live

    def _take(self, c: Client, rep, server: str, renewal: bool) -> bool:
        """The client takes a REPLY: what it gives (valid > 0) must be held by nobody else."""
        if rep is None or rep.msg_type != C.REPLY:
            return False
        now = self.clock.seconds()
        got = {}
        for kind, ias in (("na", rep.ia_na), ("pd", rep.ia_pd)):
            for ia in ias:
                for x in (ia.addresses if kind == "na" else ia.prefixes):
                    text = C.ntop(x.address) if kind == "na" else f"{C.ntop(x.prefix)}/{x.prefix_len}"
                    if x.valid > 0:
                        got[kind] = (text, now + x.valid, ia.t1, ia.t2)
                    elif c.held.get(kind, (None,))[0] == text:
                        c.held.pop(kind)
        if not got:
            return False
        for kind, (text, exp, t1, t2) in got.items():
            for other in self.clients:
                if other is not c and other.holds(text, now):
                    self.fail(f"{text} given to client {c.i} by {server} at {now - T0:.1f} "
                              f"while client {other.i} holds it until {other.held}")
            old = c.held.get(kind)
            if renewal and old is not None and old[1] > now:
                key = "kept_across_failover" if server != c.server else "renewed"
                self.stats[key if old[0] == text else "moved_on_renewal"] += 1
            c.held[kind] = (text, exp)
        if not renewal:
            self.stats["acquired"] += 1
        c.state, c.server, c.disk_lost = "bound", server, False
        valid = min(exp for _, exp in c.held.values()) - now
        c.t1, c.t2 = now + 0.5 * valid, now + 0.8 * valid
        self.note(f"client {c.i} <- {server}: {got}")
        return True

    def _client(self, c: Client, now: float) -> None:
        r = self.r
        if c.state == "bound":
            c.held = {k: v for k, v in c.held.items() if v[1] > now}
            if not c.held:
                c.state, c.next_at = "off", now + r.uniform(0, 5)
                return
        if c.state == "off":
            if now < c.next_at:
                return
            m = msg(C.SOLICIT, c.i, na=[(1, ())], pd=[(7, ())], rapid_commit=True)
            if self.plan and self.BOTH_COMMIT:    # the multicast: every live server hears it
                replies = [(s, self._ask(self.nodes[s], m)) for s in self._servers()]
                if any(self._take(c, rep, s, False) for s, rep in replies):
                    return
            else:
                for server in self._servers():
                    if self._take(c, self._ask(self.nodes[server], m), server, False):
                        return
            self.stats["no_answer"] += 1
            c.next_at = now + r.uniform(1, 4)
            return
        na = [(1, [c.held["na"][0]])] if "na" in c.held else [(1, ())]
        pd = [(7, [c.held["pd"][0]])] if "pd" in c.held else [(7, ())]
        if now >= c.t1 and now < c.t2:
            if r.random() < 0.05:                    # RELEASE (or leave silently)
                if r.random() < 0.5 and self.alive.get(c.server):
                    self._ask(self.nodes[c.server], msg(C.RELEASE, c.i, self.nodes[c.server].server_duid,
                                                  na=na, pd=pd))
                c.held, c.state, c.next_at = {}, "off", now + r.uniform(1, 20)
                return
            if self.alive.get(c.server) and c.t1 + 1 > now:
                svc = self.nodes[c.server]
                self._take(c, self._ask(svc, msg(C.RENEW, c.i, svc.server_duid, na=na, pd=pd)),
                           c.server, True)
        elif now >= c.t2:
            for server in self._servers():
                if self._take(c, self._ask(self.nodes[server], msg(C.REBIND, c.i, na=na, pd=pd)),
                              server, True):
                    break

    # -- run ---------------------------------------------------------------------------------
    def run(self) -> "World":
        try:
            end = T0 + self.duration
            while self.clock.seconds() < end:
                self.clock.advance(STEP_S)
                now = self.clock.seconds()
                self.wire.pump()
                self._faults(now)
                self._cluster(now)
                self.wire.pump()
                for c in self.clients:
                    self._client(c, now)
                self.wire.pump()
            return self
        finally:
            self.close()

    def close(self) -> None:
        for name, svc in self.nodes.items():
            if self.alive[name]:
                svc.failover.outbox = None
                svc.stopService()
        for store in self.stores.values():
            store.stopService()
        shutil.rmtree(self.path, ignore_errors=True)
