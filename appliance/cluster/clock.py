"""A monotonic ``IReactorTime`` for the cluster's liveness and partner timers.

Twisted's reactor schedules ``callLater`` on the wall clock
(``twisted.python.runtime.seconds is time.time``): a backward step of the
system clock by X stalls every pending timer by X (an owner stops
heartbeating but keeps its VIP), a forward step fires them all at once (a
standby suspects a live owner, MCLT and partner-down timers skip ahead).

:class:`MonotonicClock` keeps its own heap of calls on ``CLOCK_MONOTONIC``
and wakes the reactor through a ``timerfd`` armed on that clock (a file
descriptor the reactor watches like any socket), so a wall-clock step
changes nothing here.  ``seconds()`` is ``time.monotonic()``.  It provides
``callLater`` and ``seconds`` with Twisted's ``DelayedCall`` (cancel,
reset, delay, active), so code written against ``IReactorTime`` -- and
tests that pass a ``task.Clock`` instead -- work unchanged.

Where ``timerfd`` is not available (not Linux), :func:`monotonic_clock`
returns the reactor itself and logs that timers follow the wall clock.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import heapq
import os
import time
from typing import Any, Callable

from twisted.internet.base import DelayedCall
from twisted.logger import Logger

_log = Logger(namespace="appliance.cluster.clock")

CLOCK_MONOTONIC = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC
TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec),
                                     ctypes.c_void_p]
    return libc


class MonotonicClock:
    """``callLater``/``seconds`` on CLOCK_MONOTONIC, woken by a timerfd."""

    def __init__(self, reactor):
        self._reactor = reactor
        self._libc = _libc()
        fd = self._libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create")
        self._fd = fd
        self._calls: list[tuple[float, int, DelayedCall]] = []
        self._n = 0
        self._armed: float | None = None
        self._reading = False

    # -- IReactorTime ---------------------------------------------------------
    def seconds(self) -> float:
        return time.monotonic()

    def callLater(self, delay: float, f: Callable, *args: Any, **kw: Any) -> DelayedCall:
        dc = DelayedCall(self.seconds() + max(0.0, delay), f, args, kw, self._cancelled,
                         self._reset, seconds=self.seconds)
        self._push(dc)
        return dc

    def getDelayedCalls(self):
        return [dc for _, _, dc in self._calls if dc.active()]

    # -- internals ------------------------------------------------------------
    def _push(self, dc: DelayedCall):
        self._n += 1
        heapq.heappush(self._calls, (dc.getTime(), self._n, dc))
        self._arm()

    def _cancelled(self, dc: DelayedCall):
        # Lazy removal: cancelled calls are skipped when they reach the top.
        self._arm()

    def _reset(self, dc: DelayedCall):
        self._push(dc)

    def _top(self) -> float | None:
        while self._calls:
            t, _, dc = self._calls[0]
            if dc.cancelled or dc.called:
                heapq.heappop(self._calls)
                continue
            if dc.delayed_time:
                # reset() to a later time only records the delay (Twisted's
                # DelayedCall); apply it and file the call at its new time.
                heapq.heappop(self._calls)
                dc.activate_delay()
                self._n += 1
                heapq.heappush(self._calls, (dc.getTime(), self._n, dc))
                continue
            if dc.getTime() != t:
                heapq.heappop(self._calls)       # reset earlier: filed again already
                continue
            return t
        return None

    def _arm(self):
        top = self._top()
        if top == self._armed:
            return
        spec = _Itimerspec()
        if top is not None:
            top = max(top, 1e-9)
            spec.it_value.tv_sec = int(top)
            spec.it_value.tv_nsec = max(1, int((top - int(top)) * 1e9))
        if self._libc.timerfd_settime(self._fd, TFD_TIMER_ABSTIME, ctypes.byref(spec), None) < 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime")
        self._armed = top
        if not self._reading:
            self._reading = True
            self._reactor.addReader(self)

    # -- IReadDescriptor ------------------------------------------------------
    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "MonotonicClock"

    def doRead(self):
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            pass
        self._armed = None
        now = self.seconds()
        while True:
            top = self._top()
            if top is None or top > now:
                break
            _, _, dc = heapq.heappop(self._calls)
            dc.called = 1
            try:
                dc.func(*dc.args, **dc.kw)
            except Exception:
                _log.failure("monotonic timer call {f!r} failed", f=dc.func)
        self._arm()

    def connectionLost(self, reason):
        self._reading = False

    def close(self):
        if self._reading:
            self._reactor.removeReader(self)
            self._reading = False
        os.close(self._fd)


def monotonic_clock(reactor):
    """A :class:`MonotonicClock` on ``reactor`` (the reactor itself where
    timerfd is missing: timers then follow the wall clock, logged)."""
    try:
        return MonotonicClock(reactor)
    except (OSError, AttributeError) as e:
        _log.warn("no timerfd ({why}): cluster timers follow the wall clock", why=e)
        return reactor


