"""Fencing before a takeover: the ``[cluster] pre_takeover`` hook (review M13).

Pacemaker fences (STONITH) a node it judged dead before it recovers that
node's resources.  Here, with ``pre_takeover = { command = [...], timeout_s }``
configured, a node that is about to claim a resource whose last known owner
is a peer it judged dead first runs the command (argv, never a shell) with
two more arguments, the dead peer's id and the resource's name, and the
environment ``APPLIANCE_NODE``, ``APPLIANCE_PEER``, ``APPLIANCE_RESOURCE``::

    /usr/local/sbin/fence-peer --hard b vip1

Exit status 0 within ``timeout_s``: the peer is fenced, every resource it
owned may be taken (one fence per death, not one per resource).  Anything
else -- a non-zero exit, a signal, a command that cannot be started, the
timeout (the command is then killed) -- means *no takeover*: the reason is
logged, shown in ``cluster.status`` (``fencing``), and the fence is retried
after ``retry_s`` (1 s, doubling up to 30 s).  A peer heard alive again
needs a new fence after its next death.  Nothing blocks the reactor: the
command runs as a child process (``reactor.spawnProcess``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet import defer, error, protocol
from twisted.logger import Logger

_log = Logger(namespace="appliance.cluster")

RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0
_OUTPUT_KEEP = 400          # bytes of the command's output kept for the log/status


class FenceFailed(Exception):
    """The fence command did not confirm (the message says why)."""


class _FenceProcess(protocol.ProcessProtocol):
    def __init__(self, done: defer.Deferred, timeout_s: float, clock):
        self.done = done
        self.output = b""
        self.timed_out = False
        self.timer = clock.callLater(timeout_s, self._timeout)
        self.timeout_s = timeout_s

    def _timeout(self):
        self.timed_out = True
        try:
            self.transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    def outReceived(self, data: bytes):
        self.output = (self.output + data)[-_OUTPUT_KEEP:]

    errReceived = outReceived

    def processEnded(self, reason):
        if self.timer.active():
            self.timer.cancel()
        text = self.output.decode("utf-8", "replace").strip()
        tail = f": {text}" if text else ""
        if self.timed_out:
            self.done.errback(FenceFailed(f"timed out after {self.timeout_s:g} s (killed){tail}"))
            return
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        if code == 0:
            self.done.callback(text)
        elif sig is not None:
            self.done.errback(FenceFailed(f"killed by signal {sig}{tail}"))
        else:
            self.done.errback(FenceFailed(f"exit status {code}{tail}"))


def spawn_fence(reactor, clock, argv: list[str], env: dict[str, str],
                timeout_s: float) -> defer.Deferred:
    """Run ``argv`` as a child process; fires with its output on exit status 0,
    fails with :class:`FenceFailed` otherwise (also on timeout, after a KILL)."""
    done: defer.Deferred = defer.Deferred()
    proto = _FenceProcess(done, timeout_s, clock)
    try:
        reactor.spawnProcess(proto, argv[0], argv, env={**os.environ, **env})
    except Exception as e:          # not executable, no such file, ...
        if proto.timer.active():
            proto.timer.cancel()
        return defer.fail(FenceFailed(f"could not start {argv[0]}: {e}"))
    return done


@dataclass
class _PeerFence:
    state: str = "none"         # none | running | fenced | failed
    attempts: int = 0
    error: str | None = None
    retry_at: float = 0.0
    fenced_at: float | None = None
    resource: str | None = None
    retry_timer: Any = field(default=None, repr=False)


class Fencer:
    """Per-peer fence state: :meth:`cleared` says whether a resource last owned
    by a dead ``peer`` may be claimed now, starting the fence if needed."""

    def __init__(self, clock, node_id: str, command, timeout_s: float, *,
                 run: Callable[[list[str], dict[str, str], float], defer.Deferred] | None = None,
                 reactor=None, on_change: Callable[[], None] = lambda: None):
        self.clock = clock
        self.node_id = node_id
        self.command = list(command)
        self.timeout_s = float(timeout_s)
        self.on_change = on_change
        if run is None:
            run = (lambda argv, env, timeout: spawn_fence(reactor, clock, argv, env, timeout))
        self.run = run
        self.peers: dict[str, _PeerFence] = {}
        self.stats = {"fences": 0, "fence_failures": 0}

    def cleared(self, peer: str, resource: str) -> bool:
        """True once ``peer`` (judged dead) is fenced since it was last heard;
        otherwise start (or keep waiting for) the fence and return False."""
        st = self.peers.setdefault(peer, _PeerFence())
        if st.state == "fenced":
            return True
        if st.state == "running":
            return False
        now = self.clock.seconds()
        if st.state == "failed" and now < st.retry_at:
            return False
        self._start(peer, resource, st)
        return st.state == "fenced"

    def alive(self, peer: str) -> None:
        """``peer`` is heard again: its next death needs a new fence."""
        st = self.peers.get(peer)
        if st is None or st.state == "none":
            return
        if st.retry_timer is not None and st.retry_timer.active():
            st.retry_timer.cancel()
        self.peers.pop(peer, None)       # a fence still running no longer counts

    def _start(self, peer: str, resource: str, st: _PeerFence):
        st.state, st.resource = "running", resource
        st.attempts += 1
        argv = self.command + [peer, resource]
        env = {"APPLIANCE_NODE": self.node_id, "APPLIANCE_PEER": peer,
               "APPLIANCE_RESOURCE": resource}
        _log.warn("cluster: fencing {peer} before taking over {res} (pre_takeover, attempt "
                  "{n}): {argv}", peer=peer, res=resource, n=st.attempts, argv=" ".join(argv))
        try:
            d = defer.maybeDeferred(self.run, argv, env, self.timeout_s)
        except Exception as e:      # pragma: no cover (maybeDeferred catches)
            d = defer.fail(e)
        d.addCallbacks(self._ok, self._failed, callbackArgs=(peer, st),
                       errbackArgs=(peer, st))
        d.addErrback(lambda f: _log.failure("fence bookkeeping failed", failure=f))

    def _ok(self, _output, peer: str, st: _PeerFence):
        if self.peers.get(peer) is not st or st.state != "running":
            return                  # the peer came back meanwhile: not a fence of this death
        st.state, st.error = "fenced", None
        st.fenced_at = self.clock.seconds()
        self.stats["fences"] += 1
        _log.warn("cluster: {peer} fenced (pre_takeover exit 0): taking over its resources",
                  peer=peer)
        self.on_change()

    def _failed(self, failure, peer: str, st: _PeerFence):
        why = (failure.getErrorMessage() if failure.check(FenceFailed)
               else f"{failure.type.__name__}: {failure.getErrorMessage()}")
        if self.peers.get(peer) is not st or st.state != "running":
            return
        backoff = min(RETRY_FIRST_S * 2 ** (st.attempts - 1), RETRY_MAX_S)
        st.state, st.error = "failed", why
        st.retry_at = self.clock.seconds() + backoff
        self.stats["fence_failures"] += 1
        _log.error("cluster: fencing {peer} failed ({why}): NOT taking over {res}; retry in "
                   "{backoff:g} s", peer=peer, why=why, res=st.resource, backoff=backoff)
        st.retry_timer = self.clock.callLater(backoff, self.on_change)

    def status(self, now: float) -> dict[str, dict]:
        out = {}
        for peer, st in sorted(self.peers.items()):
            entry: dict[str, Any] = {"state": st.state, "attempts": st.attempts}
            if st.error:
                entry["error"] = st.error
            if st.state == "failed":
                entry["retry_in_s"] = round(max(0.0, st.retry_at - now), 3)
            if st.fenced_at is not None:
                entry["fenced_s_ago"] = round(now - st.fenced_at, 3)
            out[peer] = entry
        return out
