"""Quorum and the witness.

A node may own resources (and enter automatic PARTNER-DOWN) only while it
holds a majority; a witness (``role = "witness"``) backs one node at a time.
With a Redis owner lease instead (lease_witness.py), a node owns a resource
only while it holds that resource's lease and enters PARTNER-DOWN by itself
only while it holds the quorum lease.
See :meth:`Quorum.has_quorum` for the rule and :meth:`Quorum.connected` and
:meth:`Quorum.update_vote` for the timing that keeps the two sides of a
partition from ever both holding it.
"""

from __future__ import annotations

from twisted.logger import Logger

_log = Logger(namespace="appliance.cluster")


class Quorum:
    """Reads the manager ``m`` it belongs to (peers, clock, channel, timing)."""

    def __init__(self, m):
        self.m = m
        self.vote: str | None = None             # a witness: the node it backs
        self._vote_seen = 0.0                    # ... last connected to it

    def node_peers(self):
        """Peers that are nodes (not the witness)."""
        return [p for p in self.m.peers.values() if p.id != self.m.witness_id]

    def has_quorum(self) -> bool:
        """May this node own resources (and enter PARTNER-DOWN by itself)?

        With a witness: a majority of nodes + witness, where the witness's
        vote counts only for the one node it backs and whoever that node is
        connected to, so two sides of a partition never both have it.
        Without a witness: with 3 or more nodes a majority of nodes; with two
        nodes always (as before: one owner again one heartbeat after a heal).
        A witness's vote is held ``deadline_s`` after its last beat; the
        witness moves it only ``deadline_s + 2 x interval`` after it was last
        connected to the node it backed, so the old side has let go before
        the new one can claim.
        """
        lease = getattr(self.m, "lease", None)
        if lease is not None:
            # Redis owner leases: each resource needs its own lease
            # (resources.py); owning anything needs Redis to answer.
            return lease.reachable()
        alive = {p.id for p in self.node_peers() if self.connected(p)}
        votes = 1 + len(alive)
        total = len(self.m.node_ids)
        if self.m.witness_id is not None:
            total += 1
            w = self.m.peers[self.m.witness_id]
            vote = w.heartbeat.vote if self.connected(w) else None
            if vote is not None and (vote == self.m.node_id or vote in alive):
                votes += 1
        elif total <= 2:
            return True
        return 2 * votes > total

    def allow_auto_partner_down(self) -> bool:
        """May a partner relationship enter PARTNER-DOWN automatically now?
        With a witness node: only with quorum; with Redis leases: only while
        this node holds the quorum lease (one node at a time, like the
        witness's vote); with neither: yes (the partner FSM still wants
        ``auto_partner_down_s`` > 0 or client evidence)."""
        lease = getattr(self.m, "lease", None)
        if lease is not None:
            return lease.holds_quorum()
        return self.m.witness_id is None or self.has_quorum()

    def connected(self, peer: PeerInfo) -> bool:
        """Heard, and it hears us: its last beat echoes one of ours sent less
        than ``deadline_s - beat_period`` ago.  The peer suspects us no sooner
        than ``deadline_s`` after that beat of ours *arrived*, so we stop
        counting its vote before it can count us out and take over (and a
        one-way link is no connection: the two sides of an asymmetric
        partition cannot both count each other).  The margin (1.5 beat
        periods) covers the wait for our next election."""
        hb = peer.heartbeat
        if not peer.alive or hb is None:
            return False
        if hb.echo is None:
            return True                     # a peer of an older version: no echo to judge
        echo = hb.echo.get(self.m.node_id)
        if echo is None or echo[0] != self.m.incarnation or self.m.channel is None:
            return False
        sent = self.m.channel.sent_time(echo[1])
        return (sent is not None
                and self.m.clock.seconds() - sent < self.m.deadline_s - 1.5 * self.m.beat_period)

    def update_vote(self, now: float):
        """A witness backs one node at a time.  It keeps it while connected to
        it (heard, and hearing the witness) and moves only ``deadline_s + 2 x
        interval`` after it last was: the node let go of the vote
        ``deadline_s`` after it last heard the witness, so even with a one-way
        delay below an interval the old side has given up before the new one
        hears the new vote.  The new vote goes to the connected node claiming
        the most resources (no needless move), then the smallest id."""
        current = self.m.peers.get(self.vote) if self.vote else None
        if current is not None and self.connected(current):
            self._vote_seen = now
            return
        if current is not None and now - self._vote_seen < self.m.deadline_s + 2 * self.m.interval:
            return
        live = [p for p in self.node_peers() if self.connected(p)]
        new = min(live, key=lambda p: (-len(p.heartbeat.resources), p.id)).id if live else None
        if new != self.vote:
            _log.info("witness: vote {old} -> {new}", old=self.vote or "nobody",
                      new=new or "nobody")
            self.vote = new
            self._vote_seen = now
