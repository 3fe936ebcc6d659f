"""A real ``twistd -n appliance`` under a fake systemd notify socket.

The test binds an AF_UNIX datagram socket, starts the node with
``$NOTIFY_SOCKET`` / ``$WATCHDOG_USEC`` pointing at it and reads what arrives:
READY=1 only once the services run (the STATUS line sent with it names them),
WATCHDOG=1 pings that stop while the reactor is blocked (a ``time.sleep`` the
launcher schedules on the reactor when the test creates a trigger file), and
STOPPING=1 at SIGTERM.  No systemd needed.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.node_process import env_with_dropins, free_port

LAUNCHER = """
import sys, time
from twisted.internet import reactor, task
trigger, hang_s = sys.argv[1], float(sys.argv[2])
def check():
    import os
    if os.path.exists(trigger):
        os.unlink(trigger)
        time.sleep(hang_s)          # the reactor hangs: no timers, no pings
task.LoopingCall(check).start(0.05)
from twisted.scripts.twistd import run
sys.argv = ["twistd"] + sys.argv[3:]
run()
"""


def read_until(sock, pred, timeout: float) -> list[tuple[float, str]]:
    """Datagrams (arrival time, line) until ``pred(lines)`` or the timeout."""
    out: list[tuple[float, str]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536).decode()
        except (socket.timeout, TimeoutError):
            break
        now = time.monotonic()
        out += [(now, line) for line in data.split("\n")]
        if pred([line for _, line in out]):
            break
    return out


@pytest.fixture
def node(tmp_path):
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    port = free_port()
    state = tmp_path / "state"
    cfg = tmp_path / "node.toml"
    cfg.write_text(f"""
[node]
id = "a"
state_dir = "{state}"
[admin]
listen = "tcp:{port}:interface=127.0.0.1"
token_file = "{state / 'admin.token'}"
[services.testecho]
message = "hi"
""")
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    trigger = tmp_path / "hang"
    env = env_with_dropins()
    env.update(NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="400000")   # pings every 0.2 s
    env.pop("WATCHDOG_PID", None)
    log = open(tmp_path / "twistd.log", "w")
    proc = subprocess.Popen([sys.executable, str(launcher), str(trigger), "4",
                             "-n", "--pidfile=", "appliance", "-c", str(cfg)],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    yield proc, sock, trigger, state, tmp_path
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    log.close()
    sock.close()


def _log(tmp_path: Path) -> str:
    return (tmp_path / "twistd.log").read_text()


def test_ready_after_services_watchdog_stops_when_reactor_hangs(node):
    proc, sock, trigger, state, tmp_path = node
    got = read_until(sock, lambda ls: "READY=1" in ls, 30)
    lines = [line for _, line in got]
    assert "READY=1" in lines, _log(tmp_path)
    # READY came with the services running: its STATUS names testecho's role,
    # and the service had written its start key to the store by then
    i = lines.index("READY=1")
    status = [line for line in lines[i:] if line.startswith("STATUS=")][0]
    assert status == "STATUS=a: testecho active", status
    assert lines.index("STATUS=starting") < i
    # pings keep coming while the reactor runs
    got = read_until(sock, lambda ls: ls.count("WATCHDOG=1") >= 5, 10)
    assert [line for _, line in got].count("WATCHDOG=1") >= 5
    # block the reactor for 4 s: no ping for (at least most of) that time
    trigger.touch()
    while trigger.exists():
        time.sleep(0.01)
    hang_started = time.monotonic()
    got = read_until(sock, lambda ls: False, 2.5)
    during = [t for t, line in got if line == "WATCHDOG=1" and t - hang_started > 0.3]
    assert during == [], f"watchdog pinged while the reactor was blocked: {len(during)}"
    assert proc.poll() is None
    # the reactor comes back: pings again (systemd would have killed it by then)
    got = read_until(sock, lambda ls: ls.count("WATCHDOG=1") >= 2, 10)
    assert [line for _, line in got].count("WATCHDOG=1") >= 2
    proc.send_signal(signal.SIGTERM)
    got = read_until(sock, lambda ls: "STOPPING=1" in ls, 15)
    assert "STOPPING=1" in [line for _, line in got]
    assert proc.wait(15) in (0, -signal.SIGTERM)   # twistd re-raises the signal it stopped on
