"""Two boxes on loopback (127.0.0.1 / 127.0.0.2) set up only with
``appliancectl cluster init`` and ``appliancectl cluster join``: both configs
pass ``twistd appliance --check`` and the two nodes form a cluster
(heartbeats with the shared HMAC key, the mutual-TLS peer link with the CA)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.support.cluster_lab import wait_for
from tests.support.node_process import env_with_dropins, free_port, twistd_command


def ctl(*args, cwd, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance.admin.ctl", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env=env_with_dropins(), cwd=cwd)


def rpc(port: int, token_file: Path, method: str):
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/rpc", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {token_file.read_text().strip()}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())["result"]


def test_init_join_check_and_form_a_cluster(tmp_path):
    join_port, hb, link = free_port(), free_port(), free_port()
    admin = {"a": free_port(), "b": free_port()}
    addr = {"a": "127.0.0.1", "b": "127.0.0.2"}
    env = env_with_dropins()
    init = subprocess.Popen(
        [sys.executable, "-m", "appliance.admin.ctl", "cluster", "init", "--dir",
         str(tmp_path / "a"), "--node-id", "a", "--address", addr["a"], "--state-dir",
         str(tmp_path / "state-a"), "--admin-listen", f"tcp:{admin['a']}:interface=127.0.0.1",
         "--join-port", str(join_port), "--heartbeat-port", str(hb), "--peer-link-port",
         str(link), "--token-ttl", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    procs = [init]
    try:
        token = None
        deadline = time.monotonic() + 30
        while token is None and time.monotonic() < deadline:
            line = init.stdout.readline()
            if not line:
                break
            if line.startswith("apj1."):
                token = line.strip()
        assert token, init.stderr.read()
        joined = ctl("cluster", "join", token, f"127.0.0.1:{join_port}", "--dir",
                     str(tmp_path / "b"), "--node-id", "b", "--address", addr["b"],
                     "--state-dir", str(tmp_path / "state-b"), "--admin-listen",
                     f"tcp:{admin['b']}:interface=127.0.0.1", cwd=tmp_path)
        assert joined.returncode == 0, joined.stderr
        out, err = init.communicate(timeout=30)
        assert init.returncode == 0, err
        assert "node b (127.0.0.2) joined" in out
        # the token is single use: a second join is refused (nobody serves it now either)
        again = ctl("cluster", "join", token, f"127.0.0.1:{join_port}", "--dir",
                    str(tmp_path / "c"), "--node-id", "c", "--address", "127.0.0.3",
                    cwd=tmp_path, timeout=30)
        assert again.returncode != 0
        for me in ("a", "b"):
            cfg = tmp_path / me / "appliance.toml"
            check = subprocess.run(twistd_command() + ["-c", str(cfg), "--check"],
                                   capture_output=True, text=True, env=env, cwd=tmp_path,
                                   timeout=60)
            assert check.returncode == 0, check.stdout + check.stderr
            assert f"node {me}" in check.stdout
        # both nodes run and see each other
        logs = {}
        for me in ("a", "b"):
            logs[me] = open(tmp_path / f"{me}.log", "w")
            procs.append(subprocess.Popen(twistd_command() + ["-c", str(tmp_path / me /
                                                                         "appliance.toml")],
                                          cwd=tmp_path, env=env, stdout=logs[me],
                                          stderr=subprocess.STDOUT))
        tokens = {me: tmp_path / f"state-{me}" / "admin.token" for me in ("a", "b")}

        def both_up():
            try:
                sa = rpc(admin["a"], tokens["a"], "cluster.status")
                sb = rpc(admin["b"], tokens["b"], "cluster.status")
            except OSError:
                return False
            return (sa["peers"]["b"]["alive"] and sb["peers"]["a"]["alive"]
                    and sa["peer_link"]["b"]["connected"] and sb["peer_link"]["a"]["connected"])

        try:
            wait_for(both_up, 30, "heartbeats and the peer link between the joined nodes")
        except AssertionError:
            raise AssertionError("\n".join((tmp_path / f"{m}.log").read_text()[-3000:]
                                           for m in ("a", "b")))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
