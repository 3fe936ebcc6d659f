"""The DN watchdog (the thesis's DN-FD): is this DN still forwarding?

Every ``interval_s`` the watchdog looks at three things:

* **reactor lag**: how late its own timer fired (a DN whose reactor is stuck
  forwards nothing, even if its process is alive);
* **the TUN device**: read/write errors since the last check, or a closed fd;
* **the data path**: a probe session -- the watchdog is an EN of its own DN
  over UDP on loopback (``probe_address``), completes the handshake and sends
  an echo keepalive each round; the DN's answer proves the receive -> open ->
  answer path works (a wedged or crashed DN fails it).

``fail_after`` bad rounds in a row make the DN *unhealthy*: the watchdog
reports it (``encap.stats`` -> ``watchdog``; with a cluster, each slice
resource this DN is primary for gets ``unable:<resource>`` in its heartbeats
so the secondaries take the slices) and restarts the encap service
(crash-only: stop, then start from scratch) after a backoff that doubles per
restart up to ``restart_backoff_max_s`` and resets after a healthy minute.
"""

from __future__ import annotations

from twisted.internet import defer, protocol, task
from twisted.logger import Logger

from services.encap import wire as W

_log = Logger(namespace="services.encap.fd")

HEALTHY_RESET_S = 60.0


class _Probe(protocol.DatagramProtocol):
    """A tiny EN talking to the DN: handshake once, then echo keepalives."""

    def __init__(self, psk: bytes, ident: str):
        self.psk, self.ident = psk, ident
        self.initiator = None
        self.keys = None
        self.index = 0
        self.answered = False
        self.target = None

    def round(self, target) -> None:
        """Start one probe round; ``answered`` is True by the next round if it worked."""
        self.target = target
        self.answered = False
        if self.transport is None:
            return
        try:
            if self.keys is None:
                self.initiator = W.Initiator(self.psk, self.ident)
                self.transport.write(self.initiator.hello(), target)
            else:
                self.transport.write(self.keys.seal(W.keepalive_plain(True)), target)
        except OSError:
            pass

    def datagramReceived(self, data, addr):
        try:
            msg = W.decode(data)
            if isinstance(msg, W.Challenge) and self.initiator is not None:
                confirm, keys, _ = self.initiator.challenged(msg)
                self.transport.write(confirm, addr)
                self.index = self.initiator.index
                self.keys, self.initiator = keys, None
                self.answered = True
            elif isinstance(msg, W.Record) and self.keys is not None and msg.receiver == self.index:
                self.keys.open(msg)
                self.answered = True
        except W.Drop:
            pass

    def reset(self) -> None:
        self.keys = None
        self.initiator = None


