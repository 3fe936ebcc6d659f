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


class ManualThread:
    """A store ``run_in_thread`` whose jobs wait until the test releases them:
    ``run(n)`` runs the oldest n, ``fail(exc)`` fails the oldest, ``run_all()``
    (``fail=True``: fails) all of them, including those queued meanwhile."""

    def __init__(self):
        self.jobs: list = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.jobs.append((f, args, d))
        return d

    def _run_one(self):
        f, args, d = self.jobs.pop(0)
        try:
            result = f(*args)
        except Exception as e:
            d.errback(e)
        else:
            d.callback(result)

    def run(self, n: int = 1):
        for _ in range(n):
            self._run_one()

    def fail(self, exc: Exception):
        _f, _args, d = self.jobs.pop(0)
        d.errback(exc)

    def run_all(self, fail: bool = False):
        while self.jobs:
            if fail:
                self.fail(OSError("disk on fire"))
            else:
                self._run_one()


class MemStore:
    """The store calls the cluster manager makes (get, set, cas), answered at once
    from a dict: one per simulated node, or per unit test."""

    def __init__(self, backend: str = "memory"):
        self.data = {}
        self.healthy = True
        #: "memory": one node's own store (claims may use reserved epochs);
        #: "redis": one store shared by the nodes (claims arbitrated by cas)
        self.backend = backend

    def describe(self):
        return {"backend": self.backend, "healthy": self.healthy}

    def get(self, key):
        return defer.succeed(self.data.get(key))

    def set(self, key, value):
        self.data[key] = value
        return defer.succeed(None)

    def cas(self, key, expected, new):
        if self.data.get(key) != expected:
            return defer.succeed(False)
        self.data[key] = new
        return defer.succeed(True)
