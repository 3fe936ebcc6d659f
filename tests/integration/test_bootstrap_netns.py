"""Two boxes as two network namespaces (a 10.77.0.1, b 10.77.0.2 on one bridge),
set up with the shipped defaults of ``appliancectl cluster init`` / ``join``
(ports 8740-8743): init on a, join from b over the bridge, both configs pass
``twistd appliance --check``, both nodes run and see each other."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.support.cluster_lab import wait_for
from tests.support.node_process import env_with_dropins, twistd_command
from tests.support.require import require_root


def test_init_and_join_between_namespaces(two_nodes_lab, tmp_path):
    require_root()
    lab = two_nodes_lab
    env = env_with_dropins()
    ctl = [sys.executable, "-m", "appliance.admin.ctl"]
    init = lab.popen("a", *ctl, "cluster", "init", "--dir", str(tmp_path / "a"), "--node-id",
                     "a", "--address", "10.77.0.1", "--state-dir", str(tmp_path / "state-a"),
                     "--token-ttl", "60", text=True, env=env, cwd=tmp_path)
    token = None
    deadline = time.monotonic() + 30
    while token is None and time.monotonic() < deadline:
        line = init.stdout.readline()
        if not line:
            break
        if line.startswith("apj1."):
            token = line.strip()
    assert token, init.stderr.read()
    joined = subprocess.run(["ip", "netns", "exec", lab.ns_name("b"), *ctl, "cluster", "join",
                             token, "10.77.0.1", "--dir", str(tmp_path / "b"), "--node-id", "b",
                             "--address", "10.77.0.2", "--state-dir", str(tmp_path / "state-b")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert joined.returncode == 0, joined.stderr
    assert init.wait(30) == 0, init.stderr.read()
    cfg = {me: str(tmp_path / me / "appliance.toml") for me in ("a", "b")}
    for me in ("a", "b"):
        check = subprocess.run(twistd_command() + ["-c", cfg[me], "--check"],
                               capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
    for me in ("a", "b"):
        lab.popen(me, *twistd_command(), "-c", cfg[me], env=env, cwd=tmp_path,
                  stdout=open(tmp_path / f"{me}.log", "w"), stderr=subprocess.STDOUT)

    def view(me):
        r = lab.run(me, *ctl, "--config", cfg[me], "--json", "cluster", check=False,
                    timeout=15)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def both_up():
        va, vb = view("a"), view("b")
        return bool(va and vb and va["peers"]["b"]["alive"] and vb["peers"]["a"]["alive"]
                    and va["peer_link"]["b"]["connected"] and vb["peer_link"]["a"]["connected"])

    try:
        wait_for(both_up, 40, "the joined nodes to see each other")
    except AssertionError:
        raise AssertionError("\n".join((tmp_path / f"{m}.log").read_text()[-2000:]
                                       for m in ("a", "b")))