class Watchdog:
    """Watches one :class:`services.encap.service.EncapService` (see module doc)."""

    def __init__(self, reactor, service, config, *, restart=None, probe: bool = True):
        self.reactor = reactor
        self.service = service
        self.config = config
        self.restart = restart or self._restart_service
        self.probe_enabled = probe
        self.strikes = 0
        self.healthy = True
        self.reasons: list[str] = []
        self.restarts = 0
        self.backoff = config.restart_backoff_s
        self.last_healthy = reactor.seconds()
        self.last_tick: float | None = None
        self.max_lag = 0.0
        self._tun_errors = None
        self._loop = None
        self._probe = None
        self._probe_port = None
        self._restarting = None
        self.history: list[dict] = []

    # ------------------------------------------------------------------
    def start(self) -> None:
        if self.probe_enabled and self.service.udp is not None:
            ident = "fd-" + self.service.dn.node_id
            self.service.dn.probe_ident = ident
            self._probe = _Probe(self.service.dn.responder.keys.local(ident), ident)
            try:
                self._probe_port = self.reactor.listenUDP(0, self._probe)
            except Exception as e:
                _log.warn("encap watchdog: no probe socket: {e}", e=e)
                self._probe = None
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = self.reactor
        self.last_tick = self.reactor.seconds()
        self._loop.start(self.config.interval_s, now=False).addErrback(
            lambda f: _log.failure("encap watchdog loop stopped", failure=f))

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._probe_port is not None:
            self._probe_port.stopListening()
            self._probe_port = None

    def _target(self):
        host = self.service.udp.getHost() if self.service.udp is not None else None
        if host is None:
            return None
        addr = str(self.service.config.listen_address)
        return ("127.0.0.1" if addr in ("0.0.0.0", "") else addr, host.port)

    # ------------------------------------------------------------------
    def findings(self, now: float) -> list[str]:
        """What is wrong this round (empty: healthy)."""
        bad = []
        if self.last_tick is not None:
            lag = now - self.last_tick - self.config.interval_s
            self.max_lag = max(self.max_lag, lag)
            if lag > self.config.max_lag_s:
                bad.append(f"reactor_lag {lag * 1000:.0f} ms")
        self.last_tick = now
        tun = self.service.tun
        if tun is not None:
            errors = tun.stats["rx_errors"] + tun.stats["tx_errors"]
            if tun.fd < 0:
                bad.append("tun_closed")
            elif getattr(tun, "broken", None):
                bad.append(f"tun_broken ({tun.broken})")
            elif self._tun_errors is not None and errors > self._tun_errors:
                bad.append(f"tun_errors {errors - self._tun_errors} ({tun.last_error})")
            self._tun_errors = errors
        if self._probe is not None:
            if self._probe.target is not None and not self._probe.answered:
                bad.append("data_path_silent")
                self._probe.reset()
            target = self._target()
            if target is not None:
                self._probe.round(target)
        return bad

    def check(self) -> None:
        try:
            self._check()
        except Exception:
            _log.failure("encap watchdog check failed")

    def _check(self) -> None:
        now = self.reactor.seconds()
        bad = self.findings(now)
        if not bad:
            self.strikes = 0
            if not self.healthy:
                self._set_health(True, [])
            if now - self.last_healthy > HEALTHY_RESET_S:
                self.backoff = self.config.restart_backoff_s
            self.last_healthy = now if self.healthy else self.last_healthy
            return
        self.strikes += 1
        self.reasons = bad
        if self.strikes >= self.config.fail_after and self.healthy:
            self._set_health(False, bad)
            self._schedule_restart(bad)

    def _set_health(self, healthy: bool, reasons: list[str]) -> None:
        self.healthy = healthy
        self.history.append({"t": self.reactor.seconds(), "healthy": healthy, "reasons": reasons})
        del self.history[:-20]
        if healthy:
            _log.info("encap watchdog: DN healthy again")
        else:
            _log.error("encap watchdog: DN unhealthy: {why}", why="; ".join(reasons))
        cluster = getattr(self.service.context, "cluster", None)
        health = getattr(cluster, "health", None)
        resources = [r for r in getattr(self.service, "_resources", ())
                     if r.startswith(f"encap:{self.service.context.node_id}:")]
        if health is not None and resources:
            for r in resources:
                if healthy:
                    health.unable.pop(r, None)
                else:
                    health.unable[r] = self.reactor.seconds() + 10 * self.backoff + 60
            changed = getattr(cluster, "changed", None)
            if changed is not None:
                changed()

    def _schedule_restart(self, reasons) -> None:
        if self._restarting is not None:
            return
        delay = self.backoff
        self.backoff = min(self.backoff * 2, self.config.restart_backoff_max_s)
        _log.warn("encap watchdog: restarting the DN in {d:.2f} s", d=delay)
        self._restarting = self.reactor.callLater(delay, self._do_restart)

    def _do_restart(self) -> None:
        self._restarting = None
        self.restarts += 1
        self.strikes = 0
        d = defer.maybeDeferred(self.restart)
        d.addErrback(lambda f: _log.failure("encap watchdog: restart failed", failure=f))

    def _restart_service(self):
        """Crash-only: stop the whole encap service, start it again (new
        sockets, new TUN fd, sessions rebuilt by the ENs' handshakes)."""
        svc = self.service
        d = defer.maybeDeferred(svc.stopService)
        d.addCallback(lambda _: svc.startService())
        return d

    def describe(self) -> dict:
        return {"healthy": self.healthy, "strikes": self.strikes, "reasons": self.reasons,
                "restarts": self.restarts, "next_backoff_s": self.backoff,
                "max_lag_ms": round(self.max_lag * 1000, 1), "history": self.history[-5:]}
