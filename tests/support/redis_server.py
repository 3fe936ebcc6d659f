"""A real ``redis-server`` (and optionally ``redis-sentinel``) on loopback for tests.

The server runs from a temporary directory with its own config (no
daemonizing) on a free port of 127.0.0.1.  ``persistence``: ``"aof"`` (the
default: ``appendonly yes``, ``appendfsync everysec``, no RDB -- a kill -9 and
restart keeps the data, like a well-configured production Redis, except
when a slow background fsync makes Redis postpone the AOF write by up to 2 s:
then an acknowledged write can die with the process), ``"aof-always"``
(``appendfsync always``: every acknowledged write is in the file; what tests
that kill -9 Redis and check the data need), ``"none"``
(``save ""``, ``appendonly no``: a restart comes back empty) or
``"default"`` (Redis' shipped defaults: RDB snapshots only).  This module
must not import pytest: ``bench/store.py`` uses it after ``pip install .``.  ``kill()`` sends
SIGKILL (an outage as abrupt as a crash), ``restart()`` brings it back on the
same port, ``stop()`` ends it for good.  Only processes started here are ever
signalled, by their own pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.server_process import ServerProcess


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_ping(port: int, password: str | None = None, timeout: float = 0.5) -> str | None:
    """Send PING over a raw socket; return the reply line or None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            if password:
                pw = password.encode()
                s.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw))
                if not s.recv(64).startswith(b"+OK"):
                    return None
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).decode(errors="replace").strip()
    except OSError:
        return None


def _encode_command(*args: str) -> bytes:
    payload = b"*%d\r\n" % len(args)
    for a in args:
        b = a.encode()
        payload += b"$%d\r\n%s\r\n" % (len(b), b)
    return payload


