"""Resource ownership: the election loop over the pure ``ownership.decide``,
epoch persistence (compare-and-set in a shared store), claim and release,
VIP side effects and listener fan-out.

Epoch reservation (a node-local store only): a claim's epoch must be durable
before the resource is taken, so that a restart never claims an epoch it used
before.  With the embedded (node-local) store that was an fsync and two
thread hops on the takeover's path.  A standby therefore keeps the next epoch
it could claim, ``max_epoch + 1``, durably *reserved* in advance
(``cluster:epoch-reserved:<name>``, written in the background whenever a
higher epoch is learned); a claim at or below the reservation is taken at
once, its epoch recorded afterwards.  After a restart the reservation is read
like a claimed epoch, so every later claim is above it: the same guarantee.
A shared store (Redis) arbitrates claims by compare-and-set, so there every
claim still waits for its write.

The table reads the world through the manager it belongs to (``m``): the
peer table, local health, the store and the VIP manager, the start hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger

from appliance.cluster.heartbeat import Heartbeat, config_digest
from appliance.cluster.ownership import Claim, ResourceSpec, View, decide

_log = Logger(namespace="appliance.cluster")


@dataclass
class Resource:
    spec: ResourceSpec
    settings: dict[str, Any]
    listeners: list[Callable] = field(default_factory=list)
    mine: Claim | None = None
    owner: str | None = None
    epoch: int = 0
    max_epoch: int = 0
    claiming: bool = False
    contested: bool = False      # another live node claims it while we own it
    vip_failures: int = 0        # consecutive failed VIP adds
    vip_error: str | None = None
    digest: Any = None           # (settings, config_digest(settings)) cache
    changed_at: float = 0.0
    reason: str = ""
    intent_seq: int = 0          # our beat that first carried claiming:<name>
    wanted: bool = False         # an operator promote waits for the owner to let go
    promote_waiters: list = field(default_factory=list)
    promote_timer: Any = None
    #: the highest-epoch claim a peer's heartbeat carried, (owner, epoch): what a
    #: node gaining the resource knows of the owner before it (ClusterManager.previous_claim)
    last_claim: tuple[str, int] | None = None
    #: epoch reservation (node-local store): the highest epoch durably reserved,
    #: the one being written (0: none), and when a failed write may be retried
    reserved: int = 0
    reserving: int = 0
    reserve_retry_at: float = 0.0
    #: with a witness: the node whose claim intent this node backs (backs:<name>=)
    backing: str | None = None


def call_listener(listener, *args):
    try:
        result = listener(*args)
        if isinstance(result, defer.Deferred):
            result.addErrback(lambda f: _log.failure("role listener failed", failure=f))
    except Exception:
        _log.failure("role listener {listener!r} failed", listener=listener)


class ResourceTable:
    def __init__(self, m):
        self.m = m
        self.resources: dict[str, Resource] = {}
        self.excluded: set[str] = set()         # resources this node was demoted from
        self.no_quorum = False
        # preempt_delay_s: "settling" until then (see _settle)
        self.settle_until = 0.0
        self._was_able = False
        self._local_store: bool | None = None      # epochs_local(), computed once
        self.stats = {"fast_claims": 0, "reservations": 0, "reservation_failures": 0}

    # -- registration ------------------------------------------------------------
    def add(self, spec: ResourceSpec, settings: dict | None, listener: Callable | None):
        res = self.resources.get(spec.name)
        if res is None:
            res = self.resources[spec.name] = Resource(spec, settings or {})
        if listener is not None:
            res.listeners.append(listener)
            if res.mine is not None:
                self.m.clock.callLater(0, call_listener, listener, spec.name, "owner",
                                       res.mine.epoch)
        return res

    def digest(self, res: Resource):
        """``config_digest`` of the settings, cached (fixed once the node runs)."""
        if res.digest is None or res.digest[0] is not res.settings or not self.m.running:
            res.digest = (res.settings, config_digest(res.settings))
        return res.digest[1]

    def digest_of(self, name: str):
        res = self.resources.get(name)
        return None if res is None else self.digest(res)

    def load_epochs(self, store):
        @defer.inlineCallbacks
        def load():
            for name, res in self.resources.items():
                for key in (f"cluster:epoch:{name}", f"cluster:epoch-reserved:{name}"):
                    value = yield store.get(key)
                    if value is not None:
                        # a reservation may have been claimed without its own write
                        res.max_epoch = max(res.max_epoch, int(value))
            for res in self.resources.values():
                self.reserve(res)
        return load()

    # -- epoch reservation (node-local store) ------------------------------------------
    def epochs_local(self) -> bool:
        """The store keeps this node's epochs only (the embedded store), so a
        reservation may stand in for a claim's own write; never with a shared
        store (Redis: the compare-and-set arbitrates) or a Redis lease witness."""
        if self._local_store is None:
            store, local = self.m.store, False
            if store is not None and self.m.lease is None:
                try:
                    local = store.describe().get("backend") == "memory"
                except Exception:
                    local = False          # a store that cannot say: the safe path
            self._local_store = local
        return self._local_store

    def reserve(self, res: Resource) -> None:
        """Make ``max_epoch + 1`` durably reserved (in the background)."""
        if not self.epochs_local() or res.reserving:
            return
        want = res.max_epoch + 1
        now = self.m.clock.seconds()
        if want <= res.reserved or now < res.reserve_retry_at:
            return
        res.reserving = want
        name = res.spec.name

        def done(_):
            res.reserving = 0
            res.reserved = max(res.reserved, want)
            self.stats["reservations"] += 1
            self.reserve(res)                  # a higher epoch learned meanwhile

        def failed(f):
            res.reserving = 0
            res.reserve_retry_at = self.m.clock.seconds() + 1.0
            self.stats["reservation_failures"] += 1
            _log.warn("epoch reservation of {res} ({epoch}) not written ({why}); its next "
                      "claim waits for its own write", res=name, epoch=want,
                      why=f.getErrorMessage())

        store = self.m.store
        d = defer.maybeDeferred(lambda: store.set(f"cluster:epoch-reserved:{name}", str(want)))
        d.addCallbacks(done, failed)
        d.addErrback(lambda f: _log.failure("epoch reservation bookkeeping failed", failure=f))

    def learn(self, hb: Heartbeat):
        """Epochs a peer claims or knows: ours never lag behind."""
        for name, (owner, epoch, _) in hb.resources.items():
            res = self.resources.get(name)
            if res is not None and epoch > res.max_epoch:
                res.max_epoch = epoch
            if res is not None and (res.last_claim is None or epoch >= res.last_claim[1]):
                res.last_claim = (owner, epoch)
        for name, epoch in hb.max_epochs.items():
            res = self.resources.get(name)
            if res is not None and epoch > res.max_epoch:
                res.max_epoch = epoch

    # -- the election ---------------------------------------------------------------
    def _able_nodes(self, quorum: bool) -> set[str]:
        able = {p.id for p in self.m.node_peers() if p.able}
        if quorum and self.m.health.able():
            able.add(self.m.node_id)
        return able

    def evaluate(self) -> None:
        m = self.m
        if m.is_witness:
            return
        quorum = m.has_quorum()
        if not quorum and not self.no_quorum:
            _log.warn("node {node} lost quorum: giving up and claiming nothing until it is back",
                      node=m.node_id)
        elif quorum and self.no_quorum:
            _log.info("node {node} has quorum again", node=m.node_id)
        self.no_quorum = not quorum
        able = self._able_nodes(quorum)
        alive = {p.id for p in m.node_peers() if p.alive} | ({m.node_id} if quorum else set())
        holding = m.clock.seconds() < m.hold_until
        flags = m.health.flags_set
        fencer = getattr(m, "fencer", None)
        if fencer is not None:
            for p in m.node_peers():
                if p.alive:
                    fencer.alive(p.id)        # heard again: its next death needs a new fence
        self._settle(m.health.able(), flags)
        for name in self.resources:
            # A demote stands aside on the wire too (demoted:<name>): the
            # peers elect without this node and the one taking over claims
            # manually, so the preempting natural owner does not take it back.
            flag = f"demoted:{name}"
            if (name in self.excluded) != (flag in flags):
                if name in self.excluded:
                    flags.add(flag)
                else:
                    flags.discard(flag)
                m.send_soon()                 # the taker waits for it
        for name, res in self.resources.items():
            self.reserve(res)                 # the next claim's epoch, durable in advance
            claims = {}
            for peer in m.node_peers():
                hb = peer.heartbeat
                if peer.alive and hb is not None and name in hb.resources:
                    owner, epoch, manual = hb.resources[name]
                    if owner == peer.id:
                        claims[peer.id] = Claim(owner, epoch, manual)
            excluded = self._excluded(name, res, able, claims)
            usable = able
            if not any(res.spec.priority.get(n, 0) > 0 for n in able):
                # Nobody healthy can serve it: better a degraded owner than none.
                usable = alive
            view = View(usable, claims, res.max_epoch, excluded)
            d = decide(res.spec, view, m.node_id, res.mine)
            owner = m.node_id if res.mine else max(
                claims.values(), key=lambda c: c.epoch, default=Claim("", 0)).owner or None
            res.owner = owner
            if d.action != "claim" or holding or claims:
                self._drop_intent(name)
            if m.witness_id is not None:
                self._advertise_backing(name, res, d.winner, claims)
            if d.action == "claim" and not holding and not res.claiming:
                if claims or (res.wanted and self._owned_elsewhere(name)) or any(
                        p.alive and p.heartbeat is not None
                        and f"releasing:{name}" in p.heartbeat.health for p in m.node_peers()):
                    # Break before make: a live node still holds it and
                    # computes the same election, so it lets go within a beat;
                    # claim once it has (never two owners for a preemption,
                    # and a one-way link cannot keep two owners forever).
                    continue
                if fencer is not None and not self._fence_cleared(res, fencer):
                    continue                  # pre_takeover: fence the dead owner first
                if m.witness_id is not None and not self._intent_acked(res):
                    continue
                handed = [p.id for p in m.node_peers() if p.alive and p.heartbeat is not None
                          and f"demoted:{name}" in p.heartbeat.health]
                if res.wanted:
                    self.claim(res, d.epoch, why="operator promote", manual=True)
                elif handed:
                    self.claim(res, d.epoch, manual=True,
                               why=f"operator demote on {','.join(handed)}")
                else:
                    self.claim(res, d.epoch, why=self._why(claims))
            elif d.action == "reassert" and not res.claiming:
                # Won a contest against a newer claim (a healed partition under
                # preempt): claim again above it, so listeners hear the new
                # epoch and the VIP is announced again.
                self.claim(res, d.epoch, manual=res.mine.manual,
                           why="re-asserted after a contest (" + self._why(claims) + ")")
            elif (d.action in ("keep", "reassert") and res.mine is not None
                  and m.lease is not None and not m.lease.holds(name)):
                # Redis lease witness: no lease, no ownership.
                self.set_mine(res, None, "its Redis owner lease is not held")
            elif d.action == "keep" and res.mine is not None:
                contested = any(c.owner != m.node_id for c in claims.values())
                if contested and not res.contested:
                    # Someone else announces it too: announce again
                    # (keepalived garp_lower_prio_repeat).
                    self._reannounce(res, "contest: " + self._why(claims))
                res.contested = contested
            elif d.action == "release":
                self.set_mine(res, None, f"{d.winner or 'nobody'} should own it "
                                         f"({self._why(claims)})")
                res.owner = d.winner if d.winner in claims else None
            if name in self.excluded and res.owner not in (None, m.node_id):
                self.excluded.discard(name)    # demote done: someone else took it

    def _fence_cleared(self, res: Resource, fencer) -> bool:
        """``[cluster] pre_takeover``: a resource whose last known owner is a
        peer judged dead is claimed only once that peer is fenced (the
        command exited 0); the fencer starts or retries the command."""
        m = self.m
        prev = res.last_claim[0] if res.last_claim is not None else None
        peer = m.peers.get(prev) if prev else None
        if peer is None or prev == m.node_id or peer.alive:
            return True
        return fencer.cleared(prev, res.spec.name)

    # -- claim intents (with a witness) ------------------------------------------------
    # Two connected nodes whose views differ for a moment (both leave
    # maintenance at once, a heal) can each see the other's last beat without
    # a claim and claim together.  With a witness a claim therefore waits for
    # a handshake: this node advertises ``claiming:<resource>`` and claims
    # only once every connected node peer's latest beat echoes that beat (it
    # has seen the intent and run its election since) and carries neither a
    # claim nor an intent that outranks ours (static rank: priority, then id).
    # A dead owner's survivor has no one to wait for: no delay.
    def _rank(self, res: Resource, node: str):
        return (res.spec.priority.get(node, 0), node)

    # The echo alone is not enough when connectivity is not transitive: with
    # b|c cut and a connected to both, a demote of the owner a let b and c
    # each see the other dead, each advertise an intent, each get a's echo
    # and both claim (simulator seeds 30534 ... --witness, 3 nodes).  So a
    # node that sees intents also says which one it backs
    # (``backs:<name>=<node>``), and an intent counts as acknowledged only by
    # a beat that backs it.  A node backs: the holder of the resource while
    # one is visible (a preemption goes through the holder's own release);
    # else the intent it backed before, as long as that node still advertises
    # it (a promise: never two intents backed in turn while the first one's
    # claim is on the way); else the intent its own election prefers.  Once
    # it judges the backed node dead, that node has stopped counting it as
    # connected (``Quorum.connected``) and lost quorum: the same timing as
    # a takeover from a dead owner.
    def _advertise_backing(self, name: str, res: Resource, winner: str | None,
                           claims: dict) -> None:
        m = self.m
        flags = m.health.flags_set
        intent = f"claiming:{name}"
        intenders = {p.id for p in m.node_peers()
                     if p.alive and p.heartbeat is not None and intent in p.heartbeat.health}
        if intent in flags:
            intenders.add(m.node_id)
        backed = None
        if intenders:
            holders = dict(claims)
            if res.mine is not None:
                holders[m.node_id] = res.mine
            if holders:
                backed = max(holders.values(), key=lambda c: (c.epoch, c.owner)).owner
            elif res.backing in intenders:
                backed = res.backing
            elif winner in intenders:
                backed = winner
            else:
                backed = max(intenders, key=lambda n: self._rank(res, n))
        res.backing = backed
        prefix = f"backs:{name}="
        want = None if backed is None else prefix + backed
        stale = [f for f in flags if f.startswith(prefix) and f != want]
        if stale or (want is not None and want not in flags):
            for f in stale:
                flags.discard(f)
            if want is not None:
                flags.add(want)
            m.send_soon()

    def backing_of(self, name: str, hb: Heartbeat) -> str | None:
        """The node whose intent on ``name`` the beat ``hb`` backs (None: no
        backing flag, a peer of an older version or one that saw no intent)."""
        prefix = f"backs:{name}="
        for flag in hb.health:
            if flag.startswith(prefix) and flag[len(prefix):] in self.m.node_ids:
                return flag[len(prefix):]
        return None

    def _intent_acked(self, res: Resource) -> bool:
        m = self.m
        name = res.spec.name
        flag = f"claiming:{name}"
        flags = m.health.flags_set
        # (a peer of an older version sends no echo: it cannot ack, nobody waits for it)
        waiting = [p for p in m.node_peers() if m.connected(p) and p.heartbeat.echo is not None]
        # Any live peer's intent counts, connected or not: once we echoed it,
        # it may claim at any moment and its claim may still be on the way
        # (a slow, lossy link makes it "not connected" here while it hears
        # our echoes: simulator seed 21924 --witness).  An intent that
        # outranks ours goes first; during our promote any intent waits for
        # the peer to see our want: and drop it (or for its claim, then its
        # release).
        for p in m.node_peers():
            if (p.alive and p.heartbeat is not None and flag in p.heartbeat.health
                    and (res.wanted or self._rank(res, p.id) > self._rank(res, m.node_id))):
                self._drop_intent(name)       # it goes first
                return False
        if not waiting:
            return True
        if flag not in flags:
            flags.add(flag)
            m.send_soon()                     # the intent goes out now ...
            res.intent_seq = m.seq + 1        # ... in the next beat, whichever it is
            return False
        for p in waiting:
            echo = (p.heartbeat.echo or {}).get(m.node_id)
            if echo is None or echo[0] != m.incarnation or echo[1] < res.intent_seq:
                return False
            backs = self.backing_of(name, p.heartbeat)
            if backs is not None and backs != m.node_id:
                return False              # it backs another node's intent or claim
        return True

    # -- operator promote: break before make --------------------------------------------
    def promote(self, res: Resource):
        """Take ``res`` as a manual claim once its owner let go: advertise
        ``want:<name>`` (the owner's election then hands it over), claim when no
        live node claims it any more (or the owner died), fail after
        ``2 x deadline + lease TTL + 1 s``.  Never two owners, also if the
        network fails meanwhile (the old make-before-break promote had two for
        up to ``dead_after`` intervals)."""
        m = self.m
        name = res.spec.name
        if res.mine is not None:
            # Ours already (automatic): the same claim made manual, one epoch up.
            epoch = max(res.max_epoch, res.mine.epoch) + 1
            return self.claim(res, epoch, why="operator promote", manual=True).addCallback(
                self._promoted, res, epoch)
        d = defer.Deferred()
        res.promote_waiters.append(d)
        if not res.wanted:
            res.wanted = True
            m.health.flags_set.add(f"want:{name}")
            lease = m.lease.ttl_s if m.lease is not None else 0.0
            res.promote_timer = m.clock.callLater(2 * m.deadline_s + lease + 1.0,
                                                  self._promote_timed_out, res)
            _log.info("resource {res}: operator promote on {node}: waiting for the owner to "
                      "let go", res=name, node=m.node_id)
            m.changed()
        return d

    def _promoted(self, ok, res: Resource, epoch: int):
        if not ok or res.mine is None:
            from appliance.cluster.errors import ClusterError
            raise ClusterError(f"claim of {res.spec.name} at epoch {epoch} was not taken (a "
                               "higher epoch in the shared store, or the store failed); see "
                               "the log", code=-32024)
        return {"resource": res.spec.name, "owner": self.m.node_id, "epoch": res.mine.epoch}

    def _owned_elsewhere(self, name: str) -> bool:
        """A live node still claims ``name`` (the promote waits for it)."""
        for p in self.m.node_peers():
            hb = p.heartbeat
            if p.alive and hb is not None and hb.resources.get(name, ("",))[0] == p.id:
                return True
        return False

    def _end_promote(self, res: Resource, error=None):
        if not res.wanted:
            return
        res.wanted = False
        self.m.health.flags_set.discard(f"want:{res.spec.name}")
        if res.promote_timer is not None and res.promote_timer.active():
            res.promote_timer.cancel()
        res.promote_timer = None
        waiters, res.promote_waiters = res.promote_waiters, []
        for d in waiters:
            if error is None:
                d.callback({"resource": res.spec.name, "owner": self.m.node_id,
                            "epoch": res.mine.epoch})
            else:
                d.errback(error)

    def _promote_timed_out(self, res: Resource):
        from appliance.cluster.errors import ClusterError
        res.promote_timer = None
        owners = [p.id for p in self.m.node_peers() if p.alive and p.heartbeat is not None
                  and p.heartbeat.resources.get(res.spec.name, ("",))[0] == p.id]
        _log.warn("resource {res}: operator promote on {node} gave up: {owner} did not let go",
                  res=res.spec.name, node=self.m.node_id, owner=",".join(owners) or "nobody")
        self._end_promote(res, ClusterError(
            f"promote of {res.spec.name} not done: "
            + (f"{', '.join(owners)} still owns it (does it hear this node?)" if owners
               else "this node could not claim it (lease, store or health)")
            + "; nothing changed", code=-32024))
        self.m.changed()

    def _drop_intent(self, name: str):
        flags = self.m.health.flags_set
        flag = f"claiming:{name}"
        if flag in flags:
            flags.discard(flag)

    # -- preempt delay (keepalived's preempt_delay) -------------------------------------
    # For ``preempt_delay_s`` after this node starts or becomes able again
    # (maintenance off, interface up, service back, quorum back) it advertises
    # ``settling``; every node's election then leaves a settling node out of a
    # resource that another able node holds (no preemption yet), but not out
    # of one nobody holds (a dead owner is replaced at once) nor of one the
    # operator promotes.  A flapping node stops moving the VIP back and forth.
    def start_settling(self) -> None:
        """At start, before the first beat: the peers must see ``settling``
        in it, or they would hand over at once."""
        self._settle(self.m.health.able(), self.m.health.flags_set, quiet=True)

    def _settle(self, able_here: bool, flags: set[str], quiet: bool = False) -> None:
        m = self.m
        delay = m.preempt_delay_s
        if delay <= 0 or m.is_witness:
            return
        now = m.clock.seconds()
        if able_here and not self._was_able:
            self.settle_until = max(now, m.hold_until) + delay
        self._was_able = able_here
        settling = able_here and now < self.settle_until
        if settling != ("settling" in flags):
            if settling:
                flags.add("settling")
                _log.info("node {node} settles for {s:g} s before preempting (preempt_delay_s)",
                          node=m.node_id, s=round(self.settle_until - now, 3))
            else:
                flags.discard("settling")
                _log.info("node {node} settled: it may preempt again", node=m.node_id)
            if not quiet:
                m.send_soon()

    def _settling(self, name: str, res: Resource, able: set[str], claims: dict,
                  excluded: set[str]) -> set[str]:
        """Settling nodes that stand aside for ``name``: every one that does not
        hold it, while an able node that is not excluded holds it."""
        m = self.m
        holders = {n for n in claims if n in able and n not in excluded}
        if res.mine is not None and m.node_id in able and m.node_id not in excluded:
            holders.add(m.node_id)
        if not holders:
            return set()
        settling = {p.id for p in m.node_peers() if p.alive and p.heartbeat is not None
                    and "settling" in p.heartbeat.health}
        if "settling" in m.health.flags_set:
            settling.add(m.node_id)
        return settling - holders

    def _excluded(self, name: str, res: Resource, able: set[str],
                  claims: dict | None = None) -> set[str]:
        """Nodes that must not own ``name`` now: this node after a demote or
        while its VIP cannot be added (if someone else can take it); a peer
        that flags ``unable:<name>`` or does not have the resource at all; a
        settling node (preempt_delay_s) while an able node holds it."""
        m = self.m
        excluded = set()
        # An operator promote in progress (want:<name>, here or on a live
        # peer): every node but the top-ranked one that wants it stands aside.
        wanters = {p.id for p in m.node_peers()
                   if p.alive and p.heartbeat is not None and f"want:{name}" in p.heartbeat.health}
        if res.wanted:
            wanters.add(m.node_id)
        if wanters:
            top = max(wanters, key=lambda n: self._rank(res, n))
            excluded |= {n for n in m.node_ids if n != top}
        # Demoted nodes (here, or demoted:<name> on a live peer) stand aside
        # only for a candidate that is not demoted: when every node was
        # demoted (a demote of a node that did not own it, then of the other)
        # the resource still gets an owner (simulator seed 70485 --witness).
        demoted = {p.id for p in m.node_peers() if p.alive and p.heartbeat is not None
                   and f"demoted:{name}" in p.heartbeat.health}
        if name in self.excluded:
            demoted.add(m.node_id)
        if demoted and any(n not in demoted and n not in excluded
                           and res.spec.priority.get(n, 0) > 0 for n in able):
            excluded |= demoted
        unable = set()
        for peer in m.node_peers():
            hb = peer.heartbeat
            if peer.alive and hb is not None:
                if name not in hb.config:
                    excluded.add(peer.id)
                elif f"unable:{name}" in hb.health:
                    unable.add(peer.id)
        if name in m.health.unable or name in m.health.service_unable():   # M6
            unable.add(m.node_id)
        # Unable nodes stand aside only for an able candidate; when every
        # candidate is unable (both VIP adds failed, the service failed on
        # both) nobody does, so every node elects the same degraded owner.
        candidates = [n for n in able if n not in excluded and res.spec.priority.get(n, 0) > 0]
        if any(n not in unable for n in candidates):
            excluded |= unable
        if not wanters and claims is not None:
            excluded |= self._settling(name, res, able, claims, excluded)
        return excluded

    def _why(self, claims: dict) -> str:
        peers = self.m.peers.values()
        dead = [p.id for p in peers if not p.alive]
        unable = [p.id for p in peers if p.alive and not p.able]
        parts = []
        if dead:
            parts.append("dead: " + ",".join(dead))
        if unable:
            parts.append("unable: " + ",".join(unable))
        if claims:
            parts.append("claims: " + ",".join(f"{c.owner}@{c.epoch}" for c in claims.values()))
        return "; ".join(parts) or "election"

    # -- claims ---------------------------------------------------------------------
    def claim(self, res: Resource, epoch: int, why: str, manual: bool = False):
        res.claiming = True
        lease = self.m.lease
        if lease is None and epoch <= res.reserved and self.epochs_local():
            # Reserved in advance: durable already, taken at once (no fsync on the
            # takeover's path); the claimed epoch itself is recorded afterwards.
            self.stats["fast_claims"] += 1
            d = defer.succeed(True)
            recorded = self._persist_epoch(res.spec.name, epoch)
            recorded.addErrback(lambda f: _log.warn(
                "claimed epoch {epoch} of {res} not recorded ({why}); its reservation "
                "stands for it", epoch=epoch, res=res.spec.name, why=f.getErrorMessage()))
        elif lease is None:
            d = self._persist_epoch(res.spec.name, epoch)
        else:
            # Redis lease witness: the lease first (nobody else holds it), then
            # the epoch; owned only if the lease is still ours at the end.
            def leased(ok):
                if not ok:
                    _log.debug("claim of {res}: its Redis lease is held elsewhere (or Redis "
                               "does not answer)", res=res.spec.name)
                    return False
                return self._persist_epoch(res.spec.name, epoch)
            d = lease.acquire(res.spec.name, epoch).addCallback(leased)

        def claimed(ok):
            res.claiming = False
            if ok and lease is not None and not lease.holds(res.spec.name):
                ok = False
            stale = self._stale_claim(res, epoch)
            if ok and stale:
                # Learned while the claim was in flight (the store's answer
                # came after a peer's beat): the claim is no longer right.
                # Drop it and elect again with what we know now.
                _log.info("claim of {res} at epoch {epoch} dropped: {why}", res=res.spec.name,
                          epoch=epoch, why=stale)
                if lease is not None and res.mine is None:
                    lease.release(res.spec.name)
                self.m.clock.callLater(0, self.m.evaluate)
                return False
            if not ok and lease is not None and res.mine is None:
                lease.release(res.spec.name)
            if not ok:
                _log.info("claim of {res} at epoch {epoch} lost a race in the shared store",
                          res=res.spec.name, epoch=epoch)
                return False
            res.max_epoch = max(res.max_epoch, epoch)
            self.set_mine(res, Claim(self.m.node_id, epoch, manual), why)
            self.reserve(res)
            self._drop_intent(res.spec.name)
            if manual and res.wanted:
                self._end_promote(res)
                self.m.clock.callLater(0, self.m.changed)     # want:<name> is gone
            return True

        def failed(f):
            res.claiming = False
            _log.error("claim of {res} not persisted ({why}); not taking it",
                       res=res.spec.name, why=f.getErrorMessage())
            return False

        d.addCallbacks(claimed, failed)
        d.addErrback(lambda f: _log.failure("claim bookkeeping failed", failure=f))
        return d

    def _stale_claim(self, res: Resource, epoch: int) -> str | None:
        """Why a claim at ``epoch`` that just came back from the store must not
        be taken, or None: a live peer claims the resource at ``epoch`` or
        above, or announced a higher epoch, since the claim was made."""
        m = self.m
        name = res.spec.name
        for peer in m.node_peers():
            hb = peer.heartbeat
            if peer.alive and hb is not None:
                owner, their, _ = hb.resources.get(name, ("", 0, False))
                if owner == peer.id and their >= epoch:
                    return f"{peer.id} claims it at epoch {their}"
        if res.max_epoch > epoch:
            return f"epoch {res.max_epoch} is known now"
        return None

    def _persist_epoch(self, name: str, epoch: int):
        """Store the epoch; with a shared store, only if nobody wrote a higher one."""
        store = self.m.store
        if store is None:
            return defer.succeed(True)
        key = f"cluster:epoch:{name}"

        @defer.inlineCallbacks
        def go():
            for _ in range(5):
                current = yield store.get(key)
                if current is not None and int(current) >= epoch:
                    self.resources[name].max_epoch = max(self.resources[name].max_epoch,
                                                         int(current))
                    return False
                ok = yield store.cas(key, current, str(epoch))
                if ok:
                    return True
            return False
        return go()

    def set_mine(self, res: Resource, claim: Claim | None, why: str):
        m = self.m
        before = res.mine
        res.mine = claim
        if (before is None) == (claim is None) and before == claim:
            return
        if claim is None and m.lease is not None:
            m.lease.release(res.spec.name)
        res.changed_at, res.reason = m.clock.seconds(), why
        if (before is None) != (claim is None):
            m.stats["role_changes"] += 1
        role = "owner" if claim is not None else "standby"
        epoch = claim.epoch if claim is not None else before.epoch
        res.epoch = epoch
        vips = m.vip_manager
        if res.spec.kind == "vip" and vips is not None:
            # The address first: its netlink job starts in the VIP manager's
            # thread while this turn logs and tells the listeners and peers
            # (the log line used to come first, on the takeover's path).
            action = vips.acquire if claim is not None else vips.release
            d = defer.maybeDeferred(action, res.spec.name, why)
            if claim is not None:
                d.addCallback(self._vip_result, res)
            else:
                self._releasing(res, d)
            d.addErrback(lambda f: _log.error("vip {res}: {why}", res=res.spec.name,
                                              why=f.getErrorMessage()))
        _log.info("resource {res}: {node} is now {role} (epoch {epoch}): {why}", res=res.spec.name,
                  node=m.node_id, role=role, epoch=epoch, why=why)
        for listener in list(res.listeners):
            call_listener(listener, res.spec.name, role, epoch)
        m.send_soon()           # a claim or a release: the peers wait for it

    def _releasing(self, res: Resource, d):
        """Until the address is really gone, advertise ``releasing:<name>``: a
        peer waits for it before it claims (break before make also on the
        wire: no moment with the VIP on two boxes).  Bounded by the liveness
        deadline, in case the removal hangs."""
        m = self.m
        flag = f"releasing:{res.spec.name}"
        m.health.flags_set.add(flag)
        timer = m.clock.callLater(m.deadline_s, lambda: done(None))

        def done(_):
            if timer.active():
                timer.cancel()
            if flag in m.health.flags_set:
                m.health.flags_set.discard(flag)
                m.send_soon()                     # tell the peers now
            return _
        d.addBoth(done)

    def release_all(self, why: str):
        for res in self.resources.values():
            if res.mine is not None:
                self.set_mine(res, None, why)
        if self.m.lease is not None:
            self.m.lease.release_all()      # the quorum lease too: nobody waits its TTL

    # -- VIP side effects --------------------------------------------------------------
    def _reannounce(self, res: Resource, why: str):
        vips = self.m.vip_manager
        if res.spec.kind != "vip" or vips is None:
            return
        self.m.stats["reannounced"] += 1
        d = defer.maybeDeferred(vips.acquire, res.spec.name, why)
        d.addErrback(lambda f: _log.error("vip {res}: {why}", res=res.spec.name,
                                          why=f.getErrorMessage()))

    def _vip_result(self, ok, res: Resource):
        m = self.m
        name = res.spec.name
        if ok is False and res.mine is not None:
            res.vip_failures += 1
            backoff = min(2.0 ** (res.vip_failures - 1), 60.0)
            m.health.unable[name] = m.clock.seconds() + backoff
            res.vip_error = f"add failed {res.vip_failures}x; retry in {backoff:g}s"
            _log.error("vip {res}: address could not be added ({n} failures); flagged "
                       "unable:{res} so a peer can take it; retry in {backoff:g}s",
                       res=name, n=res.vip_failures, backoff=backoff)
            m.changed()
        elif ok:
            res.vip_failures = 0
            res.vip_error = None
            m.health.unable.pop(name, None)

    def retry_vips(self, names):
        vips = self.m.vip_manager
        for name in names:
            res = self.resources.get(name)
            if res is not None and res.mine is not None and vips is not None:
                # Still the owner (nobody else could take it): try again.
                d = defer.maybeDeferred(vips.acquire, name, "retry after failure")
                d.addCallback(self._vip_result, res)
                d.addErrback(lambda f: _log.failure("vip retry", failure=f))

    # -- views ----------------------------------------------------------------------
    def status(self, now: float) -> dict[str, dict]:
        return {name: {"owner": res.owner,
                       "epoch": res.mine.epoch if res.mine else res.max_epoch,
                       "role": "owner" if res.mine else "standby", "kind": res.spec.kind,
                       "manual": bool(res.mine and res.mine.manual),
                       "vip_error": res.vip_error,
                       "since_s": round(now - res.changed_at, 3) if res.changed_at else None,
                       "reason": res.reason}
                for name, res in self.resources.items()}
