"""Gateway health (review M13, Pacemaker's ``ping`` agent, keepalived's
``track_script``): ``[cluster] track_gateway = { address, interval_s,
timeout_s, fall, rise }``.

Every ``interval_s`` the node pings ``address`` once (``ping -c1 -n -W``, a
child process: nothing blocks the reactor).  After ``fall`` failed pings in
a row it advertises ``gateway_down`` -- unable for every resource, like
``interface_down`` -- so a peer that still reaches the gateway takes its
resources; after ``rise`` good pings in a row the flag goes.  When every
node lost the gateway, nobody is able and the election keeps a degraded
owner rather than none (resources.py).
"""

from __future__ import annotations

import shutil
from typing import Callable

from twisted.internet import defer, protocol
from twisted.logger import Logger

_log = Logger(namespace="appliance.cluster")

FLAG = "gateway_down"


class _Ping(protocol.ProcessProtocol):
    def __init__(self, done: defer.Deferred):
        self.done = done

    def processEnded(self, reason):
        self.done.callback(getattr(reason.value, "exitCode", None) == 0)


def spawn_ping(reactor, address: str, timeout_s: float) -> defer.Deferred:
    """Fires True when one echo to ``address`` was answered within ``timeout_s``."""
    ping = shutil.which("ping") or "/usr/bin/ping"
    done: defer.Deferred = defer.Deferred()
    wait = str(max(1, int(round(timeout_s))))
    try:
        reactor.spawnProcess(_Ping(done), ping, [ping, "-c1", "-n", "-q", "-W", wait, address],
                             env={"PATH": "/usr/bin:/bin"})
    except Exception as e:
        _log.error("gateway check: cannot run {ping}: {why}", ping=ping, why=e)
        return defer.succeed(False)
    return done


class GatewayCheck:
    """Drives the ``gateway_down`` flag of :class:`~appliance.cluster.health.LocalHealth`."""

    def __init__(self, clock, health, address: str, *, interval_s: float = 1.0,
                 timeout_s: float = 1.0, fall: int = 3, rise: int = 2,
                 probe: Callable[[str, float], defer.Deferred] | None = None, reactor=None):
        self.clock, self.health, self.address = clock, health, str(address)
        self.interval_s, self.timeout_s = float(interval_s), float(timeout_s)
        self.fall, self.rise = int(fall), int(rise)
        self.probe = probe or (lambda addr, timeout: spawn_ping(reactor, addr, timeout))
        self.failures = 0           # consecutive
        self.successes = 0          # consecutive
        self.checks = 0
        self.last_ok: bool | None = None
        self._call = None
        self._running = False
        self._busy = False

    @property
    def down(self) -> bool:
        return FLAG in self.health.flags_set

    def start(self):
        self._running = True
        self._schedule(0)

    def stop(self):
        self._running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self, delay: float):
        if self._running:
            self._call = self.clock.callLater(delay, self._check)

    def _check(self):
        self._call = None
        if self._busy:              # the previous ping still runs: never two at once
            self._schedule(self.interval_s)
            return
        self._busy = True
        d = defer.maybeDeferred(self.probe, self.address, self.timeout_s)
        d.addErrback(self._probe_failed)
        d.addCallback(self._result)
        d.addErrback(lambda f: _log.failure("gateway check bookkeeping", failure=f))
        self._schedule(self.interval_s)

    @staticmethod
    def _probe_failed(f) -> bool:
        """A ping that could not run counts as no answer."""
        _log.warn("gateway check failed: {why}", why=f.getErrorMessage())
        return False

    def _result(self, ok):
        self._busy = False
        ok = bool(ok)
        self.checks += 1
        self.last_ok = ok
        if ok:
            self.successes += 1
            self.failures = 0
            if self.down and self.successes >= self.rise:
                self.health.flags_set.discard(FLAG)
                _log.info("gateway {gw} answers again ({n} pings in a row): this node can "
                          "serve again", gw=self.address, n=self.successes,
                          health_change={"flag": FLAG, "reason": None})
                self.health.changed()
        else:
            self.failures += 1
            self.successes = 0
            if not self.down and self.failures >= self.fall:
                self.health.flags_set.add(FLAG)
                _log.warn("gateway {gw} unreachable ({n} pings in a row failed): flagged "
                          "gateway_down, resources move to a peer that reaches it",
                          gw=self.address, n=self.failures,
                          health_change={"flag": FLAG, "reason": "unreachable"})
                self.health.changed()

    def status(self) -> dict:
        return {"address": self.address, "down": self.down, "last_ok": self.last_ok,
                "failures_in_a_row": self.failures, "checks": self.checks,
                "interval_s": self.interval_s, "fall": self.fall, "rise": self.rise}
