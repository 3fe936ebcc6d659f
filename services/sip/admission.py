"""Admission control of REGISTERs: under overload the node sheds, it does not stall.

The node's heartbeats leave from the same reactor as the SIP work.  A node
that takes every REGISTER it reads falls behind: the store's commits grow,
their acknowledgements (and the sync backups' acks) come back as bursts of
thousands of answers in one reactor turn, and on a busy box such a turn lasts
longer than the partner's suspicion deadline (bench, 8,000 REGISTER/s on the
shared 2 vCPUs: turns of 250-450 ms, the partner declared the live node dead
and took the registrar).  Shedding early keeps the turns short.

Two signals, checked for each REGISTER before it is authenticated or written:

* **backlog**: REGISTERs admitted and not answered yet (waiting for the store
  or the sync backups) reached ``max_pending`` -> 503, reason ``overload``;
* **lag**: a ticker runs every ``tick_s`` and notes how late it ran.  The
  reactor is *lagging* while the last tick was more than ``lag_s`` late (or the
  turn in progress has already run that long past a due tick), and for
  ``hold_s`` after.  While lagging, REGISTERs beyond ``lag_pending`` in flight
  get 503, reason ``shed_lag`` -- a lone late tick on a busy box with nothing
  queued sheds nothing.

A shed REGISTER gets ``503 Service Unavailable`` with ``Retry-After``
(RFC 3261 §21.5.4): the UA tries again later instead of retransmitting into
the queue.  ``on_change(lagging)`` lets the service read fewer datagrams per
turn while lagging (what it leaves in the kernel queue waits or is dropped
there at no cost to the reactor).

Pure logic on an injected clock (``IReactorTime``): unit tests drive it with
``task.Clock``.
"""

from __future__ import annotations

import gc
import time
from typing import Callable

from twisted.logger import Logger

from appliance.plugin import start_loop, stop_all

_log = Logger(namespace="services.sip.admission")


class Admission:
    def __init__(self, clock, *, max_pending: int = 2048, lag_s: float = 0.05,
                 hold_s: float = 0.5, lag_pending: int = 64, tick_s: float = 0.01,
                 on_change: Callable[[bool], None] | None = None):
        self.clock = clock
        self.max_pending = max_pending
        self.lag_s = lag_s                  # 0: no shedding on lag
        self.hold_s = hold_s
        self.lag_pending = lag_pending
        self.tick_s = tick_s
        self.on_change = on_change
        self._last: float | None = None     # when the ticker last ran
        self._lag_until = float("-inf")
        self._was_lagging = False
        self._loop = None                   # the ticker (a LoopingCall)
        self.stats = {"late_ticks": 0, "max_lag_ms": 0.0, "lag_episodes": 0}
        #: the cyclic GC's pauses (a full collection walks the whole heap in one go)
        self.gc = GCPauses()

    # -- the ticker ----------------------------------------------------------
    def start(self) -> None:
        if self._loop is not None or not self.lag_s:
            return
        self._last = self.clock.seconds()
        self._loop = start_loop(self.clock, self.tick_s, self._tick, "sip: admission ticker")
        self.gc.start()

    def stop(self) -> None:
        stop_all(self._loop)
        self._loop = None
        self.gc.stop()

    def _tick(self) -> None:
        now = self.clock.seconds()
        if self._last is not None:
            late = now - self._last - self.tick_s
            if late * 1000 > self.stats["max_lag_ms"]:
                self.stats["max_lag_ms"] = round(late * 1000, 1)
            if late > self.lag_s:
                self.stats["late_ticks"] += 1
                self._lag_until = now + self.hold_s
        self._last = now
        self._changed(now)

    def _changed(self, now: float) -> None:
        lagging = self.lagging(now)
        if lagging != self._was_lagging:
            self._was_lagging = lagging
            if lagging:
                self.stats["lag_episodes"] += 1
            if self.on_change is not None:
                try:
                    self.on_change(lagging)
                except Exception:
                    _log.failure("sip: admission change handler failed")

    # -- decisions -----------------------------------------------------------
    def lagging(self, now: float | None = None) -> bool:
        if not self.lag_s:
            return False
        now = self.clock.seconds() if now is None else now
        if now < self._lag_until:
            return True
        # the turn in progress has run past a due tick by lag_s already
        return self._last is not None and now - self._last - self.tick_s > self.lag_s

    def admit(self, pending: int) -> str | None:
        """None: take the REGISTER; otherwise the reason to shed it."""
        if pending >= self.max_pending:
            return "overload"
        if pending >= self.lag_pending and self.lagging():
            return "shed_lag"
        return None

    def status(self) -> dict:
        return {"lagging": self.lagging(), "max_pending": self.max_pending,
                "lag_ms": self.lag_s * 1000, **self.stats, "gc": self.gc.status()}


class GCPauses:
    """How long the cyclic GC stopped the process (``gc.callbacks``): collections per
    generation and the longest pause of each -- a late tick's usual suspect."""

    def __init__(self):
        self.counts = [0, 0, 0]
        self.max_ms = [0.0, 0.0, 0.0]
        self.total_ms = [0.0, 0.0, 0.0]
        self._began: float | None = None

    def start(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        if self._began is None:
            return
        ms = (time.perf_counter() - self._began) * 1000.0
        self._began = None
        g = min(2, int(info.get("generation", 0)))
        self.counts[g] += 1
        self.total_ms[g] += ms
        if ms > self.max_ms[g]:
            self.max_ms[g] = ms

    def status(self) -> dict:
        return {"collections": list(self.counts),
                "max_ms": [round(x, 1) for x in self.max_ms],
                "total_ms": [round(x, 1) for x in self.total_ms]}
