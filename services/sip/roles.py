"""Who serves which AOR: shards, cluster resources, owners and backups.

Unsharded (``shards = 0``): one cluster resource (``resource``, default
``sip:registrar``; a ``[[vip]]`` name makes the registrar follow that VIP).
Sharded (``shards = N``): AORs hash to shard ``crc32(aor) % N`` (stable
across nodes, versions and restarts: zlib's CRC-32 of the canonical AOR);
shard ``i`` is the cluster resource ``sip:shard<i>``.  Shard ``i`` prefers the
nodes in the order of the sorted node ids rotated by ``i`` (priorities
200, 190, ...): shards spread evenly over the nodes, each shard's next node
in that order is its backup.

Rules (:meth:`Roles.route`):

* this node owns the AOR's shard -> serve it;
* another live node owns it -> 302 to that node's SIP address (``addresses``,
  default: the node's cluster address and this node's SIP port);
* nobody owns it (the owner died and the election has not finished) ->
  ``not_owner = "redirect"``: 503 Retry-After (nobody to redirect to);
  ``"serve-if-owner-down"``: the shard's backup (the live node next in the
  shard's order) serves it as the owner would, everyone else 503.

A node never writes a binding for a shard it neither owns nor serves as the
backup of a dead owner.  Without a cluster (or with no peers) the node owns
every shard.  Resources are registered with ``preempt = false`` by default:
a node that comes back does not take its shards back before it caught up
(``cluster.promote`` moves one by hand).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

from twisted.logger import Logger

_log = Logger(namespace="services.sip.roles")


def shard_of(aor: str, shards: int) -> int:
    """The shard of a canonical AOR (0 when unsharded)."""
    if shards <= 1:
        return 0
    return zlib.crc32(aor.encode("utf-8")) % shards


def shard_priorities(nodes: list[str], shard: int) -> dict[str, int]:
    """Shard ``shard`` prefers ``sorted(nodes)`` rotated by ``shard``: 200, 190, ..."""
    order = sorted(nodes)
    n = len(order)
    return {order[(shard + k) % n]: max(1, 200 - 10 * k) for k in range(n)}


@dataclass(frozen=True)
class Route:
    action: str              # "serve" | "redirect" | "unavailable"
    shard: int
    resource: str
    owner: str | None = None
    address: str | None = None


class Roles:
    """Shard ownership of this node, fed by the cluster's role listener."""

    def __init__(self, settings, cluster, node_id: str, default_port: int,
                 peer_addresses: dict[str, str] | None = None,
                 on_change: Callable[[str, str], None] | None = None):
        self.settings = settings
        self.cluster = cluster
        self.node_id = node_id
        self.shards = settings.shards
        self.count = max(1, settings.shards)
        self.names = ([f"sip:shard{i}" for i in range(settings.shards)] if settings.shards
                      else [settings.resource])
        self.index = {name: i for i, name in enumerate(self.names)}
        self.on_change = on_change
        peers = {} if cluster is None else dict(getattr(cluster, "peers", {}) or {})
        self.alone = cluster is None or not peers
        witness = getattr(cluster, "witness_id", None)
        self.nodes = [node_id] + [p for p in peers if p != witness]
        self.owned: set[str] = set(self.names) if self.alone else set()
        self.epochs: dict[str, int] = {}
        addresses = dict(settings.addresses)
        for peer, host in (peer_addresses or {}).items():
            addresses.setdefault(peer, f"{host}:{default_port}")
        self.addresses = addresses
        self.priorities: dict[str, dict[str, int]] = {}
        for i, name in enumerate(self.names):
            if settings.shards:
                self.priorities[name] = shard_priorities(self.nodes, i)
            else:
                self.priorities[name] = dict(settings.priority) or {n: 100 for n in self.nodes}

    # -- cluster wiring ----------------------------------------------------------
    def register(self) -> None:
        if self.alone:
            return
        for name in self.names:
            existing = getattr(self.cluster, "resources", {}).get(name)
            if existing is not None:
                # a [[vip]] (or a resource another service registered first): follow its
                # owner, with its priorities
                self.cluster.add_resource(existing.spec, None, self._listener)
                priority = getattr(existing.spec, "priority", None)
                if priority:
                    self.priorities[name] = dict(priority)
            else:
                self.cluster.register_resource(
                    name, self._listener, priority=self.priorities[name],
                    preempt=self.settings.preempt, kind="sip",
                    settings={"priority": self.priorities[name], "preempt": self.settings.preempt,
                              "shards": self.shards})

    def _listener(self, resource: str, role: str, epoch: int, *rest) -> None:
        if resource not in self.index:
            return
        before = resource in self.owned
        if role == "owner":
            self.owned.add(resource)
        else:
            self.owned.discard(resource)
        self.epochs[resource] = epoch
        if before != (resource in self.owned):
            _log.info("sip: {res} {what} (epoch {epoch})", res=resource, epoch=epoch,
                      what="owned here: serving it" if role == "owner" else
                      "no longer owned here: redirecting it")
            if self.on_change is not None:
                self.on_change(resource, role)

    # -- questions -----------------------------------------------------------------
    def shard(self, aor: str) -> int:
        return shard_of(aor, self.shards)

    def resource_of(self, aor: str) -> str:
        return self.names[self.shard(aor)]

    def owns_aor(self, aor: str) -> bool:
        return self.resource_of(aor) in self.owned

    def owns_shard(self, shard: int) -> bool:
        return self.names[shard] in self.owned

    def owner(self, name: str) -> str | None:
        if name in self.owned:
            return self.node_id
        if self.alone:
            return None
        res = getattr(self.cluster, "resources", {}).get(name)
        owner = getattr(res, "owner", None)
        if owner is None or owner == self.node_id:
            return None
        peer = self.cluster.peers.get(owner)
        return owner if peer is not None and peer.alive else None

    def alive(self, node: str) -> bool:
        if node == self.node_id:
            return True
        peer = None if self.alone else self.cluster.peers.get(node)
        return peer is not None and bool(peer.alive)

    def backup(self, name: str) -> str | None:
        """The live node that takes ``name`` next: the best priority after the owner."""
        owner = self.owner(name)
        prio = self.priorities[name]
        candidates = [n for n in self.nodes if n != owner and prio.get(n, 0) > 0 and self.alive(n)]
        if not candidates:
            return None
        return max(candidates, key=lambda n: (prio.get(n, 0), n))

    def route(self, aor: str) -> Route:
        i = self.shard(aor)
        name = self.names[i]
        if name in self.owned:
            return Route("serve", i, name, self.node_id)
        owner = self.owner(name)
        if owner is not None:
            return Route("redirect", i, name, owner, self.addresses.get(owner))
        if self.settings.not_owner == "serve-if-owner-down" and self.backup(name) == self.node_id:
            return Route("serve", i, name, None)
        return Route("unavailable", i, name)

    def role(self) -> str:
        if self.alone:
            return "standalone"
        if not self.shards:
            return "owner" if self.owned else "backup"
        return f"owner of {len(self.owned)}/{self.shards} shards"
