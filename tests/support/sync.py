"""Helpers for synchronous tests of Deferred code on a Clock (no real reactor)."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock


def inline(f, *args):
    """A ``run_in_thread`` for EmbeddedStore that runs the work at once."""
    return defer.maybeDeferred(f, *args)


def ok(d):
    """The result of an already-fired Deferred (re-raises its failure), or
    ``d`` itself when it is a plain value (an ``appliance.eager`` result)."""
    if not isinstance(d, defer.Deferred):
        return d
    results = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def memory_store(state_dir, clock: Clock | None = None, **kw):
    """A started EmbeddedStore on ``clock`` whose disk work runs inline (and
    starts at each write, not at the end of a reactor turn)."""
    from appliance.store.embedded import EmbeddedStore
    clock = clock or Clock()
    kw.setdefault("turn_batching", False)
    store = EmbeddedStore(clock, state_dir=state_dir, run_in_thread=inline, **kw)
    store.startService()
    return store, clock
