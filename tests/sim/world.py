"""A deterministic fault simulator for the cluster manager.

The *real* :class:`~appliance.cluster.manager.ClusterManager` of N nodes runs
on one injected monotonic clock (a ``task.Clock``: true time) with a wall
clock per node (true time + an offset the schedule steps independently), and
a simulated network: per-direction loss, delay and jitter, partitions
(symmetric and one-way) and heals.  A seeded random schedule also kills and
restarts nodes (keeping or wiping their state: store, maintenance mark and
incarnation, with a clock behind so the new incarnation is *lower*), steps wall clocks by +-1 h
and issues operator commands (promote, demote, maintenance, partner-down).

Invariants, checked after every 10 ms step of simulated time:

* ``epoch``: the highest epoch a node knows for a resource never goes
  down while it runs, and every claim it makes is above its previous claim
  (also across a restart that kept its store: the claim epoch is persisted);
* ``detector``: at the moment a node suspects a peer, nothing of that
  peer's incarnation arrived in the last ``dead_after`` intervals (no
  takeover unless dead_after intervals of beats were really lost or late; a
  delay spike above the dead time is silence to any timeout);
* ``witness`` (with ``--witness``): never two owners, at any step, whatever
  the partitions, operator promotes included (break before make: the owner
  lets go first);
* ``lease`` (with ``--lease``: Redis owner leases instead of a witness node,
  on a simulated Redis whose clock runs up to 1.5 % fast, reached over
  per-node links that lose, delay, cut, and a Redis that pauses like
  ``kill -STOP``): never two owners, at any step, no exception;
* ``heal``: once every fault is cleared, at most one owner per resource
  within one heartbeat interval (+ one beat period + 20 ms, + two store
  round trips with ``store_delay``: the winner's re-claim writes its epoch),
  and that owner holds the highest epoch any running node has seen;
* ``fencing`` (``[cluster] pre_takeover`` in 30 % of the seeds, from its own
  generator; ``fencing="on"`` always): a node takes a resource whose last
  owner is a peer it judged dead only once a fence powered that peer off
  after the last beat it heard from it.  The simulated fence device answers
  after 20-600 ms and fails a quarter of the time (no takeover, retried);
  its success kills the target (a restart comes from the schedule);
* ``live``: 8 s after the final heal (every node up, out of maintenance)
  the resource has exactly one owner;
* ``partners``: once the network is clean, every node up and nobody in
  maintenance for 5 s, every partner relationship is NORMAL (every state is
  left without operator action once its cause is gone).

A violation raises :class:`Violation` whose message ends with the one
command that replays the seed: ``python -m tests.sim --seed S --nodes N``.
Key rotation: in half the seeds (``rotation="auto"``, from its own generator)
the heartbeat key is rotated by etc/README's three steps, one node after the
other with random gaps, under the same faults (a node down at its turn gets
the files and reads them at its next start); ``rotation="unsafe"`` switches
the signing key without the first step and must break the detector
invariant.  A third of the seeds run with ``preempt_delay_s`` (0.3-3 s, also
from its own generator), a quarter with ``deadline_slack_ms`` 0-2 ms (its
own generator: the deadline only dead_after intervals + up to 2 ms after
the last arrival, as the bench's appliance-as-keepalived-254 row).  Not simulated (reported as missing): the TLS peer
link.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

import appliance.cluster.manager as manager_mod
from appliance.cluster import partner as P
from appliance.cluster.manager import ClusterManager
from appliance.config import ClusterSection, Peer, VIPSection
from tests.support.sync import MemStore

KEY = b"k" * 32
IDS = ("a", "b", "c")
PRIORITY = {"a": 200, "b": 150, "c": 100}
INTERVAL_MS = 100
DEAD_AFTER = 3
STEP = 0.01


class Violation(AssertionError):
    pass


@dataclass
class Link:
    loss: float = 0.0
    delay: float = 0.0005
    jitter: float = 0.0
    cut: bool = False


@dataclass
class _Entry:
    value: str
    expires: float           # Redis time


class SimRedis:
    """A Redis with the three lease commands, on its own clock (true time x
    ``rate``; ``rate`` > 1: its TTLs run out early, the unsafe direction),
    reached over one link per node (requests and replies each take the link's
    delay, each may be lost, a cut link loses all).  ``paused`` (kill -STOP):
    requests wait and run at ``resume`` in arrival order."""

    def __init__(self, clock: Clock, rng: random.Random, ids, rate: float = 1.0):
        self.clock, self.rng, self.rate = clock, rng, rate
        self.data: dict[str, _Entry] = {}
        self.links = {n: Link() for n in ids}
        self.paused = False
        self.queue: list = []

    def now(self) -> float:
        return self.clock.seconds() * self.rate

    def _get(self, key):
        e = self.data.get(key)
        if e is not None and self.now() >= e.expires:
            del self.data[key]
            return None
        return e

    def holder(self, key):
        e = self._get(key)
        return e.value if e else None

    def _run(self, op, key, args):
        e = self._get(key)
        if op == "acquire":
            value, ttl_ms = args
            if e is not None:
                return False
            self.data[key] = _Entry(value, self.now() + ttl_ms / 1000)
            return True
        if op == "renew":
            old, new, ttl_ms = args
            if e is None or e.value != old:
                return False
            self.data[key] = _Entry(new, self.now() + ttl_ms / 1000)
            return True
        if op == "release":
            if e is None or e.value != args[0]:
                return False
            del self.data[key]
            return True
        raise ValueError(op)

    def call(self, client: "SimLeaseClient", op, key, *args):
        d = Deferred()
        link = self.links[client.node]
        if link.cut or (link.loss and self.rng.random() < link.loss):
            return d                      # never answered: the caller's timeout
        delay = link.delay + (self.rng.random() * link.jitter if link.jitter else 0.0)
        self.clock.callLater(delay, self._arrive, client, op, key, args, d)
        return d

    def _arrive(self, client, op, key, args, d):
        if self.paused:
            self.queue.append((client, op, key, args, d))
            return
        result = self._run(op, key, args)
        link = self.links[client.node]
        if link.cut or (link.loss and self.rng.random() < link.loss):
            return
        delay = link.delay + (self.rng.random() * link.jitter if link.jitter else 0.0)
        self.clock.callLater(delay, client.answer, d, result)

    def resume(self):
        self.paused = False
        queue, self.queue = self.queue, []
        for item in queue:
            self._arrive(*item)

    def clean(self) -> bool:
        return not self.paused and all(not l.cut and not l.loss and l.delay < 0.002
                                       for l in self.links.values())

    def heal(self):
        for link in self.links.values():
            link.loss, link.delay, link.jitter, link.cut = 0.0, 0.0005, 0.0, False
        if self.paused:
            self.resume()


class SimLeaseClient:
    """One node's store as the manager sees it: its own epochs (MemStore) and
    the shared SimRedis's lease commands.  After a kill nothing answers."""

    def __init__(self, store: MemStore, redis: SimRedis, node: str):
        self.store, self.redis, self.node = store, redis, node
        self.dead = False
        self.healthy = True

    def get(self, key):
        return self.store.get(key)

    def set(self, key, value):
        return self.store.set(key, value)

    def cas(self, key, expected, new):
        return self.store.cas(key, expected, new)

    def lease_acquire(self, key, value, ttl_ms):
        return Deferred() if self.dead else self.redis.call(self, "acquire", key, value, ttl_ms)

    def lease_renew(self, key, old, new, ttl_ms):
        return Deferred() if self.dead else self.redis.call(self, "renew", key, old, new, ttl_ms)

    def lease_release(self, key, value):
        return Deferred() if self.dead else self.redis.call(self, "release", key, value)

    def answer(self, d, result):
        if not self.dead:
            d.callback(result)


