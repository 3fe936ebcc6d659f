"""The Redis owner-lease witness (``[cluster.witness] redis_lease = true``).

When the store is Redis it can break ties instead of a witness node.  Keys
(in the store's namespace):

* ``cluster:lease:<resource>`` -- who may own the resource now;
* ``cluster:lease-quorum`` -- who may enter PARTNER-DOWN automatically
  (the one vote a witness node would give; every node contends for it).

Value ``<node>/<incarnation>/<epoch>`` (epoch 0 for the quorum key).  A
lease is taken with ``SET key value NX PX ttl``, renewed every beat with a
compare-and-renew Lua script (only while the key still holds our value; a
re-assert at a new epoch swaps the value the same way) and deleted with a
compare-and-delete when the node lets go (stop, demote, lost election).

Safety: at most one owner at every instant.  A node owns a resource only
while it holds the lease *by its own clock*: an answer to a command sent at
``t`` (monotonic) makes the lease ours until
``t + ttl x (1 - CLOCK_RATE_MARGIN) - guard`` (``guard`` = one beat period,
the time the VIP removal and the election need).  Redis counts the TTL from
when the command *arrived* (after ``t``), so our deadline comes first even
if our clock runs 2 % faster than Redis's.  At the deadline without a
renewal the node drops the resource (VIP removed) on its own; nobody else can
``SET NX`` before the key expires in Redis.  Redis unreachable (down,
stopped, path cut) = no lease = no ownership change for anyone else: the
current owner keeps the resource while renewals arrive and lets go at its
deadline once they stop, and the others cannot claim until Redis answers
again and the key is gone.  A node that cannot reach Redis advertises
``store_down`` so its peers do not wait for it to claim.

Not covered (as with any lease): a process frozen longer than its lease
cannot remove its VIP while frozen (the epoch, a fencing token, still guards
the store); a Redis failover to a replica that did not have the key yet, or a
wall-clock step on the Redis host (Redis expires keys by its wall clock),
may let a second node take a lease early.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

_log = Logger(namespace="appliance.cluster")

CLOCK_RATE_MARGIN = 0.02         # our clock may run this much faster than Redis's
RESOURCE_KEY = "cluster:lease:{}"
QUORUM_KEY = "cluster:lease-quorum"
QUORUM = "@quorum"               # the quorum lease's name here (not a resource name)


@dataclass
class _Lease:
    key: str
    value: str | None = None     # what we last wrote (may still be in Redis)
    valid_until: float = 0.0     # ours until then (monotonic); 0: not held
    inflight: bool = False
    op: Any = None               # the command in flight (its token)
    timer: Any = None
    queued: list = field(default_factory=list)   # (epoch, Deferred) waiting for the one in flight


class LeaseWitness:
    """Owner leases for the manager ``m`` in the lease store ``store``
    (``lease_acquire``/``lease_renew``/``lease_release``: RedisStore)."""

    def __init__(self, m, store, ttl_s: float):
        self.m = m
        self.store = store
        self.ttl_s = float(ttl_s)
        self.ttl_ms = max(1, int(round(self.ttl_s * 1000)))
        self.guard = m.beat_period
        self.leases: dict[str, _Lease] = {}
        self.reachable_until = 0.0
        self._unreachable_flagged = False
        self.stats = {"acquired": 0, "renewed": 0, "refused": 0, "expired_locally": 0,
                      "lost": 0, "released": 0, "errors": 0}

    # -- what the rest of the cluster asks ------------------------------------------
    @property
    def window(self) -> float:
        """How long an answer to a command keeps a lease ours (from its send time)."""
        return self.ttl_s * (1.0 - CLOCK_RATE_MARGIN) - self.guard

    def holds(self, name: str) -> bool:
        lease = self.leases.get(name)
        return lease is not None and self.m.clock.seconds() < lease.valid_until

    def reachable(self) -> bool:
        return self.m.clock.seconds() < self.reachable_until

    def holds_quorum(self) -> bool:
        return self.holds(QUORUM)

    def status(self) -> dict:
        now = self.m.clock.seconds()
        return {"ttl_ms": self.ttl_ms, "reachable": self.reachable(),
                "held": {name: round(lease.valid_until - now, 3)
                         for name, lease in self.leases.items() if lease.valid_until > now},
                **self.stats}

    def _lease(self, name: str) -> _Lease:
        lease = self.leases.get(name)
        if lease is None:
            key = QUORUM_KEY if name == QUORUM else RESOURCE_KEY.format(name)
            lease = self.leases[name] = _Lease(key)
        return lease

    def _value(self, epoch: int) -> str:
        return f"{self.m.node_id}/{self.m.incarnation}/{epoch}"

    # -- take, renew, release -----------------------------------------------------------
    def acquire(self, name: str, epoch: int):
        """Take (or keep, at ``epoch``) the lease of ``name``: fires True when
        it is ours now."""
        lease = self._lease(name)
        new = self._value(epoch)
        if lease.value == new and self.holds(name):
            return defer.succeed(True)
        if lease.inflight:
            # One command per key at a time (a renewal goes out every beat):
            # this one follows when the one in flight is answered.
            d = defer.Deferred()
            lease.queued.append((epoch, d))
            return d
        return self._send(name, lease, new)

    def _send(self, name: str, lease: _Lease, new: str):
        clock = self.m.clock
        sent = clock.seconds()
        old = lease.value
        token = object()
        lease.inflight, lease.op = True, token
        if old is not None:
            # ours before (or maybe: an attempt that got no answer): compare first
            d = defer.maybeDeferred(self.store.lease_renew, lease.key, old, new, self.ttl_ms)
        else:
            d = defer.maybeDeferred(self.store.lease_acquire, lease.key, new, self.ttl_ms)
            lease.value = new          # it may land even if no answer comes back
        result = defer.Deferred()
        # No answer within two beats: the next command may go (behind it on
        # the same connection); a late answer still counts if nothing newer
        # changed the value meanwhile.
        timeout = clock.callLater(max(min(2 * self.guard, self.window), 0.001),
                                  self._timed_out, name, lease, token, result)

        def answered(ok):
            now = clock.seconds()
            self.reachable_until = max(self.reachable_until, sent + self.window)
            if lease.op is not token:
                # abandoned after its timeout: only a success for the value we
                # still believe in extends (Redis holds it from after `sent`)
                if ok and lease.value == new:
                    self._extend(name, lease, sent + self.window)
                return False
            if ok:
                lease.value = new
                self.stats["acquired" if lease.valid_until <= now else "renewed"] += 1
                self._extend(name, lease, sent + self.window)
            else:
                # Someone else holds it (or ours expired and the key is gone).
                lease.value = None
                self.stats["refused" if lease.valid_until <= now else "lost"] += 1
                if lease.valid_until > now:
                    _log.warn("lease {key}: no longer ours in Redis; letting go now",
                              key=lease.key)
                    self._drop(name, lease, "its lease is held by another node in Redis")
            return bool(ok)

        def failed(f):
            self.stats["errors"] += 1
            _log.debug("lease {key}: {why}", key=lease.key, why=f.getErrorMessage())
            return False

        def done(ok):
            if timeout.active():
                timeout.cancel()
            if not result.called:
                result.callback(ok if clock.seconds() < sent + self.window else False)
            self._flag()
            if lease.op is token:
                self._next(name, lease)
            return None

        d.addCallbacks(answered, failed)
        d.addBoth(done)
        d.addErrback(lambda f: _log.failure("lease bookkeeping", failure=f))
        return result

    def _next(self, name: str, lease: _Lease):
        """The command in flight is answered or abandoned: send what waits."""
        lease.inflight, lease.op = False, None
        queued, lease.queued = lease.queued, []
        for epoch, waiting in queued:
            self.acquire(name, epoch).chainDeferred(waiting)

    def _timed_out(self, name: str, lease: _Lease, token, result):
        if lease.op is token:
            self.stats["errors"] += 1
            self._next(name, lease)
        if not result.called:
            result.callback(False)

    def _extend(self, name: str, lease: _Lease, until: float):
        if until <= lease.valid_until or until <= self.m.clock.seconds():
            return
        lease.valid_until = until
        if lease.timer is not None and lease.timer.active():
            lease.timer.reset(max(0.0, until - self.m.clock.seconds()))
        else:
            lease.timer = self.m.clock.callLater(max(0.0, until - self.m.clock.seconds()),
                                                 self._expired, name)

    def _expired(self, name: str):
        lease = self.leases.get(name)
        if lease is None:
            return
        lease.timer = None
        if self.m.clock.seconds() < lease.valid_until:      # renewed meanwhile
            lease.timer = self.m.clock.callLater(lease.valid_until - self.m.clock.seconds(),
                                                 self._expired, name)
            return
        self.stats["expired_locally"] += 1
        self._drop(name, lease, "its lease was not renewed before its own deadline")
        self._flag()

    def _drop(self, name: str, lease: _Lease, why: str):
        lease.valid_until = 0.0
        if lease.timer is not None and lease.timer.active():
            lease.timer.cancel()
        lease.timer = None
        res = self.m.resources.get(name)
        if res is not None and res.mine is not None:
            _log.warn("resource {res}: {node} lets go: {why}", res=name, node=self.m.node_id,
                      why=why)
            self.m.table.set_mine(res, None, why)
            self.m.evaluate()

    def release(self, name: str):
        """We let go of ``name``: the lease is no longer ours at once, and the
        key is deleted if it still holds our value (best effort)."""
        lease = self.leases.get(name)
        if lease is None:
            return
        lease.valid_until = 0.0
        if lease.timer is not None and lease.timer.active():
            lease.timer.cancel()
        lease.timer = None
        value = lease.value
        if value is None:
            return
        # Forget the value now: a late answer to a renewal sent before this
        # delete must not make the lease ours again (the delete runs after it).
        lease.value = None
        d = defer.maybeDeferred(self.store.lease_release, lease.key, value)

        def done(ok):
            self.stats["released"] += 1
        d.addCallbacks(done, lambda f: _log.debug("lease {key} release: {why}", key=lease.key,
                                                  why=f.getErrorMessage()))
        d.addErrback(lambda f: _log.failure("lease release bookkeeping", failure=f))

    def release_all(self):
        for name in list(self.leases):
            self.release(name)

    # -- every beat ------------------------------------------------------------------
    def tick(self, now: float):
        """Renew what we hold (one command in flight per key), contend for the
        quorum lease (which doubles as the reachability probe)."""
        if not self.m.running or self.m.is_witness:
            return
        for name, lease in list(self.leases.items()):
            if name == QUORUM or lease.valid_until <= now or lease.inflight:
                continue
            res = self.m.resources.get(name)
            if res is not None and (res.mine is not None or res.claiming):
                self._send(name, lease, lease.value)
            else:
                self.release(name)          # held but not owned: let the others have it
        quorum = self._lease(QUORUM)
        if not quorum.inflight:
            want = quorum.value if quorum.valid_until > now else self._value(0)
            self._send(QUORUM, quorum, want)
        self._flag()

    def _flag(self):
        """Advertise ``store_down`` while Redis does not answer (peers then
        count this node unable and take over once its lease has expired)."""
        down = not self.reachable() and self.m.clock.seconds() >= self.m.hold_until
        if down != self._unreachable_flagged:
            self._unreachable_flagged = down
            flags = self.m.health.flags_set
            if down:
                flags.add("store_down")
                _log.warn("lease witness: Redis does not answer; node {node} cannot own",
                          node=self.m.node_id)
            else:
                flags.discard("store_down")
                _log.info("lease witness: Redis answers again")
            self.m.changed()


def from_manager(m, store) -> LeaseWitness | None:
    """The lease witness for ``m`` when its config asks for one."""
    cfg = m.cfg
    if cfg is None or not getattr(cfg, "redis_lease", False) or m.is_witness:
        return None
    if store is None or not hasattr(store, "lease_acquire"):
        raise ValueError("[cluster.witness] redis_lease needs the Redis store "
                         "([store] backend = \"redis\")")
    ttl_ms = getattr(cfg, "lease_ttl_ms", 0) or 0
    ttl_s = ttl_ms / 1000.0 if ttl_ms else m.deadline_s
    return LeaseWitness(m, store, ttl_s)
