"""MonotonicClock: callLater on CLOCK_MONOTONIC through a timerfd, on the real reactor."""

from __future__ import annotations

import time

import pytest_twisted
from twisted.internet import defer, reactor

from appliance.cluster.clock import MonotonicClock


@pytest_twisted.ensureDeferred
async def test_calls_fire_in_order_cancel_and_reset():
    """Calls fire in deadline order near their monotonic time; cancelled ones never,
    reset ones at their new time."""
    clock = MonotonicClock(reactor)
    fired = []
    done = defer.Deferred()
    t0 = time.monotonic()
    clock.callLater(0.06, lambda: fired.append(("c", time.monotonic() - t0)))
    clock.callLater(0.02, lambda: fired.append(("a", time.monotonic() - t0)))
    gone = clock.callLater(0.03, lambda: fired.append(("never", 0)))
    moved = clock.callLater(0.01, lambda: fired.append(("b", time.monotonic() - t0)))
    gone.cancel()
    moved.reset(0.04)
    clock.callLater(0.08, done.callback, None)
    try:
        await done
    finally:
        clock.close()
    assert [n for n, _ in fired] == ["a", "b", "c"]
    for (name, at), due in zip(fired, (0.02, 0.04, 0.06)):
        assert due - 0.001 <= at < due + 0.05, (name, at)
    assert clock.seconds() - time.monotonic() < 0.01
