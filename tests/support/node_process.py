"""Run a real ``twistd -n appliance`` node as a subprocess for tests.

The node gets its own config file, state dir and a free loopback port; the
test talks to it with ``appliancectl`` (also a subprocess) or plain HTTP.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DROPINS = ROOT / "tests" / "support" / "dropins"


def stored_string(state_dir: Path, key: str) -> str | None:
    """A string key as the node's store left it on disk (read after the node exited).

    The embedded store keeps ``<state_dir>/store.sqlite3`` (table ``keys``);
    read with the ``sqlite3`` module, so nothing of the store is imported.
    """
    import sqlite3
    db = Path(state_dir) / "store.sqlite3"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM keys WHERE key = ? AND kind = 's'",
                           (key,)).fetchone()
    finally:
        conn.close()
    return row[0] if row else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def twistd_command() -> list[str]:
    twistd = shutil.which("twistd")
    base = [twistd] if twistd else [sys.executable, "-m", "twisted"]
    return base + ["-n", "--pidfile=", "appliance"]


def env_with_dropins() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(DROPINS), str(ROOT),
                                                    env.get("PYTHONPATH")) if p)
    return env


class NodeProcess:
    """A twistd node; ``start()`` waits until its admin endpoint answers."""

    def __init__(self, tmp_path: Path, body: str, node_id: str = "t1", port: int | None = None):
        self.tmp = tmp_path
        self.port = port or free_port()
        self.state_dir = tmp_path / "state"
        self.token_file = self.state_dir / "admin.token"
        self.config = tmp_path / "node.toml"
        self.config.write_text(f"""
[node]
id = "{node_id}"
state_dir = "{self.state_dir}"

[admin]
listen = "tcp:{self.port}:interface=127.0.0.1"
token_file = "{self.token_file}"
""" + body)
        self.proc: subprocess.Popen | None = None
        self.log = tmp_path / "twistd.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/rpc"

    def start(self, timeout: float = 20.0) -> "NodeProcess":
        self._logfh = open(self.log, "w")
        self.proc = subprocess.Popen(twistd_command() + ["-c", str(self.config)],
                                     cwd=self.tmp, env=env_with_dropins(),
                                     stdout=self._logfh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.output()}")
            if self.token_file.exists():
                try:
                    self.rpc("system.version")
                    return self
                except OSError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"node did not answer within {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def token(self) -> str:
        return self.token_file.read_text().strip()

    def rpc(self, method: str, params=None):
        """Call one JSON-RPC method; return the whole response object."""
        body = {"jsonrpc": "2.0", "id": 1, "method": method}
        if params is not None:
            body["params"] = params
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {self.token()}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())

    def rpc_batch(self, batch: list, timeout: float = 15) -> list:
        """Send one JSON-RPC batch; return the list of responses."""
        req = urllib.request.Request(self.url, data=json.dumps(batch).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {self.token()}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def ctl(self, *args: str, timeout: float = 15) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "appliance.admin.ctl", "--url", self.url,
               "--token-file", str(self.token_file), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=env_with_dropins(), cwd=self.tmp)

    def terminate(self, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._logfh.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if hasattr(self, "_logfh"):
            self._logfh.close()