class SlowStore:
    """A node's store answering after a random delay (a disk or a Redis round
    trip, up to ``max_delay``; World(store_delay=)): claims are in flight
    while beats arrive.  The delays come from their own generator, so the
    fault schedule of a seed stays the same."""

    def __init__(self, store: MemStore, clock: Clock, rng: random.Random, max_delay: float):
        self.store, self.clock, self.rng, self.max_delay = store, clock, rng, max_delay

    @property
    def healthy(self):
        return self.store.healthy

    def describe(self):
        return self.store.describe()   # node-local: claims may use reserved epochs

    def _later(self, d):
        out = Deferred()
        d.addCallback(lambda v: self.clock.callLater(self.rng.uniform(0, self.max_delay),
                                                     out.callback, v))
        return out

    def get(self, key):
        return self._later(self.store.get(key))

    def set(self, key, value):
        return self._later(self.store.set(key, value))

    def cas(self, key, expected, new):
        return self._later(self.store.cas(key, expected, new))


class SimNet:
    def __init__(self, clock: Clock, rng: random.Random, ids, incarnation_of=lambda n: 0):
        self.clock, self.rng = clock, rng
        self.incarnation_of = incarnation_of
        self.ports: dict[str, object] = {}
        self.links = {(s, d): Link() for s in ids for d in ids if s != d}
        self.addr = {n: f"10.0.0.{i + 1}" for i, n in enumerate(ids)}
        self.addr2 = {n: f"10.0.1.{i + 1}" for i, n in enumerate(ids)}   # a second path
        self.node_of = {a: n for n, a in self.addr.items()}
        self.node_of.update({a: n for n, a in self.addr2.items()})
        self.cut_paths: set[int] = set()         # path 0 (10.0.0.x) / 1 (10.0.1.x) down
        self.npaths = 1                          # paths configured (World(paths=))
        self.last_sent_delivered: dict[tuple, tuple] = {}   # (send time, send order)
        self.last_arrival: dict[tuple, float] = {}
        self.copies: dict[tuple, dict] = {}       # recent datagrams per link (path copies)

    def send(self, src: str, data: bytes, dst_addr: str):
        dst = self.node_of.get(dst_addr)
        link = self.links.get((src, dst))
        path = 1 if dst_addr == self.addr2.get(dst) else 0
        if path in self.cut_paths:
            return
        if link is None or link.cut or (link.loss and self.rng.random() < link.loss):
            return
        delay = link.delay + (self.rng.random() * link.jitter if link.jitter else 0.0)
        # the send order, not the send time: an extra beat can leave at the same
        # instant as a scheduled one (and overtake it with jitter)
        self.sends = getattr(self, "sends", 0) + 1
        self.clock.callLater(delay, self._deliver, src, dst, data,
                             (self.clock.seconds(), self.sends), self.incarnation_of(src), path)

    def _deliver(self, src, dst, data, sent_at, incarnation, path=0):
        proto = self.ports.get(dst)
        if proto is None:
            return
        key = (src, dst, incarnation)
        seen = self.copies.setdefault(key, {})
        copy = data in seen
        seen[data] = True
        if len(seen) > 64:
            del seen[next(iter(seen))]
        if sent_at >= self.last_sent_delivered.get(key, (-1e9, 0)) and not copy:
            # A beat overtaken by a newer one (a delay that shrank at a heal)
            # is refused as old by the receiver, and the copy of a beat that
            # came first by the other path is no news: no evidence of liveness.
            self.last_arrival[key] = self.clock.seconds()
        self.last_sent_delivered[key] = max(self.last_sent_delivered.get(key, (-1e9, 0)), sent_at)
        proto.datagramReceived(data, ((self.addr2 if path else self.addr)[src], 8741))

    def clean(self) -> bool:
        return len(self.cut_paths) < self.npaths and all(
            not l.cut and not l.loss and l.jitter == 0 and l.delay < 0.002
            for l in self.links.values())

    def heal(self):
        self.cut_paths.clear()
        for link in self.links.values():
            link.loss, link.delay, link.jitter, link.cut = 0.0, 0.0005, 0.0, False


