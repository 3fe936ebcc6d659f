"""Lazy lease updates to the failover partner (every lease family): batched, acknowledged, bounded.

The server ACKs its client first and then hands the lease to
:class:`LeaseOutbox`.  Updates gather for up to ``delay_s`` (10 ms) and
leave together as one peer-link message ``{"leases": [wire, ...]}`` (at
most ``batch`` leases; a full batch leaves at once): one TLS record, one
partner journal job and one ack per batch instead of per lease.  The peer link acknowledges each message after the partner has
stored every lease in it, and resends unacknowledged messages after a
reconnect.  At most ``max_unacked`` lease updates are in flight; past that
the newest state of each address waits in ``pending`` and goes out as acks
free the window, so a slow or absent partner costs memory bounded by the
pool.  The outbox itself is not the durable copy: every record the partner
has not acknowledged is marked ``synced = false`` in the lease store, in the
same commit as the lease (``LeaseStore.unsynced``); ``on_acked`` marks it
synced, and a restart queues every unsynced record again.  A batch that
fails for any reason is queued again after ``RETRY_S``.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from appliance.cluster.peerlink import Backpressure



class LeaseOutbox:
    RETRY_S = 0.5          # after the peer link refused a batch (Backpressure)

    def __init__(self, reactor, link, peer: str, channel: str, max_unacked: int, *,
                 batch: int = 32, delay_s: float = 0.01, stats: dict[str, int] | None = None,
                 durable=None, on_acked=None, tag: str = "dhcp4"):
        self.reactor = reactor
        self._tag = tag                         # the family, for the log
        self._log = Logger(namespace=f"services.{tag.replace(':', '.')}.replication")
        self.link = link
        self.peer = peer
        self.channel = channel
        self.max_unacked = max(1, int(max_unacked))
        self.batch = max(1, int(batch))
        self.delay_s = max(0.0, float(delay_s))
        # durable(): a Deferred that fires once the leases written so far are
        # on disk here; a batch leaves only then (ACK first, then the update)
        self.durable = durable
        self.on_acked = on_acked                # called with the leases the partner acked
        self.pending: dict[str, Any] = {}      # address -> newest Lease not yet sent
        self.unacked = 0                        # lease updates sent, not acknowledged
        self.stats = stats if stats is not None else {}
        for key in ("replication_sent", "replication_failed", "replication_held"):
            self.stats.setdefault(key, 0)
        self._flush_call = None
        self._retrying = False                  # the link refused a batch: wait RETRY_S
        self._holding = False

    @property
    def backlog(self) -> int:
        """Lease updates the partner does not have yet (in flight + waiting)."""
        return self.unacked + len(self.pending)

    def add(self, lease) -> None:
        """Queue ``lease`` (replacing an unsent older state of its address)."""
        self.pending[lease.address] = lease
        if len(self.pending) >= self.batch and self.unacked < self.max_unacked \
                and not self._retrying:
            self.flush()                   # a full batch leaves now
        elif self._flush_call is None:
            self._flush_call = self.reactor.callLater(self.delay_s, self.flush)

    def flush(self) -> None:
        """Send what the window allows, in batches."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self._retrying = False
        while self.pending and self.unacked < self.max_unacked and self._flush_call is None:
            n = min(self.batch, self.max_unacked - self.unacked, len(self.pending))
            leases = []
            for address in list(self.pending)[:n]:
                leases.append(self.pending.pop(address))
            self._send(leases)
        self.stats["replication_held"] = len(self.pending)
        if self.pending and not self._holding:
            self._holding = True
            self._log.warn("{tag}: {n} lease updates to {peer} unacknowledged; holding further "
                      "ones until it catches up", tag=self._tag, n=self.unacked, peer=self.peer)
        elif not self.pending:
            self._holding = False

    def _send(self, leases: list) -> None:
        n = len(leases)
        self.unacked += n
        body = {"leases": [lease.to_wire() for lease in leases]}
        if self.durable is None:
            d = self.link.send(self.peer, self.channel, body, limit=self.max_unacked)
        else:
            d = self.durable().addCallback(
                lambda _: self.link.send(self.peer, self.channel, body, limit=self.max_unacked))

        def acked(_):
            self.unacked -= n
            self.stats["replication_sent"] += n
            if self.on_acked is not None:
                try:
                    self.on_acked(leases)
                except Exception:
                    self._log.failure("{tag}: marking acknowledged updates failed", tag=self._tag)
            if self.pending and (self._holding or len(self.pending) >= self.batch) \
                    and not self._retrying:
                self.flush()               # the window held these back (else the timer sends)

        def failed(failure):
            self.unacked -= n
            if not failure.check(Backpressure):
                self.stats["replication_failed"] += n
                self._log.warn("{tag}: {n} lease updates to {peer} not queued: {why}; retrying",
                          tag=self._tag, n=n, peer=self.peer, why=failure.getErrorMessage())
            # never dropped: queued again (a newer state of an address wins) and retried
            for lease in leases:
                self.pending.setdefault(lease.address, lease)
            self.stats["replication_held"] = len(self.pending)
            if self._flush_call is not None and self._flush_call.active():
                self._flush_call.cancel()
            self._retrying = True
            self._flush_call = self.reactor.callLater(self.RETRY_S, self.flush)

        d.addCallbacks(acked, failed)
        d.addErrback(lambda f: self._log.failure("{tag} lease outbox bug", failure=f, tag=self._tag))
