"""The state-store contract every backend implements.

All services of a node share one store.  Keys and values are ``str``; scores
of sorted sets are ``float``.  Every data method returns a ``Deferred`` and
never raises synchronously: failures arrive as errbacks carrying
:class:`StoreError` (bad use, e.g. a hash operation on a string key) or
:class:`StoreUnavailable` (the backend cannot be reached right now; the
operation was not applied, or -- for a write whose reply was lost -- may or
may not have been applied).

Key namespace: backends prefix every key with ``<namespace>:`` (config key
``store.namespace``, default ``"appliance"``).  Services name their keys
``<service>:<kind>:<id>`` (for example ``dhcp4:lease:10.9.0.50``); node-local
keys carry the node id (``cluster:node:a:epoch``).  The prefix is not visible
to callers: ``scan`` and notifications give keys without it.

Ordering (both backends): the writes one store object receives are applied
in the order they were issued, made durable in that order and acknowledged
(their Deferreds fire) in that order.  A crash therefore leaves a *prefix* of
what was issued: every acknowledged write, and possibly some writes issued
after the last acknowledged one, never a later write without an earlier one,
never part of a commit.  (Redis: one connection for all commands, pipelined;
the embedded store: one writer thread, one SQLite transaction per group of
writes.)  Two exceptions, both about calls that write nothing: a call refused
for its arguments (``StoreError``) fails at once, and reads answer as soon as
they can (the embedded store at once, from memory; Redis in issue order).

Read-your-writes: a read issued after a write sees it, even before the write
is durable (the embedded store answers reads from memory).  A value read that
way may still be lost by a crash: await the write (or :meth:`IImmediateStore.durable`)
before telling anybody outside the process.

Input: keys, fields, values and members must be ``str`` that encode as
UTF-8 (a lone surrogate such as ``"\\ud800"`` is refused with
:class:`StoreError`, never half-written); scores are finite-or-infinite
floats, not NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zope.interface import Attribute, Interface


class StoreError(Exception):
    """A store operation was refused (wrong type, bad argument)."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached; the operation failed fast."""


class StoreDown(StoreUnavailable):
    """The store failed (disk error, disk full, data loss detected) and refuses
    writes until :meth:`IStateStore.recheck` (or its own retry) finds it
    healthy again.  Nothing written after the failure was acknowledged."""


RESYNC = "resync"
"""The ``op`` a subscriber gets (with its prefix as the key) after a gap in
the change feed: notifications may have been missed, re-read what you cache."""


@dataclass(frozen=True)
class Op:
    """One write inside an atomic :meth:`IStateStore.commit`.

    Build them with the class methods: ``Op.set("k", "v", ttl_s=5)``,
    ``Op.delete("k")``, ``Op.hset("h", {"f": "v"})``, ``Op.hdel("h", ["f"])``,
    ``Op.zadd("z", {"m": 1.0})``, ``Op.zrem("z", ["m"])``.
    """

    kind: str
    key: str
    args: tuple = field(default=())

    KINDS = ("set", "delete", "hset", "hdel", "zadd", "zrem")

    @classmethod
    def set(cls, key: str, value: str, ttl_s: float | None = None) -> "Op":
        return cls("set", key, (value, ttl_s))

    @classmethod
    def delete(cls, key: str) -> "Op":
        return cls("delete", key, ())

    @classmethod
    def hset(cls, key: str, mapping: dict[str, str]) -> "Op":
        return cls("hset", key, (tuple(sorted(mapping.items())),))

    @classmethod
    def hdel(cls, key: str, fields: list[str] | tuple[str, ...]) -> "Op":
        return cls("hdel", key, (tuple(fields),))

    @classmethod
    def zadd(cls, key: str, mapping: dict[str, float]) -> "Op":
        return cls("zadd", key, (tuple(sorted((m, float(s)) for m, s in mapping.items())),))

    @classmethod
    def zrem(cls, key: str, members: list[str] | tuple[str, ...]) -> "Op":
        return cls("zrem", key, (tuple(members),))


class ISubscription(Interface):
    """A live change subscription returned by :meth:`IStateStore.subscribe`."""

    ready = Attribute("A Deferred that fires once notifications flow "
                      "(Redis: PSUBSCRIBE acknowledged; embedded: at once)")

    def cancel() -> None:
        """Stop delivering notifications.  Idempotent."""


