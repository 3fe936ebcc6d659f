"""The EN-DN mapping table: which decapsulation node (DN) serves an EN
address or an address slice right now.

Store layout (keys without the store namespace)::

    encap:map              hash   target -> JSON {"dn", "epoch", "since", "reason"}
    encap:map:<target>     string the same JSON for a live entry, or a tombstone
                           {"dn": null, "epoch", "since", "reason": "released"}

``target`` is an EN address (``"10.200.0.5"``; a ``/32`` or ``/128`` is
written as the bare address) or a slice (``"10.200.0.64/26"``).  The hash is
the table (one ``hgetall`` loads it); the per-target string is the
compare-and-set guard and the per-target change feed: every change writes
both in ONE atomic :meth:`~appliance.store.interface.IStateStore.commit`
guarded by ``expect={"encap:map:<target>": <value read before>}`` (a Lua
script on Redis, a single step on the embedded store).  The guard key
outlives a release as a tombstone, so the epoch of a target only grows --
across releases too: ``claim`` and ``release`` both write ``epoch + 1``.

Claims.  ``claim(target, dn, reason)`` reads the guard, writes the next
epoch for ``dn`` if the guard is unchanged and fires with the entry now in
the table.  Two DNs claiming at once on a shared store: one commit wins, the
other's guard fails, it re-reads and finds a live entry of the winner, and
returns *that* (the caller compares ``entry["dn"]`` with itself: it lost).
A claim by the DN that already holds the target writes nothing and returns
the entry as it is.  ``release(target, dn)`` writes a tombstone only while
``dn`` still holds the target (fires ``False`` otherwise).

Memory and watchers.  The table keeps the live entries in memory
(``lookup``/``entries``/``resolve`` answer at once) and follows the store's
change feed on the prefix ``encap:map:`` (one notification per target
change, on both backends, also for this node's own writes): it re-reads the
target's guard and applies it if its epoch is newer than what it holds.
A ``RESYNC`` (a gap in the feed: Redis reconnect or failover, embedded store
recovery) reloads the whole hash and reports every difference.  Watchers
(``watch(listener)``) are called ``listener(target, entry_or_None)`` once per
change of the in-memory table, including the initial load in :meth:`start`
(every entry, as a change from empty).  Own successful claims are applied to
memory at once, before the notification (which is then a no-op).

Where the table lives -- the decision.  With the ``redis`` store pointed at
ONE Redis deployment by every DN and the ESR node the table is shared: the
compare-and-set above decides races and the change feed reaches every node;
nothing is sent over the peer link.  With the embedded ``memory`` store each
node has its own copy, so the table also travels over the cluster's peer
link (channel ``encap.map``): every change this node makes is sent to every
peer (the ESR node must therefore be a ``[cluster]`` peer of the DNs), each
peer merges what it gets by ``(epoch, dn)`` (the higher wins; a tombstone
counts as dn ``""``), and when a peer link comes up the whole table
(tombstones included) is sent so a returning node catches up.  Two DNs that
claim at the same epoch during a partition converge, after the heal, on the
one with the larger DN id -- the same answer on every node.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger

from appliance.store.interface import RESYNC, IImmediateStore, Op

MAP_KEY = "encap:map"
GUARD_PREFIX = "encap:map:"
CHANNEL = "encap.map"
SYNC_BATCH = 500          # entries per peer-link message in a full sync
CLAIM_ATTEMPTS = 5        # guard failures a claim/release retries through
RELOAD_RETRY_MIN_S = 0.1  # a failed reload after a RESYNC is retried, doubling ...
RELOAD_RETRY_MAX_S = 5.0  # ... up to this

Listener = Callable[[str, "dict | None"], Any]

_log = Logger(namespace="services.encap.mapping")


def normalize_target(target: str) -> str:
    """``"10.200.0.5"``, ``"10.200.0.5/32"`` -> ``"10.200.0.5"``;
    ``"10.200.0.64/26"`` -> itself.  A slice with host bits set, or anything
    that is not an address or a network, raises ``ValueError``."""
    if not isinstance(target, str):
        raise ValueError(f"target must be a string, not {target!r}")
    if "/" not in target:
        return str(ipaddress.ip_address(target))
    net = ipaddress.ip_network(target, strict=True)
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return str(net)


def target_network(target: str):
    """The ``ip_network`` a (normalized) target covers."""
    return ipaddress.ip_network(target, strict=False)


def _encode(entry: dict) -> str:
    return json.dumps(entry, separators=(",", ":"), sort_keys=True)


def _decode(raw: str | None) -> dict | None:
    """The guard's JSON (live entry or tombstone) or None (absent/garbage)."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("epoch"), int):
        return None
    return value


