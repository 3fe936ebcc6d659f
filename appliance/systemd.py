"""sd_notify for ``Type=notify`` units, with the stdlib ``socket`` module only.

systemd passes ``$NOTIFY_SOCKET`` (an AF_UNIX datagram socket; a leading
``@`` means the abstract namespace) and, with ``WatchdogSec=``,
``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``).  :class:`SystemdNotifier` sends:

* ``READY=1`` once, when every child of the node was started (or failed);
* ``STATUS=...`` with the node's roles (``a: dhcp4 primary (NORMAL), sip owner,
  vip-dhcp owner``), again whenever that text changes (checked every second:
  a role change shows within a second);
* ``WATCHDOG=1`` from a reactor ``LoopingCall`` every half ``WATCHDOG_USEC``:
  the pings come from the reactor thread itself, so a reactor that hangs
  (a blocking call, a deadlock, an endless loop) stops them and systemd kills
  and restarts the process (``Restart=always``): crash-only;
* ``STOPPING=1`` when the node starts its shutdown.

Without ``$NOTIFY_SOCKET`` (not under systemd, tests, a shell) every call is a
no-op.  Sending never blocks: the socket is non-blocking and a datagram that
cannot be queued is dropped and counted (systemd reads them promptly).
"""

from __future__ import annotations

import os
import socket
from typing import Callable, Mapping

from twisted.internet import task
from twisted.logger import Logger

_log = Logger(namespace="appliance.systemd")

__all__ = ["SystemdNotifier", "notify_address", "watchdog_interval", "status_line"]

STATUS_EVERY_S = 1.0


def notify_address(environ: Mapping[str, str]) -> str | bytes | None:
    """The address in ``$NOTIFY_SOCKET`` (abstract ``@name`` -> ``b"\\0name"``)."""
    path = environ.get("NOTIFY_SOCKET") or None
    if path is None:
        return None
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    if not path.startswith("/"):
        return None          # vsock:... and the like are not for us
    return path


def watchdog_interval(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None.

    ``$WATCHDOG_PID``, when set, must be this process (as sd_watchdog_enabled(3)).
    """
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    wpid = environ.get("WATCHDOG_PID")
    if wpid:
        try:
            if int(wpid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return value / 1e6 / 2


def status_line(node_id: str, services: Mapping[str, Mapping],
                resources: Mapping[str, Mapping] | None = None) -> str:
    """``a: dhcp4 primary (NORMAL), sip owner, vip-dhcp owner``: each service's role
    (``failed``/``starting`` when not running) and each cluster resource this node
    owns.  One line: systemd shows it in ``systemctl status``."""
    parts = []
    for name, info in services.items():
        state = info.get("state")
        if state == "running":
            parts.append(f"{name} {info.get('role') or 'standalone'}")
        else:
            parts.append(f"{name} {state}")
    owned = [name for name, r in (resources or {}).items() if r.get("role") == "owner"
             and name not in services]
    parts += [f"{name} owner" for name in owned]
    text = f"{node_id}: " + (", ".join(parts) if parts else "no services")
    return " ".join(text.split())[:400]


def node_status_line(node) -> str:
    """The STATUS= text of an :class:`~appliance.node.ApplianceNode`."""
    services = {name: slot.describe() for name, slot in node.slots.items()}
    cluster = getattr(node, "cluster", None)
    resources = {}
    if cluster is not None:
        for name, res in getattr(cluster, "resources", {}).items():
            resources[name] = {"role": "owner" if getattr(res, "mine", None) is not None
                               else "standby"}
    text = status_line(node.config.node.id, services, resources)
    if cluster is not None and getattr(cluster, "maintenance", False):
        text += " [maintenance]"
    return text


class SystemdNotifier:
    """sd_notify(3) for one process.  ``status`` returns the current STATUS text."""

    def __init__(self, reactor, *, environ: Mapping[str, str] | None = None,
                 status: Callable[[], str] | None = None):
        env = os.environ if environ is None else environ
        self.reactor = reactor
        self.address = notify_address(env)
        self.interval = watchdog_interval(env) if self.address is not None else None
        self.status = status
        self.sent = {"READY": 0, "STATUS": 0, "WATCHDOG": 0, "STOPPING": 0}
        self.dropped = 0
        self.last_status: str | None = None
        self._sock: socket.socket | None = None
        self._watchdog: task.LoopingCall | None = None
        self._status_loop: task.LoopingCall | None = None
        self.ready_sent = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    # -- the wire ---------------------------------------------------------
    def send(self, *lines: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; False if not sent."""
        if self.address is None:
            return False
        if self._sock is None:
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
            except OSError as e:
                _log.warn("sd_notify: cannot create a socket: {why}", why=e)
                return False
            self._sock = sock
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except (BlockingIOError, OSError) as e:
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                _log.warn("sd_notify to {address!r} failed ({n} so far): {why}",
                          address=self.address, n=self.dropped, why=e)
            return False
        for line in lines:
            key = line.partition("=")[0]
            if key in self.sent:
                self.sent[key] += 1
        return True

    # -- what the node calls ----------------------------------------------
    def start(self) -> None:
        """The node starts: STATUS=starting, the watchdog pings begin (a start that
        hangs the reactor is a hang too)."""
        if self.address is None:
            return
        self.send("STATUS=starting")
        if self.interval is not None and self._watchdog is None:
            self._watchdog = task.LoopingCall(self.ping)
            self._watchdog.clock = self.reactor
            d = self._watchdog.start(self.interval, now=True)
            d.addErrback(lambda f: _log.failure("sd_notify watchdog loop stopped", f))

    def ping(self) -> None:
        self.send("WATCHDOG=1")

    def ready(self) -> None:
        """Every service was started (or failed): READY=1 with the first STATUS."""
        if self.address is None or self.ready_sent:
            return
        self.ready_sent = True
        text = self._status_text()
        self.last_status = text
        self.send("READY=1", f"STATUS={text}" if text else "STATUS=running")
        if self.status is not None and self._status_loop is None:
            self._status_loop = task.LoopingCall(self.refresh)
            self._status_loop.clock = self.reactor
            d = self._status_loop.start(STATUS_EVERY_S, now=False)
            d.addErrback(lambda f: _log.failure("sd_notify status loop stopped", f))

    def refresh(self) -> None:
        """Send STATUS= if the roles changed since the last one."""
        text = self._status_text()
        if text and text != self.last_status:
            self.last_status = text
            self.send(f"STATUS={text}")

    def stopping(self) -> None:
        """Shutdown begins: STOPPING=1.  The watchdog keeps pinging until the
        process exits (a shutdown that hangs the reactor is killed as well)."""
        if self.address is None:
            return
        if self._status_loop is not None and self._status_loop.running:
            self._status_loop.stop()
        self._status_loop = None
        self.send("STOPPING=1", "STATUS=stopping")

    def close(self) -> None:
        for loop in (self._watchdog, self._status_loop):
            if loop is not None and loop.running:
                loop.stop()
        self._watchdog = self._status_loop = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _status_text(self) -> str:
        if self.status is None:
            return ""
        try:
            return self.status()
        except Exception:
            _log.failure("sd_notify: building the STATUS line failed")
            return ""