class IStateStore(Interface):
    """Keyed records, hashes, sorted sets, atomic writes and change feeds."""

    backend = Attribute("'memory' or 'redis'")
    healthy = Attribute("True while operations are expected to succeed")

    def describe() -> dict[str, Any]:
        """A JSON-able summary for ``system.status`` (backend, healthy, ...)."""

    # -- plain keys ---------------------------------------------------
    def get(key: str):
        """Fire with the string value, or ``None`` if absent or expired."""

    def set(key: str, value: str, ttl_s: float | None = None):
        """Store ``value``; with ``ttl_s`` the key expires after that many seconds.

        Fires with ``None`` once the write is durable per the backend's policy.
        """

    def delete(*keys: str):
        """Remove keys of any type; fire with the number that existed."""

    def expire(key: str, ttl_s: float):
        """Set a time to live on an existing key of any type; fire True if it existed."""

    def ttl(key: str):
        """Fire with the remaining seconds to live, or ``None`` (no expiry or absent)."""

    # -- hashes --------------------------------------------------------
    def hset(key: str, mapping: dict[str, str]):
        """Set fields; fire with the number of fields that were new."""

    def hget(key: str, field: str):
        """Fire with the field's value or ``None``."""

    def hgetall(key: str):
        """Fire with a ``dict`` (empty if the key is absent)."""

    def hdel(key: str, *fields: str):
        """Remove fields; fire with the number removed.  An empty hash disappears."""

    # -- sorted sets ---------------------------------------------------
    def zadd(key: str, mapping: dict[str, float]):
        """Add or re-score members; fire with the number that were new."""

    def zrem(key: str, *members: str):
        """Remove members; fire with the number removed.  An empty set disappears."""

    def zscore(key: str, member: str):
        """Fire with the member's score or ``None``."""

    def zcard(key: str):
        """Fire with the number of members."""

    def zrangebyscore(key: str, min_score: float, max_score: float,
                      limit: int | None = None):
        """Fire with ``[(member, score), ...]`` in ascending score order
        (ties by member), both bounds inclusive, at most ``limit`` entries."""

    # -- atomic writes ---------------------------------------------------
    def cas(key: str, expected: str | None, new: str | None,
            ttl_s: float | None = None):
        """Compare-and-set a plain key atomically.

        ``expected=None`` means "must be absent"; ``new=None`` deletes.
        Fire ``True`` if the swap happened, ``False`` if the current value
        differed (nothing written).
        """

    def commit(ops: list[Op], expect: dict[str, str | None] | None = None):
        """Apply ``ops`` atomically (all or none, in order).

        ``expect`` maps plain keys to the value each must hold (``None``:
        absent) for the commit to apply.  Fire ``True`` if applied, ``False``
        if a guard failed (nothing written).
        """

    # -- iteration and change feed ---------------------------------------
    def scan(prefix: str, cursor: str | None = None, count: int = 100):
        """Page through keys starting with ``prefix``.

        Fire with ``(next_cursor, keys)``; ``next_cursor`` is ``None`` when
        the iteration is complete.  Every key present for the whole scan is
        returned at least once; keys may come in any order.
        """

    def subscribe(prefix: str, callback):
        """Call ``callback(key, op)`` after each change to a key with ``prefix``.

        ``op`` is the writing operation's name (``set``, ``delete``, ``hset``,
        ``hdel``, ``zadd``, ``zrem``, ``expire``, or ``expired`` when a TTL ran
        out, where the backend can tell).  Notifications arrive
        asynchronously (never inside the writing call), including for this
        node's own writes, and for writes by other nodes sharing the backend.
        Returns an :class:`ISubscription`.
        """

    def ping():
        """Fire with ``True`` when the backend answers; errback otherwise."""

    def recheck():
        """Check the backend now (operator: ``appliancectl call store.recheck``).

        A store that failed (disk error, disk full, a Redis that lost its
        data) becomes healthy again if the check succeeds.  Fire with
        :meth:`describe` afterwards; never errback for an unhealthy store
        (``describe()["healthy"]`` says it).
        """


class IImmediateStore(IStateStore):
    """A store that holds its data in this process (the embedded backend).

    Reads answer at once and writes apply at once; durability is asked for
    separately, so a hot path pays one wait per reply instead of one per
    write.  Callers check ``IImmediateStore.providedBy(store)``.
    """

    def get_now(key: str):
        """The string value or ``None``; raises :class:`StoreError`."""

    def hgetall_now(key: str) -> dict:
        """The hash as a ``dict`` (empty if absent); raises :class:`StoreError`."""

    def commit_now(ops: list[Op], expect: dict[str, str | None] | None = None, *,
                   lazy: bool = False) -> bool:
        """:meth:`IStateStore.commit` applied at once: ``True``, or ``False``
        when a guard did not match; raises :class:`StoreError`.  Visible at
        once, durable when a :meth:`durable` asked for afterwards fires.
        ``lazy``: no transaction of its own; committed with the next one (or
        soon after), for changes nobody waits for."""

    def durable():
        """A Deferred that fires once every write made so far is durable (per
        the fsync policy), or fails with :class:`StoreError` if it cannot be."""