def _rank(value: dict | None) -> tuple[int, str]:
    """The order in which versions of one target win: epoch, then DN id."""
    if value is None:
        return (0, "")
    return (value["epoch"], value.get("dn") or "")


def _live(value: dict | None) -> dict | None:
    return value if value is not None and value.get("dn") else None


class MappingTable:
    """The EN-DN table on the node's store (see the module docstring).

    ``link`` (a :class:`~appliance.cluster.peerlink.PeerLink`) and ``peers``
    (default: every peer of the link) are used only when the store is not
    shared, i.e. when it is an :class:`IImmediateStore` (the embedded store);
    pass ``replicate=True``/``False`` to decide otherwise.
    """

    def __init__(self, reactor, store, node_id: str, *, link=None,
                 peers: tuple[str, ...] | None = None, replicate: bool | None = None):
        self.reactor = reactor
        self.store = store
        self.node_id = node_id
        if replicate is None:
            replicate = IImmediateStore.providedBy(store)
        self.link = link if replicate else None
        if self.link is not None and peers is None:
            peers = tuple(getattr(self.link, "peers", ()) or ())
        self.peers = tuple(peers or ())
        self._entries: dict[str, dict] = {}
        self._ranks: dict[str, tuple[int, str]] = {}     # tombstones too
        self._listeners: list[Listener] = []
        self._sub = None
        self._started = False
        self._reloading: defer.Deferred | None = None
        self._reload_again = False
        self._retry_call = None
        self.loaded = False
        self._load_waiters: list[defer.Deferred] = []
        self.stats = {"reload_failures": 0, "claims": 0, "claims_lost": 0, "claims_held": 0,
                      "releases": 0,
                      "releases_refused": 0, "notifications": 0, "resyncs": 0,
                      "changes": 0, "replicated_out": 0, "replicated_in": 0,
                      "replication_failures": 0, "full_syncs": 0}

    # ------------------------------------------------------------------
    # life cycle
    # ------------------------------------------------------------------
    @property
    def replicating(self) -> bool:
        return self.link is not None

    def start(self) -> defer.Deferred:
        """Subscribe to the change feed, wait until it is live, load the table.
        Fires once :meth:`lookup` answers from the loaded table.  If the store
        cannot be read, it fails at once but the load is retried in the
        background (0.1 s doubling to 5 s): :meth:`when_loaded` fires, and
        watchers hear every entry, when it worked."""
        return defer.ensureDeferred(self._start())

    async def _start(self):
        if self._started:
            return
        self._started = True
        if self.link is not None:
            self.link.on(CHANNEL, self._received)
            if hasattr(self.link, "on_connection"):
                self.link.on_connection(self._link_changed)
        self._sub = self.store.subscribe(GUARD_PREFIX, self._notified)
        ready = getattr(self._sub, "ready", None)
        if ready is not None:
            await ready
        try:
            await self._reload()
        except Exception:
            # the store cannot be read (yet): fail this start at once, but keep trying in
            # the background; when_loaded() fires (and watchers hear the entries) then
            self.stats["reload_failures"] += 1
            self._reload_until_done()
            raise
        self._now_loaded()

    def _now_loaded(self) -> None:
        if self.loaded:
            return
        self.loaded = True
        waiters, self._load_waiters = self._load_waiters, []
        for d in waiters:
            d.callback(None)
        if self.link is not None:
            for peer in self.peers:
                connected = getattr(self.link, "connected", None)
                if connected is not None and connected(peer):
                    self._full_sync(peer)

    def when_loaded(self) -> defer.Deferred:
        """Fires once the table was loaded from the store (at once if it was)."""
        if self.loaded:
            return defer.succeed(None)
        d = defer.Deferred()
        self._load_waiters.append(d)
        return d

    def stop(self) -> None:
        """Stop following the store (the memory copy stays readable)."""
        self._started = False
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        if self._sub is not None:
            self._sub.cancel()
            self._sub = None

    # ------------------------------------------------------------------
    # reading (memory)
    # ------------------------------------------------------------------
    def lookup(self, target: str) -> dict | None:
        """The live entry for exactly ``target`` (a copy), or None."""
        try:
            target = normalize_target(target)
        except ValueError:
            return None
        entry = self._entries.get(target)
        return dict(entry) if entry is not None else None

    def entries(self) -> dict[str, dict]:
        """Every live entry: ``{target: {dn, epoch, since, reason}}`` (copies)."""
        return {t: dict(e) for t, e in self._entries.items()}

    def resolve(self, address: str) -> tuple[str, dict] | None:
        """The most specific entry covering ``address``: the address itself,
        else the longest slice containing it; ``(target, entry)`` or None."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None
        entry = self._entries.get(str(ip))
        if entry is not None:
            return str(ip), dict(entry)
        best = None
        for target, entry in self._entries.items():
            if "/" not in target:
                continue
            net = target_network(target)
            if net.version == ip.version and ip in net:
                if best is None or net.prefixlen > best[0].prefixlen:
                    best = (net, target, entry)
        return (best[1], dict(best[2])) if best else None

    def watch(self, listener: Listener) -> None:
        """Call ``listener(target, entry_or_None)`` after every change of the table."""
        self._listeners.append(listener)

    def unwatch(self, listener: Listener) -> None:
        try:
            self._listeners.remove(listener)
        except ValueError:
            pass

    # ------------------------------------------------------------------
    # writing
    # ------------------------------------------------------------------
    def claim(self, target: str, dn: str, reason: str) -> defer.Deferred:
        """Make ``dn`` the holder of ``target`` with the next epoch; fires with
        the entry in the table afterwards -- another DN's when it won a race."""
        try:
            target = normalize_target(target)
            if not dn or not isinstance(dn, str):
                raise ValueError(f"dn must be a non-empty string, not {dn!r}")
        except ValueError as e:
            return defer.fail(e)
        return defer.ensureDeferred(self._claim(target, dn, str(reason)))

    async def _claim(self, target: str, dn: str, reason: str) -> dict:
        key = GUARD_PREFIX + target
        raw = await self.store.get(key)
        for attempt in range(CLAIM_ATTEMPTS):
            current = _decode(raw)
            if _live(current) is not None and current["dn"] == dn:
                self.stats["claims_held"] += 1
                self._apply(target, current)
                return _public(current)
            if attempt and _live(current) is not None:
                # someone else claimed between our read and our commit: they won
                self.stats["claims_lost"] += 1
                self._apply(target, current)
                return _public(current)
            new = {"dn": dn, "epoch": _rank(current)[0] + 1,
                   "since": self.reactor.seconds(), "reason": reason}
            value = _encode(new)
            applied = await self.store.commit(
                [Op.set(key, value), Op.hset(MAP_KEY, {target: value})], expect={key: raw})
            if applied:
                self.stats["claims"] += 1
                self._apply(target, new)
                self._replicate({target: value})
                return _public(new)
            raw = await self.store.get(key)
        raise RuntimeError(f"claim of {target} by {dn}: the guard kept changing "
                           f"({CLAIM_ATTEMPTS} attempts)")

    def release(self, target: str, dn: str) -> defer.Deferred:
        """Remove ``target`` from the table if ``dn`` still holds it; fires True
        if released, False if somebody else (or nobody) holds it."""
        try:
            target = normalize_target(target)
        except ValueError as e:
            return defer.fail(e)
        return defer.ensureDeferred(self._release(target, dn))

    async def _release(self, target: str, dn: str) -> bool:
        key = GUARD_PREFIX + target
        for _ in range(CLAIM_ATTEMPTS):
            raw = await self.store.get(key)
            current = _decode(raw)
            if _live(current) is None or current["dn"] != dn:
                self.stats["releases_refused"] += 1
                return False
            tomb = {"dn": None, "epoch": current["epoch"] + 1,
                    "since": self.reactor.seconds(), "reason": "released"}
            value = _encode(tomb)
            applied = await self.store.commit(
                [Op.set(key, value), Op.hdel(MAP_KEY, [target])], expect={key: raw})
            if applied:
                self.stats["releases"] += 1
                self._apply(target, tomb)
                self._replicate({target: value})
                return True
        raise RuntimeError(f"release of {target} by {dn}: the guard kept changing "
                           f"({CLAIM_ATTEMPTS} attempts)")

    # ------------------------------------------------------------------
    # memory and watchers
    # ------------------------------------------------------------------
    def _apply(self, target: str, value: dict | None, *, force: bool = False) -> None:
        """Take ``value`` (entry, tombstone or None) for ``target`` if newer."""
        rank = _rank(value)
        if not force and value is not None and rank <= self._ranks.get(target, (0, "")):
            return
        if value is not None:
            self._ranks[target] = rank
        else:
            self._ranks.pop(target, None)
        new = _live(value)
        old = self._entries.get(target)
        if new is None:
            if old is None:
                return
            del self._entries[target]
        else:
            new = _public(new)
            if old == new:
                return
            self._entries[target] = new
        self._report(target, None if new is None else dict(new))

    def _report(self, target: str, entry: dict | None) -> None:
        self.stats["changes"] += 1
        for listener in list(self._listeners):
            try:
                listener(target, entry)
            except Exception:
                _log.failure("mapping watcher {listener!r} failed on {target}",
                             listener=listener, target=target)

    def _notified(self, key: str, op: str) -> None:
        if op == RESYNC:
            self.stats["resyncs"] += 1
            _log.info("mapping table: change feed gap, reloading")
            self._reload_until_done()
            return
        if not key.startswith(GUARD_PREFIX):
            return
        self.stats["notifications"] += 1
        target = key[len(GUARD_PREFIX):]
        d = self.store.get(key)
        d.addCallback(lambda raw: self._apply_read(target, raw))
        def failed(f):
            _log.warn("mapping: cannot read {key} after a change: {e}; reloading", key=key,
                      e=f.getErrorMessage())
            self._reload_until_done()
        d.addErrback(failed)

    def _apply_read(self, target: str, raw: str | None) -> None:
        value = _decode(raw)
        if value is None:
            # the key is gone (deleted by hand, or data loss): drop it
            self._apply(target, None, force=True)
            return
        self._apply(target, value)

    def _reload_until_done(self, delay: float = RELOAD_RETRY_MIN_S) -> None:
        """Reload; on failure (the feed may be back before the command
        connection is) try again after ``delay``, doubling up to a cap."""
        self._retry_call = None
        if not self._started:
            return

        def failed(f):
            self.stats["reload_failures"] += 1
            _log.warn("mapping reload failed: {e}; again in {d} s", e=f.getErrorMessage(),
                      d=delay)
            if self._started and self._retry_call is None:
                self._retry_call = self.reactor.callLater(
                    delay, self._reload_until_done, min(delay * 2, RELOAD_RETRY_MAX_S))
        self._reload().addCallbacks(lambda _: self._now_loaded(), failed)

    def _reload(self) -> defer.Deferred:
        """Re-read the whole hash; report the differences.  One at a time; a
        reload asked for while one runs runs again after it."""
        if self._reloading is not None:
            self._reload_again = True
            return self._reloading
        d = self._reloading = defer.ensureDeferred(self._reload_once())

        def done(result):
            self._reloading = None
            if self._reload_again:
                self._reload_again = False
                return self._reload()
            return result
        d.addBoth(done)
        return d

    async def _reload_once(self):
        table = await self.store.hgetall(MAP_KEY)
        loaded: dict[str, dict] = {}
        for target, raw in table.items():
            value = _live(_decode(raw))
            if value is not None:
                loaded[target] = value
        # a reload is the truth (the store may have lost data: epochs can restart)
        for target in list(self._entries):
            if target not in loaded:
                self._ranks.pop(target, None)
                del self._entries[target]
                self._report(target, None)
        for target, value in loaded.items():
            self._ranks[target] = _rank(value)
            new = _public(value)
            if self._entries.get(target) != new:
                self._entries[target] = new
                self._report(target, dict(new))

    # ------------------------------------------------------------------
    # replication over the peer link (embedded store only)
    # ------------------------------------------------------------------
    def _replicate(self, values: dict[str, str]) -> None:
        if self.link is None:
            return
        for peer in self.peers:
            self._send(peer, {"entries": values})

    def _send(self, peer: str, body: dict) -> None:
        self.stats["replicated_out"] += len(body["entries"])
        d = self.link.send(peer, CHANNEL, body)
        d.addErrback(self._send_failed, peer)

    def _send_failed(self, failure, peer: str) -> None:
        self.stats["replication_failures"] += 1
        _log.warn("mapping: update to {peer} not delivered: {e} (a full sync follows at the "
                  "next link-up)", peer=peer, e=failure.getErrorMessage())

    def _link_changed(self, peer: str, connected: bool) -> None:
        if connected and self._started and peer in self.peers:
            self._full_sync(peer)

    def _full_sync(self, peer: str) -> None:
        d = defer.ensureDeferred(self._full_sync_values())

        def send(values: dict[str, str]):
            self.stats["full_syncs"] += 1
            items = sorted(values.items())
            for i in range(0, len(items), SYNC_BATCH):
                self._send(peer, {"entries": dict(items[i:i + SYNC_BATCH])})
        d.addCallback(send)
        d.addErrback(lambda f: _log.failure("mapping: full sync to {peer} failed",
                                            failure=f, peer=peer))

    async def _full_sync_values(self) -> dict[str, str]:
        keys: list[str] = []
        cursor = None
        while True:
            cursor, page = await self.store.scan(GUARD_PREFIX, cursor, 500)
            keys.extend(page)
            if cursor is None:
                break
        values = {}
        for key in keys:
            raw = await self.store.get(key)
            if raw is not None and _decode(raw) is not None:
                values[key[len(GUARD_PREFIX):]] = raw
        return values

    def _received(self, peer: str, body: Any) -> defer.Deferred:
        """Peer-link handler: merge the peer's versions (higher (epoch, dn) wins);
        fires once they are durable here, so the peer link acks after that."""
        return defer.ensureDeferred(self._merge(peer, body))

    async def _merge(self, peer: str, body: Any) -> None:
        entries = body.get("entries") if isinstance(body, dict) else None
        if not isinstance(entries, dict):
            _log.warn("mapping: malformed message from {peer} ignored", peer=peer)
            return
        for target, raw in entries.items():
            try:
                target = normalize_target(target)
            except ValueError:
                continue
            theirs = _decode(raw) if isinstance(raw, str) else None
            if theirs is None:
                continue
            key = GUARD_PREFIX + target
            for _ in range(CLAIM_ATTEMPTS):
                mine_raw = await self.store.get(key)
                if _rank(theirs) <= _rank(_decode(mine_raw)):
                    break
                ops = [Op.set(key, raw)]
                ops.append(Op.hset(MAP_KEY, {target: raw}) if _live(theirs)
                           else Op.hdel(MAP_KEY, [target]))
                if await self.store.commit(ops, expect={key: mine_raw}):
                    self.stats["replicated_in"] += 1
                    self._apply(target, theirs)
                    break

    # ------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """For RPC ``encap.mappings``: the entries and the counters."""
        return {"entries": self.entries(), "replicating": self.replicating,
                "peers": list(self.peers) if self.link is not None else [],
                "stats": dict(self.stats)}


def _public(value: dict) -> dict:
    return {"dn": value["dn"], "epoch": value["epoch"], "since": value.get("since"),
            "reason": value.get("reason")}
