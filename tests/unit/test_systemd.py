"""sd_notify: READY after every service started, STATUS with roles, WATCHDOG from
the reactor, STOPPING at shutdown -- against a fake notify socket (an AF_UNIX
datagram socket the test binds), the node on a MemoryReactorClock."""

from __future__ import annotations

import os
import socket

import pytest
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from appliance.config import load_config
from appliance.node import ApplianceNode
from appliance.systemd import (SystemdNotifier, notify_address, status_line,
                               watchdog_interval)


@pytest.fixture
def notify_socket(tmp_path):
    """A bound AF_UNIX datagram socket standing in for systemd's."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    yield str(path), sock
    sock.close()


def received(sock) -> list[str]:
    """Every message queued on the fake socket (one string per datagram)."""
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def lines(messages: list[str]) -> list[str]:
    return [line for m in messages for line in m.split("\n")]


# -- the environment ------------------------------------------------------------
def test_no_notify_socket_is_a_no_op():
    """Outside systemd nothing is sent and nothing is scheduled."""
    clock = Clock()
    n = SystemdNotifier(clock, environ={"WATCHDOG_USEC": "1000000"})
    assert not n.enabled and n.interval is None
    n.start()
    n.ready()
    n.stopping()
    assert clock.getDelayedCalls() == []
    assert not n.send("READY=1")


def test_addresses_and_watchdog_interval():
    """Abstract sockets (@name), half of WATCHDOG_USEC, WATCHDOG_PID of another process."""
    assert notify_address({"NOTIFY_SOCKET": "@sd/notify"}) == b"\0sd/notify"
    assert notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify_address({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "20000000"}) == 10.0
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}) == 10.0
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
    assert watchdog_interval({}) is None


def test_status_line_names_roles_and_owned_resources():
    text = status_line("a", {"dhcp4": {"state": "running", "role": "primary (NORMAL)"},
                             "sip": {"state": "failed", "role": "standalone"}},
                       {"vip-dhcp": {"role": "owner"}, "vip-sip": {"role": "standby"}})
    assert text == "a: dhcp4 primary (NORMAL), sip failed, vip-dhcp owner"


# -- the notifier alone ----------------------------------------------------------
def test_watchdog_pings_every_half_interval(notify_socket):
    """WATCHDOG=1 at start and every WATCHDOG_USEC / 2 of reactor time; none
    while the reactor does not run its timers (a hung reactor)."""
    path, sock = notify_socket
    clock = Clock()
    n = SystemdNotifier(clock, environ={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    n.start()
    first = lines(received(sock))
    assert first.count("WATCHDOG=1") == 1 and "STATUS=starting" in first
    for _ in range(4):
        clock.advance(1.0)
    assert lines(received(sock)).count("WATCHDOG=1") == 4
    n.close()
    clock.advance(5.0)
    assert received(sock) == []


def test_send_never_blocks_when_the_receiver_is_full(notify_socket):
    """A receiver that does not read: datagrams are dropped and counted, no hang."""
    path, sock = notify_socket
    n = SystemdNotifier(Clock(), environ={"NOTIFY_SOCKET": path})
    for _ in range(5000):
        n.send("STATUS=" + "x" * 200)
    assert n.dropped > 0
    n.close()


# -- the node ------------------------------------------------------------------
class FakeStore(Service):
    backend = "memory"
    name = "store"
    healthy = True

    def describe(self):
        return {"backend": "memory", "healthy": True}


class SlowService(Service):
    """Starts when the test fires its Deferred; its role is settable."""

    def __init__(self, pending):
        self.pending = pending
        self.role = "primary (STARTUP)"

    def startService(self):
        super().startService()
        d = defer.Deferred()
        self.pending.append((self, d))
        return d


class SlowPlugin:
    description = "test"

    def __init__(self, name, pending):
        self.name, self.pending = name, pending

    def parse_config(self, table, context):
        return {}

    def make_service(self, config, context):
        return SlowService(self.pending)


@pytest.fixture
def node_world(tmp_path, notify_socket, monkeypatch):
    path, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    pending: list = []
    plugins = {n: SlowPlugin(n, pending) for n in ("dhcp4", "sip")}
    cfg = tmp_path / "node.toml"
    cfg.write_text(f"""
[node]
id = "a"
state_dir = "{tmp_path / 'state'}"
[admin]
listen = "tcp:0:interface=127.0.0.1"
token_file = "{tmp_path / 'admin.token'}"
[services.dhcp4]
[services.sip]
""")
    config = load_config(str(cfg), plugins)
    reactor = MemoryReactorClock()
    node = ApplianceNode(config, reactor, plugins, store=FakeStore())
    return node, reactor, sock, pending


def test_ready_only_after_every_service_started(node_world):
    """READY=1 comes once the last service's start fired, with the roles in STATUS."""
    node, reactor, sock, pending = node_world
    node.startService()
    assert not any("READY=1" in m for m in received(sock))
    svc, d = pending.pop(0)               # dhcp4 started; sip still starting
    d.callback(None)
    assert not any("READY=1" in m for m in received(sock))
    svc2, d2 = pending.pop(0)
    svc2.role = "owner"
    d2.callback(None)
    ready = [m for m in received(sock) if "READY=1" in m]
    assert len(ready) == 1
    assert "STATUS=a: dhcp4 primary (STARTUP), sip owner" in ready[0].split("\n")


def test_status_follows_role_changes_and_stopping(node_world):
    """A role change is sent as a new STATUS= line; shutdown sends STOPPING=1."""
    node, reactor, sock, pending = node_world
    node.startService()
    started = []
    while pending:
        svc, d = pending.pop(0)
        started.append(svc)
        d.callback(None)
    assert any("READY=1" in m for m in received(sock))
    started[0].role = "primary (NORMAL)"
    reactor.advance(1.5)
    msgs = lines(received(sock))
    assert "STATUS=a: dhcp4 primary (NORMAL), sip primary (STARTUP)" in msgs
    reactor.advance(1.5)                  # unchanged: not sent again
    assert not any(m.startswith("STATUS=") for m in lines(received(sock)))
    node.stopService()
    assert "STOPPING=1" in lines(received(sock))


def test_watchdog_pings_from_the_node_reactor(node_world):
    """The node starts the watchdog loop at start: pings every 2 s of its reactor."""
    node, reactor, sock, pending = node_world
    node.startService()
    assert "WATCHDOG=1" in lines(received(sock))
    reactor.advance(2.0)
    reactor.advance(2.0)
    assert lines(received(sock)).count("WATCHDOG=1") == 2