class _Port:
    def __init__(self, net, node):
        self.net, self.node = net, node

    def write(self, data, addr):
        self.net.send(self.node, data, addr[0])

    def stopListening(self):
        if self.net.ports.get(self.node) is not None:
            self.net.ports.pop(self.node, None)


class _Reactor:
    """What the manager needs of a reactor besides time: a UDP port."""

    def __init__(self, clock, net, node):
        self._clock, self._net, self._node = clock, net, node

    def seconds(self):
        return self._clock.seconds()

    def callLater(self, *a, **kw):
        return self._clock.callLater(*a, **kw)

    def listenUDP(self, port, proto, interface=""):
        self._net.ports[self._node] = proto
        return _Port(self._net, self._node)


class SimMark:
    """A node's state-dir maintenance mark (appliance.cluster.transport.MaintenanceMark)
    in memory: kept across a restart, lost with a wiped state dir."""

    def __init__(self):
        self.on = False

    def load(self) -> bool:
        return self.on

    def save(self, on: bool) -> None:
        self.on = on


@dataclass
class SimNode:
    id: str
    store: MemStore = field(default_factory=MemStore)
    mark: SimMark = field(default_factory=SimMark)
    wall_offset: float = 0.0
    manager: ClusterManager | None = None
    up: bool = False
    started_at: float = 0.0
    epochs: dict[str, int] = field(default_factory=dict)
    last_claim: dict[str, int] = field(default_factory=dict)
    last_claim_inc: dict[str, int] = field(default_factory=dict)   # incarnation of that claim
    suspected: dict[str, int] = field(default_factory=dict)
    incarnation: int = 0
    client: SimLeaseClient | None = None
    # the node's key files (auth_key_file, previous_auth_key_file): not in the
    # state dir, so kept by a wiped restart; rewritten by a key rotation
    keys: dict[str, bytes] = field(default_factory=lambda: {"cur": KEY, "prev": KEY})