def redis_command(port: int, *args: str, timeout: float = 1.0,
                  password: str | None = None) -> bytes:
    """One command over a raw socket (test helper); returns the raw reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        if password:
            s.sendall(_encode_command("AUTH", password))
            reply = s.recv(64)
            if not reply.startswith(b"+OK"):
                return reply
        s.sendall(_encode_command(*args))
        return s.recv(65536)



class RedisServer(ServerProcess):
    """One redis-server process on 127.0.0.1:<port>."""

    def __init__(self, binary: str = "redis-server", *, port: int | None = None,
                 workdir: str | Path | None = None, password: str | None = None,
                 extra_config: str = "", sentinel: bool = False, persistence: str = "aof"):
        if persistence not in ("aof", "aof-always", "none", "default"):
            raise ValueError(
                f"persistence must be aof, aof-always, none or default, not {persistence!r}")
        self.persistence = persistence
        self.binary = shutil.which(binary) or binary
        self.port = port or free_port()
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="redis-test-"))
        self.password = password
        self.extra_config = extra_config
        self.sentinel = sentinel
        self.proc: subprocess.Popen | None = None
        self.config_path = self.dir / ("sentinel.conf" if sentinel else "redis.conf")
        self.log_path = self.dir / ("sentinel.log" if sentinel else "redis.log")

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write_config(self):
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            "daemonize no",
            f'dir "{self.dir}"',
            f'logfile "{self.log_path}"',
        ]
        if not self.sentinel:
            if self.persistence == "none":
                lines += ['save ""', "appendonly no"]
            elif self.persistence == "aof":
                lines += ['save ""', "appendonly yes", "appendfsync everysec"]
            elif self.persistence == "aof-always":
                lines += ['save ""', "appendonly yes", "appendfsync always"]
            lines += ["protected-mode yes", "databases 16", "tcp-keepalive 0"]
            if self.password:
                lines.append(f"requirepass {self.password}")
        lines.append(self.extra_config)
        # Sentinel rewrites its config file: write it afresh on every start
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> "RedisServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        self._write_config()
        args = [self.binary, str(self.config_path)]
        if self.sentinel:
            args.append("--sentinel")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, cwd=self.dir)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.binary} exited with {self.proc.returncode}: "
                                   f"{self.log_tail()}")
            reply = _redis_ping(self.port, None if self.sentinel else self.password)
            if reply is not None and reply.startswith("+PONG"):
                return
            time.sleep(0.02)
        raise RuntimeError(f"{self.binary} on port {self.port} did not answer PING within "
                           f"{timeout} s: {self.log_tail()}")

    def freeze(self):
        """SIGSTOP the server: connections stay open but nothing is answered."""
        if self.alive:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self):
        """SIGCONT a frozen server."""
        if self.alive:
            os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self, timeout: float = 10.0) -> "RedisServer":
        """Start again on the same port (killing a still-running instance first)."""
        self.kill()
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.start(timeout=max(1.0, deadline - time.monotonic()))
            except RuntimeError:
                # the port may linger for a moment after a kill
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self):
        """Terminate the server (SIGTERM, then SIGKILL) and remove its directory."""
        if self.alive:
            self.thaw()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class SentinelSetup:
    """A master redis-server, ``replicas`` replicas of it and one redis-sentinel
    monitoring it, on loopback.  ``down_after_ms`` is Sentinel's
    down-after-milliseconds (how long a dead master goes unnoticed)."""

    def __init__(self, master_name: str = "appliance-test", *, quorum: int = 1,
                 replicas: int = 0, down_after_ms: int = 1000):
        self.master_name = master_name
        self.dir = Path(tempfile.mkdtemp(prefix="redis-sentinel-test-"))
        (self.dir / "master").mkdir()
        (self.dir / "sentinel").mkdir()
        self.master = RedisServer("redis-server", workdir=self.dir / "master")
        self.replicas = []
        for i in range(replicas):
            (self.dir / f"replica{i}").mkdir()
            r = RedisServer("redis-server", workdir=self.dir / f"replica{i}")
            r.extra_config = f"replicaof 127.0.0.1 {self.master.port}\nrepl-ping-replica-period 1"
            self.replicas.append(r)
        self.sentinel = RedisServer(
            shutil.which("redis-sentinel") or "redis-sentinel", workdir=self.dir / "sentinel",
            sentinel=True)
        self.sentinel.extra_config = "\n".join([
            f"sentinel monitor {master_name} 127.0.0.1 {self.master.port} {quorum}",
            f"sentinel down-after-milliseconds {master_name} {down_after_ms}",
            f"sentinel failover-timeout {master_name} 3000",
        ])

    @property
    def sentinels(self) -> tuple[str, ...]:
        return (self.sentinel.address,)

    def start(self) -> "SentinelSetup":
        self.master.start()
        for r in self.replicas:
            r.start()
        self.wait_replicas(len(self.replicas))
        self.sentinel.start()
        # wait until the sentinel knows the master
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                reply = redis_command(self.sentinel.port, "SENTINEL",
                                      "get-master-addr-by-name", self.master_name)
            except OSError:
                reply = b""
            if str(self.master.port).encode() in reply and \
                    self._sentinel_knows_replicas() >= len(self.replicas):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"sentinel does not know {self.master_name}: "
                           f"{self.sentinel.log_tail()}")

    def _sentinel_knows_replicas(self) -> int:
        if not self.replicas:
            return 0
        try:
            reply = redis_command(self.sentinel.port, "SENTINEL", "REPLICAS", self.master_name)
        except OSError:
            return 0
        return reply.count(b"\r\nslave\r\n")

    def wait_replicas(self, n: int, timeout: float = 10.0) -> None:
        """Wait until the master reports ``n`` replicas online."""
        deadline = time.monotonic() + timeout
        while n:
            try:
                reply = redis_command(self.master.port, "INFO", "replication")
            except OSError:
                reply = b""
            if f"connected_slaves:{n}".encode() in reply and reply.count(b"state=online") >= n:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"master has not {n} replicas online: {reply[-300:]!r}")
            time.sleep(0.05)

    def master_port(self) -> int | None:
        """The master's port as the sentinel reports it now."""
        try:
            reply = redis_command(self.sentinel.port, "SENTINEL", "get-master-addr-by-name",
                                  self.master_name)
        except OSError:
            return None
        parts = [p for p in reply.split(b"\r\n") if p and not p[:1] in (b"*", b"$")]
        return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None

    def stop(self):
        self.sentinel.stop()
        for r in self.replicas:
            r.stop()
        self.master.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
