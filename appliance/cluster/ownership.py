"""Resource ownership: a deterministic election every node computes alike.

Pure logic, no I/O.  Each node knows, from its own state and the last
heartbeat of every live peer, who claims each resource and with which
epoch.  :func:`elect` picks the rightful owner:

1. A *manual* claim (``cluster.promote``) by a live, able node wins; among
   several, the highest epoch.
2. Without ``preempt``, a live able claimant keeps the resource (the
   highest epoch if a healed partition left two claimants).
3. Otherwise the live able node with the highest priority (ties: node id).

A node that wins but does not own it claims with an epoch above every
epoch seen; a node that owns it but lost steps down.  A node that wins and
owns it but holds an epoch below one seen elsewhere (a peer claimed during
a partition and lost the contest at the heal) *re-asserts*: it claims again
at ``max_epoch + 1`` so that the owner always holds the highest epoch
(a valid fencing token) and announces itself again (GARP, DNS).  Epochs
only grow, so after a partition heals every node sees the same claims and
agrees within one heartbeat.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class ResourceSpec:
    """A resource that can be owned by one node at a time."""

    name: str
    priority: Mapping[str, int]          # node id -> priority; 0 or absent = never owns
    preempt: bool = True
    kind: str = "resource"               # "vip", or the registering service's key


@dataclass(frozen=True)
class Claim:
    owner: str
    epoch: int
    manual: bool = False


@dataclass
class View:
    """What one node knows when it decides."""

    able: set[str]                                    # live nodes able to serve (incl. self)
    claims: dict[str, Claim] = field(default_factory=dict)   # claimant -> its claim
    max_epoch: int = 0                                # highest epoch seen anywhere
    excluded: set[str] = field(default_factory=set)   # nodes that asked not to own (demote)


def elect(spec: ResourceSpec, view: View) -> str | None:
    """The node that should own ``spec`` given ``view`` (None: nobody can)."""
    live = {n: c for n, c in view.claims.items() if n in view.able and c.owner == n}
    manual = [c for c in live.values() if c.manual and c.owner not in view.excluded]
    if manual:
        return max(manual, key=lambda c: (c.epoch, spec.priority.get(c.owner, 0), c.owner)).owner
    candidates = [n for n in view.able
                  if spec.priority.get(n, 0) > 0 and n not in view.excluded]
    if not spec.preempt:
        keepers = [c for c in live.values() if c.owner in candidates]
        if keepers:
            return max(keepers, key=lambda c: (c.epoch, spec.priority.get(c.owner, 0),
                                               c.owner)).owner
    if not candidates:
        return None
    return max(candidates, key=lambda n: (spec.priority.get(n, 0), n))


@dataclass(frozen=True)
class Decision:
    action: str              # "claim", "reassert", "release" or "keep"
    winner: str | None
    epoch: int               # the epoch to claim with (for "claim")


def decide(spec: ResourceSpec, view: View, me: str, mine: Claim | None) -> Decision:
    """What node ``me`` (holding ``mine`` or nothing) should do about ``spec``."""
    claims = dict(view.claims)
    if mine is not None:
        claims[me] = mine
    winner = elect(spec, View(view.able, claims, view.max_epoch, view.excluded))
    if winner == me and mine is None:
        return Decision("claim", winner, max(view.max_epoch, 0) + 1)
    if winner != me and mine is not None:
        return Decision("release", winner, mine.epoch)
    if winner == me and mine is not None and view.max_epoch > mine.epoch:
        # Won a contest against a newer claim: take it again above it.
        return Decision("reassert", winner, view.max_epoch + 1)
    return Decision("keep", winner, mine.epoch if mine else 0)