class World:
    def __init__(self, seed: int, n_nodes: int = 2, preempt: bool | None = None,
                 witness: bool = False, lease: bool = False, paths: int = 1,
                 store_delay: float = 0.0, rotation: str | None = "auto",
                 fencing: str | None = "auto", slack: str | None = "auto"):
        assert not (witness and lease), "a witness node or Redis leases, not both"
        self.seed, self.n, self.witness, self.lease = seed, n_nodes, witness, lease
        self.paths = paths            # 2: every node also has a 10.0.1.x heartbeat address
        self.store_delay = store_delay  # > 0: each store answer after up to this many s
        self.store_rng = random.Random(seed * 6151 + 5)
        # Heartbeat key rotation (etc/README's three steps, one node after the
        # other) from its own generator, so the fault schedule of a seed stays
        # the same: "auto" = in half the seeds, "safe" = always, "unsafe" = the
        # signing key switched without the other nodes accepting it first (the
        # detector invariant must catch that), None = never.
        self.key_rng = random.Random(seed * 3571 + 7)
        self.rotation = rotation
        # preempt_delay_s in a third of the seeds (its own generator too)
        pd_rng = random.Random(seed * 2203 + 9)
        self.preempt_delay = pd_rng.uniform(0.3, 3.0) if pd_rng.random() < 0.33 else 0.0
        # [cluster] pre_takeover fencing (its own generator): "auto" = in 30 %
        # of the seeds, "on" = always, None = never.  The fence device powers
        # the target off (world.kill) after 20-600 ms, or fails (25 %).
        self.fence_rng = random.Random(seed * 4241 + 11)
        self.fencing = (fencing == "on" or (fencing == "auto" and self.fence_rng.random() < 0.3))
        self.fenced_at: dict[str, float] = {}      # node -> when a fence powered it off
        # [cluster] deadline_slack_ms in a quarter of the seeds (its own
        # generator): 0-2 ms instead of half a beat period (keepalived-254's
        # skew is 1.2 ms); the detector invariant must hold with it
        slack_rng = random.Random(seed * 6007 + 13)
        on = slack == "on" or (slack == "auto" and slack_rng.random() < 0.25)
        self.slack_ms = slack_rng.uniform(0.0, 2.0) if on else None
        self._slack_arg = slack or "none"
        self._fencing_arg = fencing or "none"
        self.rng = random.Random(seed)
        self.net_rng = random.Random(seed * 7919 + 1)
        self.clock = Clock()
        self.node_ids = IDS[:n_nodes]
        self.ids = self.node_ids + (("w",) if witness else ())
        self.last_op_move = -1e9      # last operator promote (informational)
        self.net = SimNet(self.clock, self.net_rng, self.ids,
                          incarnation_of=lambda n: self.nodes[n].incarnation)
        self.net.npaths = paths
        self.preempt = self.rng.random() < 0.7 if preempt is None else preempt
        self.nodes = {n: SimNode(n) for n in self.ids}
        self.redis = (SimRedis(self.clock, random.Random(seed * 104729 + 3), self.node_ids,
                               rate=1.0 + self.rng.uniform(0, 0.015)) if lease else None)
        self.fault_gen = 0
        self.clean_since = 0.0
        self.pending_checks: list[tuple[float, int, str]] = []
        self.log: list[str] = []
        self.events = 0
        self.last_op = 0.0            # last operator command (partner check waits 5 s)
        self.violations: list[str] = []
        self._next_inc = 10**6

    # -- nodes ---------------------------------------------------------------
    def _incarnation(self, node: SimNode, lower: bool) -> int:
        if lower:
            return self.rng.randint(1, 1000)        # state dir lost and clock behind
        self._next_inc += self.rng.randint(1, 10**6)
        return self._next_inc

    def start(self, nid: str, *, wipe: bool = False, lower: bool = False):
        node = self.nodes[nid]
        if wipe:
            node.store = MemStore()
            node.mark = SimMark()
            node.last_claim = {}
            node.last_claim_inc = {}
        node.epochs = {}
        node.incarnation = self._incarnation(node, lower)
        peers = tuple(Peer(p, ipaddress.ip_address(self.net.addr[p]),
                           (ipaddress.ip_address(self.net.addr2[p]),) if self.paths > 1 else ())
                      for p in self.node_ids if p != nid)
        witness = (Peer("w", ipaddress.ip_address(self.net.addr["w"]))
                   if self.witness and nid != "w" else None)
        cluster = ClusterSection(peers=peers, heartbeat_interval_ms=INTERVAL_MS,
                                 dead_after=DEAD_AFTER, auto_partner_down_s=0.0,
                                 bind_address=None, role="witness" if nid == "w" else "node",
                                 witness=witness, redis_lease=self.lease,
                                 auth_key_file="cur", previous_auth_key_file="prev",
                                 preempt_delay_s=self.preempt_delay)
        if self.slack_ms is not None:
            cluster = _with_slack(cluster, self.slack_ms)
        vip = VIPSection("vip1", ipaddress.ip_interface("10.0.0.100/24"), "eth0",
                         {n: PRIORITY[n] for n in self.node_ids}, self.preempt)
        inc = node.incarnation
        store = node.store
        if self.store_delay and not self.lease:
            store = SlowStore(node.store, self.clock, self.store_rng, self.store_delay)
        if self.lease:
            store = node.client = SimLeaseClient(node.store, self.redis, nid)
        saved = manager_mod.next_incarnation
        manager_mod.next_incarnation = lambda d: inc
        try:
            m = ClusterManager(_Reactor(self.clock, self.net, nid), node_id=nid, cluster=cluster,
                               vips=[] if nid == "w" else [vip], store=store,
                               state_dir="/nonexistent-sim",
                               key=node.keys["cur"], clock=self.clock,
                               wall=lambda node=node: self.clock.seconds() + node.wall_offset)
            m.maintenance_mark = node.mark      # kept across a restart, like the state dir
            if self.fencing and nid != "w":
                self._install_fencer(nid, m)
            if self.n == 2 and nid != "w":
                other = [p for p in self.node_ids if p != nid][0]
                m.register_partner(other, primary=(nid == "a"), sync=lambda peer: None)
            with self._key_files(node):
                m.startService()
        finally:
            manager_mod.next_incarnation = saved
        # The detector invariant is checked at the moment of each suspicion:
        # nothing of that peer's incarnation arrived in the last dead_after
        # intervals (a delay spike is silence to any timeout, and is allowed).
        orig_down = m.detector.on_down

        def on_down(peer, now, nid=nid, orig_down=orig_down):
            last = self.net.last_arrival.get((peer.id, nid, peer.incarnation), -1e9)
            dead_s = DEAD_AFTER * INTERVAL_MS / 1000
            if now - last < dead_s - 1e-6:
                self.violations.append(
                    f"{nid} suspected {peer.id} although a beat of it arrived "
                    f"{(now - last) * 1000:.1f} ms before (dead_after = {dead_s * 1000:.0f} ms)")
            return orig_down(peer, now)
        m.detector.on_down = on_down
        node.manager, node.up, node.started_at = m, True, self.clock.seconds()
        node.suspected = {p: 0 for p in self.ids if p != nid}

    # -- fencing (pre_takeover) ---------------------------------------------------
    def _install_fencer(self, nid: str, m: ClusterManager):
        from appliance.cluster.fencing import Fencer
        m.fencer = Fencer(self.clock, nid, ["/sim/fence"], 2.0,
                          run=lambda argv, env, timeout, nid=nid: self._fence(
                              nid, env["APPLIANCE_PEER"]),
                          on_change=lambda m=m: m.changed() if m.running else None)

        held = {"owner": False}

        def owner(name, role, epoch, nid=nid, m=m, held=held):
            # The fencing invariant: a node takes a resource from a peer it
            # judged dead only once a fence powered that peer off after the
            # last beat it heard from it.  A claim by the node that already
            # owns it (an operator promote of its own resource: one epoch up)
            # takes nothing from anyone (seed 20257: b owned vip1 since a's
            # maintenance handed it over, a died later, and b's promote was
            # taken for a takeover from a, its last_claim still a's old one).
            was_owner, held["owner"] = held["owner"], role == "owner"
            if role != "owner" or name not in m.resources or was_owner:
                return
            res = m.resources[name]
            prev = res.last_claim[0] if res.last_claim is not None else None
            peer = m.peers.get(prev) if prev else None
            if peer is None or prev == nid or peer.alive:
                return
            heard = peer.last_seen if peer.last_seen is not None else -1e9
            if self.fenced_at.get(prev, -1e9) < heard:
                self.violations.append(
                    f"{nid} took {name} from {prev} (judged dead) without a fence of it since "
                    f"it last heard it at {heard:.3f} (fenced at {self.fenced_at.get(prev)})")
        m.resources["vip1"].listeners.append(owner)

    def _fence(self, by: str, target: str) -> Deferred:
        from appliance.cluster.fencing import FenceFailed
        d: Deferred = Deferred()
        delay = self.fence_rng.uniform(0.02, 0.6)
        fails = self.fence_rng.random() < 0.25

        def act():
            if fails:
                self.log.append(f"{self.clock.seconds():8.3f} fence {by} -> {target}: failed")
                d.errback(FenceFailed("sim: the fence device did not answer"))
                return
            if self.nodes[target].up:
                self.kill(target)
            self.fenced_at[target] = self.clock.seconds()
            self.events += 1
            self.log.append(f"{self.clock.seconds():8.3f} fence {by} -> {target}: powered off")
            d.callback("")
        self.clock.callLater(delay, act)
        return d

    def kill(self, nid: str):
        node = self.nodes[nid]
        if not node.up:
            return
        m = node.manager
        self.net.ports.pop(nid, None)           # kill -9: nothing more leaves or arrives
        if node.client is not None:
            node.client.dead = True             # ... not even a lease release
        m.port = None
        m.stopService()
        node.up = False

    # -- heartbeat keys ----------------------------------------------------------
    def _key_files(self, node: SimNode):
        """The manager reads its key files (load_key, previous_keys) from ``node.keys``."""
        import contextlib

        @contextlib.contextmanager
        def files():
            saved = manager_mod.load_key, manager_mod.previous_keys
            manager_mod.load_key = lambda path: node.keys[path]
            manager_mod.previous_keys = lambda cfg: (node.keys["prev"],)
            try:
                yield
            finally:
                manager_mod.load_key, manager_mod.previous_keys = saved
        return files()

    def _schedule_rotation(self, duration: float):
        rng = self.key_rng
        if self.rotation is None or (self.rotation == "auto" and rng.random() < 0.5):
            return
        old, new = KEY, bytes([rng.randrange(256) for _ in range(32)])
        if self.rotation == "unsafe":
            steps = [{"cur": new}]                        # no node accepts it first
        else:
            steps = [{"prev": new}, {"prev": old, "cur": new}, {"prev": new}]
        t = rng.uniform(1.0, max(1.0, duration - 3.0))
        for n, files in enumerate(steps):
            for nid in rng.sample(list(self.ids), len(self.ids)):
                t += rng.uniform(0.05, 1.0)
                self.clock.callLater(t - self.clock.seconds(), self._rotate, nid, n + 1, files)

    def _rotate(self, nid: str, step: int, files: dict):
        """One node's step of the rotation: write its files, then reload_keys if it runs
        (a node that is down reads them at its next start)."""
        node = self.nodes[nid]
        node.keys.update(files)
        what = f"key rotation step {step} on {nid}"
        if node.up:
            with self._key_files(node):
                node.manager.reload_keys()
        else:
            what += " (down: files only)"
        self.events += 1
        self.log.append(f"{self.clock.seconds():8.3f} {what}")

    # -- faults ----------------------------------------------------------------
    def _fault(self, what: str):
        self.fault_gen += 1
        self.events += 1
        self.log.append(f"{self.clock.seconds():8.3f} {what}")

    def _redis_event(self):
        redis = self.redis
        r = self.rng.random()
        nid = self.rng.choice(list(self.node_ids))
        link = redis.links[nid]
        if r < 0.25:
            link.cut = True
            self._fault(f"redis link of {nid} cut")
        elif r < 0.4:
            link.loss = self.rng.choice([0.1, 0.3, 0.6])
            self._fault(f"redis link of {nid} loss {link.loss:.0%}")
        elif r < 0.55:
            link.delay = self.rng.uniform(0.01, 0.4)
            link.jitter = self.rng.uniform(0, 0.05)
            self._fault(f"redis link of {nid} delay {link.delay * 1000:.0f} ms "
                        f"jitter {link.jitter * 1000:.0f} ms")
        elif r < 0.7 and not redis.paused:
            redis.paused = True
            self._fault("redis paused (kill -STOP)")
        elif r < 0.8 and redis.paused:
            redis.resume()
            self._fault("redis resumed (kill -CONT)")
        else:
            redis.heal()
            self._fault("redis healed")

    def random_event(self):
        if self.lease and self.rng.random() < 0.3:
            self._redis_event()
            return
        if self.paths > 1 and self.rng.random() < 0.25:
            path = self.rng.choice([0, 1])
            if path in self.net.cut_paths:
                self.net.cut_paths.discard(path)
                self._fault(f"heartbeat path {path} back")
            else:
                self.net.cut_paths.add(path)
                self._fault(f"heartbeat path {path} down")
            return
        r = self.rng.random()
        ids = list(self.ids)
        pair = self.rng.sample(ids, 2)
        if r < 0.18:
            p = self.rng.choice([0.05, 0.1, 0.2, 0.3])
            for link in self.net.links.values():
                link.loss = p
            self._fault(f"loss {p:.0%} everywhere")
        elif r < 0.28:
            p = self.rng.uniform(0, 0.3)
            self.net.links[tuple(pair)].loss = p
            self._fault(f"one-way loss {pair[0]}->{pair[1]} {p:.0%}")
        elif r < 0.36:
            d, j = self.rng.uniform(0, 0.15), self.rng.uniform(0, 0.05)
            for link in self.net.links.values():
                link.delay, link.jitter = d, j
            self._fault(f"delay {d * 1000:.0f} ms jitter {j * 1000:.0f} ms")
        elif r < 0.48:
            self.net.links[tuple(pair)].cut = self.net.links[tuple(reversed(pair))].cut = True
            self._fault(f"partition {pair[0]}|{pair[1]}")
        elif r < 0.52:
            self.net.links[tuple(pair)].cut = True
            self._fault(f"one-way cut {pair[0]}->{pair[1]}")
        elif r < 0.70:
            self.net.heal()
            if self.redis is not None:
                self.redis.heal()
            self._fault("heal")
            t = self.clock.seconds()
            self.pending_checks.append((t + INTERVAL_MS / 1000 + INTERVAL_MS / 3000 + 0.02
                                        + 2 * self.store_delay,
                                        self.fault_gen, "heal"))
        elif r < 0.78:
            nid = self.rng.choice(ids)
            if self.nodes[nid].up:
                self.kill(nid)
                self._fault(f"kill {nid}")
            else:
                wipe = self.rng.random() < 0.4
                lower = wipe and self.rng.random() < 0.5
                self.start(nid, wipe=wipe, lower=lower)
                self._fault(f"restart {nid}" + (" wiped" if wipe else "")
                            + (" lower-incarnation" if lower else ""))
        elif r < 0.84:
            nid = self.rng.choice(ids)
            step = self.rng.choice([-3600.0, 3600.0, -30.0, 45.0])
            self.nodes[nid].wall_offset += step
            self.events += 1
            self.log.append(f"{self.clock.seconds():8.3f} wall step {nid} {step:+g}s")
        else:
            self._operator(ids)

    def _operator(self, ids):
        nid = self.rng.choice(ids)
        node = self.nodes[nid]
        if not node.up:
            return
        m = node.manager
        r = self.rng.random()
        self.events += 1
        self.last_op = self.clock.seconds()
        try:
            if nid == "w":
                what = "nothing (witness)"
            elif r < 0.3:
                self.last_op_move = self.clock.seconds()
                d = m.promote("vip1")
                if hasattr(d, "addErrback"):
                    d.addErrback(lambda f, nid=nid: self.log.append(
                        f"{self.clock.seconds():8.3f} operator {nid}: promote failed "
                        f"({f.getErrorMessage()})"))
                what = "promote"
            elif r < 0.55:
                m.demote("vip1")
                what = "demote"
            elif r < 0.8:
                on = not m.maintenance
                m.set_maintenance(on)
                what = f"maintenance {'on' if on else 'off'}"
            else:
                peer = self.rng.choice([p for p in self.node_ids if p != nid])
                m.partner_down(peer)
                what = f"partner-down {peer}"
        except Exception as e:          # refused (ClusterError): fine
            what = f"refused ({type(e).__name__}: {e})"
        self.log.append(f"{self.clock.seconds():8.3f} operator {nid}: {what}")
        # After an operator move: one owner within one heartbeat (checked
        # like a heal).
        self.fault_gen += 1
        self.pending_checks.append((self.clock.seconds() + INTERVAL_MS / 1000
                                    + INTERVAL_MS / 3000 + 0.02
                                    + 2 * self.store_delay, self.fault_gen, "operator"))

    # -- invariants ------------------------------------------------------------
    def fail(self, what: str):
        tail = "\n".join(self.log[-25:])
        w = " --witness" if self.witness else (" --lease" if self.lease else "")
        w += " --paths 2" if self.paths > 1 else ""
        w += f" --store-delay {self.store_delay:g}" if self.store_delay else ""
        w += f" --rotation {self.rotation or 'none'}" if self.rotation != "auto" else ""
        w += f" --fencing {self._fencing_arg}" if self._fencing_arg != "auto" else ""
        w += f" --slack {self._slack_arg}" if self._slack_arg != "auto" else ""
        raise Violation(f"seed {self.seed}, {self.n} nodes{w.replace(' --', ' + ')}, "
                        f"t={self.clock.seconds():.3f}: "
                        f"{what}\n--- last events ---\n{tail}\n--- replay ---\n"
                        f"python -m tests.sim --seed {self.seed} --nodes {self.n}{w}")

    def owners(self):
        return [n for n, node in self.nodes.items()
                if n != "w" and node.up and node.manager.role("vip1") == "owner"]

    def check(self):
        now = self.clock.seconds()
        # An operator promote is break before make (the owner lets go, then
        # the promoted node claims): no exception.
        if self.witness:
            owners = self.owners()
            if len(owners) > 1:
                self.fail(f"two owners {owners} with a witness")
        if self.lease:
            owners = self.owners()
            if len(owners) > 1:
                self.fail(f"two owners {owners} with Redis leases (lease held by "
                          f"{self.redis.holder('cluster:lease:vip1')})")
        for nid, node in self.nodes.items():
            if not node.up:
                continue
            m = node.manager
            for name, res in m.resources.items():
                e = max(res.max_epoch, res.mine.epoch if res.mine else 0)
                if e < node.epochs.get(name, 0):
                    self.fail(f"epoch of {name} on {nid} went down: {node.epochs[name]} -> {e}")
                node.epochs[name] = e
                if res.mine is not None and res.mine.epoch != node.last_claim.get(name):
                    if res.mine.epoch < node.last_claim.get(name, 0):
                        self.fail(f"{nid} claimed {name} at epoch {res.mine.epoch}, below its "
                                  f"previous claim {node.last_claim[name]}")
                    node.last_claim[name] = res.mine.epoch
                    node.last_claim_inc[name] = node.incarnation
                elif res.mine is not None and node.last_claim_inc.get(name) != node.incarnation:
                    # the same epoch claimed again by a restarted node that kept its
                    # disk: an epoch used twice (a reservation not counted at restart)
                    self.fail(f"{nid} claimed {name} at epoch {res.mine.epoch} again after a "
                              f"restart with its disk")
        if self.violations:
            self.fail(self.violations[0])
        if not self.net.clean():
            self.clean_since = None
        elif self.clean_since is None:
            self.clean_since = now
        for check in [c for c in self.pending_checks if c[0] <= now]:
            self.pending_checks.remove(check)
            at, gen, kind = check
            if gen != self.fault_gen or not self.net.clean():
                continue
            if any(node.up and now - node.started_at < 1.0 for node in self.nodes.values()):
                continue
            owners = self.owners()
            if len(owners) > 1:
                self.fail(f"{len(owners)} owners {owners} one heartbeat after a heal")
            if owners:
                mine = self.nodes[owners[0]].manager.resources["vip1"]
                top = max(n.manager.resources["vip1"].max_epoch
                          for nid, n in self.nodes.items() if n.up and nid != "w")
                if mine.mine.epoch < top:
                    self.fail(f"owner {owners[0]} holds epoch {mine.mine.epoch} below the "
                              f"highest seen ({top}) after a heal")
        if (self.n == 2 and self.clean_since is not None and now - self.clean_since > 5.0
                and now - self.last_op > 5.0
                and all(node.up and now - node.started_at > 5.0 for node in self.nodes.values())
                and not any(node.manager.maintenance for node in self.nodes.values())):
            states = {nid: ps.fsm.state for nid, node in self.nodes.items()
                      for ps in node.manager.partners.values() if nid != "w"}
            if any(s != P.NORMAL for s in states.values()):
                self.fail(f"partner states {states} after 5 s of a clean network")

    # -- run ---------------------------------------------------------------------
    def run(self, duration: float = 30.0, mean_gap: float = 1.5):
        if self.preempt_delay:
            self.log.append(f"{0.0:8.3f} preempt_delay_s {self.preempt_delay:.2f}")
        if self.fencing:
            self.log.append(f"{0.0:8.3f} pre_takeover fencing on")
        if self.slack_ms is not None:
            self.log.append(f"{0.0:8.3f} deadline_slack_ms {self.slack_ms:.2f}")
        for nid in self.ids:
            self.start(nid)
        self._schedule_rotation(duration)
        next_event = self.rng.expovariate(1 / mean_gap) + 1.0
        t = 0.0
        while t < duration:
            self.clock.advance(STEP)
            t = self.clock.seconds()
            self.check()
            if t >= next_event:
                self.random_event()
                next_event = t + self.rng.expovariate(1 / mean_gap)
        # the end: heal, restart everyone, and everything must settle
        self.net.heal()
        if self.redis is not None:
            self.redis.heal()
        self._fault("final heal")
        for nid, node in self.nodes.items():
            if not node.up:
                self.start(nid)
            if node.manager.maintenance:        # (also kept across a restart)
                node.manager.set_maintenance(False)
                self.last_op = self.clock.seconds()
        self.pending_checks.append((t + 1.5, self.fault_gen, "heal"))
        for _ in range(int(8.0 / STEP)):
            self.clock.advance(STEP)
            self.check()
        # Liveness: 8 s after the final heal, every node up and out of
        # maintenance, the resource has exactly one owner (a handshake that
        # waits for the wrong peer would leave it with none).
        owners = self.owners()
        if len(owners) != 1:
            self.fail(f"{len(owners)} owners {owners} 8 s after the final heal")
        for node in self.nodes.values():
            if node.up:
                self.kill(node.id)
        return self


class _SlackSection:
    """A [cluster] section with ``deadline_slack_ms`` (while appliance/config.py's
    ClusterSection has no such field: the manager reads it with getattr)."""

    def __init__(self, section, slack_ms: float):
        self._section, self.deadline_slack_ms = section, slack_ms

    def __getattr__(self, name):
        return getattr(self._section, name)


def _with_slack(cluster, slack_ms: float):
    import dataclasses
    if "deadline_slack_ms" in {f.name for f in dataclasses.fields(cluster)}:
        return dataclasses.replace(cluster, deadline_slack_ms=slack_ms)
    return _SlackSection(cluster, slack_ms)


def run_seed(seed: int, n_nodes: int = 2, duration: float = 30.0,
             witness: bool = False, lease: bool = False) -> World:
    return World(seed, n_nodes, witness=witness, lease=lease).run(duration)
